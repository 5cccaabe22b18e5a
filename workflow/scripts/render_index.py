"""Adapter for rule render_index: one page over every report."""

from pathlib import Path

from actdiff.report import render_index
from actdiff.workflow_support import run

run(
    snakemake,  # noqa: F821
    render_index,
    results=str(Path(snakemake.output.html).parent.parent),  # noqa: F821  ({results}/reports/index.html)
    runs=list(snakemake.params.runs),  # noqa: F821
    out_html=snakemake.output.html,  # noqa: F821
    qmd=snakemake.input.qmd,  # noqa: F821
)
