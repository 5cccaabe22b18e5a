"""Adapter for rule dump_import: an outside engine (config kind import) over one shard, imported."""

from actdiff.warm import hand_over

hand_over()  # in a fork of the run's warm process, where there is one (actdiff.warm)

from actdiff.pipeline import dump_import
from actdiff.workflow_support import run

run(
    snakemake,  # noqa: F821
    dump_import,
    model_json=snakemake.input.model,  # noqa: F821
    tokens=snakemake.input.tokens,  # noqa: F821
    out=snakemake.output.h5,  # noqa: F821
    record_json=snakemake.output.record,  # noqa: F821
    engine=dict(snakemake.params.engine),  # noqa: F821
    variant=snakemake.wildcards.variant,  # noqa: F821
    shard=int(snakemake.wildcards.shard),  # noqa: F821
    compression=snakemake.params.compression,  # noqa: F821
)
