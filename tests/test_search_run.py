"""The search once per run (actdiff.compare.search_run): the shards' samples as tables, merged into the sample one
job over the whole corpus would have kept, refused when damaged, and searched in aggregation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from actdiff.compare.search_run import TARGET, RunSearch, SearchSample, merge_samples, search_run
from actdiff.nodes import build_graph, load_config_json
from actdiff.tables import SHARD_TABLES


@pytest.fixture(scope="module")
def graph(tiny_model_dir):
    return build_graph(load_config_json(tiny_model_dir), str(tiny_model_dir / "config.json"))


def _offers(graph, n_prompts: int, seed: int = 0):
    """(node, prompt id, inputs, target, budget) at three nodes (an expert layer's, whose inputs include the int64
    expert ids), prompts of random lengths 1-40 with ties."""
    rng = np.random.default_rng(seed)
    names = ["encoder.layers.1.mlp.experts.fc1", "encoder.layers.0.mlp.act", "encoder.layers.0.attn.out_proj"]

    def value(name, t):
        if graph[name].kind == "index":
            return rng.integers(0, 8, graph.shape(name, t)).astype(np.int64)
        return rng.standard_normal(graph.shape(name, t)).astype(np.float32)

    out = []
    for p in range(n_prompts):
        t = int(rng.integers(1, 40))
        for name in names:
            node = graph[name]
            inputs = {i: value(i, t) for i in node.inputs}
            target = value(name, t)
            out.append((name, f"p{p}", inputs, target, float(rng.uniform(1e-6, 1e-3))))
    return out


def _table(graph, sample: SearchSample, path) -> str:
    t = pa.Table.from_pydict(sample.to_columns(graph), schema=SHARD_TABLES["search_sample"].schema)
    pd.DataFrame(t.to_pandas()).to_parquet(path, index=False)
    return str(path)


def _same(a: SearchSample, b: SearchSample) -> None:
    assert list(a.items) == list(b.items) or sorted(a.items) == sorted(b.items)
    for name, item in a.items.items():
        other = b.items[name]
        assert item["prompt_ids"] == other["prompt_ids"] and item["budgets"] == other["budgets"], name
        for x, y in zip(item["targets"], other["targets"], strict=True):
            assert x.dtype == y.dtype and np.array_equal(x, y)
        for x, y in zip(item["inputs"], other["inputs"], strict=True):
            assert list(x) == list(y)
            assert all(x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]) for k in x)


def test_merged_shard_samples_are_the_sample_of_the_whole_corpus(graph, tmp_path):
    """Each shard keeps its longest prompts of its earliest nodes; merging the shards' tables in shard order gives,
    value for value and bit for bit, what one sample offered every prompt of the corpus in the same order keeps."""
    offers = _offers(graph, 12)
    whole, shards = SearchSample(3, 2), [SearchSample(3, 2) for _ in range(3)]
    for k, (name, pid, inputs, target, b) in enumerate(offers):
        whole.offer(graph, name, pid, inputs, target, b)
        shards[k * 3 // len(offers)].offer(graph, name, pid, inputs, target, b)
    paths = [_table(graph, s, tmp_path / f"shard-{i}.parquet") for i, s in enumerate(shards)]
    merged = merge_samples(graph, paths, 3, 2)
    assert sorted(merged.items) == ["encoder.layers.0.attn.out_proj", "encoder.layers.0.mlp.act"]  # earliest 2
    _same(whole, merged)
    lengths = {pid: next(t.shape[0] for n, p, _, t, _ in offers if p == pid) for _, pid, *_ in offers}
    for item in merged.items.values():  # the three longest of the corpus (ties: the first offered)
        kept = sorted((lengths[p] for p in item["prompt_ids"]), reverse=True)
        assert kept == sorted(lengths.values(), reverse=True)[:3]


def test_a_damaged_or_foreign_sample_table_is_refused_by_name(graph, tmp_path):
    s = SearchSample(2, 4)
    for name, pid, inputs, target, b in _offers(graph, 2):
        s.offer(graph, name, pid, inputs, target, b)
    path = _table(graph, s, tmp_path / "search_sample.parquet")
    t = pd.read_parquet(path)
    cut = t.assign(data=[d[:-4] if a == TARGET else d for a, d in zip(t["array"], t["data"], strict=True)])
    cut.to_parquet(tmp_path / "cut.parquet", index=False)
    with pytest.raises(ValueError, match=r"cut\.parquet.*values for shape.*delete it and rerun"):
        merge_samples(graph, [str(tmp_path / "cut.parquet")], 2, 4)
    t.assign(node="not.a.node").to_parquet(tmp_path / "foreign.parquet", index=False)
    with pytest.raises(ValueError, match=r"foreign\.parquet.*'not\.a\.node'.*another model"):
        merge_samples(graph, [str(tmp_path / "foreign.parquet")], 2, 4)
    t[t["array"] != TARGET].to_parquet(tmp_path / "notarget.parquet", index=False)
    with pytest.raises(ValueError, match=r"notarget\.parquet.*no 'target' row"):
        merge_samples(graph, [str(tmp_path / "notarget.parquet")], 2, 4)
    # a sample nobody would search is an error, not a silently missing search
    with pytest.raises(ValueError, match=r"search_sample\.parquet.*no `search`"):
        search_run([path], None)
    assert search_run([path], RunSearch.of(tmp_path, {"search_seconds": 0})).empty


def test_the_run_search_finds_what_the_shard_search_found(graph, tiny_model_dir, tmp_path):
    """A GELU in tanh form, sampled by two shards: the run's one search fits it (the tanh coefficients), with one
    row per finding and the sample's longest prompts."""
    from actdiff.compare.refops import run_op, spec_params

    rng = np.random.default_rng(1)
    name = "encoder.layers.0.mlp.act"
    node = graph[name]
    tanh = {**spec_params(graph, node), "form": "tanh"}
    shards = []
    for s in range(2):
        sample = SearchSample(3, 16)
        for p in range(3):
            t = int(rng.integers(8, 30))
            x = {node.inputs[0]: rng.standard_normal(graph.shape(node.inputs[0], t)) * 2}
            y = run_op(graph, node, x, {}, tanh).astype(np.float32)
            sample.offer(graph, name, f"s{s}p{p}", x, y, 1e-6)
        shards.append(_table(graph, sample, tmp_path / f"s{s}.parquet"))
    rows = search_run(shards, RunSearch.of(tiny_model_dir, {"search_seconds": 30}))
    assert set(rows["node"]) == {name} and (rows["prompts"] == 3).all()
    assert rows["explains"].iloc[0] and rows["rank"].iloc[0] == 1, rows[["name", "error", "baseline_error"]]


def test_the_search_reads_each_weight_once_and_finds_what_the_raw_checkpoint_gives(graph, tiny_model_dir, tmp_path):
    """search_run hands the search the checkpoint's float64 tensors held per searched node (stats.NodeWeights64):
    every candidate reads the same object, so refops.WEIGHT_MEMO rounds it once, where a fresh read per candidate
    re-read, converted and rounded it each time (MiniLM's ONNX Runtime int8 aggregation: 40 -> 32 CPU-s). The
    node's weight is read from the checkpoint once for the whole search, and the table is the one the raw
    checkpoint gives (all but the CPU seconds)."""
    from collections import Counter

    from actdiff.compare.refops import run_op, spec_params
    from actdiff.compare.search_run import run_search
    from actdiff.compare.stats import CheckpointTensors, NodeWeights64

    class Counting(CheckpointTensors):
        def __init__(self, path):
            super().__init__(path)
            self.reads = Counter()

        def __getitem__(self, key):
            self.reads[key] += 1
            return super().__getitem__(key)

        def mapped(self, key):
            self.reads[key] += 1
            return super().mapped(key)

    rng = np.random.default_rng(2)
    name = "encoder.layers.0.attn.out_proj"
    node = graph[name]
    ck = CheckpointTensors(tiny_model_dir / "model.safetensors")
    bf16 = {**spec_params(graph, node), "weight_precision": "bf16"}  # a weight stored in bf16 where fp32 was meant
    sample = SearchSample(3, 16)
    for p in range(3):
        x = {node.inputs[0]: rng.standard_normal(graph.shape(node.inputs[0], int(rng.integers(8, 30))))}
        sample.offer(graph, name, f"p{p}", x, run_op(graph, node, x, ck, bf16).astype(np.float32), 1e-6)
    tables = {}
    for label in ("raw", "held"):
        raw = Counting(tiny_model_dir / "model.safetensors")
        weights = raw if label == "raw" else NodeWeights64(raw, graph)
        tables[label] = run_search(graph, sample, weights, 30.0).drop(columns="seconds")
        tables[label + " reads"] = dict(raw.reads)
    pd.testing.assert_frame_equal(tables["raw"], tables["held"])
    assert tables["raw"]["explains"].iloc[0], tables["raw"][["name", "error"]]  # the bf16 weight, found
    assert tables["raw reads"][node.weights[0]] > 10, tables["raw reads"]
    assert tables["held reads"][node.weights[0]] == 1, tables["held reads"]
