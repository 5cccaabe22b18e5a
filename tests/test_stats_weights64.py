"""The statistics stage's float64 weights (actdiff.compare.stats.NodeWeights64): each node's tensors converted
once per prompt and shared by its spec passes, in reused buffers. The values must be exactly those the spec ops
converted themselves (tolerance 0: the budgets computed from them stay bit for bit the same), and a buffer
still viewed from outside must never be overwritten."""

from __future__ import annotations

import numpy as np
import pytest

from actdiff.compare.stats import CheckpointTensors, NodeWeights64
from actdiff.nodes import build_graph, load_config_json


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    graph = build_graph(load_config_json(tiny_model_dir), str(tiny_model_dir / "config.json"))
    return graph, CheckpointTensors(tiny_model_dir / "model.safetensors")


def _first(graph, op: str):
    return next(n for n in graph if n.op == op)


# one node at a time (resident_bytes 0: what the released model does, 7.6 GB in float64) and the whole small model
# held (the tiny model's default, NodeWeights64.RESIDENT_BYTES)
MODES = {"per_node": 0, "resident": None}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", ["MATMUL", "LAYERNORM", "ROUTER", "EXPERT_FC1", "EXPERT_FC2", "BIAS_ADD"])
def test_values_and_squares_are_the_float64_conversion_bit_for_bit(tiny, op, mode):
    graph, raw = tiny
    w64 = NodeWeights64(raw, graph, resident_bytes=MODES[mode])
    assert w64.resident == (mode == "resident")
    node = _first(graph, op)
    w64.visit(node)
    for key in node.weights:
        a = w64[key]
        exact = np.asarray(raw[key], dtype=np.float64)
        assert a.dtype == np.float64 and np.array_equal(a, exact)
        assert not a.flags.writeable
        assert w64[key] is a  # held: converted once for every pass on the node
        assert np.array_equal(w64.squared(key), np.square(exact))


def test_embedding_tables_are_mapped_not_converted(tiny):
    graph, raw = tiny
    w64 = NodeWeights64(raw, graph)
    node = _first(graph, "EMBED")
    w64.visit(node)
    for key in node.weights:
        t = w64[key]
        assert isinstance(t, np.memmap) and not t.flags.writeable
        assert t.dtype == np.asarray(raw[key]).dtype and np.array_equal(t, raw[key])


def test_a_buffer_viewed_from_outside_is_never_reused(tiny):
    """The per-node mode's pool (the released model's); a resident model never releases a buffer."""
    graph, raw = tiny
    w64 = NodeWeights64(raw, graph, resident_bytes=0)
    first, second = [n for n in graph if n.op == "EXPERT_FC1"][:2]
    w64.visit(first)
    kept = w64[first.weights[0]].reshape(-1)  # a view that outlives the visit
    w64.squared(first.weights[0])
    w64.visit(second)  # the first node's buffers go back to the pool, but for the one viewed
    other = w64[second.weights[0]]
    assert not np.shares_memory(kept, other)
    assert np.array_equal(kept, np.asarray(raw[first.weights[0]], dtype=np.float64).reshape(-1))
    w64.visit(first)  # the second node's buffers are free again and reused: values still exact
    assert np.array_equal(w64[first.weights[0]], np.asarray(raw[first.weights[0]], dtype=np.float64))
    w64.visit(None)
    assert not w64.held and not w64.pool


@pytest.mark.parametrize("mode", MODES)
def test_expert_products_pack_the_stored_float32_tensors(tiny, mode):
    """An expert product's float64 weights are packed straight from the checkpoint's float32 tensors
    (NodeWeights64.stored, kernels.pack_f64 of float32: each value widened exactly), so the per-node mode makes no
    float64 copy of them; the op's values are those of the float64 copies bit for bit (tolerance 0), as is the sum
    envelope's q (the weights' squares summed over the outputs)."""
    from actdiff.compare.budgets import _squared_op_sum
    from actdiff.compare.refops import run_op, spec_params

    graph, raw = tiny
    rng = np.random.default_rng(3)
    T, d = 9, graph.dims
    for op in ("EXPERT_FC1", "EXPERT_FC2"):
        node = _first(graph, op)
        w64 = NodeWeights64(raw, graph, resident_bytes=MODES[mode])
        w64.visit(node)
        key = node.weights[0]
        stored = w64.stored(key)
        assert stored.dtype == np.float32 and not stored.flags.writeable and w64.stored(key) is stored
        assert w64.stored("no such tensor") is None
        idx = rng.integers(0, d.experts, (T, d.top_k))
        width = d.hidden if op == "EXPERT_FC1" else d.inner
        x = rng.standard_normal((T, width) if op == "EXPERT_FC1" else (T, d.top_k, width))
        vals = {node.inputs[0]: x, node.inputs[1]: idx}
        copies = {k: np.asarray(raw[k], dtype=np.float64) for k in node.weights}
        spec = spec_params(graph, node)
        got, want = run_op(graph, node, vals, w64, spec), run_op(graph, node, vals, copies, spec)
        assert np.array_equal(got, want), op
        if mode == "per_node":
            assert ("w", key) not in w64.held  # no float64 copy was made
        q, q64 = _squared_op_sum(graph, node, vals, w64, spec), _squared_op_sum(graph, node, vals, copies, spec)
        assert abs(q - q64) <= 1e-12 * q64, (op, q, q64)
