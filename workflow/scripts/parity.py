"""Adapter for rule parity: weight and config parity of the engine at one variant."""

from actdiff.warm import hand_over

hand_over()  # in a fork of the run's warm process, where there is one (actdiff.warm)

from actdiff.pipeline import parity
from actdiff.workflow_support import run

run(
    snakemake,  # noqa: F821
    parity,
    model_json=snakemake.input.model,  # noqa: F821
    side="actdiff",
    variant=snakemake.wildcards.variant,  # noqa: F821
    out_weights=snakemake.output.weights,  # noqa: F821
    out_config=snakemake.output.config,  # noqa: F821
    fault_aliases=dict(snakemake.params.fault_aliases),  # noqa: F821
)
