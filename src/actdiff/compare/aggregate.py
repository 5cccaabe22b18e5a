"""Corpus aggregates over a (model, side, variant)'s shards, and the verdict.

Outputs (Parquet, schemas in docs/formats.md): per-node summary (p50/p90/p99/max of each metric, fail and
warn counts, worst inputs), the first-divergence histogram, hypothesis counts, routing agreement per layer
with expert load on both sides, embedding-level metrics; and ``verdict.json``: pass/fail, the most common
first divergent node, the top hypothesis with its evidence, in plain words.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..atomic import atomic_path, write_json_atomic
from .embeddings import neighbour_overlap, similarity_rank_correlation
from .routing import expert_load

QUANTILE_METRICS = ("rel_l2", "local_rel_l2", "cosine", "max_abs", "amplification", "sqnr_db", "max_ulp")


def _read(paths: list[str]) -> pd.DataFrame:
    frames = [pd.read_parquet(p) for p in paths]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.read_parquet(paths[0])


def _write(df: pd.DataFrame, path: str) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def node_summary(nodes: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (idx, name), g in nodes.groupby(["node_index", "node"], sort=True):
        row = {
            "node_index": idx,
            "node": name,
            "op": g["op"].iloc[0],
            "layer": int(g["layer"].iloc[0]),
            "n_prompts": len(g),
            "fail": int((g["status"] == "fail").sum()),
            "warn": int((g["status"] == "warn").sum()),
            "not_captured": int((g["status"] == "not_captured").sum()),
            "budget_median": float(g["budget"].median()),
        }
        for m in QUANTILE_METRICS:
            v = g[m].replace([np.inf, -np.inf], np.nan).dropna().to_numpy(np.float64)
            for q, label in ((0.10, "p10"), (0.5, "p50"), (0.9, "p90"), (0.99, "p99")):
                row[f"{m}_{label}"] = float(np.quantile(v, q)) if v.size else math.nan
            row[f"{m}_max"] = float(v.max()) if v.size else math.nan
        worst = g.sort_values("local_rel_l2", ascending=False).head(3)
        row["worst_prompts"] = json.dumps(worst["prompt_id"].tolist())
        rows.append(row)
    return pd.DataFrame(rows)


def aggregate(shard_tables: dict[str, list[str]], outputs: dict[str, str], meta: dict) -> dict:
    """Combine the shards' tables; write the summaries named in ``outputs`` and the verdict."""
    nodes = _read(shard_tables["nodes"])
    summary = node_summary(nodes)
    _write(summary, outputs["summary"])
    first = (
        nodes.drop_duplicates("prompt_id")["first_divergence"]
        .replace("", "(none)")
        .value_counts()
        .rename_axis("node")
        .reset_index(name="prompts")
    )
    _write(first, outputs["first_divergence"])
    hyp = _read(shard_tables["hypotheses"])
    if len(hyp):
        top = hyp[hyp["rank"] == 1]
        hyp_summary = (
            top.groupby(["node", "verdict", "explained_by", "hypothesis"])
            .agg(
                prompts=("prompt_id", "nunique"),
                error_median=("error", "median"),
                baseline_error_median=("baseline_error", "median"),
                says=("says", "first"),
            )
            .reset_index()
            .sort_values("prompts", ascending=False)
        )
        # evidence: the median error under every hypothesis at the most common first divergent node
        evidence = (
            hyp.groupby(["node", "hypothesis"])
            .agg(error_median=("error", "median"), prompts=("prompt_id", "nunique"))
            .reset_index()
        )
    else:
        hyp_summary = pd.DataFrame(
            columns=[
                "node",
                "verdict",
                "explained_by",
                "hypothesis",
                "prompts",
                "error_median",
                "baseline_error_median",
                "says",
            ]
        )
        evidence = pd.DataFrame(columns=["node", "hypothesis", "error_median", "prompts"])
    _write(hyp_summary, outputs["hypotheses"])
    routing = _read(shard_tables["routing"])
    prompts = _read(shard_tables["prompts"])
    _write(_routing_summary(routing, prompts, meta.get("experts", 0)), outputs["routing"])
    emb = _embedding_summary(shard_tables["embeddings"], prompts)
    write_json_atomic(outputs["embeddings"], emb)
    verdict = _verdict(summary, first, hyp_summary, evidence, emb, meta)
    write_json_atomic(outputs["verdict"], verdict)
    return verdict


def _routing_summary(routing: pd.DataFrame, prompts: pd.DataFrame, n_experts: int) -> pd.DataFrame:
    if not len(routing):
        return pd.DataFrame(
            columns=[
                "layer",
                "tokens",
                "agreement",
                "jaccard_mean",
                "flips",
                "flips_explained",
                "near_ties",
                "ref_load",
                "eng_load",
                "forced_rel_l2_median",
                "moe_out_rel_l2_median",
                "margin_hist",
                "margin_hist_flips",
            ]
        )
    rows = []
    moe = prompts[prompts["kind"] == "moe_layer"]
    edges = np.concatenate([[0.0], np.logspace(-6, 0, 25)])
    for layer, g in routing.groupby("layer"):
        ref_idx = np.array(g["ref_experts"].tolist())
        eng_idx = np.array(g["eng_experts"].tolist())
        flips = ~g["agree"].to_numpy()
        m = g["ref_margin"].to_numpy(np.float64)
        ml = moe[moe["layer"] == layer]
        rows.append(
            {
                "layer": int(layer),
                "tokens": len(g),
                "agreement": float(g["agree"].mean()),
                "jaccard_mean": float(g["jaccard"].mean()),
                "flips": int(flips.sum()),
                "flips_explained": int(g["flip_explained"].sum()),
                "near_ties": int(g["near_tie"].sum()),
                "ref_load": json.dumps(expert_load(ref_idx, n_experts).tolist()),
                "eng_load": json.dumps(expert_load(eng_idx, n_experts).tolist()),
                "forced_rel_l2_median": float(ml["value2"].median()) if len(ml) else math.nan,
                "moe_out_rel_l2_median": float(ml["value"].median()) if len(ml) else math.nan,
                "margin_hist": json.dumps(np.histogram(np.clip(m, 0, 1), edges)[0].tolist()),
                "margin_hist_flips": json.dumps(np.histogram(np.clip(m[flips], 0, 1), edges)[0].tolist()),
                "margin_edges": json.dumps(edges.tolist()),
            }
        )
    return pd.DataFrame(rows)


def _embedding_summary(paths: list[str], prompts: pd.DataFrame) -> dict:
    e = prompts[prompts["kind"] == "embedding"]
    cos = e["value"].to_numpy(np.float64)
    sample = _read(paths)
    out = {
        "prompts": int(len(e)),
        "cosine_min": float(cos.min()) if cos.size else math.nan,
        "cosine_p01": float(np.quantile(cos, 0.01)) if cos.size else math.nan,
        "cosine_median": float(np.median(cos)) if cos.size else math.nan,
        "cosine_hist": np.histogram(1 - np.clip(cos, -1, 1), np.concatenate([[0], np.logspace(-9, 0, 19)]))[0].tolist()
        if cos.size
        else [],
        "worst_cosine_prompts": e.sort_values("value").head(5)["prompt_id"].tolist(),
    }
    if len(sample):
        from .embeddings import sample_key

        sample = sample.assign(key=sample["prompt_id"].map(sample_key)).sort_values("key")
        size = len(sample)  # already bounded per shard; the global sample is the smallest keys overall
        ref = np.array(sample["ref"].tolist(), np.float64)
        eng = np.array(sample["eng"].tolist(), np.float64)
        ov = neighbour_overlap(ref, eng, 10)
        out.update(
            sample_size=int(size),
            neighbour_overlap_mean=float(ov.mean()),
            neighbour_overlap_min=float(ov.min()),
            similarity_spearman=similarity_rank_correlation(ref, eng),
        )
    return out


def _verdict(
    summary: pd.DataFrame, first: pd.DataFrame, hyp: pd.DataFrame, evidence: pd.DataFrame, emb: dict, meta: dict
) -> dict:
    failing = summary[summary["fail"] > 0]
    first_real = first[first["node"] != "(none)"]
    v = {
        **meta,
        "status": "fail" if len(failing) else "pass",
        "failing_nodes": int(len(failing)),
        "prompts": int(summary["n_prompts"].max()) if len(summary) else 0,
        "first_divergence": None,
        "first_divergence_prompts": 0,
        "hypothesis": None,
        "explained": False,
        "evidence": [],
        "worst_nodes": [],
        "embedding_cosine_min": emb.get("cosine_min"),
        "not_captured_nodes": summary.loc[summary["not_captured"] > 0, "node"].tolist() if len(summary) else [],
    }
    if len(first_real):
        node = first_real.iloc[0]["node"]
        v["first_divergence"] = node
        v["first_divergence_prompts"] = int(first_real.iloc[0]["prompts"])
        h = hyp[hyp["node"] == node]
        if len(h):
            top = h.iloc[0]
            v["explained"] = top["verdict"] == "explained"
            v["hypothesis"] = top["explained_by"] if v["explained"] else "unexplained"
            v["hypothesis_says"] = top["says"] if v["explained"] else None
            v["hypothesis_error"] = float(top["error_median"])
            v["baseline_error"] = float(top["baseline_error_median"])
            ev = evidence[evidence["node"] == node].sort_values("error_median")
            v["evidence"] = [
                {"hypothesis": r.hypothesis, "error_median": float(r.error_median)} for r in ev.head(8).itertuples()
            ]
    worst = (
        summary.assign(ratio=summary["local_rel_l2_max"] / summary["budget_median"])
        .sort_values("ratio", ascending=False)
        .head(5)
    )
    v["worst_nodes"] = [
        {
            "node": r.node,
            "local_rel_l2_max": float(r.local_rel_l2_max),
            "budget": float(r.budget_median),
            "fail": int(r.fail),
        }
        for r in worst.itertuples()
    ]
    v["causes"] = _causes(summary, hyp)
    v["plain"] = plain_words(v)
    return v


def _causes(summary: pd.DataFrame, hyp: pd.DataFrame) -> list[dict]:
    """Every distinct root cause among the failing nodes (hypotheses are ranked at each failing node when
    stats.diagnose_all_failing is on): one entry per top explanation, with the nodes it explains, in graph
    order; failing nodes no hypothesis explains are one "unexplained" entry. An engine with two
    independent bugs (llama.cpp: tanh GELU and no expert bias) gets both named, not only the first."""
    if not len(hyp) or not len(summary):
        return []
    order = dict(zip(summary["node"], summary["node_index"], strict=True))
    failing = set(summary.loc[summary["fail"] > 0, "node"])
    h = hyp[hyp["node"].isin(failing)].copy()
    if not len(h):
        return []
    h["cause"] = h["explained_by"].where(h["verdict"] == "explained", "unexplained")
    # a node's cause: the explanation that holds for most of its prompts
    per_node = h.sort_values("prompts", ascending=False).drop_duplicates("node")
    out = []
    for cause, g in per_node.groupby("cause"):
        g = g.assign(idx=g["node"].map(order)).sort_values("idx")
        out.append(
            {
                "hypothesis": cause,
                "says": g["says"].iloc[0] if cause != "unexplained" else None,
                "nodes": g["node"].tolist(),
                "first_node_index": int(g["idx"].iloc[0]),
                "prompts": int(g["prompts"].max()),
                "error_median": float(g["error_median"].median()),
                "baseline_error_median": float(g["baseline_error_median"].median()),
            }
        )
    return sorted(out, key=lambda c: (c["hypothesis"] == "unexplained", c["first_node_index"]))


def plain_words(v: dict) -> str:
    nc = v.get("not_captured_nodes") or []
    not_captured = (
        f" {len(nc)} node(s) were not captured by the engine and are not judged: {', '.join(nc[:4])}"
        + (f" and {len(nc) - 4} more." if len(nc) > 4 else ".")
        if nc
        else ""
    )
    if v["status"] == "pass":
        return (
            f"PASS: every node of {v.get('model')} / {v.get('side')} / {v.get('variant')} is within its error "
            f"budget on all {v['prompts']} prompts." + not_captured
        )
    s = (
        f"FAIL: {v['failing_nodes']} node(s) exceed their local error budget. The engine first diverges at "
        f"{v['first_divergence']} (first divergent node in {v['first_divergence_prompts']} of {v['prompts']} "
        "prompts)."
    )
    if v.get("explained"):
        s += (
            f" Most likely cause: {v['hypothesis']} — {v['hypothesis_says']} (replaying the op this way reproduces "
            f"the engine to relative error {v['hypothesis_error']:.2e}, against {v['baseline_error']:.2e} for the "
            "op as specified)."
        )
    elif v.get("hypothesis") == "unexplained":
        s += (
            f" No hypothesis in the catalogue reproduces the engine's output there (its local error against the "
            f"specified op is {v.get('baseline_error', float('nan')):.2e})."
        )
    others = [c for c in v.get("causes", []) if c["hypothesis"] not in (v.get("hypothesis"), "unexplained")]
    for c in others:
        nodes = ", ".join(c["nodes"][:4]) + (f" and {len(c['nodes']) - 4} more" if len(c["nodes"]) > 4 else "")
        s += (
            f" Also failing, with another cause: {nodes}. Most likely cause there: {c['hypothesis']} — {c['says']} "
            f"(reproduces the engine to {c['error_median']:.2e}, against {c['baseline_error_median']:.2e})."
        )
    unexplained = [c for c in v.get("causes", []) if c["hypothesis"] == "unexplained"]
    if unexplained and v.get("hypothesis") != "unexplained":
        nodes = unexplained[0]["nodes"]
        s += f" Failing without an explanation in the catalogue: {', '.join(nodes[:4])}" + (
            f" and {len(nodes) - 4} more." if len(nodes) > 4 else "."
        )
    return s + not_captured


def read_verdict(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())
