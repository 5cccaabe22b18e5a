"""Per-shard divergence statistics: one pass over a shard's prompts, streaming (tables are written in
row groups as prompts are processed, so memory does not grow with the shard's size).

For every (prompt, node):
- propagated error: the engine's value against the reference's (the error the user sees);
- local error (teacher forcing): the engine's op replayed on the REFERENCE's inputs for that node
  (our engine: ``Engine.replay_node`` through the same C kernels), against the reference's value. For an
  external engine, whose ops cannot be replayed, the local error is the engine's output against the
  specified op run on the ENGINE's own inputs (actdiff.compare.refops): the same separation, from the
  other side;
- amplification = propagated / local: how much inherited error the node carries;
- status pass/warn/fail from the local error and the node's budget (actdiff.compare.budgets).

Per prompt: the first divergent node (first node in graph order that fails while its inputs pass), the
root-cause ranking at that node (actdiff.compare.hypotheses), MoE routing agreement and forced-routing
error per layer, the pooled-embedding cosine. Per shard: the worst prompts' first values of the key
nodes on both sides (drill-down that survives deleting the HDF5 dumps) and a bounded sample of
embeddings for the corpus-level neighbour analysis.
"""

from __future__ import annotations

import heapq
import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..atomic import atomic_path
from ..errors import DumpError
from ..h5io import ActivationReader
from ..nodes import INPUT_IDS, Graph, build_graph, load_config_json
from ..variants import parse_variant
from .budgets import U32, Noise, budget, fp32_noise, status
from .embeddings import BoundedSample, cosine
from .metrics import FLOAT_METRICS, compare, per_token_errors, rel_l2
from .routing import margins, routing_rows

log = logging.getLogger(__name__)

NOT_CAPTURED = "not_captured"  # status of a node the engine's dump does not provide
DRILL_VALUES = 8  # first values of token 0 kept per key node
KEY_SUFFIXES = ("attn.out_proj", "norm1", "mlp.fc2", "experts.bias_add", "router.logits", "router.probs", "norm2")
KEY_NODES = ("embeddings", "emb_ln", "pooled", "embedding")


def key_nodes(graph: Graph) -> list[str]:
    return [n.name for n in graph if n.name in KEY_NODES or n.name.endswith(KEY_SUFFIXES)]


class _TableWriter:
    """Accumulates rows as column lists and writes them as Parquet row groups (streaming)."""

    def __init__(self, path: Path, flush_rows: int = 5000):
        self.path = Path(path)
        self.cols: dict[str, list] = {}
        self.rows = 0
        self.flush_rows = flush_rows
        self.writer: pq.ParquetWriter | None = None
        self._ctx = atomic_path(self.path)
        self.tmp = self._ctx.__enter__()

    def add(self, columns: dict[str, list]) -> None:
        n = len(next(iter(columns.values())))
        for k, v in columns.items():
            self.cols.setdefault(k, []).extend(v)
        self.rows += n
        if self.rows >= self.flush_rows:
            self.flush()

    def add_row(self, row: dict) -> None:
        self.add({k: [v] for k, v in row.items()})

    def flush(self) -> None:
        if not self.rows:
            return
        table = pa.Table.from_pydict(self.cols)
        if self.writer is None:
            self.schema = table.schema
            self.writer = pq.ParquetWriter(self.tmp, self.schema)
        self.writer.write_table(table.cast(self.schema))
        self.cols = {k: [] for k in self.cols}
        self.rows = 0

    def close(self, empty_schema: pa.Schema | None = None) -> None:
        self.flush()
        if self.writer is None:
            pq.write_table((empty_schema or pa.schema([])).empty_table(), self.tmp)
        else:
            self.writer.close()
        self._ctx.__exit__(None, None, None)

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)


@dataclass
class StatsConfig:
    budgets: dict = field(default_factory=dict)  # node glob -> relative L2 budget override
    worst_m: int = 5  # prompts per shard kept for the drill-down
    embedding_sample: int = 2000  # prompts kept for the neighbour analysis
    diagnose_all_failing: bool = True  # rank hypotheses at every failing node, not only the first


class CheckpointTensors(Mapping):
    """A safetensors checkpoint as a read-only mapping that reads each tensor when asked (memory-mapped), so
    the fp32-noise ops and the hypotheses never hold a second full copy of a large model's weights."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = Path(path)
        self._file = safe_open(str(self.path), framework="numpy")
        self._keys = list(self._file.keys())

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._keys:
            raise KeyError(key)
        return self._file.get_tensor(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class LocalReplay:
    """Local (teacher-forced) output of a node: our engine's replay, or the spec op on engine inputs."""

    def __init__(self, graph: Graph, model_dir: Path, side: str, variant: str):
        self.graph = graph
        self.variant = variant
        self.engine = None
        self._weights64 = None
        self.model_dir = model_dir
        if side == "actdiff":
            from ..engine.core import Engine

            self.engine = Engine(model_dir)
            self.engine.prepare(variant)

    @property
    def weights(self) -> CheckpointTensors:
        """The raw checkpoint tensors, read on demand (the spec ops of refops take them as stored)."""
        if self._weights64 is None:
            self._weights64 = CheckpointTensors(self.model_dir / "model.safetensors")
        return self._weights64

    def local(self, name: str, ref: dict, eng: dict) -> tuple[np.ndarray, np.ndarray]:
        """(output to judge, the value it is judged against)."""
        node = self.graph[name]
        if self.engine is not None:
            out = self.engine.replay_node(name, {i: ref[i] for i in node.inputs}, self.variant)
            return out, ref[name]
        from .refops import run_op, spec_params

        spec = run_op(self.graph, node, {i: eng[i] for i in node.inputs}, self.weights, spec_params(self.graph, node))
        return eng[name], spec


def compute_shard_stats(
    model_dir: str | Path,
    ref_h5: str | Path,
    eng_h5: str | Path,
    side: str,
    variant: str,
    shard: int,
    outputs: dict[str, str],
    cfg: StatsConfig | None = None,
) -> dict:
    """Compare one shard; write the tables named in ``outputs`` (keys: nodes, tokens, routing, drilldown,
    hypotheses, prompts, embeddings). Returns a small summary dict (for the log)."""
    from threadpoolctl import threadpool_limits

    from .hypotheses import load_catalogue, rank_hypotheses

    cfg = cfg or StatsConfig()
    model_dir = Path(model_dir)
    graph = build_graph(load_config_json(model_dir), str(model_dir / "config.json"))
    precision = parse_variant(variant).precision
    replay = LocalReplay(graph, model_dir, side, variant)
    catalogue = load_catalogue()
    dims = graph.dims
    moe_routers = [n for n in graph if n.op == "ROUTER"]
    keys = key_nodes(graph)
    writers = {k: _TableWriter(Path(v)) for k, v in outputs.items() if k != "embeddings"}
    sample = BoundedSample(cfg.embedding_sample)
    worst: list[tuple[float, str, dict]] = []  # min-heap of (score, prompt, drill rows)
    t0 = time.perf_counter()
    n_prompts = 0
    try:
        # one core (rule threads: 1): the float64 spec ops of the noise and the hypotheses call numpy's BLAS,
        # whose extra threads would only spin against the other jobs (10x slower on a loaded machine)
        with threadpool_limits(limits=1), ActivationReader(ref_h5) as rr, ActivationReader(eng_h5) as er:
            missing = [p for p in rr.prompt_ids if p not in er.index]
            if missing:
                raise DumpError(
                    f"{eng_h5}: {len(missing)} prompt(s) of the reference dump are missing, e.g. "
                    f"{missing[:3]}; the two dumps come from different token files"
                )
            names = graph.names()
            # nodes an external engine could not provide (actdiff import --allow-missing, an incomplete mapping):
            # stored as NaN placeholders, reported as "not_captured" instead of failing
            missing_nodes = frozenset(json.loads(er.attrs.get("missing_nodes", "[]") or "[]"))
            if missing_nodes:
                log.warning(
                    "%s: %d node(s) not captured by the engine: %s", eng_h5, len(missing_nodes), sorted(missing_nodes)
                )
            same_order = er.prompt_ids == rr.prompt_ids
            eng_iter = er.iter_prompts(names) if same_order else None
            for _, pid, ref in rr.iter_prompts(names):
                if eng_iter is not None:
                    _, _, eng = next(eng_iter)
                else:  # different prompt order: random access
                    eng = {n: er.node(n, pid) for n in names}
                    if "input_ids" in er.f:
                        eng[INPUT_IDS] = er.input_ids(pid)
                if INPUT_IDS not in ref:
                    raise DumpError(f"{ref_h5}: the reference dump does not record input ids; rerun dump_reference")
                eng.setdefault(INPUT_IDS, ref[INPUT_IDS])
                _one_prompt(
                    graph,
                    replay,
                    precision,
                    cfg,
                    catalogue,
                    rank_hypotheses,
                    pid,
                    ref,
                    eng,
                    writers,
                    moe_routers,
                    keys,
                    sample,
                    worst,
                    missing_nodes,
                )
                n_prompts += 1
                if n_prompts % 100 == 0:
                    log.info(
                        "stats: %d/%d prompts (%.1f prompts/s)",
                        n_prompts,
                        len(rr.prompt_ids),
                        n_prompts / (time.perf_counter() - t0),
                    )
        for _score, _pid, rows in sorted(worst, reverse=True):
            writers["drilldown"].add({k: [r[k] for r in rows] for k in rows[0]})
        for key, w in writers.items():
            w.close(empty_schema=_EMPTY_SCHEMAS.get(key))
        emb = sample.items()
        with atomic_path(outputs["embeddings"]) as tmp:
            pq.write_table(
                pa.Table.from_pydict(
                    {
                        "prompt_id": [p for p, _, _ in emb],
                        "ref": [r.ravel().tolist() for _, r, _ in emb],
                        "eng": [e.ravel().tolist() for _, _, e in emb],
                    },
                    schema=pa.schema(
                        [("prompt_id", pa.string()), ("ref", pa.list_(pa.float32())), ("eng", pa.list_(pa.float32()))]
                    ),
                ),
                tmp,
            )
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    dt = time.perf_counter() - t0
    log.info("stats: %d prompts in %.1f s (%.1f prompts/s)", n_prompts, dt, n_prompts / max(dt, 1e-9))
    return {"prompts": n_prompts, "seconds": dt, "dims": dims.hidden}


# schemas of the tables that can legitimately be empty (no failing node; no MoE layer)
_EMPTY_SCHEMAS = {
    "tokens": pa.schema(
        [
            ("prompt_id", pa.string()),
            ("node", pa.string()),
            ("token", pa.int64()),
            ("local_max_abs", pa.float64()),
            ("local_rel_l2", pa.float64()),
            ("max_abs", pa.float64()),
            ("rel_l2", pa.float64()),
        ]
    ),
    "hypotheses": pa.schema(
        [
            ("prompt_id", pa.string()),
            ("node", pa.string()),
            ("first_divergence", pa.bool_()),
            ("rank", pa.int64()),
            ("hypothesis", pa.string()),
            ("error", pa.float64()),
            ("says", pa.string()),
            ("baseline_error", pa.float64()),
            ("verdict", pa.string()),
            ("explained_by", pa.string()),
        ]
    ),
    "routing": pa.schema(
        [
            ("prompt_id", pa.string()),
            ("layer", pa.int64()),
            ("token", pa.int64()),
            ("ref_experts", pa.list_(pa.int64())),
            ("eng_experts", pa.list_(pa.int64())),
            ("agree", pa.bool_()),
            ("jaccard", pa.float64()),
            ("ref_margin", pa.float64()),
            ("near_tie", pa.bool_()),
            ("flip_explained", pa.bool_()),
        ]
    ),
}


def _one_prompt(
    graph,
    replay,
    precision,
    cfg,
    catalogue,
    rank_hypotheses,
    pid,
    ref,
    eng,
    writers,
    moe_routers,
    keys,
    sample,
    worst,
    missing: frozenset = frozenset(),
):
    T = len(ref[INPUT_IDS])
    noise: dict[str, Noise] = {}  # each node's fp32 noise on this prompt (budgets.fp32_noise)
    status_of: dict[str, str] = {}
    local_out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    rows: dict[str, list] = {}
    failing: list[str] = []
    for node in graph:
        name = node.name
        r, e = ref[name], eng[name]
        noise[name] = fp32_noise(graph, node, ref, replay.weights)
        b = budget(node, precision, noise[name], cfg.budgets)
        # an external engine's op replays on its own inputs: impossible when one of them was not captured
        blind = replay.engine is None and any(i in missing for i in node.inputs)
        if name in missing:
            m = {k: math.nan for k in FLOAT_METRICS}
            m.update(nan_ref=0, inf_ref=0, nan_eng=0, inf_eng=0, max_abs_token=-1, max_abs_channel=-1)
            local_rel, st = math.nan, NOT_CAPTURED
        elif blind:  # judged on the propagated error only (pass or warn)
            if node.kind == "index":
                m = {k: math.nan for k in FLOAT_METRICS}
                mism = float(np.mean(np.any(np.sort(e, 1) != np.sort(r, 1), axis=1))) if r.size else 0.0
                m.update(rel_l2=mism, nan_ref=0, inf_ref=0, nan_eng=0, inf_eng=0, max_abs_token=-1, max_abs_channel=-1)
            else:
                m = compare(e, r)
            local_rel = math.nan
            st = status(0.0, m["rel_l2"], b, (m["nan_eng"] + m["inf_eng"]) > (m["nan_ref"] + m["inf_ref"]))
        elif node.kind == "index":
            lo, lref = replay.local(name, ref, eng)
            # top-k ids: a disagreement at a reference near-tie (margin within the probabilities' budget) is
            # legitimate; only disagreements at clear margins count against the node
            probs = graph[name.replace("topk_indices", "probs")]
            tie = budget(probs, precision, noise[probs.name], cfg.budgets)
            clear = margins(ref[probs.name], e.shape[1]) > tie
            # compared as sets: the order inside the top-k only permutes the expert slots
            mism = float(np.mean(np.any(np.sort(e, 1) != np.sort(r, 1), axis=1))) if r.size else 0.0
            lmism = float(np.mean(np.any(np.sort(lo, 1) != np.sort(lref, 1), axis=1) & clear)) if r.size else 0.0
            m = {k: math.nan for k in FLOAT_METRICS}
            m.update(rel_l2=mism, nan_ref=0, inf_ref=0, nan_eng=0, inf_eng=0, max_abs_token=-1, max_abs_channel=-1)
            local_rel = lmism
            st = "fail" if lmism > 0 else ("warn" if mism > 0 else "pass")
            local_out[name] = (lo, lref)
        else:
            lo, lref = replay.local(name, ref, eng)
            local_out[name] = (lo, lref)
            m = compare(e, r)
            local_rel = rel_l2(lo, lref)
            new_nonfinite = (m["nan_eng"] + m["inf_eng"]) > (m["nan_ref"] + m["inf_ref"])
            st = status(local_rel, m["rel_l2"], b, new_nonfinite)
        status_of[name] = st
        if st == "fail":
            failing.append(name)
        amp = m["rel_l2"] / max(local_rel, U32) if np.isfinite(m["rel_l2"]) and np.isfinite(local_rel) else math.nan
        row = {
            "prompt_id": pid,
            "node": name,
            "node_index": node.index,
            "op": node.op,
            "layer": node.layer if node.layer is not None else -1,
            "tokens": T,
            **m,
            "local_rel_l2": local_rel,
            "ref_fp32_error": noise[name].measured,
            "fp32_noise": noise[name].value,
            "budget": b,
            "amplification": amp,
            "status": st,
        }
        for k, v in row.items():
            rows.setdefault(k, []).append(v)
    first = next((n for n in failing if all(status_of.get(i, "pass") != "fail" for i in graph[n].inputs)), None)
    rows["first_divergence"] = [first or ""] * len(graph)
    writers["nodes"].add(rows)
    # per-token errors of failing nodes (local and propagated), for error-by-position plots
    for name in failing:
        node = graph[name]
        if node.axis != "token" or node.kind == "index":
            continue
        lo, lref = local_out[name]
        lmax, lrel = per_token_errors(lo, lref)
        pmax, prel = per_token_errors(eng[name], ref[name])
        n = len(lmax)
        writers["tokens"].add(
            {
                "prompt_id": [pid] * n,
                "node": [name] * n,
                "token": list(range(n)),
                "local_max_abs": lmax.tolist(),
                "local_rel_l2": lrel.tolist(),
                "max_abs": pmax.tolist(),
                "rel_l2": prel.tolist(),
            }
        )
    # root-cause ranking at the first divergent node (or every failing node)
    for name in failing if cfg.diagnose_all_failing else [first] if first else []:
        node = graph[name]
        # our engine: its replay on the reference's inputs; external: its output on its own inputs. Every node's
        # value is passed, since some hypotheses read another node (e.g. per-expert bias needs the top-k weights)
        inputs = ref if replay.engine is not None else eng
        target = local_out[name][0] if replay.engine is not None else eng[name]
        d = rank_hypotheses(
            graph,
            node,
            inputs,
            replay.weights,
            target,
            budget(node, precision, noise[name], cfg.budgets),
            catalogue=catalogue,
        )
        writers["hypotheses"].add(_diagnosis_rows(pid, name, name == first, d))
    # MoE routing
    for router in moe_routers:
        prefix = router.name[: -len("router.logits")]
        layer = router.layer
        probs = prefix + "router.probs"
        if {probs, prefix + "router.topk_indices"} & missing:
            continue
        pb = budget(graph[probs], precision, noise[probs], cfg.budgets)
        rr = routing_rows(
            pid,
            layer,
            ref[prefix + "router.topk_indices"],
            eng[prefix + "router.topk_indices"],
            ref[probs],
            eng[probs],
            pb,
        )
        writers["routing"].add(rr)
        forced = math.nan
        if replay.engine is not None:
            out = replay.engine.forced_moe(
                router.name,
                eng[prefix[: -len("mlp.")] + "norm1"],
                ref[prefix + "router.topk_indices"],
                ref[prefix + "router.topk_weights"],
                replay.variant,
            )
            forced = rel_l2(out, ref[prefix + "experts.bias_add"])
        writers["prompts"].add_row(
            {
                "prompt_id": pid,
                "kind": "moe_layer",
                "layer": layer,
                "value": rel_l2(eng[prefix + "experts.bias_add"], ref[prefix + "experts.bias_add"]),
                "value2": forced,
                "count": int(np.sum(~np.array(rr["agree"]))),
            }
        )
    # embedding level
    if {"pooled", "embedding"} & missing:
        return
    cos = cosine(eng["pooled"], ref["pooled"])
    writers["prompts"].add_row(
        {
            "prompt_id": pid,
            "kind": "embedding",
            "layer": -1,
            "value": cos,
            "value2": cosine(eng["embedding"], ref["embedding"]),
            "count": T,
        }
    )
    sample.offer(pid, ref["embedding"], eng["embedding"])
    # drill-down candidates: worst prompts by final-embedding error
    score = rel_l2(eng["embedding"], ref["embedding"])
    if len(worst) < cfg.worst_m or score > worst[0][0]:
        drill = [
            {
                "prompt_id": pid,
                "node": k,
                "node_index": graph[k].index,
                "score": score,
                "ref_first": np.asarray(ref[k], np.float64).ravel()[:DRILL_VALUES].tolist(),
                "eng_first": np.asarray(eng[k], np.float64).ravel()[:DRILL_VALUES].tolist(),
                "rel_l2": rel_l2(eng[k], ref[k]),
            }
            for k in keys
        ]
        item = (score, pid, drill)
        if len(worst) < cfg.worst_m:
            heapq.heappush(worst, item)
        else:
            heapq.heapreplace(worst, item)


def _diagnosis_rows(pid: str, node: str, is_first: bool, d) -> dict[str, list]:
    ranked = list(d.ranked)
    n = max(len(ranked), 1)
    names = [h.name for h in ranked] or [""]
    errs = [float(h.error) for h in ranked] or [math.nan]
    says = [h.says for h in ranked] or [""]
    return {
        "prompt_id": [pid] * n,
        "node": [node] * n,
        "first_divergence": [is_first] * n,
        "rank": list(range(1, n + 1)),
        "hypothesis": names,
        "error": errs,
        "says": says,
        "baseline_error": [float(d.baseline_error)] * n,
        "verdict": [d.verdict] * n,
        "explained_by": [d.explained_by or ""] * n,
    }


def weight_parity(model_dir: str | Path, variant: str) -> tuple[list[dict], dict]:
    """Every tensor the engine uses (after its layout and quantisation) against the checkpoint, and the
    config values as the engine understood them next to config.json's."""
    from safetensors import safe_open

    from ..engine.core import Engine
    from ..kernels import compare_sums

    engine = Engine(model_dir)
    rows = []
    # one checkpoint tensor at a time, compared in one float32 pass (double sums): peak memory is the engine's
    # weights plus one tensor, not the whole checkpoint twice in float64 (8.5 GB at full size before)
    with safe_open(str(Path(model_dir) / "model.safetensors"), framework="numpy") as ck:
        for name, t in engine.export_weights(variant).items():
            got = np.ascontiguousarray(t.as_float32())
            ref = np.ascontiguousarray(ck.get_tensor(t.source).astype(np.float32, copy=False).reshape(got.shape))
            s = compare_sums(got, ref)  # the layout the spec reads the tensor in
            num, den = math.sqrt(s["sum_sq_err"]), math.sqrt(s["sum_sq_ref"])
            rows.append(
                {
                    "tensor": name,
                    "source": t.source,
                    "transform": t.transform,
                    "storage": t.storage,
                    "shape": json.dumps(list(got.shape)),
                    "max_abs": float(s["max_abs"]) if got.size else 0.0,
                    "rel_l2": num / den if den > 0 else (0.0 if num == 0 else math.inf),
                }
            )
            del got, ref
    return rows, config_parity(model_dir, engine.understood_config(variant))


def config_parity(model_dir: str | Path, understood: dict) -> dict:
    """Config values as an engine understood them (``understood``, Engine.understood_config's keys) next to
    config.json's; "match" per key. Keys an engine does not report (None) are compared as None."""
    model_dir = Path(model_dir)
    cfg = load_config_json(model_dir)
    dims = build_graph(cfg, str(model_dir / "config.json")).dims
    expected = {
        "hidden": dims.hidden,
        "heads": dims.heads,
        "layers": dims.layers,
        "inner": dims.inner,
        "experts": dims.experts,
        "top_k": dims.top_k,
        "layer_norm_eps": dims.eps,
        "rotary_base": dims.rotary_base if understood.get("rotary_base") is not None else None,
        "rotary_interleaved": dims.rotary_interleaved if understood.get("rotary_interleaved") is not None else None,
        "activation": "gelu_erf" if dims.activation == "gelu" else "gelu_tanh",
        "attention": "causal" if cfg.get("causal") else "bidirectional",
        "topk_renormalize": dims.normalize_expert_weights,
        "expert_bias": True,
    }
    return {
        k: {"config": expected[k], "engine": understood.get(k), "match": expected[k] == understood.get(k)}
        for k in expected
    }
