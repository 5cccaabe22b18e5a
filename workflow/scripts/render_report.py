"""Adapter for rule render_report: the HTML report of one (model, side, variant)."""

from actdiff.warm import hand_over

hand_over()  # in a fork of the run's warm process, where there is one (actdiff.warm)

from actdiff.layout import Layout
from actdiff.report import render_report
from actdiff.workflow_support import run

run(
    snakemake,  # noqa: F821
    render_report,
    results=Layout.of_model_json(snakemake.input.model).results,  # noqa: F821
    model=snakemake.wildcards.model,  # noqa: F821
    side=snakemake.wildcards.side,  # noqa: F821
    variant=snakemake.wildcards.variant,  # noqa: F821
    out_html=snakemake.output.html,  # noqa: F821
    qmd=snakemake.input.qmd,  # noqa: F821
    worst_n=int(snakemake.params.worst_n),  # noqa: F821
    baseline=snakemake.params.baseline or None,  # noqa: F821
)
