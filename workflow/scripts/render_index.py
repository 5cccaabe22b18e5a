"""Adapter for rule render_index: one page over every report."""

from actdiff.warm import hand_over

hand_over()  # in a fork of the run's warm process, where there is one (actdiff.warm)

from actdiff.layout import Layout
from actdiff.report import render_index
from actdiff.workflow_support import run

run(
    snakemake,  # noqa: F821
    render_index,
    results=Layout.of_index(snakemake.output.html).results,  # noqa: F821
    runs=list(snakemake.params.runs),  # noqa: F821
    out_html=snakemake.output.html,  # noqa: F821
    qmd=snakemake.input.qmd,  # noqa: F821
    baseline=snakemake.params.baseline or None,  # noqa: F821
)
