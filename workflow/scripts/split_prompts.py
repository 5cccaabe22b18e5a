"""Adapter for rule split_prompts: validate the prompt sheet and write one Parquet per shard."""

from actdiff.warm import hand_over

hand_over()  # in a fork of the run's warm process, where there is one (actdiff.warm)

from actdiff.pipeline import split_prompts
from actdiff.workflow_support import run

run(
    snakemake,  # noqa: F821
    split_prompts,
    sheet=snakemake.input.sheet,  # noqa: F821
    n_shards=snakemake.params.n_shards,  # noqa: F821
    outputs=list(snakemake.output.shards),  # noqa: F821
)
