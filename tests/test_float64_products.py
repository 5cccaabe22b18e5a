"""The reference ops' float64 products on our C float64 matmul (actdiff.kernels.matmul_f64 on a weight packed once,
refops._product_f64), and the reference noise computed over a group's stacked rows (budgets.fp32_noise_many).

What must hold: every element is the double fused multiply-add chain over k in order from 0, so a product's bits are
the naive loop's on every ISA path this CPU runs and at any thread count, and a prompt's rows give the same bits
alone or stacked with other prompts' (numpy's dgemm blocked by the row count and changed with the CPU); hence the
noise measured over a group's stacked rows equals each prompt's own, bit for bit, at every node of both bundled
models; the wrappers refuse what the C kernel cannot take.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_hypotheses_stacked import _weights64, model  # noqa: F401  (the fixture: both bundled models)

from actdiff import kernels
from actdiff.compare.budgets import fp32_noise, fp32_noise_many
from actdiff.compare.refops import run_op, spec_params


@pytest.fixture
def every_path():
    """Each ISA path this CPU runs, at one and two kernel threads; the settings restored after."""
    before = (kernels.get_isa(), kernels.get_num_threads())
    try:
        yield [(isa, threads) for isa in kernels.supported_isas() for threads in (1, 2)]
    finally:
        kernels.set_isa(before[0])
        kernels.set_num_threads(before[1])


@pytest.mark.parametrize("T,K,N", [(1, 1, 1), (5, 17, 7), (30, 384, 384), (13, 300, 40), (29, 1536, 33),
                                   (260, 512, 20), (4, 0, 9)])  # fmt: skip
def test_matmul_f64_is_the_naive_chain_on_every_path(T, K, N, every_path):
    rng = np.random.default_rng(T * 7 + K)
    x, w = rng.standard_normal((T, K)), rng.standard_normal((N, K))
    want = kernels.matmul_f64_naive(x, w)
    # the naive chain against the exact sum: |error| <= K u sum |x w| to first order (u = 2^-53, see kernels_c)
    exact = x.astype(np.longdouble) @ w.T.astype(np.longdouble)
    bound = 1.01 * K * 2.0**-53 * (np.abs(x) @ np.abs(w).T)
    assert np.all(np.abs(want - exact) <= bound)
    packed, packed_t = kernels.pack_f64(w), kernels.pack_f64(np.ascontiguousarray(w.T), trans=False)
    assert np.array_equal(packed.data, packed_t.data) and packed.kn == packed_t.kn == (K, N)
    for isa, threads in every_path:
        kernels.set_isa(isa)
        kernels.set_num_threads(threads)
        assert np.array_equal(kernels.matmul_f64(x, packed), want), (isa, threads)
        assert np.array_equal(kernels.matmul_f64(x, w), want), (isa, threads)  # unpacked: its blocks packed per call
        rows = np.split(x, [T // 3]) if T > 1 else [x]
        assert np.array_equal(np.concatenate([kernels.matmul_f64(r, packed) for r in rows]), want), (isa, threads)
    assert kernels.matmul_f64(x.reshape(1, T, K), packed).shape == (1, T, N)


def test_matmul_f64_refuses_what_the_kernel_cannot_take():
    w = np.ones((4, 3))
    packed = kernels.pack_f64(w)
    with pytest.raises(TypeError, match="PackedF64"):
        kernels.matmul_f64(np.ones((2, 3)), w.tolist())
    with pytest.raises(ValueError, match="2-D packed"):
        kernels.matmul_f64(np.ones((2, 3)), kernels.pack_f64(np.ones((2, 4, 3))))
    with pytest.raises(ValueError, match="C-contiguous"):
        kernels.matmul_f64(np.ones((2, 4)), w.T)
    with pytest.raises(TypeError, match="float64"):
        kernels.matmul_f64(np.ones((2, 3), np.float32), packed)
    with pytest.raises(ValueError, match="last dimension of 3"):
        kernels.matmul_f64(np.ones((2, 4)), packed)
    with pytest.raises(ValueError, match="C-contiguous"):
        kernels.matmul_f64(np.ones((3, 2)).T, packed)
    with pytest.raises(TypeError, match="float64 or float32"):
        kernels.pack_f64(w.astype(np.float16))  # float32 is widened as it is packed
    out = np.empty((2, 4))
    assert kernels.matmul_f64(np.ones((2, 3)), packed, out=out) is out and np.all(out == 3.0)


def test_a_prompts_float64_products_are_the_same_bits_stacked_or_alone(model, every_path):  # noqa: F811
    """Every product of both models (MATMUL, ROUTER, the experts' EXPERT_FC1 and EXPERT_FC2), the spec op's value
    on each prompt alone and on the three prompts' stacked rows: equal bit for bit on every path and thread count;
    a MATMUL's equal to the naive chain plus the bias."""
    m, w = model, _weights64(model)
    for isa, threads in every_path:
        kernels.set_isa(isa)
        kernels.set_num_threads(threads)
        for node in (n for n in m.graph if n.op in ("MATMUL", "ROUTER", "EXPERT_FC1", "EXPERT_FC2")):
            p = spec_params(m.graph, node)
            alone = [run_op(m.graph, node, v, w, dict(p)) for v in m.vals]
            stacked = run_op(m.graph, node, {i: np.concatenate([v[i] for v in m.vals]) for i in node.inputs}, w,
                             dict(p))  # fmt: skip
            assert np.array_equal(np.concatenate(alone), stacked), (isa, threads, node.name)
            if node.op != "MATMUL":
                continue
            x = np.asarray(m.vals[0][node.inputs[0]], np.float64)
            W = np.asarray(w[node.weights[0]])
            b = np.asarray(w[node.weights[1]]) if len(node.weights) > 1 else 0.0
            want = kernels.matmul_f64_naive(np.ascontiguousarray(x.reshape(-1, W.shape[1])), W) + b
            assert np.array_equal(alone[0].reshape(want.shape), want), (isa, threads, node.name)


def test_noise_over_stacked_rows_is_each_prompts_own(model):  # noqa: F811
    """budgets.fp32_noise_many (the reference noise's group, one op over the stacked rows where the op computes rows
    independently) gives every prompt's own fp32_noise at every node, bit for bit, NaN where that is NaN."""
    m, w = model, _weights64(model)
    for node in m.graph:
        many = fp32_noise_many(m.graph, node, m.vals, w)
        alone = [fp32_noise(m.graph, node, v, w) for v in m.vals]
        for a, b in zip(many, alone, strict=True):
            for x, y in zip(a, b, strict=True):
                assert x == y or (math.isnan(x) and math.isnan(y)), (node.name, a, b)


def test_a_weight_is_packed_whole_once_it_comes_again():
    """WeightMemo.get_reused: None the first time a tensor is asked for (refops then multiplies by the weight itself,
    its blocks packed per call), the memoised result from the second on; nothing kept of a tensor that is gone."""
    import gc

    from actdiff.compare.refops import WeightMemo

    memo, calls = WeightMemo(2**20), []

    def use(w: np.ndarray):
        return memo.get_reused(w, "float64 packed", lambda: calls.append(1) or kernels.pack_f64(w))

    W, once = np.ones((4, 3)), np.ones((2, 2))
    assert use(W) is None and calls == []
    first = use(W)
    assert isinstance(first, kernels.PackedF64) and use(W) is first and calls == [1]
    assert not first.data.flags.writeable and np.array_equal(kernels.matmul_f64(np.ones((1, 3)), first), [[3.0] * 4])
    assert use(once) is None and len(memo.seen) == 1
    del W, first, once
    gc.collect()
    assert memo.seen == {} and memo.bytes == 0 and not memo.items
