"""``actdiff check``: a CI gate over a run's statistics.

Reads every ``summary/verdict.json`` under a results directory (optionally filtered by model, side,
variant), prints a short summary in the spirit of a porting session (replay mismatches, first divergent node,
every cause with its numbers, outputs against their propagated budgets, worst nodes against their budgets),
and exits non-zero when a run FAILS (its replay is not the code that ran, or its outputs diverge beyond their
propagated budgets), when ``--strict`` and a run DEVIATES from the spec without effect on the outputs, or
when, against a baseline run, a node's p99 local error grew by more than ``--margin`` times (comparing
against at least 1% of the node's budget, so float noise on near-zero errors never trips it).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
from pathlib import Path

import pandas as pd

from ..layout import Layout


def find_runs(results: Path, pattern: str = "*") -> list[tuple[str, str, str]]:
    """(model, side, variant) of the runs with a verdict whose ``model/side/variant`` matches ``pattern``."""
    return [r for r in Layout(str(results)).runs_with_verdicts() if fnmatch.fnmatchcase("/".join(r), pattern)]


def regressions(run_summary: Path, base_summary: Path, margin: float) -> list[str]:
    if not base_summary.is_file():
        return [f"baseline has no {base_summary}"]
    a = pd.read_parquet(run_summary).set_index("node")
    b = pd.read_parquet(base_summary).set_index("node")
    out = []
    for node in a.index.intersection(b.index):
        new, old = float(a.at[node, "local_rel_l2_p99"]), float(b.at[node, "local_rel_l2_p99"])
        floor = 0.01 * float(a.at[node, "budget_median"])
        if new > margin * max(old, floor):
            out.append(f"{node}: p99 local relative error {new:.2e} vs baseline {old:.2e} (> {margin}x)")
    return out


def _cause_line(c: dict) -> str:
    nodes = ", ".join(c["nodes"][:3]) + (f" and {len(c['nodes']) - 3} more" if len(c["nodes"]) > 3 else "")
    effect = " (no measurable effect on the outputs)" if c.get("harmless") else ""
    if c["hypothesis"] == "unexplained":
        t = c.get("tried") or {}
        return (
            f"   unexplained at {nodes}: {t.get('catalogue', 0)} catalogue entries and {t.get('searched', 0)} searched "
            f"candidates tried, best residual {c['error_median']:.2e} vs {c['baseline_error_median']:.2e} for the "
            f"spec{effect}"
        )
    return (
        f"   cause at {nodes}: {c['says']} [{c['kind']} {c['hypothesis']}: residual {c['error_median']:.2e} vs "
        f"{c['baseline_error_median']:.2e} for the spec]{effect}"
    )


def print_run(v: dict) -> None:
    """The porting-session summary of one verdict."""
    print(f"== {v['model']}/{v['side']}/{v['variant']}: {v['status'].upper()} ({v['prompts']} prompts)")
    for m in v.get("replay_mismatches") or []:
        print(
            f"   replay does not reproduce the dump at {m['node']} "
            f"({m['prompts']} prompts, gap {m['replay_gap_max']:.2e})"
        )
    out = v.get("outputs") or {}
    if out.get("diverge"):
        print(
            f"   outputs diverge beyond their propagated budgets on {out['prompts_diverging']} prompts; "
            f"the propagated error first exceeds it at {out.get('grows_most')}"
        )
    if v["status"] == "pass":
        return
    if v.get("first_divergence"):
        print(f"   first divergent node: {v['first_divergence']} ({v['first_divergence_prompts']} prompts)")
    for c in v.get("causes") or []:
        print(_cause_line(c))
    for w in v["worst_nodes"][:3]:
        print(
            f"   {w['node']}: local rel L2 max {w['local_rel_l2_max']:.2e} vs budget {w['budget']:.2e}"
            f" ({w['fail']} prompts fail)"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="actdiff check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("results", nargs="?", default="results", help="results directory of a run")
    ap.add_argument("--only", default="*", help="glob over model/side/variant, e.g. 'tiny-nomic-moe/actdiff/fp32'")
    ap.add_argument("--baseline", help="results directory of a baseline run to compare against")
    ap.add_argument("--margin", type=float, default=2.0, help="allowed growth of p99 local error vs baseline")
    ap.add_argument("--strict", action="store_true", help="also fail runs that deviate without output effect")
    args = ap.parse_args(argv)
    results = Path(args.results)
    L, B = Layout(str(results)), Layout(str(args.baseline)) if args.baseline else None
    runs = find_runs(results, args.only)
    if not runs:
        print(f"actdiff check: no statistics under {results} matching {args.only!r}; run the pipeline first")
        return 2
    failed = 0
    for run in runs:
        v = json.loads(Path(L.verdict(*run)).read_text())
        print_run(v)
        bad = v["status"] == "fail" or (args.strict and v["status"] != "pass")
        if B is not None:
            regs = regressions(Path(L.summary(*run, "nodes")), Path(B.summary(*run, "nodes")), args.margin)
            for r in regs:
                print(f"   regression: {r}")
            bad = bad or bool(regs)
        failed += bool(bad)
    print(f"actdiff check: {len(runs) - failed} of {len(runs)} passed")
    return 1 if failed else 0
