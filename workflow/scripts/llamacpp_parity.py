"""Adapter for rule llamacpp_parity: config values as llama.cpp applies them, against config.json."""

from actdiff.warm import hand_over

hand_over()  # in a fork of the run's warm process, where there is one (actdiff.warm)

from actdiff.pipeline import llamacpp_parity
from actdiff.workflow_support import run

run(
    snakemake,  # noqa: F821
    llamacpp_parity,
    model_json=snakemake.input.model,  # noqa: F821
    gguf=snakemake.input.gguf,  # noqa: F821
    out_config=snakemake.output.config,  # noqa: F821
)
