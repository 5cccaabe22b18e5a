"""Dumps that stream (actdiff.sides.base.RowSink): a side hands each node's rows to the writer as it computes
them, the writer puts them where the file keeps them (ActivationWriter's plan), and no prompt's values are
held. A full-size model streams (1.06 MB of values per token: its reference dump held 3.9 GB, 2.1 GB
streamed); the small models write in order, so these tests force streaming on the tiny model.

Asserted: a streamed dump is the in-order dump bit for bit (reference and engine, padded batches, every node,
the input ids, offsets and NaN/Inf counts; gzip-compressed chunks rewritten in part too); the engine's streamed
forward holds a fraction of a prompt's values (tracemalloc); the planned writer takes rows in any order, keeps a
node's last value, and refuses a prompt that lacks a node, a value of the wrong shape, rows after the prompt was
done and a prompt never done, leaving no file."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import actdiff
import actdiff.sides.dump as dump_module
from actdiff.batching import MAX_BATCH_TOKENS, batch_plan, streams_rows
from actdiff.errors import DumpError
from actdiff.h5io import ActivationReader, ActivationWriter
from actdiff.models.released import released_config
from actdiff.nodes import build_graph

LENGTHS = (3, 17, 40, 9, 64, 5, 33, 120, 2, 71)


def _items(vocab: int) -> list[tuple[str, list[int]]]:
    rng = np.random.default_rng(7)
    return [(f"p{i:02d}", rng.integers(5, vocab, n).tolist()) for i, n in enumerate(LENGTHS)]


def _dump(side, items, out, monkeypatch, stream: bool, compression: str = "none"):
    monkeypatch.setattr(dump_module, "streams_rows", lambda graph: stream)
    dump_module.dump_shard(side, {"model": "tiny"}, items, out, 0, compression=compression)
    return ActivationReader(out)


@pytest.mark.parametrize(
    "side_name, compression",
    [("reference", "none"), ("actdiff", "none"), ("actdiff", "gzip")],  # a compressed chunk rewritten in part
)
def test_streamed_dump_is_the_ordered_dump_bit_for_bit(tiny_model_dir, tmp_path, monkeypatch, side_name, compression):
    with actdiff.load(tiny_model_dir, side=side_name, batch_size=4) as m:
        side = m.side
        items = _items(side.graph.dims.vocab)
        assert len(batch_plan(list(LENGTHS), 4)) > 2  # several padded batches, each sorted by length
        ordered = _dump(side, items, tmp_path / "ordered.h5", monkeypatch, False, compression)
        streamed = _dump(side, items, tmp_path / "streamed.h5", monkeypatch, True, compression)
        assert streamed.attrs["compression"] == compression
    assert streamed.prompt_ids == ordered.prompt_ids == [p for p, _ in items]
    assert list(streamed.offsets) == list(ordered.offsets)
    assert np.array_equal(streamed.f["input_ids"][()], ordered.f["input_ids"][()])
    assert streamed.node_names == ordered.node_names
    for name in ordered.node_names:
        a, b = ordered.f["nodes"][name], streamed.f["nodes"][name]
        assert a.dtype == b.dtype and np.array_equal(a[()], b[()], equal_nan=True), name
        assert a.attrs["nonfinite"] == b.attrs["nonfinite"]


def test_the_released_model_streams_and_the_small_ones_do_not(tiny_model_dir, minilm_model_dir):
    """STREAM_BYTES (1 GiB): a batch of MAX_BATCH_TOKENS tokens holds 2,065 MiB of the released model's values,
    330 MiB of MiniLM's, 116 MiB of the tiny model's."""
    assert streams_rows(build_graph(released_config()))
    for model_dir in (tiny_model_dir, minilm_model_dir):
        with actdiff.load(model_dir, side="actdiff") as m:
            assert not streams_rows(m.side.graph), model_dir


def test_engine_stream_holds_a_fraction_of_a_prompts_values(tiny_model_dir):
    """The engine drops a node's batch values once no later node reads them: while it streams one 480-token
    prompt, the memory numpy holds at once stays under a third of that prompt's values (the tiny model's 4
    layers hold about a quarter of them each; what stays is the residual stream and the node being computed:
    19 % measured); in order it holds all of them (fails without the drop: checked)."""
    with actdiff.load(tiny_model_dir, side="actdiff") as m:
        engine, prepared = m.side.engine, m.side.prepared
        ids = _items(m.side.graph.dims.vocab)[0][1][:1] * 480
        total = 0

        def put(b, name, value):
            nonlocal total
            total += value.nbytes

        tracemalloc.start()
        try:
            engine.forward_batch_into([ids], put, prepared)
            streamed_peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.reset_peak()
            held = engine.forward_batch([ids], prepared)
            ordered_peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert total == sum(v.nbytes for v in held[0].values())
    assert ordered_peak >= total  # what streaming saves
    assert streamed_peak < total / 3, (streamed_peak, total)


def _writer(tmp_path, graph, plan):
    return ActivationWriter(tmp_path / "planned.h5", graph, {"model": "tiny"}, plan=plan)


def _values(graph, T, seed):
    rng = np.random.default_rng(seed)
    return {n.name: rng.standard_normal(graph.shape(n.name, T)).astype(n.dtype) for n in graph}


def test_planned_writer_takes_rows_in_any_order(tiny_model_dir, tmp_path):
    with actdiff.load(tiny_model_dir, side="actdiff") as m:
        graph = m.side.graph
    plan = [("a", 5), ("b", 1), ("c", 12)]
    vals = [_values(graph, T, i) for i, (_, T) in enumerate(plan)]
    with _writer(tmp_path, graph, plan) as w:
        for i in (2, 0, 1):
            for n in reversed(list(graph)):
                w.put(i, n.name, np.zeros_like(vals[i][n.name]) if i == 2 else vals[i][n.name])
            if i == 2:  # a node put again keeps its last value
                for n in graph:
                    w.put(i, n.name, vals[i][n.name])
            w.done(i, input_ids=list(range(plan[i][1])))
    r = ActivationReader(tmp_path / "planned.h5")
    assert r.prompt_ids == ["a", "b", "c"] and list(r.offsets) == [0, 5, 6, 18]
    for i, (pid, _) in enumerate(plan):
        for n in graph:
            d = r.f["nodes"][n.name]
            rows = d[r.offsets[i] : r.offsets[i + 1]] if n.axis == "token" else d[i : i + 1]
            assert np.array_equal(rows, vals[i][n.name]), (pid, n.name)
    assert r.f["input_ids"][()].tolist() == [*range(5), 0, *range(12)]


def test_planned_writer_refuses_what_it_cannot_place(tiny_model_dir, tmp_path):
    with actdiff.load(tiny_model_dir, side="actdiff") as m:
        graph = m.side.graph
    first, *rest = list(graph)
    plan = [("a", 4), ("b", 3)]
    v = _values(graph, 4, 0)
    with pytest.raises(DumpError, match=r"prompt 'a': node .* was not recorded"):
        with _writer(tmp_path, graph, plan) as w:
            for n in rest:
                w.put(0, n.name, v[n.name])
            w.done(0)
    assert not (tmp_path / "planned.h5").exists()
    with pytest.raises(DumpError, match=r"prompt 'b': node .* has shape"):
        with _writer(tmp_path, graph, plan) as w:
            w.put(1, first.name, v[first.name])  # 4 tokens' rows for a 3-token prompt
    with pytest.raises(DumpError, match=r"given after the prompt was done"):
        with _writer(tmp_path, graph, plan) as w:
            for n in graph:
                w.put(0, n.name, v[n.name])
            w.done(0)
            w.put(0, first.name, v[first.name])
    with pytest.raises(DumpError, match=r"1 prompt\(s\) never done, the first 'b'"):
        with _writer(tmp_path, graph, plan) as w:
            for n in graph:
                w.put(0, n.name, v[n.name])
            w.done(0)
    assert not list(tmp_path.iterdir())


def test_streaming_batches_are_the_ordered_batches():
    """batch_plan is batched_in_order's batches: a streamed dump runs the same padded batches."""
    from actdiff.batching import batched_in_order

    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 300, 200).tolist()
    seen: list[list[int]] = []
    items = [(str(i), [i] * n) for i, n in enumerate(lengths)]

    def run(batch):
        seen.append([ids[0] for ids in batch])
        return [None] * len(batch)

    for window_tokens in (None, 3000):
        seen.clear()
        list(batched_in_order(items, run, 8, MAX_BATCH_TOKENS, window_tokens))
        assert seen == batch_plan(lengths, 8, MAX_BATCH_TOKENS, window_tokens)
