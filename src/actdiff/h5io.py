"""HDF5 activation dumps (schema documented in docs/formats.md).

One file per (model, side, variant, shard). For every node of the canonical graph there is ONE ragged
dataset ``/nodes/<node name>`` holding all the shard's real tokens concatenated (``[sum T, ...]``), or
one row per prompt for prompt-level nodes (``pooled``, ``embedding``). ``/prompt_ids`` (utf-8 strings)
and ``/token_offsets`` (int64, length N+1) say which rows belong to which prompt: prompt i owns rows
``token_offsets[i]:token_offsets[i+1]``. Every dataset is chunked with HDF5's Fletcher-32 checksum per chunk
(schema 2), so bytes changed on disk fail the read instead of becoming a divergence; compression per
``activation_compression``.
File attributes: schema_version, model, side, variant, shard, weights_sha256, graph (JSON), library
versions, creation time. Per-node attributes: op, node index, shape template, kind, count of non-finite
values.

Writes are atomic: the file is built under a temporary name and renamed when complete, so a killed run
never leaves a file that looks finished.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import OrderedDict
from collections.abc import MutableMapping
from pathlib import Path

import h5py
import numpy as np

from . import sysinfo
from .atomic import disk_full_error, is_disk_full, temp_path_for
from .errors import DumpError
from .nodes import Graph, build_graph

# 2: every dataset carries Fletcher-32 chunk checksums; prompt_ids are fixed-length utf-8 bytes (HDF5 cannot
# filter variable-length strings). Version 1 dumps (no checksums) are still read.
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
# on every dataset: a flipped bit or overwritten block is detected when the chunk is read (HDF5 raises
# OSError "data error detected by Fletcher32 checksum"), the reader turns that into a DumpError
CHECKSUM = {"fletcher32": True}
DUMP_LIBRARIES = ("actdiff", "torch", "transformers", "tokenizers", "numpy", "h5py", "safetensors")
# the writer buffers this many bytes of rows before appending them to the datasets (bytes, not rows: a
# full-size model's token row is ~20x a tiny model's)
_FLUSH_BYTES = 64 << 20
# Chunks of 256 KiB: iter_prompts' windows hold at least one chunk per node, 49 MiB for the released model's 220
# nodes (1 MiB chunks: 196 MiB, over its 64 MiB window budget), and a read of one prompt's rows (node()) checksums
# less beside them (bench/dump_read.py, released graph: 1.36 s against 1.93 s); whole reads run at the same speed
_CHUNK_BYTES = 256 << 10
# iter_prompts' read windows, all nodes' together per file: larger reads are faster (bench/dump_read.py), and a
# prompt's values are views into them, so a consumer holding several prompts holds their windows too
WINDOW_BYTES = 64 << 20
# NodeByNode keeps the nodes last read of a prompt read node by node, this many bytes a side: a layer of the
# released model's 512-token prompt is 36 MB (54 MB with its experts, the largest node 12.6 MB), so a node's
# inputs and the residual it adds are still there when it is judged: 1,172 reads for the 880 node values of two
# such prompts (the statistics' second looks, at the failing and key nodes, read again)
NODE_CACHE_BYTES = 64 << 20


# HDF5 filters per `activation_compression` setting. Activations are float32 noise to a compressor: gzip
# level 1 + shuffle saves ~17% of the bytes at ~50 MB/s, LZF ~7% at ~140 MB/s, none writes at ~600 MB/s
# (measured on the tiny model's dumps). Dumps are temporary by default, so the default is none.
COMPRESSIONS: dict[str, dict] = {
    "none": {},
    "lzf": {"compression": "lzf", "shuffle": True},
    "gzip": {"compression": "gzip", "compression_opts": 1, "shuffle": True},
}


def row_bytes(graph: Graph, name: str) -> int:
    """Bytes of one row (one token, or one prompt) of a node as the dump stores it."""
    return max(1, int(np.prod(graph.trailing_shape(name))) * np.dtype(graph[name].dtype).itemsize)


def prompt_values_bytes(graph: Graph, tokens: int) -> int:
    """Bytes of one prompt's rows of every node in a dump, ``tokens`` tokens long, without any file overhead (token
    nodes a row per token, prompt-level nodes one row)."""
    return sum(row_bytes(graph, n.name) * (tokens if n.axis == "token" else 1) for n in graph)


def chunk_rows(nbytes_per_row: int) -> int:
    """Rows per HDF5 chunk of a node dataset: about _CHUNK_BYTES, at most 1024 rows."""
    return max(1, min(1024, _CHUNK_BYTES // nbytes_per_row))


# What a dump holds besides its node data, bounded from above: per dataset, HDF5's object header with the node's
# attributes and its chunk index (B-tree entries, well under 64 bytes per chunk); per file the superblock, the
# root group and the attributes, of which the graph JSON is the largest. With these the bound exceeds the real
# file by 0.04-0.6 % on the tiny model (3 to 300 prompts, 256 KiB chunks; tests/test_diskplan.py): the most on the
# smallest dump, whose metadata is the largest part.
_DATASET_OVERHEAD = 4096
_CHUNK_INDEX_BYTES = 64
_FILE_OVERHEAD = 64 << 10


def dump_bytes_bound(graph: Graph, prompts: int, tokens: int, prompt_id_bytes: int = 64) -> int:
    """Bytes of an uncompressed dump of ``prompts`` prompts holding ``tokens`` real tokens in all, from above.

    Every node dataset stores whole chunks (HDF5 writes an uncompressed chunk at full size even when the data
    ends inside it), so a node's bytes are its rows rounded up to whole chunks of :func:`chunk_rows`; the
    token ids (gzip) are counted at 8 bytes each, the prompt ids at ``prompt_id_bytes`` (the fixed-length
    width of the longest id). Compression only makes a dump smaller, so this bounds it too."""
    total = _FILE_OVERHEAD + len(graph.to_json()) + 4096
    for n in graph:
        rows = tokens if n.axis == "token" else prompts
        per_row = row_bytes(graph, n.name)
        chunks = -(-rows // chunk_rows(per_row))
        total += chunks * chunk_rows(per_row) * per_row + chunks * _CHUNK_INDEX_BYTES + _DATASET_OVERHEAD
    total += prompts * prompt_id_bytes + 8 * (prompts + 1) + 8 * tokens + 3 * _DATASET_OVERHEAD
    return total


class ActivationWriter:
    """Write per-prompt node values into one HDF5 file; use as a context manager.

    Two ways in. :meth:`append` takes a prompt's values of every node, prompts in their order, and buffers them
    to write _FLUSH_BYTES at a time. With a ``plan`` (every prompt's id and token count, in the file's order,
    known before the first value), :meth:`put` writes one node's rows of one prompt at once, at the rows the plan
    gives it, in any order, and :meth:`done` closes a prompt: a side that streams (actdiff.sides.base.RowSink)
    then holds no prompt's values, the writer none either."""

    def __init__(
        self, path: str | Path, graph: Graph, attrs: dict, compression: str = "none",
        plan: list[tuple[str, int]] | None = None,
    ):  # fmt: skip
        if compression not in COMPRESSIONS:
            raise ValueError(f"activation compression {compression!r}: use one of {', '.join(COMPRESSIONS)}")
        self.path = Path(path)
        self.graph = graph
        self.tmp = temp_path_for(self.path)
        # planned writes land anywhere: no chunk cache (per dataset, 1 MiB each would be 220 MiB at full size); a
        # partial chunk is read back and rewritten instead, as fast here (8 full-size prompts, any order, 1.7 s)
        self.f = h5py.File(self.tmp, "w", **({"rdcc_nbytes": 0} if plan is not None else {}))
        self.plan = None if plan is None else [(str(pid), int(t)) for pid, t in plan]
        self.prompt_ids: list[str] = [] if plan is None else [pid for pid, _ in self.plan]
        self.offsets = [0] if plan is None else [0, *np.cumsum([t for _, t in self.plan], dtype=np.int64).tolist()]
        self.nonfinite = {n.name: 0 for n in graph}
        self._buf: dict[str, list[np.ndarray]] = {n.name: [] for n in graph}
        self._buf_bytes = 0
        self._ids: list[np.ndarray] = []
        self._ids_complete = True
        self._put: list[dict[str, int]] = [{} for _ in self.plan] if plan is not None else []  # node -> NaN/Inf
        self._planned_ids: dict[int, np.ndarray] = {}
        self._closed: set[int] = set()
        self.ds = self._create_datasets(compression)
        # appended rows go to disk as whole stored chunks, checksummed here (_DirectChunks), where a dataset is one
        # raw_checked reads: HDF5's filter pipeline, and the concatenation of the buffered prompts before it, were
        # half of writing a dump (1.1 of 2.0 s for MiniLM's bundled shard, Intel Xeon model 207)
        direct = plan is None and all(raw_checked(d) for d in self.ds.values())
        self._direct = {name: _DirectChunks(d) for name, d in self.ds.items()} if direct else None
        self.f.attrs.update({k: v for k, v in attrs.items() if v is not None})
        self.f.attrs["schema_version"] = SCHEMA_VERSION
        self.f.attrs["graph"] = graph.to_json()
        self.f.attrs["library_versions"] = json.dumps(sysinfo.library_versions(DUMP_LIBRARIES))
        self.f.attrs["created_unix"] = time.time()
        self.f.attrs["compression"] = compression

    def _create_datasets(self, compression: str) -> dict:
        """One dataset per node under /nodes: empty to append to, or planned at its final rows."""
        grp = self.f.create_group("nodes")
        ds = {}
        for n in self.graph:
            trailing = self.graph.trailing_shape(n.name)
            rows = 0 if self.plan is None else (self.offsets[-1] if n.axis == "token" else len(self.plan))
            d = grp.create_dataset(
                n.name,
                shape=(rows, *trailing),
                maxshape=(None, *trailing),  # a chunk may hold more rows than a small planned dump
                dtype=np.dtype(n.dtype),
                chunks=(chunk_rows(row_bytes(self.graph, n.name)), *trailing),
                **COMPRESSIONS[compression],
                **CHECKSUM,
            )
            d.attrs.update({"op": n.op, "index": n.index, "shape": n.shape_template, "kind": n.kind, "axis": n.axis})
            ds[n.name] = d
        return ds

    def append(self, prompt_id: str, values: dict[str, np.ndarray], input_ids=None) -> list[str]:
        """Add one prompt's values (every node, shaped per the graph) and, optionally, its token ids (stored in
        ``/input_ids`` when every prompt has them). Returns the nodes with NaN/Inf."""
        if self.plan is not None:
            raise RuntimeError("a planned ActivationWriter takes put() and done(), not append()")
        T = None
        bad = []
        for n in self.graph:
            if n.name not in values:
                raise DumpError(f"prompt {prompt_id!r}: node {n.name!r} was not recorded")
            a = np.asarray(values[n.name])
            if n.axis == "token":
                T = a.shape[0] if T is None else T
            a, nonfinite = self._checked(prompt_id, n.name, a, T)
            self.nonfinite[n.name] += nonfinite
            if nonfinite:
                bad.append(n.name)
            self._buf[n.name].append(a)
            self._buf_bytes += a.nbytes
        ids = self._checked_ids(prompt_id, input_ids, T)
        if ids is not None:
            self._ids.append(ids)
        self.prompt_ids.append(prompt_id)
        self.offsets.append(self.offsets[-1] + int(T))
        if self._buf_bytes >= _FLUSH_BYTES:
            self._flush()
        return bad

    def put(self, index: int, name: str, value: np.ndarray) -> None:
        """Write node ``name``'s rows of the plan's prompt ``index`` now (its tokens' rows, or its one row of a
        prompt-level node). A node put twice keeps the last value."""
        pid, T = self.plan[index]
        if index in self._closed:
            raise DumpError(f"prompt {pid!r}: node {name!r} given after the prompt was done")
        a, nonfinite = self._checked(pid, name, np.asarray(value), T)
        lo = self.offsets[index] if self.graph[name].axis == "token" else index
        self.ds[name][lo : lo + a.shape[0]] = a
        self.nonfinite[name] += nonfinite - self._put[index].get(name, 0)
        self._put[index][name] = nonfinite

    def done(self, index: int, input_ids=None) -> list[str]:
        """Close the plan's prompt ``index``: every node must have been put. Returns the nodes with NaN/Inf."""
        pid, T = self.plan[index]
        absent = [n.name for n in self.graph if n.name not in self._put[index]]
        if absent:
            raise DumpError(f"prompt {pid!r}: node {absent[0]!r} was not recorded ({len(absent)} nodes)")
        ids = self._checked_ids(pid, input_ids, T)
        if ids is not None:
            self._planned_ids[index] = ids
        self._closed.add(index)
        return [name for name, nonfinite in self._put[index].items() if nonfinite]

    def _checked(self, pid: str, name: str, a: np.ndarray, T: int | None) -> tuple[np.ndarray, int]:
        """``a`` in the node's dtype once its shape is the graph's for ``T`` tokens; how many NaN/Inf it holds."""
        n = self.graph[name]
        expected = self.graph.shape(name, T if n.axis == "token" else 1)
        if a.shape != expected:
            raise DumpError(f"prompt {pid!r}: node {name!r} has shape {a.shape}, graph says {expected}")
        a = a.astype(n.dtype, copy=False)
        return a, 0 if n.kind == "index" else int(a.size - np.count_nonzero(np.isfinite(a)))

    def _checked_ids(self, pid: str, input_ids, T: int | None) -> np.ndarray | None:
        if input_ids is None:
            self._ids_complete = False
            return None
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.shape != (T,):
            raise DumpError(f"prompt {pid!r}: {ids.shape[0]} input ids for {T} tokens")
        return ids

    def _flush(self) -> None:
        for name, parts in self._buf.items():
            if not parts:
                continue
            d = self.ds[name]
            start = d.shape[0]
            d.resize(start + sum(len(a) for a in parts), axis=0)
            if self._direct is not None:
                for a in parts:
                    self._direct[name].add(a)
            else:
                d[start:] = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)  # one long prompt: no copy
            parts.clear()
        self._buf_bytes = 0

    def close(self) -> None:
        try:
            self._finish()
        except BaseException as e:
            self._fail(e)
            raise
        os.replace(self.tmp, self.path)

    def _finish(self) -> None:
        self._flush()
        for chunks in (self._direct or {}).values():
            chunks.close()
        if self.plan is not None:
            open_ = [self.plan[i][0] for i in range(len(self.plan)) if i not in self._closed]
            if open_:
                raise DumpError(f"{self.path}: {len(open_)} prompt(s) never done, the first {open_[0]!r}")
            self._ids = [self._planned_ids[i] for i in sorted(self._planned_ids)]
        # fixed-length utf-8 bytes: HDF5 cannot checksum variable-length strings (the reader decodes them)
        ids = np.array([p.encode("utf-8") for p in self.prompt_ids] or [b""], dtype=bytes)[: len(self.prompt_ids)]
        self.f.create_dataset("prompt_ids", data=ids, **CHECKSUM)
        self.f.create_dataset("token_offsets", data=np.asarray(self.offsets, dtype=np.int64), **CHECKSUM)
        if self._ids_complete and self._ids:
            self.f.create_dataset("input_ids", data=np.concatenate(self._ids), **COMPRESSIONS["gzip"], **CHECKSUM)
        for name, count in self.nonfinite.items():
            self.ds[name].attrs["nonfinite"] = count
        self.f.attrs["n_prompts"] = len(self.prompt_ids)
        self.f.attrs["n_tokens"] = self.offsets[-1]
        # flush first, with every handle alive: a flush that fails (full disk) leaves HDF5's ids consistent for
        # abort, a close that fails half-way does not
        self.f.flush()
        self.ds.clear()
        self.f.close()

    def _fail(self, e: BaseException) -> None:
        """Remove the temporary file; a full disk becomes a DiskFullError naming the dump (raised here)."""
        written = self.tmp.stat().st_size if self.tmp.exists() else None
        self.abort()
        if is_disk_full(e):
            raise disk_full_error(self.path, written) from None

    def abort(self) -> None:
        """Discard the temporary file. On a full disk HDF5 still writes its caches when the handles close, fails
        again (once per dataset), and a close that fails half-way leaves ids that crash the interpreter when
        released: so the file's descriptor is first pointed at /dev/null, where those last writes succeed."""
        with contextlib.suppress(Exception):
            fd = self.f.id.get_vfd_handle()
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, fd)
            os.close(null)
        try:
            self.ds.clear()
            self.f.close()
        except Exception:  # noqa: BLE001  the file is discarded whatever its close says
            pass
        finally:
            if self.tmp.exists():
                self.tmp.unlink()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self._fail(exc)
        return False


class ActivationReader:
    """Read a dump; every failure to read is a DumpError naming the file and what to do."""

    def __init__(self, path: str | Path, cache_bytes: int = 0):
        self.path = Path(path)
        if not self.path.is_file():
            raise DumpError(f"{self.path}: activation dump not found; rerun the pipeline to produce it")
        try:
            # no chunk cache: it is per dataset, so with hundreds of nodes even 1 MiB each adds up, and grows with
            # the file; bulk reads go through iter_prompts, which reads each chunk once
            self.f = h5py.File(self.path, "r", rdcc_nbytes=cache_bytes)
            version = int(self.f.attrs["schema_version"])
            self.prompt_ids = [s.decode("utf-8") if isinstance(s, bytes) else s for s in self.f["prompt_ids"][()]]
            self.offsets = self.f["token_offsets"][()]
            self.graph_json = json.loads(self.f.attrs["graph"])
        except (OSError, KeyError, ValueError) as e:
            raise DumpError(
                f"{self.path}: not a readable actdiff dump ({type(e).__name__}: {e}); the file is corrupted or "
                "incomplete. Delete it and rerun the pipeline to recompute it."
            ) from None
        if version not in READABLE_VERSIONS:
            raise DumpError(f"{self.path}: schema version {version}, this actdiff reads {SCHEMA_VERSION}; rerun")
        self.attrs = dict(self.f.attrs)
        self.index = {p: i for i, p in enumerate(self.prompt_ids)}
        self._raw: dict = {}  # dataset path -> its h5py Dataset where _rows_checked reads it (raw_checked), else None
        self._per_prompt: dict[str, bool] = {}  # node -> stored one row per prompt (:meth:`per_prompt`)

    @property
    def node_names(self) -> list[str]:
        return list(self.f["nodes"].keys())

    def graph(self) -> Graph:
        from .nodes import ModelDims

        return build_graph(ModelDims(**self.graph_json["dims"]))

    def corrupted(self, dataset: str, e: Exception | str) -> DumpError:
        """The error for a dataset whose read fails: with schema 2 a chunk whose checksum no longer matches (HDF5
        says only "filter returned failure during read"; ``e`` the exception), or an unreadable chunk; ``e`` a
        string: what the reader's own check found (:meth:`_rows_checked`)."""
        why = e if isinstance(e, str) else f"HDF5: {e}"
        return DumpError(
            f"{self.path}: dataset {dataset!r} is damaged ({why}): its data changed on disk after it was "
            "written (disk, copy or transfer error; every chunk carries a checksum). Delete the file and rerun the "
            "pipeline to recompute it."
        )

    def _get(self, dataset: str, sel=()):
        """``self.f[dataset][sel]``, with a damaged chunk reported as a DumpError naming file and dataset. A slice
        of rows of a dataset :func:`raw_checked` accepts is read by :meth:`_rows_checked`."""
        if isinstance(sel, slice) and sel.step in (None, 1) and self._raw_checked(dataset):
            lo, hi, _ = sel.indices(self._raw[dataset].shape[0])
            return self._rows_checked(dataset, lo, max(lo, hi))
        return self._hdf5_get(dataset, sel)

    def _hdf5_get(self, dataset: str, sel=()):
        try:
            return self.f[dataset][sel]
        except OSError as e:
            raise self.corrupted(dataset, e) from None

    def _raw_checked(self, dataset: str) -> bool:
        if dataset not in self._raw:
            d = self.f[dataset]  # kept: looking a dataset up by its path was a third of a raw read's time
            self._raw[dataset] = d if raw_checked(d) else None
        return self._raw[dataset] is not None

    def _rows_checked(self, dataset: str, lo: int, hi: int) -> np.ndarray:
        """Rows ``lo:hi`` of ``dataset``, the stored chunks holding them read raw and each one's Fletcher-32
        checksum verified here (actdiff.kernels.fletcher32: HDF5's checksum, bit for bit) instead of in HDF5's
        filter pipeline: a dump's whole-chunk reads went 1.3-1.8 GB/s through the pipeline, against 7 GB/s for
        the raw chunks and 25 GB/s for the checksum (the tiny model's reference dump, Zen 4). A chunk stored
        without its checksum (a skipped filter) or not readable raw sends the read through HDF5, which then
        names any damage itself."""
        from .kernels import fletcher32

        d = self._raw[dataset]
        shape, dtype = d.shape, d.dtype
        per, row = d.chunks[0], dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
        # 4 bytes past the rows: a whole chunk is read in place, its checksum landing just after its rows (where the
        # next chunk's rows then go); a separate buffer per chunk was a fresh allocation and a copy of every byte
        flat = np.empty((hi - lo) * row + 4, np.uint8)
        tail = (0,) * (len(shape) - 1)
        for c0 in range(lo // per * per, hi, per):
            a, b = max(lo, c0), min(hi, c0 + per)  # the rows of this chunk asked for
            whole = (a, b) == (c0, c0 + per)
            raw = self._raw_chunk(d, (c0, *tail), flat[(a - lo) * row : (b - lo) * row + 4] if whole else None)
            if raw is None:
                return self._hdf5_get(dataset, slice(lo, hi))
            body = raw[:-4]
            if len(raw) != per * row + 4 or fletcher32(body) != int.from_bytes(raw[-4:], "little"):
                raise self.corrupted(dataset, f"the stored chunk at row {c0} does not match its Fletcher-32 checksum")
            if not whole:
                flat[(a - lo) * row : (b - lo) * row] = np.frombuffer(body, np.uint8, (b - a) * row, (a - c0) * row)
        return flat[:-4].view(dtype).reshape(hi - lo, *shape[1:])

    @staticmethod
    def _raw_chunk(d, offsets: tuple, into: np.ndarray | None) -> memoryview | None:
        """The stored bytes of one chunk (into ``into`` where given and large enough), or None where it is not
        stored whole with every filter applied (HDF5 then reads it)."""
        try:
            if into is not None:
                try:
                    mask, raw = d.id.read_direct_chunk(offsets, out=into)
                except ValueError:  # stored larger than its rows: read it apart (the size check then names it)
                    mask, raw = d.id.read_direct_chunk(offsets)
            else:
                mask, raw = d.id.read_direct_chunk(offsets)
        except (OSError, KeyError, ValueError):
            return None
        return None if mask else memoryview(raw)

    def node_all(self, name: str) -> np.ndarray:
        if name not in self.f["nodes"]:
            raise DumpError(f"{self.path}: node {name!r} is not in this dump")
        return self._get(f"nodes/{name}")

    def per_prompt(self, name: str) -> bool:
        """Does the dump store node ``name`` one row per prompt (its ``axis`` attribute), not per token? Read once
        per node: looking a dataset and its attribute up through h5py took 50-100 us, and a long prompt read node
        by node (NodeByNode) asked it for every node of every prompt."""
        if name not in self._per_prompt:
            self._per_prompt[name] = self.f["nodes"][name].attrs.get("axis", "token") == "prompt"
        return self._per_prompt[name]

    def node(self, name: str, prompt: int | str) -> np.ndarray:
        i = self.index[prompt] if isinstance(prompt, str) else prompt
        if self.per_prompt(name):
            return self._get(f"nodes/{name}", slice(i, i + 1))
        return self._get(f"nodes/{name}", slice(self.offsets[i], self.offsets[i + 1]))

    def iter_prompts(self, names: list[str], window_bytes: int | None = None, lazy: frozenset[int] = frozenset()):
        """Yield (index, prompt_id, {node: values}) for every prompt in file order. Each node is read whole HDF5
        chunks at a time, each chunk once (:class:`_ChunkWindow`): a prompt's rows are a slice of the chunks
        holding them (reading a prompt's rows alone reads and checksums its whole chunks, for each prompt in
        them). The nodes' windows share ``window_bytes`` (default WINDOW_BYTES; at least one chunk each): fewer,
        larger reads are faster (one 1 MiB read per node instead of four of 256 KiB: 0.41 s against 0.56 s for 455
        MB of the released model's values, bench/dump_read.py). Memory: the windows, and one prompt's rows (a
        prompt's values are views into its windows: a window stays while a view of it is held). The prompts whose
        indices are in ``lazy`` are not read here: their values are a :class:`NodeByNode`."""
        has_ids = "input_ids" in self.f
        each = (WINDOW_BYTES if window_bytes is None else window_bytes) // max(1, len(names))
        windows = {name: _ChunkWindow(self, f"nodes/{name}", each) for name in names}
        per_prompt = {name: self.per_prompt(name) for name in names}
        ids = _ChunkWindow(self, "input_ids", each) if has_ids else None
        for p in range(len(self.prompt_ids)):
            # no local of this frame holds the values: a reference kept here until the next prompt's values are
            # read held two prompts at once (0.5 GB a side for a 512-token prompt of the released model)
            if p in lazy:
                yield p, self.prompt_ids[p], NodeByNode(self, p, names)
            else:
                yield p, self.prompt_ids[p], _prompt_rows(windows, per_prompt, ids, p, self.offsets)

    def input_ids(self, prompt: int | str) -> np.ndarray:
        i = self.index[prompt] if isinstance(prompt, str) else prompt
        if "input_ids" not in self.f:
            raise DumpError(f"{self.path}: this dump does not record input ids")
        return self._get("input_ids", slice(self.offsets[i], self.offsets[i + 1]))

    def close(self) -> None:
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _prompt_rows(windows: dict, per_prompt: dict, ids, p: int, offsets) -> dict[str, np.ndarray]:
    """Prompt ``p``'s values from the read windows (ActivationReader.iter_prompts)."""
    a, b = int(offsets[p]), int(offsets[p + 1])
    vals = {name: w.rows(p, p + 1) if per_prompt[name] else w.rows(a, b) for name, w in windows.items()}
    if ids is not None:
        vals["input_ids"] = ids.rows(a, b)
    return vals


class NodeByNode(MutableMapping):
    """One prompt's values ``{node: rows}`` (and its ``input_ids``), each node read from the dump when asked for
    and the last ones asked for kept, up to ``cache_bytes`` (at least the last): a prompt too large to hold whole
    (a 512-token prompt of the released model: 0.54 GB a side) is judged node by node, and a node's inputs, read
    just before it, are still there. Values set on it are kept as given."""

    def __init__(self, reader: ActivationReader, p: int, names: list[str], cache_bytes: int = NODE_CACHE_BYTES):
        self.reader, self.p, self.names = reader, p, frozenset(names)
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._set: dict[str, np.ndarray] = {}
        if "input_ids" in reader.f:
            self._set["input_ids"] = reader.input_ids(p)

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self._set:
            return self._set[name]
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        if name not in self.names:
            raise KeyError(name)
        a = self.reader.node(name, self.p)
        self._cache[name] = a
        self._bytes += a.nbytes
        while self._bytes > self.cache_bytes and len(self._cache) > 1:
            self._bytes -= self._cache.popitem(last=False)[1].nbytes
        return a

    def __setitem__(self, name: str, value) -> None:
        self._set[name] = value

    def __delitem__(self, name: str) -> None:
        if name in self._cache:
            self._bytes -= self._cache.pop(name).nbytes
        self._set.pop(name, None)

    def __contains__(self, name) -> bool:
        return name in self._set or name in self.names

    def __iter__(self):
        return iter([*self._set, *(n for n in self.names if n not in self._set)])

    def __len__(self) -> int:
        return len(self._set) + sum(1 for n in self.names if n not in self._set)


def raw_checked(d: h5py.Dataset) -> bool:
    """Can ActivationReader._rows_checked read ``d``: chunked along rows only (a chunk holds whole rows), a plain
    numeric dtype, and Fletcher-32 its one filter (no compression: `activation_compression` none, the default)."""
    return (
        d.chunks is not None
        and d.ndim >= 1
        and tuple(d.chunks[1:]) == tuple(d.shape[1:])
        and d.dtype.kind in "fiub"
        and d.fletcher32
        and d.id.get_create_plist().get_nfilters() == 1
    )


class _DirectChunks:
    """Rows appended to one :func:`raw_checked` dataset, written as whole stored chunks (``write_direct_chunk``):
    each chunk's bytes and then HDF5's Fletcher-32 of them (actdiff.kernels.fletcher32, bit for bit the checksum
    the filter appends), so HDF5 reads and verifies them as its own. The rows of the chunk being filled wait in a
    buffer; :meth:`close` writes the last one, its rows past the dataset's end zeros (the fill value HDF5 writes
    there). The dataset's extent must already hold the rows added (ActivationWriter._flush resizes it first)."""

    def __init__(self, d: h5py.Dataset):
        self.d, self.per, self.tail = d, d.chunks[0], (0,) * (d.ndim - 1)
        self.row = d.dtype.itemsize * int(np.prod(d.shape[1:], dtype=np.int64))
        self.buf = np.zeros(self.per * self.row + 4, np.uint8)  # a chunk, then its checksum
        self.filled = 0  # rows in the buffer
        self.c0 = 0  # the buffer's first row in the dataset

    def add(self, a: np.ndarray) -> None:
        raw = np.ascontiguousarray(a, dtype=self.d.dtype).reshape(-1).view(np.uint8)
        i, n = 0, len(raw) // self.row
        while i < n:
            k = min(self.per - self.filled, n - i)
            self.buf[self.filled * self.row : (self.filled + k) * self.row] = raw[i * self.row : (i + k) * self.row]
            self.filled += k
            i += k
            if self.filled == self.per:
                self._write()

    def close(self) -> None:
        if self.filled:
            self.buf[self.filled * self.row : -4] = 0
            self._write()

    def _write(self) -> None:
        from .kernels import fletcher32

        self.buf[-4:] = np.frombuffer(fletcher32(self.buf[:-4]).to_bytes(4, "little"), np.uint8)
        self.d.id.write_direct_chunk((self.c0, *self.tail), self.buf)
        self.c0 += self.per
        self.filled = 0


class _ChunkWindow:
    """Rows of one dataset read in whole chunks, in order: the rows asked for are a slice of a window of whole
    chunks (at least ``window_bytes``, at least one chunk), read when they leave it. Rows that start in the
    window and end past it are the one copy: the window's tail joined to the start of the next window, which
    holds the chunks after it (no chunk is read twice). Rows are asked for in increasing order (a prompt's after
    the previous prompt's); any other order still reads right, only more."""

    def __init__(self, reader: ActivationReader, dataset: str, window_bytes: int = 0):
        d = reader.f[dataset]
        self.reader, self.dataset, self.n = reader, dataset, d.shape[0]
        row = d.dtype.itemsize * int(np.prod(d.shape[1:]))
        self.chunk = d.chunks[0] if d.chunks else chunk_rows(row)
        self.rows_read = self.chunk * max(1, window_bytes // max(1, self.chunk * row))  # whole chunks, at least one
        self.lo = self.hi = 0
        self.buf = None

    def rows(self, a: int, b: int) -> np.ndarray:
        """Rows ``a:b``: a view into the window, or a copy where they straddle two windows (read-only use)."""
        if self.buf is not None and self.lo <= a and b <= self.hi:
            return self.buf[a - self.lo : b - self.lo]
        if self.buf is not None and self.lo <= a < self.hi:
            head = self.buf[a - self.lo :]
            self._read(self.hi, b)
            rows = np.concatenate([head, self.buf[: b - self.lo]])
            if b - self.lo > self.hi - b:  # the new window is mostly these rows: keep only what follows them
                self.buf, self.lo = self.buf[b - self.lo :].copy(), b
            return rows
        self._read(a // self.chunk * self.chunk, b)
        return self.buf[a - self.lo : b - self.lo]

    def _read(self, lo: int, b: int) -> None:
        """Make the window the whole chunks from row ``lo`` (a chunk's first) through row ``b - 1``."""
        hi = min(self.n, -(-max(b, lo + self.rows_read) // self.chunk) * self.chunk)
        self.buf, self.lo, self.hi = self.reader._get(self.dataset, slice(lo, hi)), lo, hi
