"""Reading a dump prompt by prompt (actdiff.h5io.ActivationReader.iter_prompts): every prompt's values bit for
bit what a direct read of its rows gives, each HDF5 chunk read once, whatever the prompt lengths are against the
chunk size (shorter, straddling two chunks, spanning several)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import ensure_tiny_model

import actdiff.h5io as h5io
from actdiff.h5io import ActivationReader, ActivationWriter, _ChunkWindow
from actdiff.nodes import graph_for_model_dir

# prompt lengths against chunks of 16 rows (below): inside one chunk, straddling, exactly a chunk, several chunks
LENGTHS = (3, 14, 16, 1, 40, 5, 33, 16, 2, 70)


@pytest.fixture(scope="module")
def graph():
    return graph_for_model_dir(ensure_tiny_model())


@pytest.fixture
def small_chunks(monkeypatch, graph):
    """Chunks of 16 rows for the hidden-size nodes (so that the lengths above cross chunk boundaries)."""
    monkeypatch.setattr(h5io, "_CHUNK_BYTES", 16 * graph.dims.hidden * 4)


def _write(path, graph, lengths, seed=0) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    vals = {}
    with ActivationWriter(path, graph, {"model": "tiny"}) as w:
        for i, T in enumerate(lengths):
            v = {}
            for n in graph:
                shape = graph.shape(n.name, T if n.axis == "token" else 1)
                v[n.name] = (rng.integers(0, graph.dims.experts, shape) if n.kind == "index"
                             else rng.standard_normal(shape).astype(np.float32))  # fmt: skip
            w.append(f"p{i}", v, input_ids=rng.integers(0, 100, T))
            vals[f"p{i}"] = {**v, "input_ids": w._ids[-1]}
    return vals


def _counting(reader: ActivationReader) -> dict[str, int]:
    """Rows read per dataset through the reader from now on."""
    rows: dict[str, int] = {}
    get = reader._get

    def counted(dataset, sel=()):
        out = get(dataset, sel)
        rows[dataset] = rows.get(dataset, 0) + (out.shape[0] if out.ndim else 1)
        return out

    reader._get = counted
    return rows


@pytest.mark.parametrize("window_chunks", [0, 3, None], ids=["one-chunk", "three-chunks", "default"])
def test_iter_prompts_equals_direct_reads_and_reads_each_chunk_once(tmp_path, graph, small_chunks, window_chunks):
    """Windows of one chunk (every prompt over a boundary straddles two windows), of three, and the default
    (here the whole dataset)."""
    path = tmp_path / "shard-0.h5"
    vals = _write(path, graph, LENGTHS)
    with ActivationReader(path) as r:
        names = r.node_names
        assert r.f["nodes/emb_ln"].chunks[0] == 16  # the fixture's premise
        rows = _counting(r)
        seen = []
        hidden_chunk = 16 * graph.dims.hidden * 4
        kw = {} if window_chunks is None else {"window_bytes": window_chunks * hidden_chunk * len(names)}
        for i, pid, got in r.iter_prompts(names, **kw):
            seen.append(pid)
            assert i == r.index[pid]
            assert set(got) == {*names, "input_ids"}
            for name in names:
                np.testing.assert_array_equal(got[name], vals[pid][name], err_msg=f"{pid} {name}")
                assert got[name].dtype == r.f["nodes"][name].dtype
            np.testing.assert_array_equal(got["input_ids"], vals[pid]["input_ids"])
        assert seen == [f"p{i}" for i in range(len(LENGTHS))]
        for name in names:  # every row of every dataset read exactly once
            assert rows[f"nodes/{name}"] == r.f["nodes"][name].shape[0], name
        assert rows["input_ids"] == sum(LENGTHS)


def test_chunk_window_any_order(tmp_path, graph, small_chunks):
    """Rows asked for out of order, overlapping, or empty still come back right (only read more)."""
    path = tmp_path / "shard-0.h5"
    vals = _write(path, graph, LENGTHS, seed=1)
    with ActivationReader(path) as r:
        whole = r.node_all("emb_ln")
        assert np.array_equal(whole, np.concatenate([vals[f"p{i}"]["emb_ln"] for i in range(len(LENGTHS))]))
        w = _ChunkWindow(r, "nodes/emb_ln")
        rng = np.random.default_rng(2)
        for _ in range(200):
            a = int(rng.integers(0, len(whole)))
            b = min(len(whole), a + int(rng.integers(0, 50)))
            np.testing.assert_array_equal(w.rows(a, b), whole[a:b])


def test_iter_prompts_reads_dumps_with_other_chunk_sizes(tmp_path, graph, monkeypatch):
    """A dump written with 1 MiB chunks (before version 0.2's 256 KiB) reads the same way."""
    monkeypatch.setattr(h5io, "_CHUNK_BYTES", 1 << 20)
    path = tmp_path / "shard-0.h5"
    vals = _write(path, graph, LENGTHS, seed=3)
    with ActivationReader(path) as r:
        for _, pid, got in r.iter_prompts(["emb_ln", "embedding"]):
            np.testing.assert_array_equal(got["emb_ln"], vals[pid]["emb_ln"])
            np.testing.assert_array_equal(got["embedding"], vals[pid]["embedding"])


def test_rows_over_a_window_boundary_do_not_keep_the_window_they_came_from(tmp_path, graph, small_chunks):
    """A prompt straddling two windows is a copy; where it fills most of the second window, the window keeps only
    the rows after it (a full-size 512-token prompt is ~0.5 GB a side: keeping the window beside the copy doubled
    it, and the statistics job's peak)."""
    path = tmp_path / "shard-0.h5"
    vals = _write(path, graph, LENGTHS, seed=4)
    with ActivationReader(path) as r:
        whole = r.node_all("emb_ln")
        w = _ChunkWindow(r, "nodes/emb_ln")  # one chunk (16 rows) per window
        offsets = np.cumsum((0, *LENGTHS))  # p4: rows 34-74, from the window [32, 48) into [48, 80)
        for a, b in zip(offsets[:4], offsets[1:5], strict=True):
            w.rows(int(a), int(b))
        assert (w.lo, w.hi) == (32, 48)
        got = w.rows(34, 74)
        np.testing.assert_array_equal(got, vals["p4"]["emb_ln"])
        assert got.flags.owndata
        assert (w.lo, w.hi) == (74, 80) and w.buf.flags.owndata and w.buf.shape[0] == 6  # not the 32 rows read
        np.testing.assert_array_equal(w.rows(74, 79), whole[74:79])  # p5, from what was kept
        np.testing.assert_array_equal(w.rows(79, 112), whole[79:112])


def test_a_prompt_is_released_before_the_next_one_is_read(tmp_path, graph, small_chunks, monkeypatch):
    """The chain that feeds the statistics (iter_prompts, stats._paired_prompts, grouped) holds no prompt's values
    once its consumer dropped them, while the next prompt is being read: each generator's loop variable used to
    keep the previous prompt until the next was complete, two prompts at once (+1 GB at full size)."""
    import weakref

    from actdiff.compare.grouped import group_plan, grouped
    from actdiff.compare.stats import _paired_prompts

    monkeypatch.setattr(h5io, "WINDOW_BYTES", 1)  # windows of one chunk: reads all along the way
    paths = tmp_path / "ref.h5", tmp_path / "eng.h5"
    for seed, path in enumerate(paths):
        _write(path, graph, LENGTHS, seed=seed)
    alive: list = []  # weak references to the values of the prompts already handed out
    held_during_reads = []
    with ActivationReader(paths[0]) as rr, ActivationReader(paths[1]) as er:
        for reader in (rr, er):

            def checked(dataset, sel=(), get=reader._get):
                held_during_reads.append(sum(ref() is not None for ref in alive))
                return get(dataset, sel)

            reader._get = checked
        n = 0
        # the statistics' own plan (actdiff.compare.grouped.group_plan), with a bound of one prompt per group
        sizes = group_plan(graph, list(LENGTHS))[1]
        for group in grouped(_paired_prompts(*paths, rr, er, rr.node_names), 1, sizes):
            ((pid, ref, eng),) = group
            alive[:] = [weakref.ref(v) for v in (*ref.values(), *eng.values())]
            del group, ref, eng
            n += 1
    assert n == len(LENGTHS) and len(held_during_reads) > 2 * len(LENGTHS)
    assert max(held_during_reads) == 0


def test_rows_read_raw_and_checked_are_what_hdf5_reads(tmp_path):
    """A dataset chunked along rows with Fletcher-32 as its one filter (every node of a dump written with
    `activation_compression` none) is read as raw chunks, each checksum verified by actdiff.kernels.fletcher32:
    any row slice (inside a chunk, across chunks, the padded last chunk, empty) is bit for bit HDF5's own read,
    for float32, float16 and int64, 1-3 dimensions. Compressed datasets, and ones chunked across columns, go
    through HDF5."""
    rng = np.random.default_rng(3)
    path = tmp_path / "raw.h5"
    data = {
        "f32": rng.standard_normal((101, 7, 3)).astype(np.float32),
        "f16": rng.standard_normal((53, 5)).astype(np.float16),
        "i64": rng.integers(-(2**40), 2**40, 77),
    }
    import h5py

    with h5py.File(path, "w") as f:
        f.attrs.update(schema_version=h5io.SCHEMA_VERSION, graph="{}")
        f["prompt_ids"], f["token_offsets"] = np.array([b"p"]), np.array([0, 1])
        for name, v in data.items():
            f.create_dataset(name, data=v, chunks=(16, *v.shape[1:]), fletcher32=True)
        f.create_dataset("lzf", data=data["f32"], chunks=(16, 7, 3), fletcher32=True, compression="lzf")
        f.create_dataset("cols", data=data["f16"], chunks=(16, 2), fletcher32=True)
    with ActivationReader(path) as r:
        assert [r._raw_checked(n) for n in (*data, "lzf", "cols")] == [True, True, True, False, False]
        for name, v in data.items():
            n = len(v)
            for lo, hi in [(0, n), (0, 1), (5, 9), (15, 17), (16, 32), (3, 50), (n - 1, n), (n - 20, n), (7, 7)]:
                got = r._get(name, slice(lo, hi))
                assert got.dtype == v.dtype and got.shape == v[lo:hi].shape
                assert got.tobytes() == r._hdf5_get(name, slice(lo, hi)).tobytes() == v[lo:hi].tobytes(), (name, lo)


def test_a_damaged_chunk_read_raw_is_named(tmp_path, graph, small_chunks):
    """Bytes overwritten in a stored chunk of a dump read through the raw path: a DumpError naming the file, the
    dataset and the chunk's first row, as HDF5's own check would (tests/test_integrity.py for every compression)."""
    import h5py

    from actdiff.errors import DumpError

    path = tmp_path / "shard-0.h5"
    _write(path, graph, LENGTHS)
    name = "nodes/emb_ln"
    with h5py.File(path) as f:
        info = f[name].id.get_chunk_info(2)  # the chunk of rows 32-47
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + 100)
        fh.write(b"\x00\x01\x02\x03")
    with ActivationReader(path) as r:
        assert r._raw_checked(name)
        np.testing.assert_array_equal(r._get(name, slice(0, 32)), r._hdf5_get(name, slice(0, 32)))  # intact chunks
        with pytest.raises(DumpError) as e:
            r._get(name, slice(30, 40))
        with pytest.raises(DumpError) as whole:  # the chunk read in place, as a window of whole chunks reads it
            r._get(name, slice(16, 64))
    for msg in (str(e.value), str(whole.value)):
        assert str(path) in msg and repr(name) in msg and "chunk at row 32" in msg and "Fletcher-32" in msg


def test_prompts_read_node_by_node_are_the_prompts_values(tmp_path, graph, small_chunks):
    """iter_prompts(lazy=...): those prompts' values come node by node from the dump (h5io.NodeByNode), the same
    values as a whole read, the others read as before; the nodes kept stay within the cache's bytes (at least the
    last one read), a value set on it is kept, and reading the same node twice in a row reads it once."""
    vals = _write(tmp_path / "d.h5", graph, LENGTHS)
    names = graph.names()
    lazy = frozenset({2, 4, 9})
    with ActivationReader(tmp_path / "d.h5") as r:
        for p, pid, got in r.iter_prompts(names, lazy=lazy):
            assert isinstance(got, h5io.NodeByNode) == (p in lazy)
            assert set(got) == {*names, "input_ids"} and len(got) == len(names) + 1
            for name in [*names, "input_ids"]:
                assert np.array_equal(got[name], vals[pid][name]), (pid, name)
        one = r.node(names[-1], "p9").nbytes
        x = h5io.NodeByNode(r, 9, names, cache_bytes=3 * one)
        rows = _counting(r)
        for name in names:
            x[name]
            x[name]
            assert x._bytes <= max(3 * one, x._cache[name].nbytes)
        assert all(v == (1 if r.f[d].attrs.get("axis") == "prompt" else LENGTHS[9]) for d, v in rows.items())
        assert len(rows) == len(names)
        x["extra"] = np.ones(2)
        assert "extra" in x and np.array_equal(dict(x)["extra"], np.ones(2))
        with pytest.raises(KeyError):
            x["no such node"]


@pytest.mark.parametrize("flush_bytes", [1 << 12, 64 << 20])
def test_appended_dump_stores_the_chunks_hdf5_would(tmp_path, graph, small_chunks, monkeypatch, flush_bytes):
    """The writer appends rows as whole stored chunks with their Fletcher-32 computed here (h5io._DirectChunks),
    not through HDF5's filter pipeline: every stored chunk (its rows, the zeros past the last row of the last one,
    the checksum) is byte for byte what HDF5 stores for the same values written through its pipeline (float32
    nodes, int64 expert ids; prompts crossing chunks; flushed every few prompts or once), and HDF5's own read,
    which verifies each checksum, gives the values back."""
    import h5py

    monkeypatch.setattr(h5io, "_FLUSH_BYTES", flush_bytes)
    path = tmp_path / "shard-0.h5"
    vals = _write(path, graph, LENGTHS)
    theirs = tmp_path / "hdf5.h5"
    with h5py.File(path) as f, h5py.File(theirs, "w") as g:
        for n in graph:
            d = f["nodes"][n.name]
            assert h5io.raw_checked(d)
            ref = np.concatenate([vals[f"p{i}"][n.name] for i in range(len(LENGTHS))]).astype(d.dtype)
            np.testing.assert_array_equal(d[:], ref)  # HDF5's read: its checksum check passes
            h = g.create_dataset(n.name, data=ref, chunks=d.chunks, maxshape=d.maxshape, **h5io.CHECKSUM)
            assert d.id.get_num_chunks() == h.id.get_num_chunks() == -(-len(ref) // d.chunks[0])
            for k in range(d.id.get_num_chunks()):
                offset = d.id.get_chunk_info(k).chunk_offset
                assert d.id.read_direct_chunk(offset) == h.id.read_direct_chunk(offset), (n.name, offset)


def test_compressed_dumps_are_written_through_hdf5(tmp_path, graph):
    """A compressed dump (activation_compression lzf or gzip) is not one raw_checked reads: HDF5 writes it."""
    for compression, direct in [("lzf", False), ("gzip", False), ("none", True)]:
        w = ActivationWriter(tmp_path / f"{compression}.h5", graph, {"model": "tiny"}, compression=compression)
        assert (w._direct is not None) == direct, compression
        w.abort()
