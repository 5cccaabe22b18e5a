"""``actdiff report RESULTS [--baseline DIR] [--out DIR] [--run MODEL/SIDE/VARIANT ...]``: render the reports of
a finished run outside the workflow, e.g. against a baseline run (the workflow does it with ``report.baseline``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ActdiffError
from ..layout import Layout
from .render import render_index, render_report


def render_all(results: str, out: Path, runs: list[tuple[str, str, str]], baseline: str | None) -> list[Path]:
    """Every run's report and an index, laid out as ``results/reports/`` (so `actdiff publish` can take them)."""
    pages = []
    L = Layout(results)
    for m, s, v in runs:
        page = out / Path(L.report(m, s, v)).relative_to(Path(L.index()).parent)
        render_report(results, m, s, v, str(page), baseline=baseline)
        pages.append(page)
    render_index(results, [f"{m}/{s}/{v}" for m, s, v in runs], str(out / "index.html"), baseline=baseline)
    return pages


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="actdiff report", description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="the results folder of a finished run")
    ap.add_argument("--baseline", help="results folder of an earlier run: every report compares with it")
    ap.add_argument("--out", help="where the pages go (default RESULTS/reports-vs-<baseline folder name>)")
    ap.add_argument("--run", action="append", default=[], help="MODEL/SIDE/VARIANT (default: every run)")
    args = ap.parse_args(argv)
    runs = [tuple(r.split("/")) for r in args.run] or Layout(args.results).runs_with_verdicts()
    if any(len(r) != 3 for r in runs):
        raise ActdiffError(f"--run takes MODEL/SIDE/VARIANT, got {args.run}")
    if not runs:
        raise ActdiffError(f"{args.results}: no run with a verdict (run the pipeline first)")
    name = f"reports-vs-{Path(args.baseline).resolve().name}" if args.baseline else "reports-rerendered"
    out = Path(args.out) if args.out else Path(args.results) / name
    pages = render_all(args.results, out, runs, args.baseline)  # type: ignore[arg-type]
    print(f"rendered {len(pages)} report(s) and the index into {out}")
    return 0
