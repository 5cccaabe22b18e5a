"""HTML reports: one per (model, side, variant) and an index over all of them.

The Quarto sources are package data, ``actdiff/data/reports/`` (``report.qmd``, ``index.qmd``), and only
call this package:
``actdiff.report.data`` loads a run's tables, ``actdiff.report.sections`` turns them into markdown and
static figures, ``actdiff.report.render`` renders a ``.qmd`` with quarto or, without quarto, with the
fallback renderer (jupytext, an in-process IPython shell, pandoc).
"""

from __future__ import annotations

from .render import RenderError, render, render_index, render_report

__all__ = ["RenderError", "render", "render_index", "render_report"]
