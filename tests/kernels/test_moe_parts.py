"""The MoE parts as separate ops (topk, expert_up, expert_down, moe_combine): bitwise equal to the fused
ak_moe on the same inputs (same gemm core, same ranking, same product-then-add sum), for every weight dtype,
plus errors for bad indices and shapes."""

from __future__ import annotations

import numpy as np
import pytest

import actdiff.kernels as K


def _weights(rng, E, F, H, dtype):
    w1 = (rng.standard_normal((E, F, H)) / np.sqrt(H)).astype(np.float32)
    w2 = (rng.standard_normal((E, F, H)) / np.sqrt(F)).astype(np.float32)
    if dtype == "f32":
        return w1, w2, None, None
    if dtype == "f16":
        return w1.astype(np.float16), w2.astype(np.float16), None, None
    if dtype == "bf16":
        return K.f32_to_bf16(w1), K.f32_to_bf16(w2), None, None
    q1, s1 = K.quantize_int8(w1, axis=2)
    q2, s2 = K.quantize_int8(w2, axis=1)
    return q1, q2, s1, s2


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "i8"])
@pytest.mark.parametrize("T,H,F,E,k", [(1, 16, 24, 4, 2), (37, 128, 512, 8, 2), (9, 40, 72, 5, 3)])
def test_parts_equal_fused(rng, dtype, T, H, F, E, k):
    h = rng.standard_normal((T, H)).astype(np.float32)
    router = rng.standard_normal((E, H)).astype(np.float32)
    bias = rng.standard_normal(H).astype(np.float32)
    w1, w2, s1, s2 = _weights(rng, E, F, H, dtype)
    r = K.moe(h, router, w1, w2, bias, top_k=k, w1_scales=s1, w2_scales=s2, return_intermediates=True)
    wts, idx = K.topk(r.probs, k)
    np.testing.assert_array_equal(idx, r.topk_indices)
    np.testing.assert_array_equal(wts, r.topk_weights)
    fc1 = K.expert_up(h, idx, w1, scales=s1)
    np.testing.assert_array_equal(fc1, r.fc1)
    act = K.gelu(fc1)
    np.testing.assert_array_equal(act, r.act)
    out = K.expert_down(act, idx, w2, scales=s2)
    np.testing.assert_array_equal(out, r.expert_out)
    np.testing.assert_array_equal(K.moe_combine(out, wts), r.weighted)
    np.testing.assert_array_equal(K.moe_combine(out, wts, bias), r.out)


def test_parts_against_numpy(rng):
    T, H, F, E, k = 11, 32, 48, 6, 2
    h = rng.standard_normal((T, H)).astype(np.float32)
    w1, w2, _, _ = _weights(rng, E, F, H, "f32")
    idx = rng.integers(0, E, size=(T, k))
    up = np.einsum("th,tjfh->tjf", h.astype(np.float64), w1[idx].astype(np.float64))
    # NMSE threshold: a length-H fp32 dot product has relative error ~sqrt(H)*2^-24; 1e-12 is loose for that
    got = K.expert_up(h, idx, w1)
    assert np.sum((got - up) ** 2) / np.sum(up**2) < 1e-12
    act = rng.standard_normal((T, k, F)).astype(np.float32)
    down = np.einsum("tjf,tjfh->tjh", act.astype(np.float64), w2[idx].astype(np.float64))
    got = K.expert_down(act, idx, w2)
    assert np.sum((got - down) ** 2) / np.sum(down**2) < 1e-12
    p = np.array([[0.1, 0.3, 0.3, 0.2, 0.1, 0.0]], np.float32)
    w, i = K.topk(p, 3)
    assert i.tolist() == [[1, 2, 3]]  # ties to the lower index
    w, i = K.topk(p, 2, renormalize=True)
    np.testing.assert_allclose(w, [[0.5, 0.5]])


def test_parts_reject_bad_inputs(rng):
    h = rng.standard_normal((3, 8)).astype(np.float32)
    w1 = rng.standard_normal((4, 6, 8)).astype(np.float32)
    with pytest.raises(ValueError, match=r"indices must be in \[0, 4\)"):
        K.expert_up(h, np.array([[0, 4]] * 3), w1)
    with pytest.raises(ValueError, match="w1 must have shape"):
        K.expert_up(h, np.zeros((3, 2), np.int64), w1[:, :, :7].copy())
    with pytest.raises(ValueError, match="scales is required"):
        K.expert_up(h, np.zeros((3, 2), np.int64), w1.astype(np.int8))
    with pytest.raises(ValueError, match="k must be"):
        K.topk(np.ones((2, 4), np.float32), 5)
    with pytest.raises(ValueError, match="weights must have shape"):
        K.moe_combine(np.ones((3, 2, 8), np.float32), np.ones((3, 3), np.float32))
