"""``actdiff check``: a CI gate over a run's statistics.

Reads every ``summary/verdict.json`` under a results directory (optionally filtered by model, side,
variant), prints a short summary in the spirit of a porting session (replay mismatches, first divergent node,
every cause with its numbers, outputs against their propagated budgets, worst nodes against their budgets),
and exits non-zero when a run FAILS (its replay is not the code that ran, or its outputs diverge beyond their
propagated budgets), when ``--strict`` and a run DEVIATES from the spec without effect on the outputs, or
when, against a baseline run, a node's p99 local error grew by more than ``--margin`` times (comparing
against at least 1% of the node's budget, so float noise on near-zero errors never trips it).

It also fails when a run is MISSING: a run directory holding dumps, statistics or a partial summary but no
verdict (an aggregation that failed or was deleted), or, with ``--configfile``, a run the config asks for
that has no verdict. A run with non-finite values (NaN/Inf the model itself produces, status NONFINITE) fails:
the comparison could not judge the positions where they are. A baseline of other weights or another corpus is
refused (its regressions would be spurious) unless ``--allow-incomparable-baseline``.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
from pathlib import Path

import pandas as pd

from ..layout import Layout
from .fitted import excluded_words


def find_runs(results: Path, pattern: str = "*") -> list[tuple[str, str, str]]:
    """(model, side, variant) of the runs with a verdict whose ``model/side/variant`` matches ``pattern``."""
    return [r for r in Layout(str(results)).runs_with_verdicts() if fnmatch.fnmatchcase("/".join(r), pattern)]


# a run directory holding any of these was started by the pipeline; without a verdict it is unfinished
_RUN_PARTS = ("activations", "stats", "summary")


def started_runs(results: Path) -> list[tuple[str, str, str]]:
    """(model, side, variant) of every engine run directory the pipeline started (dumps, shard statistics
    or summaries are there), verdict or not; the reference side is an input, not a run."""
    root = Path(results)
    found = {d.relative_to(root).parts[:3] for part in _RUN_PARTS for d in root.glob(f"*/*/*/{part}") if d.is_dir()}
    return sorted(r for r in found if r[1] != "reference")  # type: ignore[misc]


def config_runs(configfile: str) -> list[tuple[str, str, str]]:
    """The runs a workflow config asks for, as the workflow's targets list them (llama.cpp only where it is
    available or required)."""
    import yaml

    from ..config import validate_config
    from ..sides.configured import configured_runs, engine_specs, usable_engines

    cfg = validate_config(yaml.safe_load(Path(configfile).read_text(encoding="utf-8")) or {}, source=configfile)
    engines, _skipped = usable_engines(cfg, engine_specs(cfg["engines"]))
    return configured_runs(cfg, engines)


def missing_runs(results: Path, pattern: str, configfile: str | None) -> list[tuple[tuple[str, str, str], str]]:
    """Expected runs (started ones, and the config's) matching ``pattern`` that have no verdict, with why."""
    L = Layout(str(results))
    expected = {r: "its directory holds dumps, statistics or a partial summary" for r in started_runs(results)}
    if configfile:
        for r in config_runs(configfile):
            expected.setdefault(r, f"{configfile} asks for it")
    return [
        (r, why)
        for r, why in sorted(expected.items())
        if fnmatch.fnmatchcase("/".join(r), pattern) and not Path(L.verdict(*r)).is_file()
    ]


def comparability(run: dict, base: dict, results: Path, baseline: Path) -> tuple[list[str], list[str]]:
    """(what differs, what could not be verified) between a run's verdict and its baseline's: regressions
    against another model's weights or another corpus would be spurious."""
    differs, unverified = [], []
    n_run, n_base = run.get("prompts"), base.get("prompts")
    for key, what in (("weights_sha256", "the weights (sha256 of model.safetensors) differ"),
                      ("corpus_sha256", "the corpus (prompt ids, texts, token ids) differs")):  # fmt: skip
        a, b = run.get(key), base.get(key)
        if a and b and a != b:
            extra = f", {n_run} vs {n_base} prompts" if key == "corpus_sha256" else ""
            differs.append(f"{what}: {a[:12]}... in {results} vs {b[:12]}... in {baseline}{extra}")
        elif not (a and b):
            unverified.append(key)
    if "corpus_sha256" in unverified and n_run != n_base:  # an older verdict: the prompt count still tells
        differs.append(f"the corpus differs: {n_run} prompts in {results} vs {n_base} in {baseline}")
    return differs, unverified


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
    nf = (v.get("nonfinite") or {}).get("statement")
    if nf:
        print(f"   non-finite values: {nf}")
    if v.get("excluded_prompts"):
        print(f"   {excluded_words(v['excluded_prompts'])}")
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
    ap.add_argument("--configfile", help="workflow config of the run: every run it asks for must have a verdict")
    ap.add_argument(
        "--allow-incomparable-baseline", action="store_true",
        help="compare against a baseline of other weights or another corpus anyway",
    )  # fmt: skip
    args = ap.parse_args(argv)
    results = Path(args.results)
    L = Layout(str(results))
    runs = find_runs(results, args.only)
    missing = missing_runs(results, args.only, args.configfile)
    if not runs and not missing:
        print(f"actdiff check: no statistics under {results} matching {args.only!r}; run the pipeline first")
        return 2
    failed = 0
    for run in runs:
        v = json.loads(Path(L.verdict(*run)).read_text())
        print_run(v)
        bad = v["status"] in BAD_STATUSES or (args.strict and v["status"] != "pass")
        if args.baseline:
            bad = _against_baseline(run, v, results, Path(args.baseline), args) or bad
        failed += bool(bad)
    for run, why in missing:
        print(
            f"== {'/'.join(run)}: MISSING: no verdict at {L.verdict(*run)} ({why}); its aggregation did not finish. "
            "Rerun the pipeline (snakemake with the same config) to produce it."
        )
    total = len(runs) + len(missing)
    print(f"actdiff check: {len(runs) - failed} of {total} passed" + (f", {len(missing)} missing" if missing else ""))
    return 1 if failed or missing else 0


# verdict statuses that fail the gate: a failing engine, and a run whose values are partly NaN/Inf (nothing was
# compared at those positions, so it cannot count as a healthy run)
BAD_STATUSES = ("fail", "nonfinite")


def _against_baseline(run: tuple, v: dict, results: Path, baseline: Path, args) -> bool:
    """Print the baseline comparison of one run; True when it fails (regressions, or an incomparable baseline)."""
    B = Layout(str(baseline))
    base_verdict = Path(B.verdict(*run))
    if base_verdict.is_file():
        differs, unverified = comparability(v, json.loads(base_verdict.read_text()), results, baseline)
        for d in differs:
            print(f"   baseline not comparable: {d}")
        if differs and not args.allow_incomparable_baseline:
            print("   refusing to compare (pass --allow-incomparable-baseline to compare anyway)")
            return True
        if unverified:
            print(f"   note: the baseline comparison could not verify {', '.join(unverified)} (older verdicts lack it)")
    regs = regressions(Path(Layout(str(results)).summary(*run, "nodes")), Path(B.summary(*run, "nodes")), args.margin)
    for r in regs:
        print(f"   regression: {r}")
    return bool(regs)
