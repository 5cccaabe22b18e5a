"""Adapter for rule dump_engine: record every node of the actdiff engine for one shard and variant."""

from actdiff.warm import hand_over

hand_over()  # in a fork of the run's warm process, where there is one (actdiff.warm)

from actdiff.pipeline import dump
from actdiff.workflow_support import run

run(
    snakemake,  # noqa: F821
    dump,
    model_json=snakemake.input.model,  # noqa: F821
    tokens=snakemake.input.tokens,  # noqa: F821
    out=snakemake.output.h5,  # noqa: F821
    side="actdiff",
    variant=snakemake.wildcards.variant,  # noqa: F821
    shard=int(snakemake.wildcards.shard),  # noqa: F821
    compression=snakemake.params.compression,  # noqa: F821
    fault_aliases=dict(snakemake.params.fault_aliases),  # noqa: F821
    engine_ids=snakemake.params.engine_ids,  # noqa: F821
    batch_size=snakemake.params.batch_size,  # noqa: F821
    threads=snakemake.threads,  # noqa: F821
)
