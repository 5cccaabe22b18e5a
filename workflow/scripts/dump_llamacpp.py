"""Adapter for rule dump_llamacpp: record every mapped node of llama.cpp for one shard and variant."""

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
    side="llamacpp",
    variant=snakemake.wildcards.variant,  # noqa: F821
    shard=int(snakemake.wildcards.shard),  # noqa: F821
    compression=snakemake.params.compression,  # noqa: F821
    gguf=snakemake.input.gguf,  # noqa: F821
    engine_ids=snakemake.params.engine_ids,  # noqa: F821
    threads=snakemake.threads,  # noqa: F821
)
