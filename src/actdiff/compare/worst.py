"""Which prompts are the worst: one definition, used by statistics (the drill-down candidates each shard
keeps while its activations are at hand) and by aggregation (the corpus ranking every report shows).

A prompt's score is its worst local error over its own budget (the node that most exceeds what fp32 noise
allows, local to that node), then its worst propagated relative L2 (what the user sees). Because a shard's
top M by this score contains every prompt of the corpus's top M that lives in the shard, aggregation only
needs each shard's candidates to rank the whole corpus.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # imported where a table is built: a statistics job only ranks (prompt_score, rank_key)
    import pandas as pd

_TINY = 1e-30  # a zero budget (an exact op) still ranks by its error


def over_budget(local_rel_l2, budget) -> np.ndarray:
    """Each node's local error over its budget."""
    return np.asarray(local_rel_l2, np.float64) / np.maximum(np.asarray(budget, np.float64), _TINY)


def prompt_score(local_rel_l2, budget, rel_l2) -> tuple[float, float]:
    """(max local / budget, max propagated relative L2) over one prompt's nodes; NaN rows (nodes not
    captured) are skipped, a prompt with nothing measured scores -inf."""
    return _nanmax(over_budget(local_rel_l2, budget)), _nanmax(np.asarray(rel_l2, np.float64))


def rank_key(score: tuple[float, float], prompt_id: str) -> tuple:
    """Sort key, worst first; ties (exact zeros are common) broken by prompt_id, independent of shard order."""
    return (-score[0], -score[1], prompt_id)


def _nanmax(a: np.ndarray) -> float:
    a = a[np.isfinite(a) | np.isposinf(a)]
    return float(a.max()) if a.size else -math.inf


# ------------------------------------------------------------------------------- corpus (aggregation)
WORST_COLUMNS = [
    "prompt_id", "tokens", "failing_nodes", "first_divergence", "worst_node", "local_over_budget", "rel_l2_max",
]  # fmt: skip


def per_prompt(nodes: pd.DataFrame) -> pd.DataFrame:
    """One row per prompt of a shard's nodes table: its score (prompt_score, vectorised) and the columns of
    the worst-inputs table."""
    import pandas as pd

    r = nodes.assign(ratio=over_budget(nodes["local_rel_l2"], nodes["budget"]))
    r["ratio"] = r["ratio"].fillna(-math.inf)
    by_ratio = r.sort_values(["prompt_id", "ratio", "node_index"], ascending=[True, False, True])
    worst = by_ratio.drop_duplicates("prompt_id")
    g = r.groupby("prompt_id", sort=True)
    out = pd.DataFrame(
        {
            "tokens": g["tokens"].max(),
            "failing_nodes": g["status"].agg(lambda s: int((s == "fail").sum())),
            "first_divergence": g["first_divergence"].first(),
            "worst_node": worst.set_index("prompt_id")["node"],
            "local_over_budget": g["ratio"].max(),
            "rel_l2_max": g["rel_l2"].max().fillna(-math.inf),
        }
    )
    return out.reset_index()[WORST_COLUMNS]


def top(table: pd.DataFrame, k: int) -> pd.DataFrame:
    """The k worst rows of a per_prompt table, worst first (rank_key order)."""
    cols = zip(table["local_over_budget"], table["rel_l2_max"], table["prompt_id"], strict=True)
    keys = [rank_key((a, b), p) for a, b, p in cols]
    order = sorted(range(len(keys)), key=keys.__getitem__)[:k]
    return table.iloc[order].reset_index(drop=True)
