"""Adapter for rule convert_gguf: the model as a GGUF of the variant's weight type."""

from actdiff.warm import hand_over

hand_over()  # in a fork of the run's warm process, where there is one (actdiff.warm)

from actdiff.pipeline import convert_gguf
from actdiff.workflow_support import run

run(
    snakemake,  # noqa: F821
    convert_gguf,
    model_json=snakemake.input.model,  # noqa: F821
    variant=snakemake.wildcards.variant,  # noqa: F821
    out=snakemake.output.gguf,  # noqa: F821
)
