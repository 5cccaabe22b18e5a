"""Adapter for rule reference_noise: the reference's fp32 noise of one shard and an fp32 engine's propagated budgets,
shared by the runs' statistics."""

from actdiff.warm import hand_over

hand_over()  # in a fork of the run's warm process, where there is one (actdiff.warm)

from actdiff.pipeline import reference_noise
from actdiff.workflow_support import run

run(
    snakemake,  # noqa: F821
    reference_noise,
    model_json=snakemake.input.model,  # noqa: F821
    ref_h5=snakemake.input.ref,  # noqa: F821
    out=snakemake.output.noise,  # noqa: F821
    budgets=snakemake.params.budgets,  # noqa: F821
)
