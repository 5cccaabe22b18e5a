"""Per-shard divergence statistics: one pass over a shard's prompts, streaming (tables are written in
row groups as prompts are processed, so memory does not grow with the shard's size). Short prompts are read in
bounded groups whose replays and propagated budgets are computed node by node for the whole group first
(actdiff.compare.grouped); each prompt is then judged on its own.

For every (prompt, node):
- propagated error: the engine's value against the reference's (the error the user sees);
- local error (teacher forcing): the side's own op replayed on the REFERENCE's inputs for that node
  (:func:`actdiff.sides.open_replay`; our engine replays through the same C kernels), against the
  reference's value. For a side that cannot replay (an external engine, an imported dump), the local error
  is the side's output against the specified op run on the side's OWN inputs (actdiff.compare.refops): the
  same separation, from the other side;
- replay check: a replaying side's op is also replayed on its OWN inputs and must reproduce its dump (bit for
  bit, or within the node's budget on a path its forward computes differently: the fused MoE kernel); where it
  does not, the replay is not the code that ran, the node is a finding of its own (``replay_mismatch``) and is
  judged like an external side's, on its dumped output against the spec op on its own inputs;
- amplification = propagated / local: how much inherited error the node carries;
- status pass/warn/fail from the local error and the node's budget (actdiff.compare.budgets);
- propagated budget (actdiff.compare.propagation): what the outputs of an engine within every local budget may
  show; a prompt whose output nodes exceed theirs diverges whether or not a node fails.

:func:`judge_prompt` does the per-node work once per prompt; each table is then built by its own builder
(:data:`BUILDERS`) from that shared :class:`Judged` prompt and the per-shard :class:`ShardContext`:
per-token errors of failing nodes, the root-cause ranking (actdiff.compare.hypotheses; nodes it leaves
unexplained go into a bounded sample, table ``search_sample``, that actdiff.compare.search_run searches once per
run in aggregation, under a time budget), MoE routing and
forced-routing error, the pooled-embedding cosine, and the drill-down candidates (the shard's worst prompts
by :mod:`actdiff.compare.worst`, whose first values survive deleting the HDF5 dumps).
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import json
import logging
import math
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..atomic import atomic_path, disk_full_error, is_disk_full
from ..errors import DumpError
from ..h5io import ActivationReader, NodeByNode
from ..nodes import EMBEDDING, INPUT_IDS, POOLED, Graph, build_graph, load_config_json
from ..tables import EMBEDDING_SAMPLE, SHARD_TABLES, empty_table
from ..variants import Variant, resolve_variant
from .budgets import TF32_OPS, U32, Noise, budget_of, budget_terms, fp32_noise, reference_precision_of, status
from .embeddings import BoundedSample, cosine
from .grouped import HOLD_BYTES, float_gap, group_plan, grouped, prepare_group, same_bits
from .metrics import FLOAT_METRICS, compare, local_error, nonfinite_match, per_token_errors, rel_l2
from .routing import margins, routing_rows
from .search_run import SearchSample
from .worst import prompt_score, rank_key

log = logging.getLogger(__name__)

NOT_CAPTURED = "not_captured"  # status of a node the engine's dump does not provide
# status of a node whose NaN/Inf sit at the same positions on both sides (the model itself produces them, e.g. from
# a NaN weight) while its finite values are within budget: not a failure of the engine, never a pass either
NONFINITE = "nonfinite"
DRILL_VALUES = 8  # first values of token 0 kept per key node


class _TableWriter:
    """Accumulates rows as column lists and writes them as Parquet row groups (streaming)."""

    def __init__(self, path: Path, empty: pa.Table, flush_rows: int = 5000):
        self.path = Path(path)
        self.empty = empty
        self.cols: dict[str, list] = {}
        self.rows = 0
        self.flush_rows = flush_rows
        self.writer: pq.ParquetWriter | None = None
        self.metadata: dict[bytes, bytes] = {}  # the schema's key-value metadata (set before the first flush)
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
        with self._disk_full_named():
            if self.writer is None:
                self.schema = table.schema.with_metadata(self.metadata) if self.metadata else table.schema
                self.writer = pq.ParquetWriter(self.tmp, self.schema)
            self.writer.write_table(table.cast(self.schema))
        self.cols = {k: [] for k in self.cols}
        self.rows = 0

    def close(self) -> None:
        self.flush()
        with self._disk_full_named():
            if self.writer is None:
                pq.write_table(self.empty.replace_schema_metadata(self.metadata or None), self.tmp)
            else:
                self.writer.close()
        self._ctx.__exit__(None, None, None)

    def abort(self) -> None:
        try:
            if self.writer is not None:
                self.writer.close()
        except OSError:
            pass  # closing writes the footer, which fails again on a full disk; the file is removed below
        finally:
            self.writer = None
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)

    @contextlib.contextmanager
    def _disk_full_named(self):
        """A full disk while streaming: the table's temporary file is removed and the error names the table
        (the rows are written outside atomic_path's own ``with``)."""
        try:
            yield
        except (OSError, RuntimeError) as e:
            if not is_disk_full(e):
                raise
            written = self.tmp.stat().st_size if self.tmp.exists() else None
            self.abort()
            raise disk_full_error(self.path, written) from None


@dataclass
class StatsConfig:
    budgets: dict = field(default_factory=dict)  # node glob -> relative L2 budget override
    worst_m: int = 5  # prompts per shard kept for the drill-down
    embedding_sample: int = 2000  # prompts kept for the neighbour analysis
    diagnose_all_failing: bool = True  # rank hypotheses at every failing node, not only the first
    # the search at unexplained nodes runs once per run, in aggregation (actdiff.compare.search_run); a shard keeps
    # its sample: search_prompts longest unexplained prompts of each of its search_nodes earliest unexplained nodes
    search_seconds: float = 60.0  # the run's CPU-second budget of the search (0: no sample is kept)
    search_prompts: int = 3
    search_nodes: int = 16


class CheckpointTensors(Mapping):
    """A safetensors checkpoint as a read-only mapping that reads each tensor when asked (memory-mapped), so
    the fp32-noise ops and the hypotheses never hold a second full copy of a large model's weights."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = Path(path)
        self._file = safe_open(str(self.path), framework="numpy")
        self._keys = list(self._file.keys())
        self._key_set = frozenset(self._keys)
        self._header: tuple[dict, int] | None = None  # (safetensors header, data offset), read by mapped()

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._key_set:
            raise KeyError(key)
        return self._file.get_tensor(key)

    def _located(self, key: str) -> tuple[dict, int, np.dtype | None]:
        """The tensor's header entry, the byte where the file's data starts, and the dtype numpy reads it as
        (None for bf16 and the other dtypes numpy cannot read from the file)."""
        from ..engine.weights import _ST_DTYPES, Checkpoint

        if key not in self._key_set:
            raise KeyError(key)
        if self._header is None:
            ck = Checkpoint(self.path)
            self._header = (ck.header, ck.data_start)
        header, start = self._header
        info = header[key]
        readable = info["dtype"] in ("F32", "F16", "F64")
        return info, start, np.dtype(_ST_DTYPES[info["dtype"]]).newbyteorder("<") if readable else None

    def mapped(self, key: str) -> np.ndarray:
        """The tensor as a read-only memory map of the file: only the pages an op reads become resident, for
        the tables an op gathers rows from (the released word table is 0.77 GB, and reading it whole for
        every prompt and pass was a third of the statistics stage). A dtype numpy cannot map (bf16): read."""
        info, start, dtype = self._located(key)
        if dtype is None or not info["shape"]:
            return self[key]
        # a fresh map per call, released with its last view: a map kept per tensor kept every page the spec ops
        # had read resident, the released model's 1.9 GB of weights on top of the engine's own copy
        offset = start + info["data_offsets"][0]
        return np.memmap(self.path, dtype=dtype, mode="r", offset=offset, shape=tuple(info["shape"]))

    def flat_blocks(self, key: str, values: int):
        """The tensor's values in C order as float32, ``values`` at a time: (offset, block) pairs, each block read
        from the file into memory of its own (not a map: the pages a map has read stay resident with it)."""
        info, start, dtype = self._located(key)
        n = int(np.prod(info["shape"], dtype=np.int64))
        if dtype is None:
            whole = np.asarray(self[key]).astype(np.float32, copy=False).reshape(-1)
            yield from ((lo, whole[lo : lo + values]) for lo in range(0, n, values))
            return
        with open(self.path, "rb") as f:
            for lo in range(0, n, values):
                f.seek(start + info["data_offsets"][0] + lo * dtype.itemsize)
                block = np.fromfile(f, dtype=dtype, count=min(values, n - lo))
                yield lo, block.astype(np.float32, copy=False)

    def __contains__(self, key) -> bool:
        return key in self._key_set  # Mapping's own would read the tensor to find out

    def shape_of(self, key: str) -> tuple[int, ...]:
        """A tensor's shape from the file header, without reading it (the search scans every tensor's shape)."""
        if key not in self._key_set:
            raise KeyError(key)
        return tuple(self._file.get_slice(key).get_shape())

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class NodeWeights64(Mapping):
    """Checkpoint tensors in float64 for the spec ops (actdiff.compare.refops computes in float64 and converts
    every weight it reads). The tensors of the node being visited (:meth:`visit`) are converted once and shared
    by all its float64 passes on the prompt (fp32 noise, sum envelope, propagated budget, a non-replaying
    side's spec op): each pass used to read the tensor from the checkpoint and convert it again, which was
    most of the stage's time at full size. They are released when the next node is visited, so at most one
    node's weights (and their squares, :meth:`squared`) are held in float64: the released model's expert
    weights, 151 MB each. Their buffers are reused by later tensors of the same shape (POOL_PER_SHAPE per
    shape): a fresh 151 MB array costs more in page faults than the conversion itself (squaring into a
    fresh array measured 5x squaring into a reused one). A buffer still viewed from outside is never reused.
    EMBED tables pass through as stored (memory-mapped where the mapping can): the op gathers the rows it
    needs, and the released word table would be 1.5 GB in float64. Arrays handed out are read-only."""

    POOL_PER_SHAPE = 2  # a weight and its square
    # A model whose float64 weights and squares together take at most this many bytes keeps them all, across
    # nodes and prompts (``resident``): converting them again per node and prompt was a fifth of a small model's
    # statistics job (MiniLM-L6: 0.36 GB; the tiny NomicBERT-MoE: 3 MB). The released model (7.6 GB in float64
    # with squares) stays one node at a time, within the job's memory target of 1.5x its fp32 weights.
    RESIDENT_BYTES = 512 << 20

    def __init__(self, raw: Mapping, graph: Graph, resident_bytes: int | None = None):
        self.raw = raw
        self.convert = frozenset(w for n in graph if n.op != "EMBED" for w in n.weights)
        self.keep: frozenset = frozenset()
        self.held: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}  # (kind, key) -> (buffer, view)
        self.stored_held: dict[str, np.ndarray] = {}  # key -> the checkpoint's own tensor (:meth:`stored`)
        self.pool: dict[tuple[int, ...], list[np.ndarray]] = {}
        # from the header where the mapping has one (reading every tensor here raised the job's peak RSS by 1.1 GB)
        shape, stored = getattr(raw, "shape_of", None) or (lambda k: np.shape(raw[k])), frozenset(raw)
        f64_bytes = sum(2 * 8 * math.prod(shape(w)) for w in self.convert if w in stored)  # weight and square
        self.resident = f64_bytes <= (self.RESIDENT_BYTES if resident_bytes is None else resident_bytes)

    def visit(self, node) -> None:
        """Hold ``node``'s tensors from now on (None: hold nothing and free the pool); the previous node's are
        released, their buffers back in the pool. A resident model holds every node's, once converted."""
        if self.resident:
            self.keep = self.convert
            return
        buffers = [b for b, _ in self.held.values()]
        self.held, self.stored_held = {}, {}
        for b in buffers if node is not None else []:
            free = self.pool.setdefault(b.shape, [])
            if sys.getrefcount(b) <= 3 and len(free) < self.POOL_PER_SHAPE:  # `buffers`, `b`, the call's own
                free.append(b)
        if node is None:
            self.pool = {}
        self.keep = frozenset(node.weights) & self.convert if node is not None else frozenset()

    def _buffer(self, shape: tuple[int, ...]) -> np.ndarray:
        free = self.pool.get(shape)
        return free.pop() if free else np.empty(shape)

    def _hold(self, kind: str, key: str, shape: tuple[int, ...], fill) -> np.ndarray:
        """A held read-only float64 array of ``shape`` filled by ``fill(out)``, in a pooled buffer."""
        b = self._buffer(tuple(shape))
        fill(b)
        v = b.view()
        v.flags.writeable = False
        self.held[(kind, key)] = (b, v)
        return v

    def __getitem__(self, key: str) -> np.ndarray:
        if ("w", key) in self.held:
            return self.held[("w", key)][1]
        if key not in self.convert:  # a table: mapped, not read whole, where the mapping can
            return self.raw.mapped(key) if hasattr(self.raw, "mapped") else self.raw[key]
        # converted straight from the file's pages where the mapping maps (no fp32 copy in between)
        t = self.raw.mapped(key) if hasattr(self.raw, "mapped") else self.raw[key]
        if np.asarray(t).dtype.kind != "f":
            return t
        if key not in self.keep:
            a = np.array(t, dtype=np.float64)  # a copy even of a float64 tensor: the raw mapping's stays writable
            a.flags.writeable = False
            return a
        return self._hold("w", key, np.shape(t), lambda out: np.copyto(out, t))

    def stored(self, key: str) -> np.ndarray | None:
        """The checkpoint's own tensor of a held node weight (read-only; mapped from the file where the mapping
        maps), one object for as long as the node's are held: a float32 tensor a float64 product packs straight
        from it (refops._stored_float32). None for a tensor not held (another node's)."""
        if key not in self.keep:
            return None
        if key not in self.stored_held:
            t = np.asarray(self.raw.mapped(key) if hasattr(self.raw, "mapped") else self.raw[key]).view()
            t.flags.writeable = False
            self.stored_held[key] = t
        return self.stored_held[key]

    def squared(self, key: str) -> np.ndarray:
        """The tensor's square in float64 (the sum envelope's q, budgets.sequential_sum_noise), equal bit for
        bit to ``np.square(np.asarray(w, np.float64))``."""
        if ("sq", key) in self.held:
            return self.held[("sq", key)][1]
        w = self[key]
        if key not in self.keep or ("w", key) not in self.held:
            return np.square(np.asarray(w, dtype=np.float64))
        return self._hold("sq", key, w.shape, lambda out: np.square(w, out=out))

    def __contains__(self, key) -> bool:
        return key in self.raw

    def shape_of(self, key: str) -> tuple[int, ...]:
        """A tensor's shape, from the raw mapping's header where it has one (CheckpointTensors.shape_of)."""
        shape_of = getattr(self.raw, "shape_of", None)
        return tuple(shape_of(key)) if shape_of is not None else tuple(np.shape(self.raw[key]))

    def __iter__(self):
        return iter(self.raw)

    def __len__(self) -> int:
        return len(self.raw)


@dataclass
class ShardContext:
    """What every prompt of a shard is judged with, and where the tables go."""

    graph: Graph
    variant: Variant
    cfg: StatsConfig
    replay: object  # actdiff.sides.Replay, or None: the side's output is judged against the spec op
    weights: CheckpointTensors
    catalogue: list
    missing: frozenset  # nodes the side did not capture
    writers: dict[str, _TableWriter]
    sample: BoundedSample
    drill: list = field(default_factory=list)  # min-heap of (-rank key, prompt, rows): the shard's worst M
    keys: list[str] = field(default_factory=list)
    fused: frozenset = frozenset()  # nodes the side's forward computes on another path than its replay
    outputs: tuple = ()  # the output nodes (actdiff.compare.propagation.output_nodes)
    search: object = None  # actdiff.compare.search_run.SearchSample: the search's bounded sample
    _nonfinite_weights: dict = field(default_factory=dict)  # node -> JSON {tensor: non-finite count}
    reference: str = "fp32"  # the reference dump's own precision (budgets.U_REFERENCE)
    weights64: NodeWeights64 | None = None  # the visited node's weights in float64 (set in __post_init__)
    noise_table: object = None  # actdiff.compare.refnoise.NoiseTable, or None: the noise is measured here
    side: str | None = None  # the engine that produced the values (its precision policy: actdiff.variants.policy)
    _budget_terms: dict = field(default_factory=dict)  # node -> budgets.BudgetTerms at the run's precision

    def __post_init__(self):
        if self.weights64 is None:
            self.weights64 = NodeWeights64(self.weights, self.graph)

    def nonfinite_weights(self, name: str | None) -> str:
        """JSON {checkpoint tensor: count of NaN/Inf} of a node's weights that hold any ("" for no node)."""
        if name is None:
            return ""
        if name not in self._nonfinite_weights:
            counts = {}
            for w in self.graph[name].weights:
                t = np.asarray(self.weights[w]) if w in self.weights else np.zeros(0)
                bad = int(t.size - np.count_nonzero(np.isfinite(t))) if t.dtype.kind == "f" else 0
                if bad:
                    counts[w] = bad
            self._nonfinite_weights[name] = json.dumps(counts, sort_keys=True)
        return self._nonfinite_weights[name]

    def reference_noise(self, pid: str, ref: dict, node) -> Noise:
        """The reference's fp32 noise at ``node`` on prompt ``pid``: read from the shard's noise table (measured
        once for every side, actdiff.compare.refnoise), else measured here."""
        if self.noise_table is not None:
            return self.noise_table.of(pid, node.name)
        return fp32_noise(self.graph, node, ref, self.weights64)

    def budget(self, name: str, noise: Noise) -> float:
        """The run's local budget at node ``name`` given its fp32 noise on a prompt (budgets.budget), from the
        node's prompt-independent terms, worked out once per node."""
        terms = self._budget_terms.get(name)
        if terms is None:
            terms = self._budget_terms[name] = budget_terms(
                self.graph[name], self.variant.precision, self.cfg.budgets, self.reference, self.side
            )
        return budget_of(terms, noise)

    def shared_propagation(self, pid: str, ref: dict, eng: dict) -> dict[str, float] | None:
        """The prompt's propagated budgets from the noise table's shared simulation where they are this run's own
        (actdiff.compare.refnoise: a run at the table's precision, with its budgets, whose engine made no other
        choice at a near tie than the simulation did); None where the run simulates the prompt itself."""
        if not self._shares_propagation:
            return None
        probs = [self.graph[b.probs] for b in self.graph.moe_blocks()]
        budgets = {n.name: self.budget(n.name, self.reference_noise(pid, ref, n)) for n in probs}
        return self.noise_table.propagated(pid, ref, eng, budgets)

    @functools.cached_property
    def _shares_propagation(self) -> bool:
        """Were the noise table's propagated budgets simulated with this run's budgets (refnoise.NoiseTable.shares)?
        Asked once per shard."""
        t = self.noise_table
        return t is not None and t.shares(self.variant.precision, self.cfg.budgets, self.reference, self.side)

    def local(self, name: str, ref: dict, eng: dict, replayed: bool = True, pre=None, spec=None) -> tuple:
        """(output to judge, the value it is judged against) of a node under teacher forcing. ``replayed``
        False (no replay, or a replay that does not reproduce the dump): the side's dumped output against the
        spec op on the side's own inputs. ``pre``: the node's replays computed with its group's
        (actdiff.compare.grouped.Replayed), else the replay runs here; ``spec``: the spec op on the side's own
        inputs computed with its group's (grouped.spec_on_own_inputs), else it runs here."""
        node = self.graph[name]
        if self.replay is not None and replayed:
            if pre is not None and pre.local is not None:
                return pre.local, ref[name]
            return self.replay.replay_node(name, {i: ref[i] for i in node.inputs}), ref[name]
        if spec is not None:
            return eng[name], spec
        from .refops import run_op, spec_params

        spec = run_op(self.graph, node, {i: eng[i] for i in node.inputs}, self.weights64, spec_params(self.graph, node))
        return eng[name], spec


@dataclass
class Judged:
    """One prompt after judge_prompt: per-node values shared by the table builders."""

    pid: str
    ref: dict
    eng: dict
    noise: dict[str, Noise] = field(default_factory=dict)
    status: dict[str, str] = field(default_factory=dict)
    local: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # failing nodes, once judged
    rows: dict[str, list] = field(default_factory=dict)  # the nodes table's columns for this prompt
    failing: list[str] = field(default_factory=list)
    first: str | None = None
    replay_gap: dict[str, float] = field(default_factory=dict)  # node -> replay on own inputs vs the dump
    mismatched: set = field(default_factory=set)  # nodes whose replay does not reproduce the dump
    propagated: dict[str, float] = field(default_factory=dict)  # node -> propagated budget
    replayed: dict = field(default_factory=dict)  # node -> its replays, computed with its group (compare.grouped)
    spec: dict = field(default_factory=dict)  # node -> the spec op on its own inputs, computed with its group
    diagnoses: dict = field(default_factory=dict)  # node -> (Diagnosis, inputs, target, budget): diagnose_group

    @property
    def tokens(self) -> int:
        return len(self.ref[INPUT_IDS])


# ---------------------------------------------------------------------------------------------- judging
def _nan_metrics(**over) -> dict:
    m = {k: math.nan for k in FLOAT_METRICS}
    m.update(nan_ref=0, inf_ref=0, nan_eng=0, inf_eng=0, max_abs_token=-1, max_abs_channel=-1, nonfinite_matched=0)
    m.update(over)
    return m


def _set_mismatch(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per token: do the expert-id sets differ (the order inside the top-k only permutes the expert slots)?"""
    return np.any(np.sort(a, 1) != np.sort(b, 1), axis=1)


def _replay_gap(ctx: ShardContext, j: Judged, node) -> float:
    """The side's replay of ``node`` on its OWN inputs against its dump: 0 when the replay is the code that
    ran. Index nodes: the fraction of tokens whose expert set differs where the side's own probabilities have
    a clear margin (a tie may legitimately break either way)."""
    pre = j.replayed.get(node.name)
    if pre is not None and pre.gap is not None:
        return pre.gap
    own = pre.own if pre is not None else ctx.replay.replay_node(node.name, {i: j.eng[i] for i in node.inputs})
    e = j.eng[node.name]
    if node.kind != "index":
        return float_gap(own, e)
    if same_bits(own, e) or np.array_equal(own, e):
        return 0.0
    probs = ctx.graph.moe_block_of(node.name).probs
    clear = margins(j.eng[probs], e.shape[1]) > ctx.budget(probs, j.noise[probs])
    return float(np.mean(_set_mismatch(own, e) & clear)) if e.size else 0.0


def _replay_reproduces(ctx: ShardContext, j: Judged, node, b: float) -> bool:
    """Is the replay the code that produced the dump at ``node``? Bit for bit, except on a path the side
    computes differently in its forward (a fused kernel): there within the node's budget, which is derived to
    hold two correct fp32 implementations of the op (budgets.R_IMPL). A side without replay: nothing to check
    (its local error is judged on its own dumped outputs)."""
    if ctx.replay is None:
        return True
    gap = j.replay_gap[node.name] = _replay_gap(ctx, j, node)
    bound = b if node.name in ctx.fused and node.kind != "index" else 0.0
    if gap > bound:
        j.mismatched.add(node.name)
        return False
    return True


def _judge_index(ctx: ShardContext, j: Judged, node, replayed: bool) -> tuple[dict, float, str]:
    """Top-k expert ids: a disagreement at a near-tie (margin within the probabilities' budget) is legitimate;
    only disagreements at clear margins count against the node."""
    r, e = j.ref[node.name], j.eng[node.name]
    lo, lref = ctx.local(node.name, j.ref, j.eng, replayed, j.replayed.get(node.name), j.spec.pop(node.name, None))
    probs = ctx.graph.moe_block_of(node.name).probs
    judged_probs = j.ref[probs] if replayed and ctx.replay is not None else j.eng[probs]
    clear = margins(judged_probs, e.shape[1]) > ctx.budget(probs, j.noise[probs])
    mism = float(np.mean(_set_mismatch(e, r))) if r.size else 0.0
    lmism = float(np.mean(_set_mismatch(lo, lref) & clear)) if r.size else 0.0
    j.local[node.name] = (lo, lref)
    return _nan_metrics(rel_l2=mism), lmism, "fail" if lmism > 0 else ("warn" if mism > 0 else "pass")


def _judge_blind(j: Judged, node, b: float) -> tuple[dict, float, str]:
    """An external side's op on its own inputs is impossible when one of them was not captured: the node is
    judged on its propagated error only (pass or warn)."""
    r, e = j.ref[node.name], j.eng[node.name]
    if node.kind == "index":
        m = _nan_metrics(rel_l2=float(np.mean(_set_mismatch(e, r))) if r.size else 0.0)
    else:
        m = compare(e, r)
    same, diverged = nonfinite_match(e, r)
    m["nonfinite_matched"] = same
    st = status(0.0, m["rel_l2"], b, diverged > 0)
    return m, math.nan, NONFINITE if same and st != "fail" else st


def _judge_float(ctx: ShardContext, j: Judged, node, b: float, replayed: bool) -> tuple[dict, float, str]:
    """Errors over the positions finite on both sides. NaN/Inf on one side only (propagated, or made by the op
    itself on the judged inputs) fail; the same NaN/Inf at the same positions on both sides make the node
    NONFINITE unless its finite values fail their budget: nothing can be compared there, so the node neither
    passes nor is an engine failure (the model itself produces them)."""
    lo, lref = ctx.local(node.name, j.ref, j.eng, replayed, j.replayed.get(node.name), j.spec.pop(node.name, None))
    j.local[node.name] = (lo, lref)
    m = compare(j.eng[node.name], j.ref[node.name])
    # compare counted the NaN/Inf of both sides: where there are none, nothing can match or diverge
    counted = m["nan_ref"] + m["inf_ref"] + m["nan_eng"] + m["inf_eng"]
    same, diverged = nonfinite_match(j.eng[node.name], j.ref[node.name]) if counted else (0, 0)
    lsame, ldiverged, local_rel = local_error(lo, lref)
    m["nonfinite_matched"] = same
    if diverged or ldiverged:
        return m, local_rel, "fail"
    if not (same or lsame):
        return m, local_rel, status(local_rel, m["rel_l2"], b, False)
    # all values non-finite: nothing finite to judge, only the matching positions
    st = status(local_rel, m["rel_l2"], b, False) if not math.isnan(local_rel) else "pass"
    return m, local_rel, "fail" if st == "fail" else NONFINITE


def judge_node(ctx: ShardContext, j: Judged, node) -> dict:
    """One node of one prompt: its errors, budget and status (a row of the nodes table). A node whose replay
    does not reproduce the dump is judged like an external side's: its dumped output against the spec op on
    its own inputs (the replay would judge code that did not run)."""
    noise = j.noise[node.name] if node.name in j.noise else ctx.reference_noise(j.pid, j.ref, node)
    j.noise[node.name] = noise
    b = ctx.budget(node.name, noise)
    if node.name in ctx.missing:
        m, local_rel, st = _nan_metrics(), math.nan, NOT_CAPTURED
    elif any(i in ctx.missing for i in node.inputs):  # own inputs not in the dump: a replay is uncheckable
        m, local_rel, st = _judge_blind(j, node, b)
    elif node.kind == "index":
        m, local_rel, st = _judge_index(ctx, j, node, _replay_reproduces(ctx, j, node, b))
    else:
        m, local_rel, st = _judge_float(ctx, j, node, b, _replay_reproduces(ctx, j, node, b))
    j.status[node.name] = st
    finite = np.isfinite(m["rel_l2"]) and np.isfinite(local_rel)
    amp = m["rel_l2"] / max(local_rel, U32) if finite else math.nan
    return {
        "prompt_id": j.pid,
        "node": node.name,
        "node_index": node.index,
        "op": node.op,
        "layer": node.layer if node.layer is not None else -1,
        "tokens": j.tokens,
        **m,
        "local_rel_l2": local_rel,
        "ref_fp32_error": noise.measured,
        "fp32_noise": noise.value,
        "budget": b,
        "amplification": amp,
        "status": st,
        "replay_gap": j.replay_gap.get(node.name, math.nan),
        "replay_mismatch": node.name in j.mismatched,
    }


def judge_prompt(ctx: ShardContext, pid: str, ref: dict, eng: dict, ahead=None) -> Judged:
    """Every node of one prompt, in graph order; the first divergent node is the first that fails while its
    inputs pass. Then the propagated budgets (actdiff.compare.propagation): does the prompt's output diverge
    beyond what correct local errors can produce? The propagation steps through the graph beside the judging,
    so each node's weights are converted to float64 once for all its spec passes (NodeWeights64). ``ahead``:
    what was computed with the prompt's group (actdiff.compare.grouped.Ahead: replays, noise, propagated
    budgets), used instead of computing it here."""
    from .propagation import Propagation, float32_product_ok

    j = Judged(pid, ref, eng, dict(ahead.noise) if ahead else {}, replayed=ahead.replayed if ahead else {},
               spec=ahead.spec if ahead else {})  # fmt: skip
    shared = None if ahead else ctx.shared_propagation(pid, ref, eng)
    prop = None if ahead or shared is not None else Propagation(ctx.graph, pid, ref, eng, ctx.weights64)
    budgets = {}
    rows = []
    try:
        for node in ctx.graph:
            ctx.weights64.visit(node)
            row = judge_node(ctx, j, node)
            j.replayed.pop(node.name, None)
            budgets[node.name] = row["budget"]
            if prop is not None:
                prop.step(node, budgets, float32_product_ok(node, row["budget"], j.noise[node.name]))
            if row["status"] != "fail":  # the builders read the local values of failing nodes only
                j.local.pop(node.name, None)
            rows.append(row)
    finally:
        ctx.weights64.visit(None)  # the last node's float64 weights are not kept past the prompt
    j.rows = _columns(rows)
    _first_divergence(ctx, j)
    j.propagated = ahead.propagated if ahead else shared if shared is not None else prop.out
    j.rows["propagated_budget"] = [j.propagated[n] for n in j.rows["node"]]
    rel = dict(zip(j.rows["node"], j.rows["rel_l2"], strict=True))
    over = [rel[n] > j.propagated[n] for n in ctx.outputs if n not in ctx.missing]
    j.rows["output_diverges"] = [any(over)] * len(ctx.graph)
    j.rows["is_output"] = [n in ctx.outputs for n in j.rows["node"]]
    return j


def _columns(rows: list[dict]) -> dict[str, list]:
    """A prompt's rows of the nodes table (one dict per node, every one with the same keys) as its columns: one
    list per column at the end, where appending each value to its column as the rows came (a dict lookup per value,
    ~30 columns per node and prompt) was about 5 % of a small model's statistics job (cProfile)."""
    if not rows:
        return {}
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    if any(len(r) != len(cols) for r in rows):
        raise ValueError(f"nodes table rows of one prompt with different columns: {sorted(cols)}")
    return cols


def _first_divergence(ctx: ShardContext, j: Judged) -> None:
    """The prompt's failing nodes, its first divergent node, and where its matching NaN/Inf start (the first
    NONFINITE node none of whose inputs is NONFINITE) with the non-finite weights there."""
    j.failing = [n for n in ctx.graph.names() if j.status[n] == "fail"]
    inputs_pass = (all(j.status.get(i, "pass") != "fail" for i in ctx.graph[n].inputs) for n in j.failing)
    j.first = next((n for n, ok in zip(j.failing, inputs_pass, strict=True) if ok), None)
    j.rows["first_divergence"] = [j.first or ""] * len(ctx.graph)
    nonfinite = [n for n in ctx.graph.names() if j.status[n] == NONFINITE]
    origin = next((n for n in nonfinite if all(j.status.get(i) != NONFINITE for i in ctx.graph[n].inputs)), None)
    j.rows["nonfinite_origin"] = [origin or ""] * len(ctx.graph)
    j.rows["nonfinite_weights"] = [ctx.nonfinite_weights(origin)] * len(ctx.graph)


# --------------------------------------------------------------------------------------------- builders
def build_nodes(ctx: ShardContext, j: Judged) -> None:
    ctx.writers["nodes"].add(j.rows)


def build_tokens(ctx: ShardContext, j: Judged) -> None:
    """Per-token errors (local and propagated) of the failing nodes, for error-by-position plots."""
    for name in j.failing:
        node = ctx.graph[name]
        if node.axis != "token" or node.kind == "index":
            continue
        lmax, lrel = per_token_errors(*j.local[name])
        pmax, prel = per_token_errors(j.eng[name], j.ref[name])
        n = len(lmax)
        ctx.writers["tokens"].add(
            {
                "prompt_id": [j.pid] * n,
                "node": [name] * n,
                "token": list(range(n)),
                "local_max_abs": lmax.tolist(),
                "local_rel_l2": lrel.tolist(),
                "max_abs": pmax.tolist(),
                "rel_l2": prel.tolist(),
            }
        )


def _diagnosed_nodes(ctx: ShardContext, j: Judged) -> list[str]:
    """Where a prompt's root cause is ranked: every failing node, or its first divergent node only."""
    return j.failing if ctx.cfg.diagnose_all_failing else [j.first] if j.first else []


def diagnose_group(ctx: ShardContext, js: list[Judged]) -> None:
    """Root-cause ranking (actdiff.compare.hypotheses) of the judged prompts of a group, node by node: the prompts
    failing at a node are ranked there together (rank_hypotheses_many: one op over their stacked rows where the op
    allows), on the values the judged code ran on (a replaying side: its replay on the reference's inputs; a side
    without a replay, or a node whose replay does not reproduce the dump: its dumped output on its own inputs).
    Every node's value is passed, since some hypotheses read another node (e.g. per-expert bias needs the top-k
    weights). Each prompt keeps its diagnoses (``j.diagnoses``) for build_hypotheses, which writes them in the
    prompt's order."""
    from .hypotheses import rank_hypotheses_many
    from .propagation import float32_product_ok

    at: dict[str, list[tuple[Judged, dict, np.ndarray, float]]] = {}
    for j in js:
        for name in _diagnosed_nodes(ctx, j):
            own = ctx.replay is None or name in j.mismatched
            inputs, target = (j.eng, j.eng[name]) if own else (j.ref, j.local[name][0])
            at.setdefault(name, []).append((j, inputs, target, ctx.budget(name, j.noise[name])))
    try:
        for node in (n for n in ctx.graph if n.name in at):
            ctx.weights64.visit(node)  # the float64 weights: converted once for the group's prompts
            items = at.pop(node.name)
            f32 = all(float32_product_ok(node, b, j.noise[node.name]) for j, _, _, b in items)
            ds = rank_hypotheses_many(ctx.graph, node, [i[1:] for i in items], ctx.weights64, ctx.catalogue, f32)
            for (j, inputs, target, b), d in zip(items, ds, strict=True):
                j.diagnoses[node.name] = (d, inputs, target, b)
    finally:
        ctx.weights64.visit(None)


def build_hypotheses(ctx: ShardContext, j: Judged) -> None:
    """The prompt's diagnoses (diagnose_group ranks them for its group first) into the hypotheses table; a node
    the catalogue leaves unexplained goes into the search's bounded sample."""
    from .hypotheses import UNEXPLAINED

    for name in _diagnosed_nodes(ctx, j):
        d, inputs, target, b = j.diagnoses[name]
        ctx.writers["hypotheses"].add(_diagnosis_rows(j.pid, name, name == j.first, d))
        if d.verdict == UNEXPLAINED and ctx.search is not None:
            ctx.search.offer(ctx.graph, name, j.pid, inputs, target, b)


def build_routing(ctx: ShardContext, j: Judged) -> None:
    """Per MoE layer: routing agreement at clear margins, and the block's error with the reference's expert
    choice forced (expert-kernel error separated from routing flips)."""
    ref, eng = j.ref, j.eng
    for block in ctx.graph.moe_blocks():
        if {block.probs, block.topk_indices} & ctx.missing:
            continue
        pb = ctx.budget(block.probs, j.noise[block.probs])
        rr = routing_rows(
            j.pid, block.layer, ref[block.topk_indices], eng[block.topk_indices], ref[block.probs], eng[block.probs], pb
        )
        ctx.writers["routing"].add(rr)
        forced = math.nan
        if ctx.replay is not None and block.input not in ctx.missing:
            out = ctx.replay.forced_moe(block, eng[block.input], ref[block.topk_indices], ref[block.topk_weights])
            forced = rel_l2(out, ref[block.output])
        ctx.writers["prompts"].add_row(
            {
                "prompt_id": j.pid,
                "kind": "moe_layer",
                "layer": block.layer,
                "value": rel_l2(eng[block.output], ref[block.output]),
                "value2": forced,
                "count": int(np.sum(~np.array(rr["agree"]))),
            }
        )


def build_embedding(ctx: ShardContext, j: Judged) -> None:
    """Cosine of the pooled and final embeddings; a bounded sample for the neighbour analysis."""
    if {POOLED, EMBEDDING} & ctx.missing:
        return
    row = {
        "prompt_id": j.pid,
        "kind": "embedding",
        "layer": -1,
        "value": cosine(j.eng[POOLED], j.ref[POOLED]),
        "value2": cosine(j.eng[EMBEDDING], j.ref[EMBEDDING]),
        "count": j.tokens,
    }
    ctx.writers["prompts"].add_row(row)
    ctx.sample.offer(j.pid, j.ref[EMBEDDING], j.eng[EMBEDDING])


def build_drilldown(ctx: ShardContext, j: Judged) -> None:
    """Keep the first values of the key nodes for the shard's worst prompts (compare.worst), so aggregation can
    show the corpus's worst ones after the dumps are gone."""
    score = prompt_score(j.rows["local_rel_l2"], j.rows["budget"], j.rows["rel_l2"])
    key = rank_key(score, j.pid)
    item = (_Desc(key), j.pid, None)
    if len(ctx.drill) >= ctx.cfg.worst_m and not item[0] > ctx.drill[0][0]:
        return
    rows = [
        {
            "prompt_id": j.pid,
            "node": k,
            "node_index": ctx.graph[k].index,
            "score": score[0],
            "ref_first": np.asarray(j.ref[k], np.float64).ravel()[:DRILL_VALUES].tolist(),
            "eng_first": np.asarray(j.eng[k], np.float64).ravel()[:DRILL_VALUES].tolist(),
            "rel_l2": rel_l2(j.eng[k], j.ref[k]),
        }
        for k in ctx.keys
    ]
    item = (item[0], j.pid, rows)
    if len(ctx.drill) < ctx.cfg.worst_m:
        heapq.heappush(ctx.drill, item)
    else:
        heapq.heapreplace(ctx.drill, item)


class _Desc:
    """Heap order for rank keys: the min-heap's top is the least bad prompt kept so far."""

    __slots__ = ("key",)

    def __init__(self, key: tuple):
        self.key = key

    def __lt__(self, other: _Desc) -> bool:
        return self.key > other.key  # a larger rank key is a better (less bad) prompt

    def __gt__(self, other: _Desc) -> bool:
        return self.key < other.key


BUILDERS = (build_nodes, build_tokens, build_hypotheses, build_routing, build_embedding, build_drilldown)


def _diagnosis_rows(pid: str, node: str, is_first: bool, d) -> dict[str, list]:
    ranked = list(d.ranked)
    n = max(len(ranked), 1)
    return {
        "prompt_id": [pid] * n,
        "node": [node] * n,
        "first_divergence": [is_first] * n,
        "rank": list(range(1, n + 1)),
        "candidate": [h.name for h in ranked] or [""],
        "error": [float(h.error) for h in ranked] or [math.nan],
        "says": [h.says for h in ranked] or [""],
        "baseline_error": [float(d.baseline_error)] * n,
        "verdict": [d.verdict] * n,
        "explained_by": [d.explained_by or ""] * n,
    }


# ------------------------------------------------------------------------------------------------ shard
def compute_shard_stats(
    model_dir: str | Path,
    ref_h5: str | Path,
    eng_h5: str | Path,
    side: str,
    variant: str | Variant,
    shard: int,
    outputs: dict[str, str],
    cfg: StatsConfig | None = None,
    noise: str | Path | None = None,
) -> dict:
    """Compare one shard; write the shard tables (actdiff.tables.SHARD_TABLES) named in ``outputs``. ``noise``:
    the shard's reference noise table (actdiff.compare.refnoise), else the noise is measured here. Returns a
    small summary dict (for the log)."""
    from threadpoolctl import threadpool_limits

    from ..sides import open_replay
    from .hypotheses import load_catalogue
    from .propagation import output_nodes
    from .refnoise import NoiseTable

    cfg = cfg or StatsConfig()
    model_dir = Path(model_dir)
    graph = build_graph(load_config_json(model_dir), str(model_dir / "config.json"))
    variant = resolve_variant(variant)
    streamed = {k: t for k, t in SHARD_TABLES.items() if k != EMBEDDING_SAMPLE}  # the sample is written at the end
    writers = {k: _TableWriter(Path(outputs[k]), empty_table(t)) for k, t in streamed.items()}
    t0, n_prompts = time.perf_counter(), 0
    try:
        # one core (rule threads: 1): the float64 spec ops of the noise and the hypotheses call numpy's BLAS,
        # whose extra threads would only spin against the other jobs (10x slower on a loaded machine)
        with threadpool_limits(limits=1), ActivationReader(ref_h5) as rr, ActivationReader(eng_h5) as er:
            weights = CheckpointTensors(model_dir / "model.safetensors")
            replay = open_replay(side, model_dir, variant, er.attrs)
            ctx = ShardContext(
                graph, variant, cfg, replay, weights, load_catalogue(), _missing_nodes(eng_h5, er), writers,
                BoundedSample(cfg.embedding_sample), keys=graph.key_nodes(),
                fused=replay.fused_nodes() if replay is not None else frozenset(), outputs=tuple(output_nodes(graph)),
                search=SearchSample(cfg.search_prompts, cfg.search_nodes) if cfg.search_seconds > 0 else None,
                reference=reference_precision_of(rr.attrs, str(ref_h5)),
                noise_table=NoiseTable(noise, rr.prompt_ids, graph, ref_h5) if noise else None, side=side,
            )  # fmt: skip
            skip = _fitted_prompts(eng_h5, er, rr, writers["nodes"])
            _record_reference(ref_h5, rr, writers["nodes"])
            # planned from the token offsets: a group is read only once the one before it is judged, a prompt
            # larger than HOLD_BYTES is read node by node
            judged = [(i, p) for i, p in enumerate(rr.prompt_ids) if p not in skip]
            bound, sizes = group_plan(graph, [int(rr.offsets[i + 1] - rr.offsets[i]) for i, _ in judged])
            lazy = frozenset(p for (_, p), size in zip(judged, sizes, strict=True) if size > HOLD_BYTES)
            paired = _paired_prompts(ref_h5, eng_h5, rr, er, graph.names(), skip, lazy)
            for group in grouped(paired, bound, sizes):
                ahead = prepare_group(ctx, group)
                js = [judge_prompt(ctx, pid, ref, eng, pre) for (pid, ref, eng), pre in zip(group, ahead, strict=True)]
                del ahead  # what judging kept of it is in js (the local values of failing nodes)
                diagnose_group(ctx, js)
                while js:
                    j = js.pop(0)
                    for build in BUILDERS:
                        build(ctx, j)
                    del j
                    n_prompts += 1
                    if n_prompts % 100 == 0:
                        rate = n_prompts / (time.perf_counter() - t0)
                        log.info("stats: %d/%d prompts (%.1f prompts/s)", n_prompts, len(rr.prompt_ids), rate)
                del group  # released before the next group is read and judged, not after
        _close(ctx, outputs[EMBEDDING_SAMPLE])
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    dt = time.perf_counter() - t0
    log.info("stats: %d prompts in %.1f s (%.1f prompts/s)", n_prompts, dt, n_prompts / max(dt, 1e-9))
    replay_s = getattr(replay, "seconds", math.nan)  # a replay that times itself (its share of the stage)
    if math.isfinite(replay_s):
        log.info("stats: replay (teacher forcing, forced routing) %.1f s of the %.1f s", replay_s, dt)
    return {"prompts": n_prompts, "seconds": dt, "replay_seconds": replay_s, "dims": graph.dims.hidden,
            "excluded": len(skip)}  # fmt: skip


def _fitted_prompts(eng_h5, er: ActivationReader, rr: ActivationReader, nodes: _TableWriter) -> frozenset:
    """The shard's prompts the side was fitted on (actdiff.compare.fitted): skipped, and recorded in the nodes
    table's metadata for aggregation."""
    from .fitted import fitted_prompts, shard_metadata

    skip = fitted_prompts(er.attrs, str(eng_h5)) & set(rr.prompt_ids)
    if skip:
        nodes.metadata = shard_metadata(skip)
        log.info("%s: %d prompt(s) the side was fitted on are not compared: %s", eng_h5, len(skip), sorted(skip))
    return skip


def _record_reference(ref_h5, rr: ActivationReader, nodes: _TableWriter) -> None:
    """The reference's device and numerics, kept in the nodes table's metadata for the verdict and the report
    (the dump itself is a temp() file)."""
    from ..reference_device import REFERENCE_META, reference_record

    rec = reference_record(rr.attrs)
    nodes.metadata = {**nodes.metadata, REFERENCE_META: json.dumps(rec, sort_keys=True).encode()}
    if rec["reference_precision"] != "fp32":
        log.warning("%s: the reference ran in %s on %s; its rounding is added to the budgets of %s nodes",
                    ref_h5, rec["reference_precision"], rec["device"], ", ".join(TF32_OPS))  # fmt: skip


def _missing_nodes(eng_h5, er: ActivationReader) -> frozenset:
    """Nodes a side could not provide (actdiff import --allow-missing, an incomplete mapping): stored as
    placeholders, reported as "not_captured" instead of failing."""
    missing = frozenset(json.loads(er.attrs.get("missing_nodes", "[]") or "[]"))
    if missing:
        log.warning("%s: %d node(s) not captured by the engine: %s", eng_h5, len(missing), sorted(missing))
    return missing


def _paired_prompts(
    ref_h5, eng_h5, rr: ActivationReader, er: ActivationReader, names: list[str], skip=frozenset(), lazy=frozenset()
):
    """(prompt_id, reference values, side values) for every prompt of the reference dump but those in ``skip``;
    those in ``lazy`` read node by node (actdiff.h5io.NodeByNode)."""
    missing = [p for p in rr.prompt_ids if p not in er.index and p not in skip]
    if missing:
        raise DumpError(
            f"{eng_h5}: {len(missing)} prompt(s) of the reference dump are missing, e.g. "
            f"{missing[:3]}; the two dumps come from different token files"
        )
    lazy_at = frozenset(i for i, p in enumerate(rr.prompt_ids) if p in lazy)
    eng_iter = er.iter_prompts(names, lazy=lazy_at) if er.prompt_ids == rr.prompt_ids else None
    for _, pid, ref in rr.iter_prompts(names, lazy=lazy_at):
        if eng_iter is not None:
            _, _, eng = next(eng_iter)  # read in step with the reference, skipped prompts too
        if pid in skip:
            continue
        if eng_iter is None and pid in lazy:
            eng = NodeByNode(er, er.index[pid], names)
        elif eng_iter is None:  # different prompt order: random access
            eng = {n: er.node(n, pid) for n in names}
            if "input_ids" in er.f:
                eng[INPUT_IDS] = er.input_ids(pid)
        if INPUT_IDS not in ref:
            raise DumpError(f"{ref_h5}: the reference dump does not record input ids; rerun dump_reference")
        eng.setdefault(INPUT_IDS, ref[INPUT_IDS])
        yield pid, ref, eng
        del ref, eng  # released before the next prompt is read, not after (iter_prompts)


def _close(ctx: ShardContext, embeddings_out: str) -> None:
    """Write the search's sample (searched once per run, in aggregation) and the drill-down (worst first), close
    the streamed tables, write the embedding sample."""
    if ctx.search is not None:
        ctx.writers["search_sample"].add(ctx.search.to_columns(ctx.graph))
    for _key, _pid, rows in sorted(ctx.drill, reverse=True):
        ctx.writers["drilldown"].add({k: [r[k] for r in rows] for k in rows[0]})
    for w in ctx.writers.values():
        w.close()
    emb = ctx.sample.items()
    table = pa.Table.from_pydict(
        {
            "prompt_id": [p for p, _, _ in emb],
            "ref": [r.ravel().tolist() for _, r, _ in emb],
            "eng": [e.ravel().tolist() for _, _, e in emb],
        },
        schema=SHARD_TABLES[EMBEDDING_SAMPLE].schema,
    )
    with atomic_path(embeddings_out) as tmp:
        pq.write_table(table, tmp)
