"""The reference's fp32 noise per (prompt, node), measured once per shard and read by every side's statistics,
and beside it the propagated budgets of an fp32 engine, shared by the fp32 runs where they are their own.

A node's budget scales with the reference's own rounding error there (actdiff.compare.budgets.fp32_noise: the
reference's value against the float64 spec op on the reference's inputs, and for long sums and normalisations
the sequential-summation envelope). It depends on the reference dump and the model only, so every side and
variant compared against one reference shard measures the same numbers: the default report's 30 runs did so
60 times over its two shards, about a third of each statistics job's time. Rule ``reference_noise`` measures it
once per model and shard (:func:`measure_reference_noise`, table ``reference_noise``) and ``compute_stats``
reads it (:class:`NoiseTable`). Without the table (a direct call of compute_shard_stats) the statistics measure
it in place: the same function on the same values, so the same bits either way.

The propagated budgets (actdiff.compare.propagation: a float64 forward per prompt of the spec model, every node
perturbed by its local budget) were the other large per-run cost: 41 % of a MiniLM fp32 statistics job, 32 % of
the tiny model's. They depend on the reference, the budgets (the precision's policy, the config's overrides, the
reference's precision) and, at an MoE model's near ties only, on the engine's routing. So the table also holds,
per prompt and node, the propagated budget of an engine at the reference's precision (:data:`SHARED_PRECISION`,
fp32: the precision every engine runs and the one engines are compared at) from a simulation that follows no
engine, with that simulation's expert choices. A run at that precision takes them for every prompt where its
own simulation would make the same choices (propagation.shared_routing_holds: at none of its near ties did the
engine choose other experts), which is then the same computation on the same draws: for a model without experts
every prompt. Elsewhere, and for other precisions, the statistics simulate as before. The prompts are simulated
in the groups the statistics use (actdiff.compare.grouped.group_plan), so the stacked float64 products are the
same ones and a shared budget is the in-place one bit for bit.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..atomic import atomic_path
from ..errors import DumpError
from ..h5io import ActivationReader
from ..nodes import Graph, build_graph, load_config_json
from ..tables import REFERENCE_NOISE
from ..variants import REFERENCE_VARIANT, policy
from .budgets import Noise, budget_of, budget_terms, fp32_noise_many, reference_precision_of
from .grouped import group_plan, grouped
from .propagation import Propagation, shared_routing_holds, step_together

log = logging.getLogger(__name__)

SCHEMA = REFERENCE_NOISE.schema
SHARED_PRECISION = REFERENCE_VARIANT  # the precision whose propagated budgets the table holds
_META = b"actdiff.propagation"  # the budgets they were simulated with: the config's overrides, the reference's


def measure_reference_noise(model_dir: str | Path, ref_h5: str | Path, out: str | Path, budgets: dict | None = None
                            ) -> dict:  # fmt: skip
    """Every prompt and node of the reference dump ``ref_h5``: its fp32 noise and the propagated budget of an
    engine at SHARED_PRECISION (``budgets``: the config's budget overrides, as the statistics get them), written
    to ``out`` (Parquet, actdiff.tables.REFERENCE_NOISE, atomically). Prompts go in the statistics' groups; each
    node's weights are converted to float64 once per group and shared by the noise, its envelope and the
    simulation (compare.stats.NodeWeights64). Returns a summary for the log."""
    from threadpoolctl import threadpool_limits

    from .stats import CheckpointTensors, NodeWeights64

    model_dir = Path(model_dir)
    graph = build_graph(load_config_json(model_dir), str(model_dir / "config.json"))
    cols: dict[str, list] = {k: [] for k in SCHEMA.names}
    t0 = time.perf_counter()
    with threadpool_limits(limits=1), ActivationReader(ref_h5) as rr:  # one core: rule threads 1
        weights64 = NodeWeights64(CheckpointTensors(model_dir / "model.safetensors"), graph)
        shared = {"overrides": dict(budgets or {}), "reference": reference_precision_of(rr.attrs, str(ref_h5))}
        bound, sizes = group_plan(graph, [int(rr.offsets[i + 1] - rr.offsets[i]) for i in range(len(rr.prompt_ids))])
        prompts = ((pid, ref) for _, pid, ref in rr.iter_prompts(graph.names()))
        for group in grouped(prompts, bound, sizes):
            _measure_group(graph, group, weights64, shared, cols)
        n = len(rr.prompt_ids)
    table = pa.Table.from_pydict(cols, schema=SCHEMA)
    table = table.replace_schema_metadata({_META: json.dumps(shared, sort_keys=True).encode()})
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp)
    dt = time.perf_counter() - t0
    log.info("reference noise and %s propagated budgets: %d prompts x %d nodes in %.1f s", SHARED_PRECISION, n,
             len(graph), dt)  # fmt: skip
    return {"prompts": n, "nodes": len(graph), "seconds": dt}


def _measure_group(graph: Graph, group: list, weights64, shared: dict, cols: dict[str, list]) -> None:
    """One group's rows of the table, node by node: each prompt's noise and budget, then the simulation's step of
    the whole group (propagation.step_together, as the statistics run it)."""
    props = [Propagation(graph, pid, ref, {}, weights64) for pid, ref in group]
    noise: list[list[Noise]] = [[] for _ in group]
    budgets: list[dict[str, float]] = [{} for _ in group]
    try:
        for node in graph:
            weights64.visit(node)
            terms = budget_terms(node, SHARED_PRECISION, shared["overrides"], shared["reference"])
            for k, nz in enumerate(fp32_noise_many(graph, node, [ref for _, ref in group], weights64)):
                noise[k].append(nz)
                budgets[k][node.name] = budget_of(terms, nz)
            step_together(props, node, budgets)
    finally:
        weights64.visit(None)
    for (pid, _), nzs, prop in zip(group, noise, props, strict=True):
        for node, nz in zip(graph, nzs, strict=True):
            routed = prop.routed.get(node.name)
            cols["prompt_id"].append(pid)
            cols["node"].append(node.name)
            cols["measured"].append(nz.measured)
            cols["envelope"].append(nz.envelope)
            cols["propagated"].append(prop.out[node.name])
            cols["routed"].append(None if routed is None else routed.astype(np.int16).ravel().tolist())


class NoiseTable:
    """A shard's reference noise read back: :meth:`of` gives a (prompt, node)'s Noise, :meth:`propagated` a
    prompt's shared propagated budgets where they are a run's own. Held as arrays of (prompt, node) (a dict of
    tuples would be ~100 bytes a row: 0.6 GB for a 1000-prompt shard of a 600-node model). The table must hold
    every node of the graph, in graph order, for every prompt of the reference dump it is used with: anything
    else was measured on another dump or model, and the budgets would be wrong."""

    def __init__(self, path: str | Path, prompt_ids: list[str], graph: Graph, ref_h5: str | Path):
        # ParquetFile, not pq.read_table: its dataset module is a seventh of a second of every statistics job
        t = pq.ParquetFile(path).read()
        if not set(SCHEMA.names) <= set(t.column_names):
            raise DumpError(f"{path}: not a reference noise table of this version (columns {t.column_names}); "
                            "delete it and rerun (rule reference_noise measures it)")  # fmt: skip
        t = t.select(SCHEMA.names).cast(SCHEMA)
        names = graph.names()
        n = len(t) // max(len(names), 1)
        ok = len(t) == n * len(names)
        if ok:  # one row of the grid per prompt: the graph's nodes in order, one prompt id throughout
            pids = t["prompt_id"].to_numpy(zero_copy_only=False).reshape(n, len(names))
            nodes = t["node"].to_numpy(zero_copy_only=False).reshape(n, len(names))
            ok = bool((nodes == np.array(names, dtype=object)).all() and (pids == pids[:, :1]).all())
        self.row = {str(pids[i, 0]): i for i in range(n)} if ok else {}
        self.col = {name: k for k, name in enumerate(names)}
        missing = [p for p in prompt_ids if p not in self.row]
        if not ok or missing:
            what = f"{len(missing)} prompt(s), e.g. {missing[:3]}," if ok else "every node in graph order"
            raise DumpError(
                f"{path}: the reference noise table lacks {what} for the reference dump {ref_h5} and model graph; "
                "it was measured on another dump or model. Delete it and rerun (rule reference_noise measures it)"
            )
        shape = (n, len(names))
        self.graph, self.names = graph, names
        self.measured = t["measured"].to_numpy().reshape(shape)
        self.envelope = t["envelope"].to_numpy().reshape(shape)
        self.propagation = t["propagated"].to_numpy().reshape(shape)
        meta = (pq.read_schema(path).metadata or {}).get(_META)  # without it (a rewritten table) nothing is shared
        self.simulated = json.loads(meta) if meta else None
        topk = [k for k, node in enumerate(graph) if node.op == "TOPK" and node.kind == "index"]
        routed = t["routed"].to_pylist() if topk else []
        self.routed_ids = [{names[k]: routed[i * len(names) + k] for k in topk} for i in range(n)]

    def of(self, pid: str, name: str) -> Noise:
        i, k = self.row[pid], self.col[name]
        return Noise(float(self.measured[i, k]), float(self.envelope[i, k]))

    def shares(self, precision: str, overrides: dict | None, reference: str, side: str | None = None) -> bool:
        """Were the table's propagated budgets simulated with the budgets of engine ``side``'s run at ``precision``
        with these budget overrides against a reference of this precision?"""
        same = {"overrides": dict(overrides or {}), "reference": reference}
        same = json.loads(json.dumps(same))  # as the table recorded them
        shared = policy(precision, side) == policy(SHARED_PRECISION)
        return self.simulated is not None and shared and same == self.simulated

    def propagated(self, pid: str, ref, eng, budgets) -> dict[str, float] | None:
        """Prompt ``pid``'s propagated budgets (node -> value) for the engine whose values are ``eng``, where the
        shared simulation is its own (propagation.shared_routing_holds; ``budgets``: node -> the run's local
        budget, the probabilities' at least); None where the run must simulate itself. Only for a run that
        :meth:`shares` the table's budgets."""
        i = self.row[pid]
        k = self.graph.dims.top_k
        routed = {name: np.asarray(ids, np.int64).reshape(-1, k) for name, ids in self.routed_ids[i].items() if ids}
        if not shared_routing_holds(self.graph, ref, eng, routed, budgets):
            return None
        return dict(zip(self.names, self.propagation[i].tolist(), strict=True))
