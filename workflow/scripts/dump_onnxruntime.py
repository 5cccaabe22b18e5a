"""Adapter for rule dump_onnxruntime: record every canonical node ONNX Runtime computes for one shard."""

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
    side="onnxruntime",
    variant=snakemake.wildcards.variant,  # noqa: F821
    shard=int(snakemake.wildcards.shard),  # noqa: F821
    compression=snakemake.params.compression,  # noqa: F821
    model_file=snakemake.input.onnx,  # noqa: F821
    level=snakemake.params.level,  # noqa: F821
    threads=snakemake.threads,  # noqa: F821
    batch_size=snakemake.params.batch_size,  # noqa: F821
    engine_ids="reference",  # ORT has no tokenizer: it runs on the reference's ids
)
