"""MoE layer vs a torch eager reference; intermediates, forced routing, ties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from kernel_helpers import Guarded, nmse, nmse_tol

import actdiff.kernels as K


def moe_ref(h, router_w, w1, w2, bias, top_k, renormalize, approx, dtype=torch.float64):
    """Straightforward torch eager MoE; top-k via a *stable* descending sort so ties go to the
    lower expert index (torch.topk does not guarantee that, see test_torch_topk_tie_order)."""
    ht = torch.from_numpy(h).to(dtype)
    logits = torch.from_numpy(h) @ torch.from_numpy(router_w).T  # fp32 routing, as specified
    probs = torch.softmax(logits, -1)
    idx = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :top_k]
    wts = probs.gather(1, idx)
    if renormalize:
        wts = wts / wts.sum(-1, keepdim=True)
    w1t, w2t = torch.from_numpy(w1).to(dtype), torch.from_numpy(w2).to(dtype)
    T, H = h.shape
    eo = torch.zeros(T, top_k, H, dtype=dtype)
    for e in range(w1.shape[0]):
        tok, slot = torch.nonzero(idx == e, as_tuple=True)
        if len(tok):
            a = TF.gelu(ht[tok] @ w1t[e].T, approximate=approx)
            eo[tok, slot] = a @ w2t[e]
    y = (wts.to(dtype)[..., None] * eo).sum(1)
    if bias is not None:
        y = y + torch.from_numpy(bias).to(dtype)
    return y.numpy(), idx.numpy(), wts.numpy(), probs.numpy(), eo.numpy()


def make(rng, T, H, F, E):
    h = rng.standard_normal((T, H)).astype(np.float32)
    rw = rng.standard_normal((E, H)).astype(np.float32)
    w1 = (rng.standard_normal((E, F, H)) / np.sqrt(H)).astype(np.float32)
    w2 = (rng.standard_normal((E, F, H)) / np.sqrt(F)).astype(np.float32)
    b = rng.standard_normal(H).astype(np.float32)
    return h, rw, w1, w2, b


@pytest.mark.parametrize(
    "T,H,F,E,k", [(1, 128, 512, 4, 2), (37, 128, 512, 8, 2), (64, 96, 200, 5, 3), (128, 768, 3072, 8, 2)]
)
@pytest.mark.parametrize("renorm", [False, True])
def test_moe_vs_torch(rng, T, H, F, E, k, renorm):
    if H == 768 and renorm:
        pytest.skip("one large case is enough")
    h, rw, w1, w2, b = make(rng, T, H, F, E)
    g = Guarded((T, H))
    r = K.moe(h, rw, w1, w2, b, top_k=k, renormalize=renorm, return_intermediates=True, out=g.out)
    g.check()
    y, idx, wts, probs, eo = moe_ref(h, rw, w1, w2, b, k, renorm, "none")
    assert np.array_equal(r.topk_indices, idx)
    # routing probs: logits are length-H fp32 dots of magnitude ~sqrt(H) computed in a different
    # order than torch -> absolute logit error ~ H * 2^-24 ~ 1e-5, i.e. ~1e-5 relative in the probs
    assert np.allclose(r.topk_weights, wts, rtol=2e-4, atol=1e-7)
    assert np.allclose(r.probs, probs, rtol=2e-4, atol=1e-7)
    # expert path: length-H chain, gelu, length-F chain; then k-term weighted sum
    assert nmse(r.expert_out, eo) < nmse_tol(H + F + 64)
    assert nmse(r.out, y) < nmse_tol(H + F + 64)
    assert r.out is g.out
    assert np.array_equal(r.weighted + b, r.out)
    assert r.fc1.shape == (T, k, F) and r.act.shape == (T, k, F)
    ref_act = TF.gelu(torch.from_numpy(r.fc1)).numpy()
    assert nmse(r.act, ref_act) < 64 * 2.0**-48
    fc1_0 = h[0].astype(np.float64) @ w1[r.topk_indices[0, 0]].astype(np.float64).T
    assert nmse(r.fc1[0, 0], fc1_0) < nmse_tol(H)


def test_moe_forced_routing(rng):
    h, rw, w1, w2, b = make(rng, 20, 64, 96, 6)
    r = K.moe(h, rw, w1, w2, b, top_k=2, return_intermediates=True)
    same = K.moe(h, None, w1, w2, b, top_k=2, forced_indices=r.topk_indices, forced_weights=r.topk_weights)
    assert np.array_equal(same, r.out)
    idx = np.tile(np.array([[5, 0]]), (20, 1))
    wts = np.full((20, 2), 0.5, np.float32)
    f = K.moe(h, rw, w1, w2, None, top_k=2, forced_indices=idx, forced_weights=wts, return_intermediates=True)
    assert np.array_equal(f.topk_indices, idx) and f.probs is not None
    ref = (
        0.5
        * (
            TF.gelu(torch.from_numpy(h).double() @ torch.from_numpy(w1[5]).double().T) @ w2[5]
            + TF.gelu(torch.from_numpy(h).double() @ torch.from_numpy(w1[0]).double().T) @ w2[0]
        ).numpy()
    )
    assert nmse(f.out, ref) < nmse_tol(64 + 96 + 64)
    with pytest.raises(ValueError, match="forced_indices"):
        K.moe(h, rw, w1, w2, top_k=2, forced_indices=idx + 3, forced_weights=wts)


def test_moe_ties_lowest_index(rng):
    T, H, F, E = 4, 16, 24, 8
    h, _, w1, w2, _ = make(rng, T, H, F, E)
    rw = np.zeros((E, H), np.float32)  # all logits 0 -> all probs equal
    r = K.moe(h, rw, w1, w2, top_k=3, return_intermediates=True)
    assert (r.topk_indices == [0, 1, 2]).all()
    rw[5] = rw[2] = 1.0  # experts 2 and 5 tie for the top
    h2 = np.abs(h)
    r = K.moe(h2, rw, w1, w2, top_k=3, return_intermediates=True)
    assert (r.topk_indices[:, :2] == [2, 5]).all() and (r.topk_indices[:, 2] == 0).all()
    stable = torch.sort(torch.from_numpy(r.probs), dim=-1, descending=True, stable=True).indices[:, :3].numpy()
    assert np.array_equal(stable, r.topk_indices)


def test_torch_topk_tie_order():
    """Document torch.topk tie behaviour (CPU): the *set* is right, the order among equal
    values is an implementation detail (observed with torch 2.13: 4 equal values, k=2 ->
    [2, 3]; 8 equal -> [6, 5]) -- NOT lowest-index-first.  A stable descending sort gives
    the kernel's order (ties -> lower index)."""
    for E in (4, 8, 16):
        p = torch.full((1, E), 1.0 / E)
        tk = torch.topk(p, 2).indices[0].tolist()
        assert len(set(tk)) == 2 and all(0 <= i < E for i in tk)
        st = torch.sort(p, dim=-1, descending=True, stable=True).indices[0, :2].tolist()
        assert st == [0, 1]
    observed = torch.topk(torch.full((1, 4), 0.25), 2).indices[0].tolist()
    if torch.__version__.startswith("2.13"):
        assert observed == [2, 3]
    # NaN ranks highest in torch.topk, ties among NaN by index here; the kernel does the same
    x = torch.tensor([[0.1, float("nan"), 0.3, float("nan")]])
    assert torch.topk(x, 3).indices[0].tolist() == [1, 3, 2]


def test_moe_weight_dtypes(rng):
    h, rw, w1, w2, b = make(rng, 9, 64, 128, 4)
    base = K.moe(h, rw, w1, w2, b, top_k=2, return_intermediates=True)
    fi, fw = base.topk_indices, base.topk_weights
    w1h, w2h = w1.astype(np.float16), w2.astype(np.float16)
    outh = K.moe(h, rw, w1h, w2h, b, top_k=2, forced_indices=fi, forced_weights=fw)
    refh = K.moe(
        h, rw, w1h.astype(np.float32), w2h.astype(np.float32), b, top_k=2, forced_indices=fi, forced_weights=fw
    )
    assert np.array_equal(outh, refh)  # fp16 converts exactly to fp32
    w1b, w2b = K.f32_to_bf16(w1), K.f32_to_bf16(w2)
    outb = K.moe(h, rw, w1b, w2b, b, top_k=2, forced_indices=fi, forced_weights=fw)
    refb = K.moe(h, rw, K.bf16_to_f32(w1b), K.bf16_to_f32(w2b), b, top_k=2, forced_indices=fi, forced_weights=fw)
    assert np.array_equal(outb, refb)
    q1, s1 = K.quantize_int8(w1)  # (E,F) scales: per output channel of fc1
    q2, s2 = K.quantize_int8(w2, axis=1)  # (E,H) scales: w2[e] is (F,H), output channel = H
    outq = K.moe(h, rw, q1, q2, b, top_k=2, forced_indices=fi, forced_weights=fw, w1_scales=s1, w2_scales=s2)
    d1 = q1.astype(np.float32) * s1[..., None]
    d2 = q2.astype(np.float32) * s2[:, None, :]
    refq = K.moe(h, rw, d1, d2, b, top_k=2, forced_indices=fi, forced_weights=fw)
    assert np.array_equal(outq, refq)


def test_moe_nan_propagation(rng):
    h, rw, w1, w2, b = make(rng, 6, 32, 48, 4)
    h[3, 0] = np.nan
    r = K.moe(h, rw, w1, w2, b, top_k=2, return_intermediates=True)
    assert np.isnan(r.out[3]).all()
    assert np.isfinite(np.delete(r.out, 3, 0)).all()
    assert np.isnan(r.probs[3]).all() and len(set(r.topk_indices[3])) == 2
