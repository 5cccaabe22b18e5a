"""Before/after: one run's report against the same (model, side, variant) of a baseline results folder.

A review is a comparison ("did this port get better since last week, and where?"). This module reads both runs'
summaries (and the per-prompt embedding cosines of both runs' statistics) and says, per node, the p99 local and
propagated error old vs new and status changes; the verdict, first divergence and cause changes; routing
agreement per MoE layer; the embedding cosine shift; and the prompts whose final embedding got better or worse.
A baseline of other weights or another corpus is compared anyway but said first (actdiff.compare.check's
comparability: its changes may be the weights', not the engine's).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..compare.check import comparability
from ..errors import ActdiffError
from ..layout import Layout
from .data import Run, load_run

MARGIN = 2.0  # a change counts when the quantity moved by more than this factor (actdiff check's default margin)
# 1 - cosine moves below this are not counted as a prompt getting better or worse: 1 - cos ~ rel_l2^2 / 2, so
# 1e-6 is a relative L2 change of the final embedding of ~1.4e-3, 2e4 x fp32's unit roundoff; smaller moves
# are the rounding differences of a correct port, not a change of behaviour
COSINE_FLOOR = 1e-6


@dataclass
class BeforeAfter:
    baseline: Path
    base: Run
    differs: list[str]  # why the baseline is not comparable (empty: same weights and corpus)
    nodes: pd.DataFrame
    routing: pd.DataFrame
    prompts: pd.DataFrame


def prompt_cosines(run: Run) -> pd.Series:
    """Final-embedding cosine per prompt, from the run's per-shard statistics (a few bytes per prompt)."""
    L = Layout(str(run.results))
    pattern = L.stats(run.model, run.side, run.variant, "*", "prompts")[len(L.results) + 1 :]
    parts = [pd.read_parquet(p, columns=["prompt_id", "kind", "value"]) for p in sorted(run.results.glob(pattern))]
    if not parts:
        return pd.Series(dtype="float64")
    t = pd.concat(parts)
    t = t[t["kind"] == "embedding"]
    return t.set_index("prompt_id")["value"].astype("float64")


def node_changes(new: pd.DataFrame, old: pd.DataFrame) -> pd.DataFrame:
    """Per node (the new run's graph order): p99 local and propagated error old vs new, status old and new."""
    from .graph_svg import node_status

    cols = ["node", "local_rel_l2_p99", "rel_l2_p99"]
    t = new[cols].merge(old[cols], on="node", how="left", suffixes=("_new", "_old"))
    status = {n: node_status(r) for n, r in zip(old["node"], old.to_dict("records"), strict=True)}
    t["status_old"] = [status.get(n, "absent") for n in t["node"]]
    t["status_new"] = [node_status(r) for r in new.to_dict("records")]
    return t


def prompt_changes(new: pd.Series, old: pd.Series) -> pd.DataFrame:
    """Prompts in both runs with 1 - cosine old and new and the change: 'worse' / 'better' when it moved by more
    than MARGIN times and by more than COSINE_FLOOR, else 'same'."""
    t = pd.DataFrame({"cosine_old": old, "cosine_new": new}).dropna()
    d_old, d_new = 1 - t["cosine_old"], 1 - t["cosine_new"]
    moved = (d_new - d_old).abs() > COSINE_FLOOR
    t["change"] = "same"
    t.loc[moved & (d_new > MARGIN * d_old), "change"] = "worse"
    t.loc[moved & (d_old > MARGIN * d_new), "change"] = "better"
    t["delta_1_minus_cosine"] = d_new - d_old
    return t.rename_axis("prompt_id").reset_index()


def routing_changes(new: Run, old: Run) -> pd.DataFrame:
    a, b = new.summary.get("routing"), old.summary.get("routing")
    if a is None or not len(a):
        return pd.DataFrame()
    cols = ["layer", "agreement", "flips"]
    b = b[cols] if b is not None and len(b) else pd.DataFrame(columns=cols)
    return a[cols].merge(b, on="layer", how="left", suffixes=("_new", "_old"))


def before_after(run: Run, baseline: str | Path) -> BeforeAfter:
    """Compare ``run`` with the same run in the results folder ``baseline``."""
    baseline = Path(baseline)
    if not baseline.is_dir():
        raise ActdiffError(f"baseline {baseline}: no such results folder (config key report.baseline / --baseline)")
    base = load_run(baseline, run.model, run.side, run.variant)
    differs, _ = comparability(run.verdict, base.verdict, run.results, baseline)
    return BeforeAfter(
        baseline=baseline,
        base=base,
        differs=differs,
        nodes=node_changes(run.summary["nodes"], base.summary["nodes"]),
        routing=routing_changes(run, base),
        prompts=prompt_changes(prompt_cosines(run), prompt_cosines(base)),
    )
