"""Corpus aggregates over a (model, side, variant)'s shards, and the verdict.

Outputs (Parquet, schemas in docs/formats.md): per-node summary (p50/p90/p99/max of each metric, fail and
warn counts, worst inputs), the first-divergence histogram, hypothesis counts, routing agreement per layer
with expert load on both sides, embedding-level metrics; and ``verdict.json``: pass/fail, the most common
first divergent node, the top hypothesis with its evidence, in plain words.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..atomic import atomic_path, write_json_atomic
from ..reference_device import read_reference_records
from . import prompt_table
from . import worst as worst_mod
from .embeddings import neighbour_overlap, similarity_rank_correlation
from .fitted import excluded_summary, excluded_words, read_excluded
from .routing import expert_load

QUANTILE_METRICS = ("rel_l2", "local_rel_l2", "cosine", "max_abs", "amplification", "sqnr_db", "max_ulp")


def _write(df: pd.DataFrame, path: str) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


_QUANTILES, _QUANTILE_LABELS = (0.10, 0.5, 0.9, 0.99), ("p10", "p50", "p90", "p99")


def _finite_max_ratio(num: pd.Series, den: pd.Series) -> float:
    """The largest finite value of ``num / den`` (NaN where there is none)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        r = num.to_numpy(np.float64) / den.to_numpy(np.float64)
    r = r[np.isfinite(r)]
    return float(r.max()) if r.size else math.nan


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
            "nonfinite": 0,  # exact counts below (_apply_exact)
            "is_output": bool(g["is_output"].iloc[0]),
            "replay_mismatch": 0,  # exact counts below (_apply_exact)
            "over_propagated": 0,
            "fail_with_effect": 0,
            "budget_median": float(g["budget"].median()),
            "propagated_budget_median": float(g["propagated_budget"].median()),
            # budgets follow each prompt's fp32 noise: the worst prompt's own ratio, not max over median
            "local_over_budget_max": _finite_max_ratio(g["local_rel_l2"], g["budget"]),
        }
        for m in QUANTILE_METRICS:
            # the finite values (pandas' replace and dropna per metric and node were half of this function's time)
            v = g[m].to_numpy(np.float64)
            v = v[np.isfinite(v)]
            qs = np.quantile(v, _QUANTILES) if v.size else [math.nan] * len(_QUANTILES)
            for q, label in zip(qs, _QUANTILE_LABELS, strict=True):
                row[f"{m}_{label}"] = float(q)
            row[f"{m}_max"] = float(v.max()) if v.size else math.nan
        worst = g.sort_values("local_rel_l2", ascending=False).head(3)
        row["worst_prompts"] = json.dumps(worst["prompt_id"].tolist())
        rows.append(row)
    return pd.DataFrame(rows)


# quantiles and medians come from this many prompts (all of them in smaller corpora): the rank error of a
# p99 estimated from 5,000 prompts is about sqrt(0.99 * 0.01 / 5000) = 0.14 percentile points
SAMPLE_PROMPTS = 5_000
# the columns of the nodes table the quantiles need (the rest is counted exactly while streaming)
_SAMPLED_NODE_COLUMNS = [
    "prompt_id",
    "node_index",
    "node",
    "op",
    "layer",
    "status",
    "budget",
    "propagated_budget",
    "is_output",
    *QUANTILE_METRICS,
]
# counted exactly per node: (column, how); see _exact_node_part
_EXACT_COUNTS = (
    "n_prompts", "fail", "warn", "not_captured", "nonfinite", "replay_mismatch", "over_propagated", "fail_with_effect",
)  # fmt: skip


def _sample_threshold(paths: list[str], k: int) -> int:
    """The sample key of the k-th smallest prompt over the shards (every prompt when there are fewer): the
    prompts whose key is at most this form a fixed, corpus-wide uniform sample, found with a bounded heap."""
    import heapq

    from .embeddings import sample_key

    heap: list[int] = []  # max-heap of the k smallest keys (negated)
    for p in paths:
        for pid in pq_prompt_ids(p):
            key = -sample_key(pid)
            if len(heap) < k:
                heapq.heappush(heap, key)
            elif key > heap[0]:
                heapq.heapreplace(heap, key)
    return -heap[0] if len(heap) >= k else 2**64


def _nonempty_shards(shard_tables: dict[str, list[str]]) -> dict[str, list[str]]:
    """The tables of the shards that hold prompts. A shard the hash gave no prompt (fewer prompts than shards)
    has empty tables, and those whose columns come from the rows (nodes, prompts) have no columns at all, so
    it contributes nothing and is left out here, once, instead of in every reader."""
    import pyarrow.parquet as pq

    keep = [i for i, p in enumerate(shard_tables["nodes"]) if pq.ParquetFile(p).metadata.num_rows > 0]
    return {name: [paths[i] for i in keep] for name, paths in shard_tables.items()}


def pq_prompt_ids(path: str) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=["prompt_id"]).column(0).unique().to_pylist()


def _in_sample(df: pd.DataFrame, threshold: int) -> pd.DataFrame:
    from .embeddings import sample_key

    if not len(df):
        return df
    ids = df["prompt_id"].unique()
    keep = {p for p in ids if sample_key(p) <= threshold}  # one hash per prompt, not per row
    return df[df["prompt_id"].isin(keep)].copy()


_COSINE = "embedding_cosine"  # the worst-prompts column holding the final-embedding cosine


@dataclass
class _Corpus:
    """What aggregation keeps while it reads the shards one at a time: exact counts, maxima and histograms,
    the rows of the sampled prompts, and the worst prompts so far."""

    threshold: int  # sample key bound (_sample_threshold)
    n_experts: int
    worst_n: int
    key_nodes: list[str] = field(default_factory=list)  # Graph.key_nodes(): the prompt table's error columns
    sampled: dict = field(default_factory=lambda: {"nodes": [], "hypotheses": [], "prompts": []})
    exact_nodes: list = field(default_factory=list)
    first_counts: dict = field(default_factory=dict)
    hyp_counts: dict = field(default_factory=dict)
    hyp_fallback: dict = field(default_factory=dict)
    ev_counts: dict = field(default_factory=dict)
    routing: dict = field(default_factory=dict)
    emb: dict = field(default_factory=lambda: {"n": 0, "min": math.inf, "hist": None, "worst": []})
    empty_nodes: pd.DataFrame | None = None
    nonfinite_origins: dict = field(default_factory=dict)  # node -> [prompts, JSON of its non-finite weights]
    worst: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=[*worst_mod.WORST_COLUMNS, _COSINE]))
    prompt_rows: list = field(default_factory=list)  # compare.prompt_table rows of the shards read so far

    def add_nodes(self, nodes: pd.DataFrame) -> None:
        if self.empty_nodes is None:
            self.empty_nodes = nodes.iloc[:0]
        if not len(nodes):
            return
        self.exact_nodes.append(_exact_node_part(nodes))
        firsts = nodes.drop_duplicates("prompt_id")["first_divergence"].replace("", "(none)").value_counts()
        for node, c in firsts.items():
            self.first_counts[node] = self.first_counts.get(node, 0) + int(c)
        if "nonfinite_origin" in nodes:
            per_prompt = nodes.drop_duplicates("prompt_id")
            for node, weights in zip(per_prompt["nonfinite_origin"], per_prompt["nonfinite_weights"], strict=True):
                if node:
                    self.nonfinite_origins.setdefault(node, [0, weights])[0] += 1
        part = _in_sample(nodes[_SAMPLED_NODE_COLUMNS], self.threshold)
        for c in ("prompt_id", "op", "status"):  # repeated strings: categoricals, not objects
            part[c] = part[c].astype("category")
        self.sampled["nodes"].append(part)

    def add_hypotheses(self, hyp: pd.DataFrame) -> None:
        if not len(hyp):
            return
        top = hyp[hyp["rank"] == 1]
        # an unexplained node is one group, whatever candidate happened to come closest on each prompt
        for key, g in top.groupby(["node", "verdict", "explained_by"]):
            self.hyp_counts[key] = self.hyp_counts.get(key, 0) + g["prompt_id"].nunique()
            self.hyp_fallback.setdefault(key, _group_medians(g))
        for key, g in hyp.groupby(["node", "candidate"]):
            self.ev_counts[key] = self.ev_counts.get(key, 0) + g["prompt_id"].nunique()
        self.sampled["hypotheses"].append(_in_sample(hyp, self.threshold))

    def add_prompts(self, prompts: pd.DataFrame, nodes: pd.DataFrame, routing: pd.DataFrame) -> None:
        if len(nodes):
            per_prompt = worst_mod.per_prompt(nodes)  # once: the ranking and the prompt table both need it
            self.worst = _worst_update(self.worst, per_prompt, prompts, self.worst_n)
            self.prompt_rows.append(prompt_table.shard_rows(per_prompt, nodes, prompts, routing, self.key_nodes))
        self.sampled["prompts"].append(_in_sample(prompts, self.threshold))
        _embedding_accumulate(self.emb, prompts)
        _routing_accumulate(self.routing, routing, self.n_experts)


def aggregate(
    shard_tables: dict[str, list[str]],
    outputs: dict[str, str],
    meta: dict,
    sample_prompts: int = SAMPLE_PROMPTS,
    tokens: list[str] | None = None,
    worst_n: int = 20,
    key_nodes: list[str] | None = None,
    search=None,
) -> dict:
    """Combine the shards' tables; write the summaries named in ``outputs`` and the verdict.

    Shards are read one at a time. Counts, maxima, worst prompts, histograms and expert loads are exact;
    quantiles and medians come from a fixed sample of ``sample_prompts`` prompts (the smallest sha256 keys
    of prompt_id: every prompt of a corpus up to that size). So memory is bounded by one shard plus the
    sample, whatever the corpus size. The worst ``worst_n`` prompts (compare.worst) are ranked here, once, with
    what the report shows of them (heatmap, per-token errors, drill-down): a report reads summaries only.
    ``tokens``: the tokens shards (the prompts' texts). ``key_nodes``: ``Graph.key_nodes()`` of the run's graph,
    the error columns of the prompt table (default: the nodes the drill-down shard tables hold, the same list).
    ``search``: how to search the nodes the catalogue left unexplained, once for the run, on the shards' merged
    samples (actdiff.compare.search_run.RunSearch; None: no search, refused when a shard kept a sample)."""
    if tokens:  # what `actdiff check --baseline` compares: a baseline of another corpus is refused
        meta = {**meta, "corpus_sha256": corpus_sha256(tokens)}
    excluded = read_excluded(shard_tables["nodes"])  # prompts the side was fitted on: no shard table holds them
    if excluded:
        meta = {**meta, "excluded_prompts": excluded_summary(excluded)}
    # where the reference ran and in what precision (actdiff.reference_device; one record per distinct device)
    meta = {**meta, "reference": read_reference_records(shard_tables["nodes"])}
    shard_tables = _nonempty_shards(shard_tables)
    threshold = _sample_threshold(shard_tables["nodes"], sample_prompts)
    if key_nodes is None:
        key_nodes = prompt_table.key_nodes_of(shard_tables["drilldown"])
    acc = _Corpus(threshold, int(meta.get("experts", 0) or 0), worst_n, list(key_nodes))
    for i in range(len(shard_tables["nodes"])):
        nodes = pd.read_parquet(shard_tables["nodes"][i])
        acc.add_nodes(nodes)
        acc.add_hypotheses(pd.read_parquet(shard_tables["hypotheses"][i]))
        acc.add_prompts(pd.read_parquet(shard_tables["prompts"][i]), nodes, pd.read_parquet(shard_tables["routing"][i]))
        del nodes
    verdict = _write_summaries(acc, shard_tables, outputs, meta, search)
    _write_worst_tables(acc.worst, shard_tables, tokens or [], outputs)
    if prompt_table.NAME in outputs:
        _write_table(prompt_table.with_texts(acc.prompt_rows, tokens or []), _schema(prompt_table.NAME),
                     outputs[prompt_table.NAME])  # fmt: skip
    if "tokenization" in outputs:
        write_json_atomic(outputs["tokenization"], tokenization_summary(tokens or []))
    write_json_atomic(outputs["verdict"], verdict)
    return verdict


def _write_summaries(acc: _Corpus, shard_tables: dict, outputs: dict, meta: dict, search) -> dict:
    """The node, first-divergence, hypothesis and routing summaries and the embedding JSON; returns the verdict."""
    nodes_s = _concat(acc.sampled["nodes"], acc.empty_nodes)
    summary = node_summary(nodes_s) if len(nodes_s) else pd.DataFrame()
    if len(summary):
        summary = _apply_exact(summary, pd.concat(acc.exact_nodes, ignore_index=True))
    _write(summary, outputs["nodes"])
    first = (
        pd.DataFrame({"node": list(acc.first_counts), "prompts": list(acc.first_counts.values())})
        .sort_values(["prompts", "node"], ascending=[False, True])
        .reset_index(drop=True)
    )
    _write(first, outputs["first_divergence"])
    hyp_s = _concat(acc.sampled["hypotheses"], None)
    hyp_summary, evidence = _hypothesis_tables(hyp_s, acc.hyp_counts, acc.hyp_fallback, acc.ev_counts)
    _write(hyp_summary, outputs["hypotheses"])
    from .search_run import search_run

    searched = search_summary(search_run(shard_tables.get("search_sample", []), search))
    if "search" in outputs:
        _write(searched, outputs["search"])
    prompts_s = _concat(acc.sampled["prompts"], None)
    _write(_routing_table(acc.routing, prompts_s), outputs["routing"])
    emb = _embedding_summary(shard_tables["embeddings"], prompts_s, acc.emb, meta.get("embedding_sample", 2000))
    write_json_atomic(outputs["embeddings"], emb)
    return _verdict(summary, first, hyp_summary, evidence, searched, emb, meta, acc.nonfinite_origins)


def _worst_update(worst: pd.DataFrame, part: pd.DataFrame, prompts: pd.DataFrame, k: int) -> pd.DataFrame:
    """The k worst prompts so far, with one more shard's prompts (``worst.per_prompt``) and their final-embedding
    cosine."""
    part = part.copy()
    emb = prompts[prompts["kind"] == "embedding"].set_index("prompt_id")["value"] if len(prompts) else {}
    part[_COSINE] = part["prompt_id"].map(lambda p: float(emb.get(p, math.nan)))
    both = pd.concat([worst, part], ignore_index=True) if len(worst) else part
    return worst_mod.top(both, k)


def _write_worst_tables(worst: pd.DataFrame, shard_tables: dict, tokens: list[str], outputs: dict) -> None:
    """The worst prompts and what a report shows of them, each read from the shards with a filter (bounded)."""
    from ..tables import SUMMARY_TABLES

    ids = worst["prompt_id"].tolist()
    rank = {p: i + 1 for i, p in enumerate(ids)}
    text = _texts(tokens, set(ids))
    table = worst.assign(rank=[rank[p] for p in ids], text=[text.get(p, "") for p in ids])
    built = {
        "worst_prompts": table,
        "heatmap": _filtered(shard_tables["nodes"], ids, ["prompt_id", "node_index", "rel_l2"])
        .assign(rank=lambda d: d["prompt_id"].map(rank))
        .sort_values(["rank", "node_index"]),
        "token_errors": _token_errors(shard_tables["tokens"]),
        "drilldown": _filtered(shard_tables["drilldown"], ids, None).sort_values(
            ["prompt_id", "node_index"], key=lambda c: c.map(rank) if c.name == "prompt_id" else c
        ),
    }
    for name, df in built.items():
        if name in outputs:
            schema = SUMMARY_TABLES[name].schema
            df = df[[c for c in schema.names]] if schema is not None and len(df) else df
            _write_table(df, schema, outputs[name])


def _schema(name: str):
    from ..tables import SUMMARY_TABLES

    return SUMMARY_TABLES[name].schema


def _write_table(df: pd.DataFrame, schema, path: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pa.Table.from_pandas(df.reset_index(drop=True), schema=schema, preserve_index=False) if len(df) else None
    with atomic_path(path) as tmp:
        pq.write_table(t if t is not None else schema.empty_table(), tmp)


def _filtered(paths: list[str], ids: list[str], columns: list[str] | None) -> pd.DataFrame:
    frames = [pd.read_parquet(p, columns=columns, filters=[("prompt_id", "in", ids)]) for p in paths] if ids else []
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns or ["prompt_id"])


def _texts(tokens: list[str], ids: set[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for p in tokens:
        if ids:
            t = pd.read_parquet(p, columns=["prompt_id", "text"], filters=[("prompt_id", "in", list(ids))])
            out.update(zip(t["prompt_id"], t["text"].astype(str), strict=True))
    return out


def corpus_sha256(tokens: list[str]) -> str:
    """sha256 over the corpus as the statistics saw it: every prompt's id, text and reference token ids, in
    prompt_id order (independent of sharding and sheet order)."""
    import hashlib

    cols = ["prompt_id", "text", "reference_ids"]
    t = pd.concat([pd.read_parquet(p, columns=cols) for p in tokens], ignore_index=True).sort_values("prompt_id")
    h = hashlib.sha256()
    for pid, text, ids in zip(t["prompt_id"], t["text"], t["reference_ids"], strict=True):
        h.update(json.dumps([pid, str(text), [int(i) for i in ids]]).encode("utf-8"))
    return h.hexdigest()


TOKENIZATION_EXAMPLES = 10  # prompts whose ids differ, shown with the ids around the first difference


def tokenization_summary(tokens: list[str]) -> dict:
    """The three tokenizations over the corpus: the engine's own against its target (counts, first differing
    prompts in shard order), every pair's agreement, and what each shard's metadata records (the reference's
    tokenizer, the engine's target, max_length and its source, library versions; a list when shards differ)."""
    from ..token_shards import AGREEMENT, read_tokenization_metadata

    out = {"inputs": 0, "ids_match": 0, "ids_differ": 0, "engine_missing": 0, "truncated": 0, "examples": []}
    out["agreement"] = {col: {"equal": 0, "differ": 0, "missing": 0} for col, _, _ in AGREEMENT}
    out["examples_transformers_tokenizers"] = []
    metas: list[dict] = []
    for p in tokens:
        t = pd.read_parquet(p)
        meta = read_tokenization_metadata(p)
        if meta not in metas:
            metas.append(meta)
        match = t["ids_match"]
        out["inputs"] += len(t)
        out["ids_match"] += int((match == True).sum())  # noqa: E712
        out["engine_missing"] += int(match.isna().sum())
        out["truncated"] += int(t.get("reference_truncated", pd.Series(dtype=bool)).fillna(False).sum())
        bad = t[match == False]  # noqa: E712
        out["ids_differ"] += len(bad)
        target = "tokenizers_ids" if meta.get("engine_target") == "tokenizers" else "reference_ids"
        _examples(out["examples"], bad, ("engine_ids", "engine_ids"), (target, "reference_ids"), "first_diff")
        for col, _, _ in AGREEMENT:
            flags = t[col] if col in t else pd.Series([None] * len(t), dtype=object)
            a = out["agreement"][col]
            a["equal"] += int((flags == True).sum())  # noqa: E712
            a["differ"] += int((flags == False).sum())  # noqa: E712
            a["missing"] += int(flags.isna().sum())
        if "transformers_eq_tokenizers" in t:
            lit = t[t["transformers_eq_tokenizers"] == False]  # noqa: E712
            pair = ("tokenizers_ids", "tokenizers_ids"), ("reference_ids", "transformers_ids")
            _examples(out["examples_transformers_tokenizers"], lit, *pair, None)
    for key in ("reference", "engine_target", "max_length", "max_length_source", "versions"):
        values = [m[key] for m in metas if key in m]
        values = [v for i, v in enumerate(values) if v not in values[:i]]
        out[key] = values[0] if len(values) == 1 else (values or None)
    return out


def _examples(out: list, bad: pd.DataFrame, ids: tuple[str, str], held_to: tuple[str, str], diff_col) -> None:
    """Append the first differing prompts (up to TOKENIZATION_EXAMPLES) with both id sequences: ``ids`` and
    ``held_to`` are (Parquet column, key in the summary); the engine's examples keep the keys ``engine_ids`` and
    ``reference_ids`` (the ids of its target, whichever it is: the summary's ``engine_target``)."""
    from ..token_shards import first_difference

    for r in bad.head(TOKENIZATION_EXAMPLES - len(out)).itertuples():
        own = [int(i) for i in (getattr(r, ids[0]) if getattr(r, ids[0]) is not None else [])]
        ref = [int(i) for i in getattr(r, held_to[0])]
        fd = getattr(r, diff_col) if diff_col else first_difference(own, ref)
        fd = int(fd) if fd is not None and not pd.isna(fd) else 0
        out.append({"prompt_id": r.prompt_id, "text": str(r.text), "first_diff": fd, held_to[1]: ref, ids[1]: own})


TOKEN_NODES, TOKEN_PROMPTS = 4, 6  # the per-token plot: the first failing nodes, each on its worst prompts


def _token_errors(paths: list[str]) -> pd.DataFrame:
    """Per-token errors of the first TOKEN_NODES failing nodes (graph order), each on the TOKEN_PROMPTS prompts
    where its local error is largest: two passes, the second reading only the chosen rows."""
    best: dict[str, list[tuple[float, str]]] = {}
    for p in paths:
        t = pd.read_parquet(p, columns=["prompt_id", "node", "local_rel_l2"])
        for (node, pid), v in t.groupby(["node", "prompt_id"])["local_rel_l2"].max().items():
            best.setdefault(node, []).append((-float(v), pid))
            best[node] = sorted(best[node])[:TOKEN_PROMPTS]
    if not best:
        return pd.DataFrame()
    frames = []
    for p in paths:
        t = pd.read_parquet(p, filters=[("node", "in", list(best))])
        keep = {(n, pid) for n, lst in best.items() for _, pid in lst}
        frames.append(t[[(n, pid) in keep for n, pid in zip(t["node"], t["prompt_id"], strict=True)]])
    # in (node, prompt, token) order: the table does not depend on the order the shards come in
    return pd.concat(frames, ignore_index=True).sort_values(["node", "prompt_id", "token"], ignore_index=True)


def _concat(frames: list[pd.DataFrame], empty: pd.DataFrame | None) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    if frames:
        return pd.concat(frames, ignore_index=True)
    return empty if empty is not None else pd.DataFrame()


def _exact_node_part(nodes: pd.DataFrame) -> pd.DataFrame:
    """One shard's exact per-node counts, maxima and worst prompts (combined over shards by _apply_exact)."""
    status = nodes["status"]
    # the counts and maxima as columns summed and maximised per group by pandas itself: a Python function per
    # group and column (pandas' slow path) took 0.11 s of a MiniLM run's 0.85 s of aggregation, now 0.035 s
    nodes = nodes.assign(
        # the propagated error beyond what correct local errors can produce (actdiff.compare.propagation)
        over_propagated=nodes["rel_l2"] > nodes["propagated_budget"],
        # a local failure on a prompt whose outputs diverge: a deviation with an effect
        fail_with_effect=(status == "fail") & nodes["output_diverges"],
        **{f"is_{s}": status == s for s in ("fail", "warn", "not_captured", "nonfinite")},
        **{f"finite_{m}": nodes[m].replace([np.inf, -np.inf], np.nan) for m in QUANTILE_METRICS},
    )
    g = nodes.groupby(["node_index", "node"], sort=True)
    part = g.agg(
        n_prompts=("prompt_id", "size"),
        fail=("is_fail", "sum"),
        warn=("is_warn", "sum"),
        not_captured=("is_not_captured", "sum"),
        nonfinite=("is_nonfinite", "sum"),
        replay_mismatch=("replay_mismatch", "sum"),
        over_propagated=("over_propagated", "sum"),
        fail_with_effect=("fail_with_effect", "sum"),
        replay_gap_max=("replay_gap", "max"),
        **{f"{m}_max": (f"finite_{m}", "max") for m in QUANTILE_METRICS},
    )
    # ties (exact zeros are common) broken by prompt_id, so the worst prompts do not depend on shard order
    worst = nodes.sort_values(["local_rel_l2", "prompt_id"], ascending=[False, True]).groupby("node").head(3)
    part["worst"] = worst.groupby(["node_index", "node"]).apply(
        lambda w: list(zip(w["local_rel_l2"].fillna(-np.inf), w["prompt_id"], strict=True)), include_groups=False
    )
    return part.reset_index()


def _apply_exact(summary: pd.DataFrame, exact: pd.DataFrame) -> pd.DataFrame:
    g = exact.groupby(["node_index", "node"], sort=True)
    agg = g[list(_EXACT_COUNTS)].sum()
    agg["replay_gap_max"] = g["replay_gap_max"].max()
    for m in QUANTILE_METRICS:
        agg[f"{m}_max"] = g[f"{m}_max"].max()
    agg["worst_prompts"] = g["worst"].agg(
        lambda parts: json.dumps([p for _, p in sorted((x for w in parts for x in w), key=lambda t: (-t[0], t[1]))[:3]])
    )
    agg = agg.reset_index()
    out = summary.drop(columns=[c for c in agg.columns if c not in ("node_index", "node")], errors="ignore")
    out = out.merge(agg, on=["node_index", "node"], how="left")
    return out[[*summary.columns, "replay_gap_max"]]


HYPOTHESIS_COLUMNS = [
    "node",
    "verdict",
    "explained_by",
    "prompts",
    "error_median",
    "baseline_error_median",
    "says",
    "candidates",
]


def _group_medians(g: pd.DataFrame) -> tuple[float, float, str]:
    """(median residual of the top candidate, median baseline error, its sentence when it explains)."""
    explained = g["verdict"].iloc[0] == "explained"
    return float(g["error"].median()), float(g["baseline_error"].median()), g["says"].iloc[0] if explained else ""


def _hypothesis_tables(hyp_s, hyp_counts, hyp_fallback, ev_counts):
    """Per (node, verdict, cause): prompts and medians. An unexplained group names no candidate: its error is
    the best residual any catalogue entry reached, ``candidates`` how many were tried."""
    if not hyp_counts:
        return pd.DataFrame(columns=HYPOTHESIS_COLUMNS), pd.DataFrame(
            columns=["node", "candidate", "error_median", "prompts"]
        )
    med = {}
    if len(hyp_s):
        top = hyp_s[hyp_s["rank"] == 1]
        for key, g in top.groupby(["node", "verdict", "explained_by"]):
            med[key] = _group_medians(g)
    tried = {}
    for node, _cand in ev_counts:
        tried[node] = tried.get(node, 0) + 1
    rows = []
    for key, n in hyp_counts.items():
        e, b, says = med.get(key, hyp_fallback[key])  # a group outside the sample: its first shard's median
        rows.append(dict(zip(HYPOTHESIS_COLUMNS, [*key, n, e, b, says, tried.get(key[0], 0)], strict=True)))
    hyp_summary = pd.DataFrame(rows, columns=HYPOTHESIS_COLUMNS).sort_values(
        ["prompts", "node"], ascending=[False, True]
    )
    ev_med = hyp_s.groupby(["node", "candidate"])["error"].median().to_dict() if len(hyp_s) else {}
    evidence = pd.DataFrame(
        [
            {"node": k[0], "candidate": k[1], "error_median": float(ev_med.get(k, math.nan)), "prompts": n}
            for k, n in ev_counts.items()
        ],
        columns=["node", "candidate", "error_median", "prompts"],
    )
    return hyp_summary.reset_index(drop=True), evidence


def search_summary(t: pd.DataFrame) -> pd.DataFrame:
    """Per searched node of the ``search`` rows (actdiff.compare.search_run): the best explaining finding (lowest
    residual relative to its baseline), else the best finding; candidates tried and seconds summed over the
    searches of the node (one per run; rows of several searches, e.g. concatenated runs, add up), timed_out if
    any ran out."""
    from ..tables import SUMMARY_TABLES

    schema = SUMMARY_TABLES["search"].schema
    if not len(t):
        return schema.empty_table().to_pandas()
    rows = []
    for _, g in t.groupby("node", sort=False):
        runs = g.drop_duplicates(["tried", "seconds", "prompts"])  # one search: its rows share these
        totals = {
            "tried": int(runs["tried"].sum()),
            "seconds": float(runs["seconds"].sum()),
            "timed_out": bool(g["timed_out"].any()),
            "prompts": int(runs["prompts"].sum()),
        }
        found = g[g["rank"] > 0].assign(ratio=lambda d: d["error"] / d["baseline_error"])
        # ties (two formats that round the op's values identically, e.g. sqrt(2) in fp16 and bf16) go to the
        # search's own order (rank: the searchers try the narrower explanation first), never the alphabet
        pick = (found[found["explains"]] if found["explains"].any() else found).sort_values(
            ["ratio", "rank"], kind="stable"
        )
        best = pick.iloc[0] if len(pick) else g.iloc[0]
        row = best.drop(labels=["ratio"], errors="ignore").to_dict()
        if not row["explains"]:  # the best residual is evidence, its sentence is not a cause: never carried
            row["says"] = ""
        rows.append({**row, **totals})
    out = pd.DataFrame(rows).sort_values("node_index", ignore_index=True)
    return out[schema.names]


ROUTING_COLUMNS = [
    "layer", "tokens", "agreement", "jaccard_mean", "flips", "flips_explained", "near_ties", "ref_load", "eng_load",
    "forced_rel_l2_median", "moe_out_rel_l2_median", "margin_hist", "margin_hist_flips", "margin_edges",
]  # fmt: skip
MARGIN_EDGES = np.concatenate([[0.0], np.logspace(-6, 0, 25)])


def _routing_accumulate(acc: dict, routing: pd.DataFrame, n_experts: int) -> None:
    """Add one shard's routing rows to per-layer sums (tokens, agreements, loads, margin histograms)."""
    for layer, g in routing.groupby("layer"):
        a = acc.setdefault(
            int(layer),
            {
                "tokens": 0,
                "agree": 0,
                "jaccard": 0.0,
                "flips": 0,
                "flips_explained": 0,
                "near_ties": 0,
                "ref_load": np.zeros(n_experts, np.int64),
                "eng_load": np.zeros(n_experts, np.int64),
                "hist": np.zeros(len(MARGIN_EDGES) - 1, np.int64),
                "hist_flips": np.zeros(len(MARGIN_EDGES) - 1, np.int64),
            },
        )
        flips = ~g["agree"].to_numpy()
        m = np.clip(g["ref_margin"].to_numpy(np.float64), 0, 1)
        a["tokens"] += len(g)
        a["agree"] += int(g["agree"].sum())
        a["jaccard"] += float(g["jaccard"].sum())
        a["flips"] += int(flips.sum())
        a["flips_explained"] += int(g["flip_explained"].sum())
        a["near_ties"] += int(g["near_tie"].sum())
        a["ref_load"] += expert_load(np.array(g["ref_experts"].tolist()), n_experts)
        a["eng_load"] += expert_load(np.array(g["eng_experts"].tolist()), n_experts)
        a["hist"] += np.histogram(m, MARGIN_EDGES)[0]
        a["hist_flips"] += np.histogram(m[flips], MARGIN_EDGES)[0]


def _routing_table(acc: dict, prompts_s: pd.DataFrame) -> pd.DataFrame:
    if not acc:
        return pd.DataFrame(columns=ROUTING_COLUMNS)
    moe = prompts_s[prompts_s["kind"] == "moe_layer"] if len(prompts_s) else pd.DataFrame(columns=["layer"])
    rows = []
    for layer in sorted(acc):
        a = acc[layer]
        ml = moe[moe["layer"] == layer]
        rows.append(
            {
                "layer": layer,
                "tokens": a["tokens"],
                "agreement": a["agree"] / a["tokens"] if a["tokens"] else math.nan,
                "jaccard_mean": a["jaccard"] / a["tokens"] if a["tokens"] else math.nan,
                "flips": a["flips"],
                "flips_explained": a["flips_explained"],
                "near_ties": a["near_ties"],
                "ref_load": json.dumps(a["ref_load"].tolist()),
                "eng_load": json.dumps(a["eng_load"].tolist()),
                "forced_rel_l2_median": float(ml["value2"].median()) if len(ml) else math.nan,
                "moe_out_rel_l2_median": float(ml["value"].median()) if len(ml) else math.nan,
                "margin_hist": json.dumps(a["hist"].tolist()),
                "margin_hist_flips": json.dumps(a["hist_flips"].tolist()),
                "margin_edges": json.dumps(MARGIN_EDGES.tolist()),
            }
        )
    return pd.DataFrame(rows, columns=ROUTING_COLUMNS)


COSINE_EDGES = np.concatenate([[0], np.logspace(-9, 0, 19)])


def _embedding_accumulate(acc: dict, prompts: pd.DataFrame) -> None:
    """Exact embedding-level counts over every prompt: minimum cosine, histogram of 1 - cosine, worst five."""
    e = prompts[prompts["kind"] == "embedding"] if len(prompts) else prompts
    if not len(e):
        return
    cos = e["value"].to_numpy(np.float64)
    acc["n"] += len(e)
    finite = np.isfinite(cos)  # NaN: an embedding holds NaN/Inf, counted apart and ranked worst
    acc["nonfinite"] = acc.get("nonfinite", 0) + int((~finite).sum())
    if finite.any():
        acc["min"] = min(acc["min"], float(cos[finite].min()))
    h = np.histogram(1 - np.clip(cos[finite], -1, 1), COSINE_EDGES)[0]
    acc["hist"] = h if acc["hist"] is None else acc["hist"] + h
    ranked = np.where(finite, cos, -math.inf).tolist()
    acc["worst"] = sorted([*acc["worst"], *zip(ranked, e["prompt_id"], strict=True)])[:5]


def _embedding_summary(paths: list[str], prompts_s: pd.DataFrame, acc: dict, sample_size: int = 2000) -> dict:
    e = prompts_s[prompts_s["kind"] == "embedding"] if len(prompts_s) else pd.DataFrame(columns=["value"])
    cos = e["value"].to_numpy(np.float64)  # the prompt sample: quantiles (of the measurable cosines)
    cos = cos[np.isfinite(cos)]
    out = {
        "prompts": int(acc["n"]),
        "cosine_min": acc["min"] if acc["n"] and math.isfinite(acc["min"]) else math.nan,
        "cosine_nonfinite": int(acc.get("nonfinite", 0)),  # prompts whose embeddings hold NaN/Inf
        "cosine_p01": float(np.quantile(cos, 0.01)) if cos.size else math.nan,
        "cosine_median": float(np.median(cos)) if cos.size else math.nan,
        "cosine_hist": acc["hist"].tolist() if acc["hist"] is not None else [],
        "worst_cosine_prompts": [p for _, p in acc["worst"]],
    }
    # each shard kept its own smallest-key sample; the corpus sample is the smallest keys over all shards,
    # merged one shard at a time so at most two shards' samples are in memory
    from .embeddings import sample_key

    sample = None
    for p in paths:
        part = pd.read_parquet(p)
        if not len(part):
            continue
        part = part.assign(key=part["prompt_id"].map(sample_key))
        sample = part if sample is None else pd.concat([sample, part], ignore_index=True)
        sample = sample.nsmallest(sample_size, "key")
    if sample is not None and len(sample):
        sample = sample.sort_values("key")
        ref = np.array(sample["ref"].tolist(), np.float64)
        eng = np.array(sample["eng"].tolist(), np.float64)
        ov = neighbour_overlap(ref, eng, 10)
        out.update(
            sample_size=int(len(sample)),
            neighbour_overlap_mean=float(ov.mean()),
            neighbour_overlap_min=float(ov.min()),
            similarity_spearman=similarity_rank_correlation(ref, eng),
        )
    return out


def _verdict(
    summary: pd.DataFrame,
    first: pd.DataFrame,
    hyp: pd.DataFrame,
    evidence: pd.DataFrame,
    searched: pd.DataFrame,
    emb: dict,
    meta: dict,
    origins: dict | None = None,
) -> dict:
    """The run's verdict. FAIL when the replay is not the code that ran at some node, or when the outputs
    diverge beyond their propagated budgets (actdiff.compare.propagation), failing node or not; DEVIATES when
    nodes differ from the spec but no output moves beyond what correct local errors produce; else PASS."""
    failing = summary[summary["fail"] > 0] if len(summary) else summary
    v = {
        **meta,
        "failing_nodes": int(len(failing)),
        "prompts": int(summary["n_prompts"].max()) if len(summary) else 0,
        "first_divergence": None,
        "first_divergence_prompts": 0,
        "hypothesis": None,
        "explained": False,
        "evidence": [],
        "embedding_cosine_min": emb.get("cosine_min"),
        "embedding_nonfinite": emb.get("cosine_nonfinite", 0),
        "not_captured_nodes": summary.loc[summary["not_captured"] > 0, "node"].tolist() if len(summary) else [],
        "replay_mismatches": _replay_mismatches(summary),
        "replay": _replay_statement(summary),
        "outputs": _outputs(summary),
    }
    first_real = first[first["node"] != "(none)"]
    if len(first_real):
        v["first_divergence"] = first_real.iloc[0]["node"]
        v["first_divergence_prompts"] = int(first_real.iloc[0]["prompts"])
    v["causes"] = _causes(summary, hyp, searched)
    _headline_cause(v, evidence)
    v["nonfinite"] = _nonfinite(summary, origins or {})
    v["status"] = (
        "fail" if v["replay_mismatches"] or v["outputs"]["diverge"] or len(failing) and v["nonfinite"]["nodes"]
        else "nonfinite" if v["nonfinite"]["nodes"] else "deviates" if len(failing) else "pass"
    )  # fmt: skip
    _unbudgeted_is_never_pass(v)
    # only failing nodes: a list of passing nodes under "worst nodes" reads as a finding
    worst = failing.sort_values("local_over_budget_max", ascending=False).head(5) if len(failing) else failing
    v["worst_nodes"] = [
        {
            "node": r.node,
            "local_rel_l2_max": float(r.local_rel_l2_max),
            "budget": float(r.budget_median),
            "local_over_budget_max": float(r.local_over_budget_max),
            "fail": int(r.fail),
        }
        for r in worst.itertuples()
    ]
    v["warned_nodes"] = int((summary["warn"] > 0).sum()) if len(summary) else 0
    v["plain"] = plain_words(v)
    return v


def _unbudgeted_is_never_pass(v: dict) -> None:
    """A precision that rounds something no budget allows for (8-bit activations: compare.budgets.unbudgeted)
    is never PASS: no failing node there only means its error hid under the other allowances, while its
    embeddings move. It DEVIATES at best, saying why."""
    from ..errors import ConfigError
    from ..variants import parse_variant
    from .budgets import unbudgeted

    try:
        gap = unbudgeted(parse_variant(str(v.get("variant"))).precision, v.get("side"))
    except ConfigError:  # a run labelled outside the variant grammar (a test's meta): nothing to add
        return
    if gap is None:
        return
    v["unbudgeted"] = gap
    if v["status"] == "pass":
        v["status"] = "deviates"


def _nonfinite(summary: pd.DataFrame, origins: dict) -> dict:
    """Nodes whose NaN/Inf match on both sides (status nonfinite), and where they start: the origin node per
    prompt with the checkpoint tensors of its that hold NaN/Inf (actdiff.compare.stats)."""
    out = {"nodes": [], "origins": [], "statement": None}
    if not len(summary) or "nonfinite" not in summary:
        return out
    bad = summary[summary["nonfinite"] > 0].sort_values("node_index")
    out["nodes"] = bad["node"].tolist()
    order = dict(zip(summary["node"], summary["node_index"], strict=True))
    for node, (prompts, weights) in sorted(origins.items(), key=lambda kv: order.get(kv[0], 0)):
        out["origins"].append({"node": node, "prompts": int(prompts), "weights": json.loads(weights or "{}")})
    if out["nodes"]:
        out["statement"] = _nonfinite_words(out)
    return out


def _nonfinite_words(nf: dict) -> str:
    heads = []
    for o in nf["origins"]:
        w = ", ".join(f"{t} ({c} NaN/Inf values)" for t, c in o["weights"].items())
        src = f"from weight tensor {w}" if w else "with finite weights (an overflow in the op itself)"
        heads.append(f"at {o['node']} on {o['prompts']} prompt(s), {src}")
    where = "; ".join(heads) or f"at {nf['nodes'][0]}"
    return (
        f"The model itself produces NaN/Inf {where}. Both sides have them at the same positions in "
        f"{len(nf['nodes'])} node(s) ({_nodes_words(nf['nodes'])}), and those positions are not compared: "
        "the errors given are over the finite values only. Fix the checkpoint (or the overflow) and rerun."
    )


REPLAYED = (
    "every node was replayed on the side's own inputs and reproduced its dump (bit for bit; within the node's "
    "budget on a fused path), so the local errors judge the code that ran"
)
NOT_REPLAYED = (
    "this side cannot replay its ops: each node's local error is its dumped output against the specified op on "
    "its own dumped inputs, which judges the values it produced; not proven: that each dumped value is the one its "
    "next op consumed (a tap taken before an in-place change, or inside a fused kernel the taps do not see), nor "
    "anything about nodes it did not capture"
)


def _replay_statement(summary: pd.DataFrame) -> dict:
    """What the replay proved for this side, or what a side without replay leaves unproven."""
    available = bool(len(summary)) and "replay_gap_max" in summary and bool(summary["replay_gap_max"].notna().any())
    if not available:
        return {"available": False, "statement": NOT_REPLAYED}
    bad = int((summary["replay_mismatch"] > 0).sum())
    text = REPLAYED if not bad else f"the replay did NOT reproduce the dump at {bad} node(s) (see replay_mismatches)"
    return {"available": True, "statement": text}


def _replay_mismatches(summary: pd.DataFrame) -> list[dict]:
    """Nodes where the side's replay on its own inputs does not reproduce its dump, in graph order."""
    if not len(summary) or "replay_mismatch" not in summary:
        return []
    bad = summary[summary["replay_mismatch"] > 0].sort_values("node_index")
    return [
        {"node": r.node, "prompts": int(r.replay_mismatch), "replay_gap_max": float(r.replay_gap_max)}
        for r in bad.itertuples()
    ]


def _outputs(summary: pd.DataFrame) -> dict:
    """The output nodes against their propagated budgets; where the propagated error first exceeds what the
    local budgets allow (the node to look at when outputs diverge and no node fails locally)."""
    out = {"diverge": False, "nodes": [], "grows_most": None, "prompts_diverging": 0}
    if not len(summary) or "over_propagated" not in summary:
        return out
    names = set(summary.loc[summary["is_output"], "node"])  # actdiff.compare.propagation.output_nodes
    rows = summary[summary["node"].isin(names)].sort_values("node_index")
    out["nodes"] = [
        {
            "node": r.node,
            "rel_l2_max": float(r.rel_l2_max),
            "propagated_budget_median": float(r.propagated_budget_median),
            "prompts_over": int(r.over_propagated),
        }
        for r in rows.itertuples()
    ]
    out["prompts_diverging"] = int(rows["over_propagated"].max()) if len(rows) else 0
    out["diverge"] = out["prompts_diverging"] > 0
    over = summary[summary["over_propagated"] > 0].sort_values("node_index")
    if out["diverge"] and len(over):
        out["grows_most"] = over.iloc[0]["node"]
    return out


def _headline_cause(v: dict, evidence: pd.DataFrame) -> None:
    """The cause of the first divergent node (or first replay mismatch) as the verdict's headline. Catalogue
    evidence is listed only when a catalogue entry explains; an unexplained node names no candidate."""
    node = v["replay_mismatches"][0]["node"] if v["replay_mismatches"] else v["first_divergence"]
    cause = next((c for c in v["causes"] if node in c["nodes"]), None)
    if node is None or cause is None:
        return
    v["explained"] = cause["hypothesis"] != "unexplained"
    v["hypothesis"] = cause["hypothesis"]
    v["hypothesis_kind"] = cause["kind"]
    v["hypothesis_says"] = cause["says"]
    v["hypothesis_error"] = cause["error_median"]
    v["baseline_error"] = cause["baseline_error_median"]
    if cause["kind"] == "catalogue":
        ev = evidence[evidence["node"] == node].sort_values("error_median")
        v["evidence"] = [
            {"hypothesis": r.candidate, "error_median": float(r.error_median)} for r in ev.head(8).itertuples()
        ]
    else:
        v["tried"] = cause.get("tried", {})


def _node_cause(node: str, hyp: pd.DataFrame, searched: pd.DataFrame) -> dict:
    """One failing node's cause: the catalogue entry that explains most of its prompts, else the search's
    explaining finding, else unexplained (with what was tried and the best residual)."""
    h = hyp[hyp["node"] == node].sort_values("prompts", ascending=False)
    s = searched[searched["node"] == node] if len(searched) else searched
    top = h.iloc[0] if len(h) else None
    if top is not None and top["verdict"] == "explained":
        return {
            "hypothesis": top["explained_by"],
            "kind": "catalogue",
            "says": top["says"],
            "params": {},
            "prompts": int(top["prompts"]),
            "error_median": float(top["error_median"]),
            "baseline_error_median": float(top["baseline_error_median"]),
        }
    base = float(top["baseline_error_median"]) if top is not None else math.nan
    prompts = int(h.loc[h["verdict"] == "unexplained", "prompts"].sum()) if len(h) else 0
    if len(s) and bool(s.iloc[0]["explains"]):
        f = s.iloc[0]
        return {
            "hypothesis": f["name"],
            "kind": f["kind"],
            "says": f["says"],
            "params": json.loads(f["params"]),
            "prompts": prompts,
            "error_median": float(f["error"]),
            "baseline_error_median": float(f["baseline_error"]),
            "searched_prompts": int(f["prompts"]),
        }
    cat_best = float(top["error_median"]) if top is not None else math.nan
    search_best = float(s.iloc[0]["error"]) if len(s) and s.iloc[0]["rank"] > 0 else math.nan
    bests = [e for e in (cat_best, search_best) if not math.isnan(e)]
    tried = {
        "catalogue": int(top["candidates"]) if top is not None else 0,
        "searched": int(s.iloc[0]["tried"]) if len(s) else 0,
        "search_seconds": float(s.iloc[0]["seconds"]) if len(s) else 0.0,
        "search_timed_out": bool(s.iloc[0]["timed_out"]) if len(s) else False,
        "best_residual": min(bests) if bests else math.nan,
    }
    return {
        "hypothesis": "unexplained",
        "kind": "unexplained",
        "says": None,
        "params": {},
        "prompts": prompts,
        "error_median": tried["best_residual"],
        "baseline_error_median": base,
        "tried": tried,
    }


def _causes(summary: pd.DataFrame, hyp: pd.DataFrame, searched: pd.DataFrame) -> list[dict]:
    """Every distinct root cause among the failing nodes (and nodes whose replay does not reproduce the dump),
    one entry per cause with the nodes it explains, in graph order; ``harmless`` when no prompt on which those
    nodes fail has outputs beyond their propagated budgets. An engine with two independent bugs gets both."""
    if not len(summary):
        return []
    order = dict(zip(summary["node"], summary["node_index"], strict=True))
    bad = summary[(summary["fail"] > 0) | (summary.get("replay_mismatch", 0) > 0)]
    effect = dict(zip(summary["node"], summary.get("fail_with_effect", pd.Series(0, index=summary.index)), strict=True))
    groups: dict[tuple, dict] = {}
    for node in bad.sort_values("node_index")["node"]:
        c = _node_cause(node, hyp, searched)
        key = (c["hypothesis"], c["kind"])
        g = groups.setdefault(
            key, {**c, "nodes": [], "first_node_index": int(order[node]), "effect": 0, "errors": [], "baselines": []}
        )
        g["nodes"].append(node)
        g["effect"] += int(effect.get(node, 0))
        g["errors"].append(c["error_median"])
        g["baselines"].append(c["baseline_error_median"])
    out = []
    for g in groups.values():
        g["error_median"] = float(np.nanmedian(g.pop("errors"))) if g["nodes"] else math.nan
        g["baseline_error_median"] = float(np.nanmedian(g.pop("baselines")))
        g["harmless"] = g.pop("effect") == 0
        out.append(g)
    return sorted(out, key=lambda c: (c["hypothesis"] == "unexplained", c["first_node_index"]))


def _cause_words(c: dict) -> str:
    if c["hypothesis"] == "unexplained":
        t = c.get("tried", {})
        if not t.get("catalogue") and not t.get("searched"):  # the statistics ranked nothing at these nodes
            return (
                "no candidate cause was tried there: causes are ranked only where a node's local error exceeds its "
                "budget (a node listed for its replay alone may be within it), and with stats.diagnose_all_failing "
                "false only at the first such node"
            )
        return (
            f"nothing tried reproduces the engine there: {t.get('catalogue', 0)} catalogue entries and "
            f"{t.get('searched', 0)} searched candidates"
            + (" (the search's time budget ran out)" if t.get("search_timed_out") else "")
            + f"; the best residual is {c['error_median']:.2e} against {c['baseline_error_median']:.2e} for the "
            "op as specified"
        )
    how = "a catalogue entry" if c["kind"] == "catalogue" else f"found by the search ({c['kind']})"
    return (
        f"{c['says']} [{c['hypothesis']}, {how}: reproduces the engine to relative error {c['error_median']:.2e}, "
        f"against {c['baseline_error_median']:.2e} for the op as specified]"
    )


def _nodes_words(nodes: list[str]) -> str:
    return ", ".join(nodes[:4]) + (f" and {len(nodes) - 4} more" if len(nodes) > 4 else "")


def plain_words(v: dict) -> str:
    """The verdict in a few sentences: status, replay findings, output impact, every cause."""
    nc = v.get("not_captured_nodes") or []
    tail = f" {len(nc)} node(s) were not captured by the engine and are not judged: {_nodes_words(nc)}." if nc else ""
    out = v.get("outputs") or {}
    run = f"{v.get('model')} / {v.get('side')} / {v.get('variant')}"
    warned = (
        f", {v['warned_nodes']} node(s) warn (propagated error over budget, local error within it)"
        if v.get("warned_nodes")
        else ""
    )
    cos = v.get("embedding_cosine_min")
    cos_s = f"; minimum embedding cosine {cos:.6f}" if cos is not None and not pd.isna(cos) else ""
    if v.get("embedding_nonfinite"):
        cos_s += f"; embedding cosine not measurable on {v['embedding_nonfinite']} input(s) (NaN/Inf embeddings)"
    if not (v.get("replay") or {}).get("available", True):
        tail += f" Replay: {NOT_REPLAYED}."
    nf = (v.get("nonfinite") or {}).get("statement")
    tail = f" {nf}" + tail if nf else tail
    ex = excluded_words(v.get("excluded_prompts"))
    tail = f" {ex}" + tail if ex else tail
    if v["status"] == "pass":
        return (
            f"PASS: every node of {run} is within its error budget on all {v['prompts']} prompts and the outputs "
            f"stay within their propagated budgets{warned}{cos_s}." + tail
        )
    parts = [f"{v['status'].upper()}: {run}, {v['prompts']} prompts{cos_s}."]
    for m in v.get("replay_mismatches", []):
        parts.append(
            f"The engine's replay of {m['node']} on its own inputs does not reproduce its dumped value on "
            f"{m['prompts']} prompt(s) (relative gap up to {m['replay_gap_max']:.2e}): the forward ran other code than "
            "the per-node replay, so that node is judged on its dumped output against the spec."
        )
    if out.get("diverge"):
        parts.append(
            f"The outputs diverge beyond their propagated budgets on {out['prompts_diverging']} prompt(s); the "
            f"propagated error first exceeds what correct local errors allow at {out.get('grows_most')}."
        )
    if v["failing_nodes"]:
        parts.append(
            f"{v['failing_nodes']} node(s) exceed their local error budget; the engine first diverges at "
            f"{v['first_divergence']} ({v['first_divergence_prompts']} prompts){warned}."
        )
    elif out.get("diverge"):
        parts.append("No node fails locally.")
    if v.get("unbudgeted"):
        parts.append(
            f"Not budgeted: {v['unbudgeted']}, so this variant is never PASS"
            + ("; no node exceeds its budget, but the error it adds is accounted for by none." if not v["failing_nodes"]
               else ".")
        )
    for c in v.get("causes", []):
        effect = " It has no measurable effect on the outputs (within their propagated budgets)."
        effect = effect if c.get("harmless") else ""
        parts.append(f"At {_nodes_words(c['nodes'])}: {_cause_words(c)}.{effect}")
    return " ".join(parts) + tail
