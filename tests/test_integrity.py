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

import actdiff.h5io as h5io
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


# what h5py raises when a chunk written whole (write_direct_chunk, actdiff.h5io._DirectChunks) finds the disk full
# (a 1 MB tmpfs filled)
ENOSPC_DIRECT = OSError(
    28,
    "Can't write unprocessed chunk data (file write failed: time = Sun Dec  6 04:19:53 2026, filename = 'x.h5', "
    "file descriptor = 3, errno = 28, error message = 'No space left on device', buf = 0x1, total write size = 4032)",
)


@pytest.mark.parametrize("compression", ["none", "lzf"])
def test_disk_full_while_writing_a_dump(tmp_path, graph, monkeypatch, compression):
    """h5py's error on a full disk becomes a DiskFullError naming the dump; no temporary file is left. Both ways
    a dump is written: whole chunks checksummed by actdiff (none, the default) and HDF5's filter pipeline (lzf)."""
    path = tmp_path / "shard-0.h5"
    calls = {"n": 0}
    if compression == "none":
        real = h5io._DirectChunks._write

        def full(self):
            calls["n"] += 1
            if calls["n"] > 3:  # a few chunks are written, then the disk fills
                raise ENOSPC_DIRECT
            return real(self)

        monkeypatch.setattr(h5io._DirectChunks, "_write", full)
    else:
        real = h5py.Dataset.__setitem__

        def full(self, key, value):
            calls["n"] += 1
            if calls["n"] > 3:  # a few datasets are written, then the disk fills
                raise RuntimeError(ENOSPC_H5)
            return real(self, key, value)

        monkeypatch.setattr(h5py.Dataset, "__setitem__", full)
    with pytest.raises(DiskFullError) as e:
        _write_dump(path, graph, compression)
    assert calls["n"] > 3
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


# ------------------------------------------------------------------- case 4: actdiff check, a run missing
def _run(results, run=("tiny", "actdiff", "fp32"), status="pass", p99=1e-7, **verdict):
    """A finished run as `actdiff check` reads it: verdict.json and the node summary."""
    import pandas as pd

    d = results.joinpath(*run, "summary")
    v = {"model": run[0], "side": run[1], "variant": run[2], "status": status, "prompts": 4, "worst_nodes": []}
    v.update(weights_sha256="a" * 64, corpus_sha256="c" * 64)
    v.update(verdict)
    _json(d / "verdict.json", v)
    pd.DataFrame({"node": ["emb_ln"], "local_rel_l2_p99": [p99], "budget_median": [1e-6]}).to_parquet(
        d / "nodes.parquet"
    )


def _check(*args):
    import contextlib
    import io

    from actdiff.compare.check import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main([str(a) for a in args])
    return rc, out.getvalue()


def test_check_fails_when_a_run_has_no_verdict(tmp_path):
    """A run whose summary is missing (its shard statistics are there) is MISSING and fails the gate; so does a
    run the config asks for with nothing on disk at all."""
    r = tmp_path / "r"
    _run(r)
    (r / "tiny/actdiff/fp16/stats/shard-0").mkdir(parents=True)  # statistics done, aggregation never finished
    (r / "tiny/reference/fp32/activations").mkdir(parents=True)  # the reference is an input, never "missing"
    rc, out = _check(r)
    assert rc == 1, out
    assert f"== tiny/actdiff/fp16: MISSING: no verdict at {r}/tiny/actdiff/fp16/summary/verdict.json" in out
    assert "actdiff check: 1 of 2 passed, 1 missing" in out
    assert _check(r, "--only", "tiny/actdiff/fp32")[0] == 0  # --only filters the missing runs too
    (r / "tiny/actdiff/fp16").rename(tmp_path / "gone")
    assert _check(r)[0] == 0
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "prompts: p.tsv\nengines: [actdiff]\nvariants: [fp32, bf16]\n"
        "models:\n  tiny:\n    source: {generate: tiny-nomic-moe}\n    max_length: 8\n"
    )
    rc, out = _check(r, "--configfile", cfg)
    assert rc == 1 and f"== tiny/actdiff/bf16: MISSING: no verdict at {r}/tiny/actdiff/bf16" in out, out
    assert f"({cfg} asks for it)" in out


def test_check_fails_a_nonfinite_run(tmp_path):
    _run(tmp_path, status="nonfinite")
    rc, out = _check(tmp_path)
    assert rc == 1 and "NONFINITE" in out, out


# ------------------------------------------------------------- case 5: a baseline of other weights / corpus
@pytest.mark.parametrize(
    "base, message",
    [
        ({"weights_sha256": "b" * 64}, "the weights (sha256 of model.safetensors) differ: aaaaaaaaaaaa... in"),
        ({"corpus_sha256": "d" * 64, "prompts": 5}, "the corpus (prompt ids, texts, token ids) differs: cccccccccccc"),
        ({"corpus_sha256": None, "prompts": 9}, "the corpus differs: 4 prompts in"),
    ],
)
def test_check_refuses_an_incomparable_baseline(tmp_path, base, message):
    """Against a baseline of other weights or another corpus every node would 'regress': refused, naming what
    differs, unless --allow-incomparable-baseline (then the regression shows as usual)."""
    run, b = tmp_path / "run", tmp_path / "base"
    _run(run, p99=5e-7)
    _run(b, p99=1e-7, **base)  # 5x the baseline's p99: a regression if the two were comparable
    rc, out = _check(run, "--baseline", b)
    assert rc == 1 and message in out, out
    assert "refusing to compare (pass --allow-incomparable-baseline" in out and "regression:" not in out
    rc, out = _check(run, "--baseline", b, "--allow-incomparable-baseline")
    assert rc == 1 and "regression: emb_ln" in out, out


def test_check_baseline_same_corpus_and_weights(tmp_path):
    run, b = tmp_path / "run", tmp_path / "base"
    _run(run, p99=1.1e-7)
    _run(b, p99=1e-7)
    rc, out = _check(run, "--baseline", b)
    assert rc == 0 and "not comparable" not in out and "note:" not in out, out
    _run(b, p99=1e-7, corpus_sha256=None)  # an older baseline: same prompt count, so compared, with a note
    rc, out = _check(run, "--baseline", b)
    assert rc == 0 and "could not verify corpus_sha256" in out, out


def test_corpus_sha256_ignores_sharding_not_content(tmp_path):
    import pandas as pd

    from actdiff.compare.aggregate import corpus_sha256

    ids = [[0, 2], [0, 5, 2], [0, 2]]
    t = pd.DataFrame({"prompt_id": ["a", "b", "c"], "text": ["x", "y", "z"], "reference_ids": ids})
    t.to_parquet(tmp_path / "all.parquet")
    t.iloc[[2, 0]].to_parquet(tmp_path / "s0.parquet")
    t.iloc[[1]].to_parquet(tmp_path / "s1.parquet")
    whole = corpus_sha256([str(tmp_path / "all.parquet")])
    assert corpus_sha256([str(tmp_path / "s0.parquet"), str(tmp_path / "s1.parquet")]) == whole
    t.loc[1, "text"] = "y!"
    t.to_parquet(tmp_path / "changed.parquet")
    assert corpus_sha256([str(tmp_path / "changed.parquet")]) != whole


# ------------------------------------------------------------- case 1: a NaN in one weight, on both sides
NAN_WEIGHT = "encoder.layers.0.mlp.fc1.weight"


def _nan_run(root):
    """The tiny model with one NaN in NAN_WEIGHT, three prompts through reference, our engine, statistics,
    aggregation and weight parity (the pipeline's own stage functions, no Snakemake)."""
    from helpers import model_copy

    from actdiff import pipeline
    from actdiff.layout import Layout
    from actdiff.tables import AGGREGATE_JSON, AGGREGATE_TABLES, SHARD_TABLES

    def mutate(w):
        w[NAN_WEIGHT][7, 3] = np.nan

    md = model_copy(ensure_tiny_model(), root / "model", mutate)
    (root / "p.tsv").write_text("prompt_id\ttext\na\thello world\nb\tthe quick brown fox\nc\tnumbers 1 2 3\n")
    L, run = Layout(str(root / "r")), ("nanm", "actdiff", "fp32")
    pipeline.resolve_model("nanm", {"path": str(md)}, L.model_json("nanm"))
    pipeline.split_prompts(str(root / "p.tsv"), 1, [L.prompts(0)])
    pipeline.tokenize(L.model_json("nanm"), L.prompts(0), 16, L.tokens("nanm", 0))
    for side in ("reference", "actdiff"):
        out = L.activations("nanm", side, "fp32", 0)
        pipeline.dump(L.model_json("nanm"), L.tokens("nanm", 0), out, side, "fp32", 0)

    def stats_and_verdict():
        outs = {t: L.stats(*run, 0, t) for t in SHARD_TABLES}
        ref, eng = L.activations("nanm", "reference", "fp32", 0), L.activations(*run, 0)
        pipeline.compute_stats(L.model_json("nanm"), ref, eng, "actdiff", "fp32", 0, outs, search={"search_seconds": 5})
        so = {t: L.summary(*run, t) for t in AGGREGATE_TABLES} | {n: L.summary_json(*run, n) for n in AGGREGATE_JSON}
        tables = {t: [outs[t]] for t in SHARD_TABLES}
        pipeline.aggregate_stats(L.model_json("nanm"), [L.tokens("nanm", 0)], "actdiff", "fp32", tables, so)
        return json.loads(open(L.verdict(*run)).read()), open(L.verdict(*run)).read(), outs

    pipeline.parity(L.model_json("nanm"), "fp32", L.summary(*run, "weights"), L.summary_json(*run, "config_parity"))
    return L, run, stats_and_verdict


def test_nan_weight_on_both_sides_is_reported_not_infinite(tmp_path):
    """Same NaN on both sides: no infinite error anywhere, the node and the weight tensor are named, no node is
    said to fail, the run is NONFINITE (never a pass) and `actdiff check` fails it; weight parity counts the NaN.
    Then one NaN the reference does not have, planted in the engine's dump: a failure at that node."""
    import pandas as pd

    L, run, stats_and_verdict = _nan_run(tmp_path)
    v, text, outs = stats_and_verdict()
    assert v["status"] == "nonfinite", v["plain"]
    assert "Infinity" not in text  # no infinite error anywhere
    # NaN only where nothing finite is left to measure: the all-NaN outputs' errors and propagated budgets, and
    # the minimum embedding cosine
    assert all(o["rel_l2_max"] != o["rel_l2_max"] for o in v["outputs"]["nodes"]) and text.count("NaN,") <= 4
    assert (
        "The model itself produces NaN/Inf at encoder.layers.0.mlp.fc1 on 3 prompt(s), from weight tensor "
        f"{NAN_WEIGHT} (1 NaN/Inf values). Both sides have them at the same positions in" in v["plain"]
    )
    assert v["failing_nodes"] == 0 and v["worst_nodes"] == [] and v["first_divergence"] is None
    # all-NaN embeddings have no cosine: said as not measurable, never "minimum embedding cosine 0.000000"
    assert v["embedding_nonfinite"] == 3 and "minimum embedding cosine" not in v["plain"]
    assert "embedding cosine not measurable on 3 input(s)" in v["plain"]
    assert v["nonfinite"]["origins"] == [{"node": "encoder.layers.0.mlp.fc1", "prompts": 3, "weights": {NAN_WEIGHT: 1}}]
    nodes = pd.read_parquet(outs["nodes"])
    fc1 = nodes[nodes["node"] == "encoder.layers.0.mlp.fc1"]
    # the NaN weight column gives one NaN per token on both sides; the other 511 columns agree to fp32 noise
    assert (fc1["status"] == "nonfinite").all() and (fc1["nonfinite_matched"] == fc1["tokens"]).all()
    assert (fc1["local_rel_l2"] <= fc1["budget"]).all()
    w = pd.read_parquet(L.summary(*run, "weights")).set_index("source")
    assert w.loc[NAN_WEIGHT, "nonfinite_checkpoint"] == 1 and w.loc[NAN_WEIGHT, "nonfinite_engine"] == 1
    assert w["nonfinite_checkpoint"].sum() == 1  # and no other tensor is flagged
    rc, out = _check(L.results)
    assert rc == 1 and "NONFINITE" in out and "non-finite values: The model itself produces NaN/Inf" in out, out

    with h5py.File(L.activations(*run, 0), "r+") as f:  # emb_ln is finite on both sides; one NaN on the engine's
        f["nodes"]["emb_ln"][0, 0] = np.nan
    v, _, outs = stats_and_verdict()
    nodes = pd.read_parquet(outs["nodes"])
    first = nodes[nodes["prompt_id"] == nodes.iloc[0]["prompt_id"]]
    assert first.set_index("node").at["emb_ln", "status"] == "fail"
    assert v["status"] == "fail" and v["first_divergence"] == "emb_ln", v["plain"]


def test_nonfinite_match():
    from actdiff.compare.metrics import nonfinite_match, rel_l2_finite

    a = np.array([1.0, np.nan, np.inf, 2.0, -np.inf], np.float32)
    assert nonfinite_match(a, a.copy()) == (3, 0)
    b = a.copy()
    b[1], b[3], b[4] = 1.0, np.nan, np.inf  # NaN vs finite, finite vs NaN, -Inf vs +Inf
    assert nonfinite_match(a, b) == (1, 3)
    assert rel_l2_finite(a, a) == 0.0 and np.isnan(rel_l2_finite(np.full(2, np.nan), np.full(2, np.nan)))
