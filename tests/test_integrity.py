"""Integrity of outputs (issue 15): damaged dumps are detected, a full disk is named and leaves no partial file,
`actdiff check` refuses missing runs and incomparable baselines, and NaN the model itself produces is reported as
such, never as an infinite error."""

from __future__ import annotations

import errno
import json

import h5py
import numpy as np
import pytest
from helpers import ensure_tiny_model

from actdiff.errors import DiskFullError, DumpError
from actdiff.h5io import SCHEMA_VERSION, ActivationReader, ActivationWriter
from actdiff.nodes import graph_for_model_dir


@pytest.fixture(scope="module")
def graph():
    return graph_for_model_dir(ensure_tiny_model())


def _values(graph, T: int, rng) -> dict[str, np.ndarray]:
    out = {}
    for n in graph:
        shape = graph.shape(n.name, T if n.axis == "token" else 1)
        if n.kind == "index":
            out[n.name] = rng.integers(0, graph.dims.experts, shape).astype(np.int64)
        else:
            out[n.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def _write_dump(path, graph, compression="none", lengths=(7, 12, 5), seed=0):
    rng = np.random.default_rng(seed)
    vals = {}
    with ActivationWriter(path, graph, {"model": "tiny"}, compression=compression) as w:
        for i, T in enumerate(lengths):
            vals[f"p{i}"] = _values(graph, T, rng)
            w.append(f"p{i}", vals[f"p{i}"], input_ids=np.arange(T))
    return vals


# ------------------------------------------------------------------------------ case 2: damaged dump data
@pytest.mark.parametrize("compression", ["none", "lzf", "gzip"])
def test_dump_checksums_catch_overwritten_bytes(tmp_path, graph, compression):
    """Bytes overwritten in the middle of a node's data are a DumpError naming file and dataset (Fletcher-32
    per chunk), with every compression setting; the intact file reads back exactly."""
    path = tmp_path / "shard-0.h5"
    vals = _write_dump(path, graph, compression)
    name = "encoder.layers.0.attn.qkv"
    with h5py.File(path) as f:
        assert f.attrs["schema_version"] == SCHEMA_VERSION == 2
        for d in [*f["nodes"].values(), f["prompt_ids"], f["token_offsets"], f["input_ids"]]:
            assert d.fletcher32, d.name
        info = f["nodes"][name].id.get_chunk_info(0)
    with ActivationReader(path) as r:
        np.testing.assert_array_equal(r.node(name, "p1"), vals["p1"][name])  # intact: bit for bit
    with open(path, "r+b") as fh:  # 16 random bytes in the middle of the first chunk's stored data
        fh.seek(info.byte_offset + info.size // 2)
        fh.write(np.random.default_rng(1).bytes(16))
    with ActivationReader(path) as r:
        with pytest.raises(DumpError) as e:
            list(r.iter_prompts([name]))
        with pytest.raises(DumpError):
            r.node(name, "p0")
        assert r.node("emb_ln", "p0").shape[0] == 7  # other datasets still read
    msg = str(e.value)
    assert str(path) in msg and f"dataset 'nodes/{name}'" in msg
    assert "is damaged" in msg and "Delete the file and rerun the pipeline" in msg


def test_empty_dump_with_checksums(tmp_path, graph):
    path = tmp_path / "empty.h5"
    with ActivationWriter(path, graph, {}, compression="none"):
        pass
    with ActivationReader(path) as r:
        assert r.prompt_ids == [] and list(r.offsets) == [0]


# ------------------------------------------------------------------------------------ case 3: disk full
ENOSPC_H5 = (
    "Can't write data (file write failed: time = Mon Jan  1 00:00:00 2024, filename = 'x.h5', file descriptor = 5, "
    "errno = 28, error message = 'No space left on device', buf = 0x1, total write size = 1048576)"
)


def test_disk_full_while_writing_a_dump(tmp_path, graph, monkeypatch):
    """h5py's RuntimeError on a full disk becomes a DiskFullError naming the dump; no temporary file is left."""
    path = tmp_path / "shard-0.h5"
    real = h5py.Dataset.__setitem__
    calls = {"n": 0}

    def full(self, key, value):
        calls["n"] += 1
        if calls["n"] > 3:  # a few datasets are written, then the disk fills
            raise RuntimeError(ENOSPC_H5)
        return real(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", full)
    with pytest.raises(DiskFullError) as e:
        _write_dump(path, graph)
    msg = str(e.value)
    assert msg.startswith(f"{path}: the disk is full (no space left on device)")
    assert "The partial file was removed" in msg and "rerun" in msg
    assert list(tmp_path.iterdir()) == []  # neither the dump nor its .tmp-<pid>


@pytest.mark.parametrize("kind", ["json", "parquet"])
def test_disk_full_in_atomic_writers(tmp_path, monkeypatch, kind):
    """Every atomic writer (JSON, Parquet through atomic_path, the streamed stats tables) names the file and
    removes its temporary on ENOSPC."""
    import pandas as pd

    from actdiff.atomic import atomic_path, write_json_atomic

    out = tmp_path / f"x.{kind}"
    if kind == "json":
        real = type(out).write_text

        def full(self, *a, **k):
            real(self, "partial")
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(type(out), "write_text", full)
        with pytest.raises(DiskFullError, match="the disk is full"):
            write_json_atomic(out, {"a": 1})
    else:
        with pytest.raises(DiskFullError, match=rf"{out}: the disk is full .* after writing"):
            with atomic_path(out) as tmp:
                pd.DataFrame({"a": [1, 2]}).to_parquet(tmp)
                raise OSError("Error writing bytes to file. Detail: [errno 28] No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_disk_full_in_streamed_stats_table(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    from actdiff.compare.stats import _TableWriter
    from actdiff.tables import SHARD_TABLES, empty_table

    out = tmp_path / "nodes.parquet"
    w = _TableWriter(out, empty_table(SHARD_TABLES["nodes"]), flush_rows=1)

    def full(self, table, *a, **k):
        raise OSError("Error writing bytes to file. Detail: [errno 28] No space left on device")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", full)
    with pytest.raises(DiskFullError, match=f"{out}: the disk is full"):
        w.add_row({"prompt_id": "a", "node": "x"})
    assert list(tmp_path.iterdir()) == []


def test_disk_full_real_tmpfs(tmp_path):
    """The real thing on a 1 MiB tmpfs (root only; skipped elsewhere)."""
    import os
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        g = graph_for_model_dir(ensure_tiny_model())
        with pytest.raises(DiskFullError, match="the disk is full"):
            _write_dump(mnt / "shard-0.h5", g, lengths=(64, 64, 64, 64))
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)])


def _json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
