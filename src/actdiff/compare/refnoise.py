"""The reference's fp32 noise per (prompt, node), measured once per shard and read by every side's statistics.

A node's budget scales with the reference's own rounding error there (actdiff.compare.budgets.fp32_noise: the
reference's value against the float64 spec op on the reference's inputs, and for long sums and normalisations
the sequential-summation envelope). It depends on the reference dump and the model only, so every side and
variant compared against one reference shard measures the same numbers: the default report's 30 runs did so
60 times over its two shards, about a third of each statistics job's time. Rule ``reference_noise`` measures it
once per model and shard (:func:`measure_reference_noise`, table ``reference_noise``) and ``compute_stats``
reads it (:class:`NoiseTable`). Without the table (a direct call of compute_shard_stats) the statistics measure
it in place: the same function on the same values, so the same bits either way.
"""

from __future__ import annotations

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
from .budgets import Noise, fp32_noise

log = logging.getLogger(__name__)

SCHEMA = REFERENCE_NOISE.schema


def measure_reference_noise(model_dir: str | Path, ref_h5: str | Path, out: str | Path) -> dict:
    """Every prompt and node of the reference dump ``ref_h5``: its fp32 noise, written to ``out`` (Parquet,
    actdiff.tables.REFERENCE_NOISE, atomically). Each node's weights are converted to float64 once per prompt
    and shared by the noise and its envelope (compare.stats.NodeWeights64). Returns a summary for the log."""
    from threadpoolctl import threadpool_limits

    from .stats import CheckpointTensors, NodeWeights64

    model_dir = Path(model_dir)
    graph = build_graph(load_config_json(model_dir), str(model_dir / "config.json"))
    cols: dict[str, list] = {k: [] for k in SCHEMA.names}
    t0 = time.perf_counter()
    with threadpool_limits(limits=1), ActivationReader(ref_h5) as rr:  # one core: rule threads 1
        weights64 = NodeWeights64(CheckpointTensors(model_dir / "model.safetensors"), graph)
        for _, pid, ref in rr.iter_prompts(graph.names()):
            for node, noise in prompt_noise(graph, ref, weights64):
                cols["prompt_id"].append(pid)
                cols["node"].append(node)
                cols["measured"].append(noise.measured)
                cols["envelope"].append(noise.envelope)
        n = len(rr.prompt_ids)
    with atomic_path(out) as tmp:
        pq.write_table(pa.Table.from_pydict(cols, schema=SCHEMA), tmp)
    dt = time.perf_counter() - t0
    log.info("reference noise: %d prompts x %d nodes in %.1f s", n, len(graph), dt)
    return {"prompts": n, "nodes": len(graph), "seconds": dt}


def prompt_noise(graph: Graph, ref: dict, weights64):
    """(node, Noise) of one prompt's reference values, in graph order; ``weights64`` visits each node."""
    try:
        for node in graph:
            weights64.visit(node)
            yield node.name, fp32_noise(graph, node, ref, weights64)
    finally:
        weights64.visit(None)


class NoiseTable:
    """A shard's reference noise read back: :meth:`of` gives a (prompt, node)'s Noise. Held as two arrays of
    (prompt, node) (a dict of tuples would be ~100 bytes a row: 0.6 GB for a 1000-prompt shard of a 600-node
    model). The table must hold every node of the graph, in graph order, for every prompt of the reference dump
    it is used with: anything else was measured on another dump or model, and the budgets would be wrong."""

    def __init__(self, path: str | Path, prompt_ids: list[str], graph: Graph, ref_h5: str | Path):
        t = pq.read_table(path, schema=SCHEMA)
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
        self.measured = t["measured"].to_numpy().reshape(shape)
        self.envelope = t["envelope"].to_numpy().reshape(shape)

    def of(self, pid: str, name: str) -> Noise:
        i, k = self.row[pid], self.col[name]
        return Noise(float(self.measured[i, k]), float(self.envelope[i, k]))
