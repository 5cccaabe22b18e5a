"""The search (actdiff.compare.search) once per run, over the whole corpus.

Every statistics job (one shard) keeps a bounded sample of the nodes the catalogue left unexplained
(:class:`SearchSample`: per node, the inputs and judged outputs of its longest unexplained prompts) and writes it
as the shard table ``search_sample`` (actdiff.tables). Aggregation merges the shards' samples into the run's sample
(:func:`merge_samples`: the same bounds, so the run's sample is what one job over the whole corpus would have
kept) and runs the search once on it (:func:`run_search`), under one time budget for the run. The search used to
run in every statistics job, under a budget per shard: its cost grew with the number of shards, and on a run whose
nodes the catalogue cannot explain (ONNX Runtime's quantised MiniLM) it was most of each job's time.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from ..nodes import Graph

if TYPE_CHECKING:  # pandas is imported where a table is read (a statistics job only fills the sample)
    import pandas as pd

log = logging.getLogger(__name__)

TARGET = "target"  # the ``array`` of a sample row holding the judged output (the others name an input node)
SEARCH_ROWS = 5  # findings kept per node (best first)


@dataclass
class SearchSample:
    """The search's bounded sample: per unexplained node (at most ``nodes``, earliest in graph order), the
    inputs and judged outputs of its ``prompts`` LONGEST unexplained prompts: least squares needs rows (a weight
    of width H is determined from H + 1 tokens on), and a bug that shows on long prompts only shows there. Ties in
    length keep the prompt offered first (shard order, then prompt order)."""

    prompts: int
    nodes: int
    # node -> {"inputs": [...], "targets": [...], "budgets": [...], "prompt_ids": [...]}
    items: dict = field(default_factory=dict)

    def _admit(self, graph: Graph, name: str) -> bool:
        if name in self.items:
            return True
        if self.prompts <= 0 or self.nodes <= 0:
            return False
        if len(self.items) >= self.nodes:
            last = max(self.items, key=lambda n: graph[n].index)
            if graph[name].index > graph[last].index:
                return False
            del self.items[last]
        self.items[name] = {"inputs": [], "targets": [], "budgets": [], "prompt_ids": []}
        return True

    def offer(self, graph: Graph, name: str, pid: str, inputs: dict, target: np.ndarray, budget: float) -> None:
        """Keep prompt ``pid``'s values at ``name`` if the node is among the earliest and the prompt among the
        longest so far. ``inputs`` may hold every node of the prompt: the node's inputs (and its MoE block's top-k
        weights, which some candidates read) are copied."""
        if not self._admit(graph, name):
            return
        item, rows = self.items[name], int(np.shape(target)[0])
        if len(item["targets"]) >= self.prompts:
            shortest = min(range(len(item["targets"])), key=lambda i: np.shape(item["targets"][i])[0])
            if rows <= np.shape(item["targets"][shortest])[0]:
                return
            for key in item:
                del item[key][shortest]
        node, block = graph[name], graph.moe_block_of(name)
        keep = [*node.inputs, *([block.topk_weights] if block is not None else [])]
        item["inputs"].append({k: np.array(inputs[k]) for k in keep if k in inputs})
        item["targets"].append(np.array(target))
        item["budgets"].append(float(budget))
        item["prompt_ids"].append(str(pid))

    # ------------------------------------------------------------------------------------ as a table
    def to_columns(self, graph: Graph) -> dict[str, list]:
        """The sample as the ``search_sample`` table's columns: one row per (node, prompt, array), arrays as
        their raw C-order bytes with dtype and shape, nodes in graph order."""
        cols: dict[str, list] = {k: [] for k in ("node", "node_index", "prompt_id", "budget", "array", "dtype",
                                                 "shape", "data")}  # fmt: skip
        for name in sorted(self.items, key=lambda n: graph[n].index):
            item = self.items[name]
            for pid, inputs, target, b in zip(item["prompt_ids"], item["inputs"], item["targets"], item["budgets"],
                                              strict=True):  # fmt: skip
                for array, value in [(TARGET, target), *inputs.items()]:
                    a = np.ascontiguousarray(value)
                    cols["node"].append(name)
                    cols["node_index"].append(graph[name].index)
                    cols["prompt_id"].append(pid)
                    cols["budget"].append(b)
                    cols["array"].append(array)
                    cols["dtype"].append(a.dtype.str)
                    cols["shape"].append(list(a.shape))
                    cols["data"].append(a.tobytes())
        return cols

    def add_table(self, graph: Graph, table: pd.DataFrame, source: str) -> None:
        """Offer every (node, prompt) of a ``search_sample`` table, in its row order (``source`` names the file
        in errors)."""
        known = set(graph.names())
        for (name, pid), g in table.groupby(["node", "prompt_id"], sort=False):
            if name not in known:
                raise ValueError(f"{source}: node {name!r} of the search sample is not in the model's graph; the "
                                 "table comes from another model: delete it and rerun its statistics")  # fmt: skip
            arrays = {r.array: _array(r, source) for r in g.itertuples(index=False)}
            if TARGET not in arrays:
                raise ValueError(f"{source}: node {name!r}, prompt {pid!r} has no {TARGET!r} row; the table is "
                                 "damaged: delete it and rerun its statistics")  # fmt: skip
            target = arrays.pop(TARGET)
            self.offer(graph, name, pid, arrays, target, float(g["budget"].iloc[0]))


def _array(row, source: str) -> np.ndarray:
    a = np.frombuffer(row.data, dtype=np.dtype(row.dtype))
    shape = [int(s) for s in row.shape]
    if a.size != math.prod(shape):
        raise ValueError(f"{source}: node {row.node!r}, array {row.array!r}: {a.size} values for shape {shape}; "
                         "the table is damaged: delete it and rerun its statistics")  # fmt: skip
    return a.reshape(shape)


def merge_samples(graph: Graph, paths: list[str], prompts: int, nodes: int) -> SearchSample:
    """The run's sample from its shards' ``search_sample`` tables, read in the order given (shard order)."""
    import pandas as pd

    sample = SearchSample(prompts, nodes)
    for p in paths:
        sample.add_table(graph, pd.read_parquet(p), str(p))
    return sample


# ---------------------------------------------------------------------------------------------- search
@dataclass(frozen=True)
class RunSearch:
    """How aggregation searches a run (config ``stats.search_*``): the model's folder (its graph and weights), the
    run's CPU-second budget, and the sample's bounds (prompts per node, nodes)."""

    model_dir: str
    seconds: float = 60.0
    prompts: int = 3
    nodes: int = 16

    @classmethod
    def of(cls, model_dir, stats: dict | None = None) -> RunSearch:
        """From config ``stats``' ``search_seconds``, ``search_prompts``, ``search_nodes`` (others ignored), with
        the statistics' defaults (actdiff.compare.stats.StatsConfig) for the keys not given."""
        from .stats import StatsConfig

        keys = ("search_seconds", "search_prompts", "search_nodes")
        cfg = StatsConfig(**{k: v for k, v in (stats or {}).items() if k in keys})
        return cls(str(model_dir), float(cfg.search_seconds), int(cfg.search_prompts), int(cfg.search_nodes))


def search_run(paths: list[str], search: RunSearch | None) -> pd.DataFrame:
    """The run's ``search`` rows: its shards' samples (``search_sample`` tables) merged and searched once.
    ``search`` None or a zero budget: nothing is searched; but a sample with rows and no ``search`` is an error
    (the shards kept values for a search nobody would run)."""
    import pandas as pd

    from ..tables import SUMMARY_TABLES

    empty = SUMMARY_TABLES["search"].schema.empty_table().to_pandas()
    if search is None:
        held = [p for p in paths if pd.read_parquet(p, columns=["node"]).shape[0]]
        if held:
            raise ValueError(f"{held[0]}: the shard kept values for the search at the nodes the catalogue left "
                             "unexplained, but aggregate() was given no `search` (RunSearch: the model folder and "
                             "budget); pass it, or compute the statistics with search_seconds=0")  # fmt: skip
        return empty
    if search.seconds <= 0:
        return empty
    from ..nodes import build_graph, load_config_json
    from .stats import CheckpointTensors, NodeWeights64

    graph = build_graph(load_config_json(search.model_dir), f"{search.model_dir}/config.json")
    sample = merge_samples(graph, paths, search.prompts, search.nodes)
    if not sample.items:
        return empty
    weights = NodeWeights64(CheckpointTensors(f"{search.model_dir}/model.safetensors"), graph)
    return run_search(graph, sample, weights, search.seconds)


def run_search(graph: Graph, sample: SearchSample, weights, seconds: float) -> pd.DataFrame:
    """The search (actdiff.compare.search) at every sampled node, in graph order, under one CPU-time budget;
    the ``search`` table: one row per finding (the best few), or one row saying what was tried when nothing was
    found. ``weights``: the checkpoint's tensors by name (actdiff.compare.stats.CheckpointTensors), or their
    float64 copies held per searched node (stats.NodeWeights64, what :func:`search_run` passes): a candidate
    then reads the same float64 object as the others, so each weight is read, converted and rounded once per
    node (refops.WEIGHT_MEMO), not once per candidate (MiniLM's ONNX Runtime int8-dynamic aggregation: 40 -> 32
    CPU-s)."""
    from threadpoolctl import threadpool_limits

    from ..tables import SUMMARY_TABLES
    from .findings import Deadline
    from .search import search_node

    items = sorted(sample.items.items(), key=lambda kv: graph[kv[0]].index)
    deadline, wall0, frames = Deadline(seconds), time.monotonic(), []
    visit = getattr(weights, "visit", lambda node: None)  # raw tensors: nothing to hold
    # one core (rule threads: 1): threaded BLAS on these small matrices would only spin against the other jobs
    with threadpool_limits(limits=1):
        for name, item in items:
            b = float(np.median(item["budgets"]))
            if deadline.expired():
                log.warning("search: time budget of %.0f CPU s spent before %s (stats.search_seconds)",
                            deadline.seconds, name)  # fmt: skip
                frames.append(_search_rows(graph, name, None, b))
                continue
            visit(graph[name])  # NodeWeights64 holds this node's tensors while it is searched
            try:
                res = search_node(graph, name, item["inputs"], item["targets"], weights, b, deadline)
            finally:
                visit(None)
            frames.append(_search_rows(graph, name, res, b))
    if items:
        log.info("search: %d node(s) in %.1f CPU s, %.1f s wall (budget %.0f CPU s)", len(items), deadline.spent(),
                 time.monotonic() - wall0, deadline.seconds)  # fmt: skip
    schema = SUMMARY_TABLES["search"].schema
    if not frames:
        return schema.empty_table().to_pandas()
    cols = {k: [v for f in frames for v in f[k]] for k in schema.names}
    return pa.Table.from_pydict(cols, schema=schema).to_pandas()


def _search_rows(graph: Graph, name: str, res, budget: float) -> dict[str, list]:
    from .findings import explains

    node = graph[name]
    found = res.findings[:SEARCH_ROWS] if res is not None else []
    n = max(len(found), 1)
    base = res.baseline_error if res is not None else math.nan
    return {
        "node": [name] * n,
        "node_index": [node.index] * n,
        "op": [node.op] * n,
        "rank": list(range(1, len(found) + 1)) or [0],
        "kind": [f.kind for f in found] or [""],
        "name": [f.name for f in found] or [""],
        "says": [f.says for f in found] or [""],
        "error": [float(f.error) for f in found] or [math.nan],
        "params": [json.dumps(f.params, sort_keys=True, default=str) for f in found] or ["{}"],
        "explains": [explains(f.error, base, budget) for f in found] or [False],
        "baseline_error": [base] * n,
        "budget": [budget] * n,
        "prompts": [res.prompts if res else 0] * n,
        "rows": [res.rows if res else 0] * n,
        "tried": [res.tried if res else 0] * n,
        "seconds": [res.seconds if res else 0.0] * n,
        "timed_out": [res.timed_out if res else True] * n,
    }
