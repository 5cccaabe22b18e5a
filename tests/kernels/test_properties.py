"""Hypothesis property tests over shapes (bounded example counts, derandomized)."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_helpers import nmse, nmse_tol

import actdiff.kernels as K

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


@SETTINGS
@given(
    T=st.integers(1, 70),
    C=st.integers(1, 400),
    OC=st.integers(1, 140),
    bias=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_matmul_property(T, C, OC, bias, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, C)).astype(np.float32)
    w = rng.standard_normal((OC, C)).astype(np.float32)
    b = rng.standard_normal(OC).astype(np.float32) if bias else None
    out = K.matmul(x, w, b)
    assert np.array_equal(out, K.matmul_naive(x, w, b))
    ref = x.astype(np.float64) @ w.astype(np.float64).T + (0 if b is None else b)
    assert nmse(out, ref) < nmse_tol(C + 1) * 4  # tiny shapes: fewer terms to average over


@SETTINGS
@given(
    T=st.integers(1, 150),
    nh=st.integers(1, 4),
    hd=st.integers(1, 70),
    causal=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_attention_property(T, nh, hd, causal, seed):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((T, nh, hd)).astype(np.float32) for _ in range(3))
    mask = rng.random(T) > 0.25
    out = K.attention(q, k, v, mask, scale=1 / math.sqrt(hd), causal=causal)
    ref = K.attention_naive(q, k, v, mask, scale=1 / math.sqrt(hd), causal=causal)
    assert out.shape == (T, nh * hd)
    assert nmse(out, ref) < nmse_tol(4 * hd + 2 * T + 32) * 4


@SETTINGS
@given(
    T=st.integers(1, 40),
    H=st.integers(1, 48),
    F=st.integers(1, 64),
    E=st.integers(1, 6),
    data=st.data(),
    seed=st.integers(0, 2**31 - 1),
)
def test_moe_property(T, H, F, E, data, seed):
    k = data.draw(st.integers(1, E))
    renorm = data.draw(st.booleans())
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((T, H)).astype(np.float32)
    rw = rng.standard_normal((E, H)).astype(np.float32)
    w1 = rng.standard_normal((E, F, H)).astype(np.float32)
    w2 = rng.standard_normal((E, F, H)).astype(np.float32)
    r = K.moe(h, rw, w1, w2, None, top_k=k, renormalize=renorm, return_intermediates=True)
    for t in range(T):
        assert len(set(r.topk_indices[t].tolist())) == k
        p = r.probs[t, r.topk_indices[t]]
        assert np.all(np.diff(p) <= 0)
    # recombine from the intermediates in float64
    ref = np.zeros((T, H))
    for t in range(T):
        for j in range(k):
            e = r.topk_indices[t, j]
            a = r.act[t, j].astype(np.float64) @ w2[e].astype(np.float64)
            ref[t] += float(r.topk_weights[t, j]) * a
    assert nmse(r.out, ref) < nmse_tol(F + k + 8) * 4
    forced = K.moe(h, None, w1, w2, None, top_k=k, forced_indices=r.topk_indices, forced_weights=r.topk_weights)
    assert np.array_equal(forced, r.out)
