"""Adapter for rule generate_model: build an embedded default model from its seed."""

from actdiff.warm import hand_over

hand_over()  # in a fork of the run's warm process, where there is one (actdiff.warm)

from actdiff.pipeline import generate_model
from actdiff.workflow_support import run

run(
    snakemake,  # noqa: F821
    generate_model,
    kind=snakemake.params.kind,  # noqa: F821
    out_dir=str(snakemake.output.config).rsplit("/", 1)[0],  # noqa: F821
    text_file=snakemake.input.text,  # noqa: F821
    seed=snakemake.params.seed,  # noqa: F821
)
