"""The whole corpus, one row per prompt: what the report's "Any prompt" section searches and drills into.

Built by aggregation from each shard's tables while they are in memory (``shard_rows``), so it costs
O(prompts x key nodes) and never another pass over the shards: the prompt's size and first divergence, its
failing-node count, its final-embedding cosine, the propagated relative L2 at each key node of the graph
(``Graph.key_nodes()``, in graph order) and per MoE layer how many of its tokens the engine routed to the
reference's experts. Texts come from the tokens shards, truncated (the page shows a preview, not the prompt).
Column meanings: docs/formats.md.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

NAME = "prompt_table"  # its name in actdiff.tables.SUMMARY_TABLES
TEXT_CHARS = 100  # text kept per prompt: a page with 10,000 prompts must stay small (README "Any prompt")
COLUMNS = [
    "prompt_id", "text", "tokens", "first_divergence", "failing_nodes", "embedding_cosine",
    "key_rel_l2", "routing_layers", "routing_agreement", "routing_flips",
]  # fmt: skip


def shard_rows(per_prompt: pd.DataFrame, nodes: pd.DataFrame, prompts: pd.DataFrame, routing: pd.DataFrame,
               key_nodes: list[str]) -> pd.DataFrame:  # fmt: skip
    """One row per prompt of one shard (no text yet). ``per_prompt``: ``worst.per_prompt(nodes)``, computed
    once by aggregation for the worst-prompt ranking as well."""
    out = per_prompt[["prompt_id", "tokens", "first_divergence", "failing_nodes"]].copy()
    emb = prompts[prompts["kind"] == "embedding"].set_index("prompt_id")["value"] if len(prompts) else pd.Series()
    out["embedding_cosine"] = out["prompt_id"].map(emb).astype(np.float64)
    out["key_rel_l2"] = _key_errors(nodes, key_nodes, out["prompt_id"])
    layers, agree, flips = _routing_per_layer(routing, out["prompt_id"])
    out["routing_layers"], out["routing_agreement"], out["routing_flips"] = layers, agree, flips
    return out


def _key_errors(nodes: pd.DataFrame, key_nodes: list[str], ids: pd.Series) -> list[list[float]]:
    """Each prompt's propagated rel L2 at the key nodes, in key-node order; NaN where a node is missing."""
    key = nodes[nodes["node"].isin(key_nodes)]
    wide = key.pivot_table(index="prompt_id", columns="node", values="rel_l2", aggfunc="first", dropna=False)
    wide = wide.reindex(index=ids.to_numpy(), columns=key_nodes)
    return [[float(v) for v in row] for row in wide.to_numpy(np.float64)]


def _routing_per_layer(routing: pd.DataFrame, ids: pd.Series) -> tuple[list, list, list]:
    """Per prompt: its MoE layers, the fraction of its tokens routed to the reference's experts in each, and
    the number of tokens whose expert set flipped. Empty lists for a model without MoE layers."""
    empty = [[] for _ in range(len(ids))]
    if not len(routing):
        return empty, [[] for _ in ids], [[] for _ in ids]
    g = routing.groupby(["prompt_id", "layer"], sort=True)["agree"].agg(["mean", "size", "sum"]).reset_index()
    g["flips"] = g["size"] - g["sum"]
    per = {pid: part for pid, part in g.groupby("prompt_id", sort=False)}
    layers, agree, flips = [], [], []
    for pid in ids:
        part = per.get(pid)
        layers.append([] if part is None else part["layer"].astype(int).tolist())
        agree.append([] if part is None else part["mean"].astype(float).tolist())
        flips.append([] if part is None else part["flips"].astype(int).tolist())
    return layers, agree, flips


def with_texts(rows: list[pd.DataFrame], tokens: list[str]) -> pd.DataFrame:
    """The shards' rows in prompt_id order, each with the start of its text (from the tokens shards)."""
    table = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=[c for c in COLUMNS if c != "text"])
    text: dict[str, str] = {}
    for p in tokens:
        t = pd.read_parquet(p, columns=["prompt_id", "text"])
        text.update((pid, str(s)[:TEXT_CHARS]) for pid, s in zip(t["prompt_id"], t["text"], strict=True))
    table["text"] = [text.get(p, "") for p in table["prompt_id"]]
    return table.sort_values("prompt_id").reset_index(drop=True)[COLUMNS]


def key_nodes_of(drilldown_shards: list[str]) -> list[str]:
    """The key nodes as statistics kept them (Graph.key_nodes(), written into the drill-down shard tables), in
    graph order: for callers of aggregate() that do not pass the graph's list."""
    for p in drilldown_shards:
        d = pd.read_parquet(p, columns=["node", "node_index"])
        if len(d):
            return d.drop_duplicates("node").sort_values("node_index")["node"].tolist()
    return []

