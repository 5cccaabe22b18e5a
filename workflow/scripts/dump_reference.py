"""Adapter for rule dump_reference: record every node of the fp32 reference for one shard."""

from actdiff.warm import hand_over

hand_over()  # in a fork of the run's warm process, where there is one (actdiff.warm)

from actdiff.layout import REFERENCE_SIDE, REFERENCE_VARIANT
from actdiff.pipeline import dump
from actdiff.workflow_support import run

run(
    snakemake,  # noqa: F821
    dump,
    model_json=snakemake.input.model,  # noqa: F821
    tokens=snakemake.input.tokens,  # noqa: F821
    out=snakemake.output.h5,  # noqa: F821
    side=REFERENCE_SIDE,
    variant=REFERENCE_VARIANT,
    shard=int(snakemake.wildcards.shard),  # noqa: F821
    compression=snakemake.params.compression,  # noqa: F821
    impl=snakemake.params.impl,  # noqa: F821
    batch_size=snakemake.params.batch_size,  # noqa: F821
    allow_pickle=snakemake.params.allow_pickle,  # noqa: F821
    device=snakemake.params.device,  # noqa: F821
    allow_tf32=snakemake.params.allow_tf32,  # noqa: F821
    device_batch_size=dict(snakemake.params.device_batch_size),  # noqa: F821
)
