"""Adapter for rule tokenize: token ids for one shard (transformers, tokenizers, the engine's own)."""

from actdiff.warm import hand_over

hand_over()  # in a fork of the run's warm process, where there is one (actdiff.warm)

from actdiff.pipeline import tokenize
from actdiff.workflow_support import run

run(
    snakemake,  # noqa: F821
    tokenize,
    model_json=snakemake.input.model,  # noqa: F821
    prompts=snakemake.input.prompts,  # noqa: F821
    max_length=snakemake.params.max_length,  # noqa: F821
    out=snakemake.output.tokens,  # noqa: F821
    engine_side=snakemake.params.engine_side,  # noqa: F821
    engine_target=snakemake.params.engine_target,  # noqa: F821
)
