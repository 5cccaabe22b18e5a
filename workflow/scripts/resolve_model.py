"""Adapter for rule resolve_model: locate and fingerprint a model."""

from actdiff.warm import hand_over

hand_over()  # in a fork of the run's warm process, where there is one (actdiff.warm)

from actdiff.pipeline import resolve_model
from actdiff.workflow_support import run

run(
    snakemake,  # noqa: F821
    resolve_model,
    name=snakemake.wildcards.model,  # noqa: F821
    source=dict(snakemake.params.source),  # noqa: F821
    out_json=snakemake.output.model,  # noqa: F821
    allow_pickle=snakemake.params.allow_pickle,  # noqa: F821
)
