"""Every op against a numpy / torch reference, edge shapes, NaN/Inf, guards, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from kernel_helpers import U2, Guarded, nmse, nmse_tol

import actdiff.kernels as K
from actdiff._version import __version__


def f32(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# ------------------------------------------------------------------ matmul
MATMUL_SHAPES = [
    (1, 768, 2304),
    (3, 128, 512),
    (17, 512, 128),
    (128, 768, 768),
    (5, 3072, 768),
    (33, 100, 37),
    (1, 1, 1),
    (64, 768, 3072),
    (512, 128, 129),
]


@pytest.mark.parametrize("T,C,OC", MATMUL_SHAPES)
@pytest.mark.parametrize("wdt", ["f32", "f16", "bf16", "i8"])
def test_matmul_vs_float64(rng, T, C, OC, wdt):
    x = f32(rng, T, C)
    w = f32(rng, OC, C)
    b = f32(rng, OC)
    scales = None
    if wdt == "f32":
        wk, wref = w, w
    elif wdt == "f16":
        wk = w.astype(np.float16)
        wref = wk.astype(np.float32)
    elif wdt == "bf16":
        wk = K.f32_to_bf16(w)
        wref = K.bf16_to_f32(wk)
    else:
        wk, scales = K.quantize_int8(w)
        wref = wk.astype(np.float32) * scales[:, None]  # dequantised in fp32, as the kernel does
    g = Guarded((T, OC))
    out = K.matmul(x, wk, b, scales=scales, out=g.out)
    assert out is g.out
    g.check()
    ref = x.astype(np.float64) @ wref.astype(np.float64).T + b
    # length-C fp32 fma chain + one rounding for the bias add
    assert nmse(out, ref) < nmse_tol(C + 1)
    # the naive path performs the same per-element arithmetic: bitwise equal
    assert np.array_equal(K.matmul_naive(x, wk, b, scales=scales), out)


@pytest.mark.parametrize("T,C,OC", [(1, 17, 5), (7, 300, 70), (40, 519, 33), (3, 16, 64)])
def test_reduced_weights_convert_every_bit_pattern_exactly(rng, T, C, OC):
    """fp16 and bf16 weights of every kind of bit pattern (random 16-bit words: zeros of both signs, subnormals,
    normals, Inf, NaN with any payload) and int8 with per-channel scales, read by the packing's run conversion
    (16 or 8 values at a time on the vector paths, the rest one by one: C and OC leave remainders): each matmul
    equals the naive loop's, which converts value by value, and the fp32 matmul of the exactly converted values;
    so does expert_down, whose un-transposed weights are converted along the output channels."""
    x = f32(rng, T, C)
    words = rng.integers(0, 1 << 16, size=(OC, C), dtype=np.uint16)
    f16 = words.view(np.float16)
    cases = [(f16, None, f16.astype(np.float32)), (words, None, K.bf16_to_f32(words))]
    q, sc = K.quantize_int8(f32(rng, OC, C))
    cases.append((q, sc, q.astype(np.float32) * sc[:, None]))
    for wk, scales, exact in cases:
        out = K.matmul(x, wk, scales=scales)
        assert np.array_equal(out, K.matmul_naive(x, wk, scales=scales), equal_nan=True), wk.dtype
        assert np.array_equal(out, K.matmul(x, K.pack_f32(exact)), equal_nan=True), wk.dtype
    E, k = 3, 2
    idx = rng.integers(0, E, size=(T, k)).astype(np.int32)
    act = f32(rng, T, k, C)
    w2 = rng.integers(0, 1 << 16, size=(E, C, OC), dtype=np.uint16).view(np.float16)  # (E, F, H): F = C here
    assert np.array_equal(K.expert_down(act, idx, w2), K.expert_down(act, idx, w2.astype(np.float32)), equal_nan=True)
    q2, s2 = K.quantize_int8(f32(rng, E, C, OC), axis=1)
    d2 = q2.astype(np.float32) * s2[:, None, :]
    assert np.array_equal(K.expert_down(act, idx, q2, scales=s2), K.expert_down(act, idx, d2))


def test_matmul_vs_torch_and_numpy(rng):
    x = f32(rng, 128, 768)
    w = f32(rng, 2304, 768)
    out = K.matmul(x, w)
    assert nmse(out, x @ w.T) < 2 * nmse_tol(768)  # both sides carry fp32 error
    assert nmse(out, TF.linear(torch.from_numpy(x), torch.from_numpy(w)).numpy()) < 2 * nmse_tol(768)


def test_matmul_batch_invariant(rng):
    x = f32(rng, 50, 300)
    w = f32(rng, 70, 300)
    full = K.matmul(x, w)
    for t in (0, 13, 49):
        assert np.array_equal(K.matmul(x[t : t + 1].copy(), w)[0], full[t])


def test_matmul_leading_dims_and_empty(rng):
    x = f32(rng, 2, 3, 16)
    w = f32(rng, 5, 16)
    assert K.matmul(x, w).shape == (2, 3, 5)
    assert K.matmul(np.zeros((0, 16), np.float32), w).shape == (0, 5)


def test_matmul_nan_inf_propagation(rng):
    x = f32(rng, 4, 40)
    w = f32(rng, 6, 40)
    x[1, 3] = np.nan
    x[2, 5] = np.inf
    out = K.matmul(x, w)
    assert np.isnan(out[1]).all()
    assert np.isinf(out[2]).all() or np.isnan(out[2]).any()
    assert np.isfinite(out[[0, 3]]).all()
    ref = x @ w.T
    assert np.array_equal(np.isnan(out), np.isnan(ref))
    assert np.array_equal(np.isposinf(out), np.isposinf(ref))


def test_matmul_errors(rng):
    x = f32(rng, 4, 8)
    w = f32(rng, 3, 8)
    with pytest.raises(TypeError, match="inp"):
        K.matmul(x.astype(np.float64), w)
    with pytest.raises(TypeError, match="weight"):
        K.matmul(x, w.astype(np.float64))
    with pytest.raises(ValueError, match="inp"):
        K.matmul(f32(rng, 4, 9), w)
    with pytest.raises(ValueError, match="C-contiguous"):
        K.matmul(np.asfortranarray(f32(rng, 4, 8)), w)
    with pytest.raises(ValueError, match="bias"):
        K.matmul(x, w, f32(rng, 4))
    with pytest.raises(ValueError, match="scales"):
        K.matmul(x, w.astype(np.int8))
    with pytest.raises(ValueError, match="out"):
        K.matmul(x, w, out=np.empty((4, 4), np.float32))
    with pytest.raises(TypeError, match="inp"):
        K.matmul([[1.0]], w)


def test_kernel_error_and_status_string():
    err = K.KernelError("x", 2)
    assert err.status == 2 and "invalid size" in str(err)
    st = K.lib.ak_matmul(K.ffi.NULL, K.ffi.NULL, K.ffi.NULL, K.ffi.NULL, K.ffi.NULL, 1, 1, 1, 0)
    assert K.ffi.string(K.lib.ak_status_string(st)) == b"null pointer argument"
    with pytest.raises(K.KernelError, match="index out of range"):
        K.embedding(np.array([0, 5]), np.zeros((5, 3), np.float32))


def test_version_check():
    assert K.LIB_VERSION == __version__
    K.check_version("0.1.0", "0.1.0")
    with pytest.raises(K.KernelVersionError):
        K.check_version("0.0.9", "0.1.0")
    assert issubclass(K.KernelVersionError, ImportError)


def test_call_counts(rng):
    K.reset_call_counts()
    x = f32(rng, 2, 4)
    K.matmul(x, f32(rng, 3, 4))
    K.matmul(x, f32(rng, 3, 4))
    K.gelu(x)
    c = K.call_counts()
    assert c["matmul"] == 2 and c["gelu"] == 1 and c["attention"] == 0
    K.reset_call_counts()
    assert sum(K.call_counts().values()) == 0


def test_bf16_conversion():
    x = np.array([1.0, 1.00390625, 1.01171875, -2.5, np.inf, -np.inf, 0.0, 3.0e38], np.float32)
    ref = torch.from_numpy(x).to(torch.bfloat16).to(torch.float32).numpy()  # torch rounds RNE
    assert np.array_equal(K.bf16_to_f32(K.f32_to_bf16(x)), ref)
    assert np.isnan(K.bf16_to_f32(K.f32_to_bf16(np.array([np.nan], np.float32))))[0]


def test_bf16_conversion_at_every_exponent_and_rounding_boundary():
    # every sign/exponent/high-mantissa pattern with the low 16 bits at each rounding case (0, below half, half
    # with an even and odd kept bit, above half, all ones): round-to-nearest-even as torch does it, NaN kept
    hi = np.arange(1 << 16, dtype=np.uint32) << 16
    low = np.array([0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF], np.uint32)
    bits = (hi[:, None] | low[None, :]).ravel()
    x = bits.view(np.float32)
    got = K.bf16_to_f32(K.f32_to_bf16(x))
    nan = np.isnan(x)
    ref = torch.from_numpy(x[~nan]).to(torch.bfloat16).to(torch.float32).numpy()
    assert np.array_equal(got[~nan].view(np.uint32), ref.view(np.uint32))
    assert np.isnan(got[nan]).all() and nan.sum() == 2 * ((1 << 7) - 1) * 6 + 2 * 5


# ------------------------------------------------------------------ elementwise / rows
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (64, 768), (2, 5, 33)])
def test_layernorm(rng, shape):
    x = f32(rng, *shape) * 3 + 1
    C = shape[-1]
    w, b = f32(rng, C), f32(rng, C)
    g = Guarded(shape)
    K.layernorm(x, w, b, 1e-5, out=g.out)
    g.check()
    ref = TF.layer_norm(
        torch.from_numpy(x).double(), (C,), torch.from_numpy(w).double(), torch.from_numpy(b).double(), 1e-5
    ).numpy()
    # statistics in double, then 3 fp32 roundings per element: NMSE ~ few u^2
    assert nmse(g.out, ref) < 64 * U2
    assert np.allclose(K.layernorm(x, eps=1e-6), TF.layer_norm(torch.from_numpy(x), (C,), eps=1e-6).numpy(), atol=1e-5)


@pytest.mark.parametrize("approx", ["none", "tanh"])
@pytest.mark.parametrize("n", [1, 15, 1000, 4099])
def test_gelu(rng, approx, n):
    x = f32(rng, n, scale=3.0)
    g = Guarded((n,))
    K.gelu(x, approx, out=g.out)
    g.check()
    ref = TF.gelu(torch.from_numpy(x).double(), approximate=approx).numpy()
    # tanh form: libm expf (~1 ulp) + 4 roundings -> 64 u^2.  exact form on AVX-512: Chebyshev erfc
    # (rel. err < 1.2e-7) times exp of an argument |arg| <= t^2 + 2 whose rounding (|arg| u) is
    # amplified by exp: relative error <= ~25 u for |x| <= 6, so NMSE <= 2^-38 even for one element.
    tol = 64 * U2 if approx == "tanh" else 2.0**-38
    assert nmse(g.out, ref) < tol
    y = x.copy()
    assert K.gelu(y, approx, out=y) is y and np.array_equal(y, g.out)


def test_gelu_nan_inf():
    x = np.array([np.nan, np.inf, -np.inf, 0.0], np.float32)
    out = K.gelu(x)
    # gelu(-inf) = -inf * 0 = NaN exactly like torch; gelu(+inf) = +inf (torch 2.13 gives NaN there)
    assert np.isnan(out[0]) and out[1] == np.inf and np.isnan(out[2]) and out[3] == 0.0
    assert np.isnan(TF.gelu(torch.tensor([-np.inf]))).all()


@pytest.mark.parametrize("shape", [(1, 1), (4, 7), (3, 16), (5, 17), (8, 512), (2, 3, 33)])
def test_softmax(rng, shape):
    x = f32(rng, *shape, scale=4.0)
    g = Guarded(shape)
    K.softmax(x, out=g.out)
    g.check()
    ref = torch.softmax(torch.from_numpy(x).double(), -1).numpy()
    # exp (~1-2 ulp), length-C sum, one division
    assert nmse(g.out, ref) < nmse_tol(shape[-1] + 16)


def test_softmax_special():
    x = np.array([[0.0, -np.inf, 1.0], [1.0, np.nan, 2.0], [1000.0, 1000.0, -1000.0], [-np.inf] * 3], np.float32)
    out = K.softmax(x)
    ref = torch.softmax(torch.from_numpy(x), -1).numpy()
    assert out[0, 1] == 0.0 and np.allclose(out[0], ref[0])
    assert np.isnan(out[1]).all() and np.isnan(ref[1]).all()
    assert np.allclose(out[2], [0.5, 0.5, 0.0])
    assert np.isnan(out[3]).all() and np.isnan(ref[3]).all()


def test_add(rng):
    a, b = f32(rng, 7, 9), f32(rng, 7, 9)
    g = Guarded((7, 9))
    K.add(a, b, out=g.out)
    g.check()
    assert np.array_equal(g.out, a + b)
    assert K.add(a, b, out=a) is a
    with pytest.raises(ValueError, match="b"):
        K.add(a, f32(rng, 7, 8))


def test_embedding(rng):
    table = f32(rng, 50, 24)
    ids = np.array([3, 0, 49, 3], np.int64)
    g = Guarded((4, 24))
    K.embedding(ids, table, out=g.out)
    g.check()
    assert np.array_equal(g.out, table[ids])
    assert np.array_equal(K.embedding(ids.astype(np.int32), table), table[ids])
    with pytest.raises(TypeError, match="ids"):
        K.embedding(ids.astype(np.float32), table)


def rotary_ref(x, pos, base, interleaved, rot):
    """HF-style fp32 torch reference."""
    t = torch.from_numpy(x)
    inv = 1.0 / (base ** (torch.arange(0, rot, 2, dtype=torch.int64).float() / rot))
    ang = torch.outer(torch.from_numpy(pos).float(), inv)  # (T, rot/2)
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    xr, xp = t[..., :rot], t[..., rot:]
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        o = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).flatten(-2)
    else:
        cos2, sin2 = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
        x1, x2 = xr[..., : rot // 2], xr[..., rot // 2 :]
        o = xr * cos2 + torch.cat([-x2, x1], -1) * sin2
    return torch.cat([o, xp], -1).numpy()


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("T,nh,hd,rot", [(1, 1, 2, 2), (9, 4, 32, 32), (130, 12, 64, 64), (5, 2, 64, 32)])
def test_rotary(rng, interleaved, T, nh, hd, rot):
    x = f32(rng, T, nh, hd)
    pos = np.arange(T, dtype=np.int64) + 7
    g = Guarded((T, nh, hd))
    K.rotary(x, pos, base=10000.0, interleaved=interleaved, rot_dim=rot, out=g.out)
    g.check()
    ref = rotary_ref(x, pos, 10000.0, interleaved, rot)
    # cos/sin of fp32 angles (libm vs torch, ~1 ulp) and 3 roundings per element
    assert nmse(g.out, ref) < 64 * U2
    assert np.array_equal(K.rotary(x, offset=7, interleaved=interleaved, rot_dim=rot), g.out)


def test_mean_pool_and_l2(rng):
    x = f32(rng, 2, 6, 10)
    mask = np.array([[1, 1, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0]], bool)
    g = Guarded((2, 10))
    K.mean_pool(x, mask, out=g.out)
    g.check()
    assert np.allclose(g.out[0], x[0][mask[0]].mean(0), atol=1e-6)
    assert np.array_equal(g.out[1], np.zeros(10, np.float32))  # no token: zeros, like clamp(1e-9)
    assert np.allclose(K.mean_pool(x[0]), x[0].mean(0), atol=1e-6)
    y = f32(rng, 5, 384)
    y[2] = 0
    g2 = Guarded((5, 384))
    K.l2_normalize(y, out=g2.out)
    g2.check()
    ref = TF.normalize(torch.from_numpy(y).double(), dim=-1, eps=1e-12).numpy()
    assert nmse(g2.out, ref) < 16 * U2
    assert np.array_equal(g2.out[2], np.zeros(384, np.float32))


# ------------------------------------------------------------------ attention
def attention_ref(q, k, v, mask, scale, causal):
    """torch eager reference in float64: q k^T * scale, masked softmax, @ v."""
    T, nh, hd = q.shape
    qt, kt, vt = (torch.from_numpy(a).double().permute(1, 0, 2) for a in (q, k, v))
    s = (qt @ kt.transpose(1, 2)) * scale
    vis = torch.ones(T, T, dtype=torch.bool)
    if mask is not None:
        vis = vis & torch.from_numpy(mask.astype(bool))[None, :]
    if causal:
        vis = vis & torch.ones(T, T, dtype=torch.bool).tril()
    s = s.masked_fill(~vis, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)  # rows without a visible key -> zeros (kernel convention)
    return (p @ vt).permute(1, 0, 2).reshape(T, nh * hd).numpy()


@pytest.mark.parametrize("T,nh,hd", [(1, 1, 8), (7, 4, 32), (65, 4, 32), (200, 12, 64), (512, 2, 64)])
@pytest.mark.parametrize("causal", [False, True])
def test_attention(rng, T, nh, hd, causal):
    q, k, v = f32(rng, T, nh, hd), f32(rng, T, nh, hd), f32(rng, T, nh, hd)
    mask = rng.random(T) > 0.3
    mask[0] = True
    g = Guarded((T, nh * hd))
    K.attention(q, k, v, mask, scale=1 / math.sqrt(hd), causal=causal, out=g.out)
    g.check()
    ref = attention_ref(q, k, v, mask, 1 / math.sqrt(hd), causal)
    # scores: length-hd chain (error amplified by |s| ~ 1-3 through exp); softmax: exp + length-T sum;
    # context: length-T chain.  Budget: nmse_tol(4*hd + 2*T + 32).
    assert nmse(g.out, ref) < nmse_tol(4 * hd + 2 * T + 32)
    if T <= 65:
        assert nmse(K.attention_naive(q, k, v, mask, causal=causal), ref) < nmse_tol(4 * hd + 2 * T + 32)


def test_attention_all_masked_and_nan(rng):
    q, k, v = f32(rng, 5, 2, 8), f32(rng, 5, 2, 8), f32(rng, 5, 2, 8)
    out = K.attention(q, k, v, np.zeros(5, bool))
    assert np.array_equal(out, np.zeros((5, 16), np.float32))
    q[2, 0, 3] = np.nan
    out = K.attention(q, k, v)
    assert np.isnan(out[2, :8]).all() and np.isfinite(np.delete(out, 2, 0)).all() and np.isfinite(out[2, 8:]).all()


def test_attention_errors(rng):
    q = f32(rng, 5, 2, 8)
    with pytest.raises(ValueError, match="k"):
        K.attention(q, f32(rng, 5, 2, 4), q)
    with pytest.raises(ValueError, match="key_mask"):
        K.attention(q, q, q, np.ones(4, bool))
    with pytest.raises(TypeError, match="v"):
        K.attention(q, q, q.astype(np.float16))


PADDED = [(1, 4, 2, 8), (7, 9, 4, 32), (37, 64, 4, 32), (65, 130, 2, 64), (200, 203, 12, 64)]


@pytest.mark.parametrize("L,S,nh,hd", PADDED)
@pytest.mark.parametrize("causal", [False, True])
def test_attention_right_padded_equals_unpadded(rng, L, S, nh, hd, causal):
    """A sequence of L real tokens padded on the right to S with a key-padding mask: the real query rows are
    bitwise the unpadded result (keys past the last visible one are never read, so no sum changes order or
    length, on every ISA path), whatever the pad rows hold (NaN, huge values), and within the derived
    float64 budget. Holes inside the real span (masked real keys) keep their ordinary meaning."""
    q, k, v = f32(rng, S, nh, hd), f32(rng, S, nh, hd), f32(rng, S, nh, hd)
    for a, fill in ((q, np.nan), (k, 1e30), (v, np.nan)):
        a[L:] = fill  # pad rows: a NaN or a huge pad key would poison any sum that read it
    mask = np.zeros(S, bool)
    mask[:L] = rng.random(L) > 0.2
    mask[0] = True
    scale = 1 / math.sqrt(hd)
    g = Guarded((S, nh * hd))
    K.attention(q, k, v, mask, scale=scale, causal=causal, out=g.out)
    g.check()
    single = K.attention(q[:L].copy(), k[:L].copy(), v[:L].copy(), mask[:L].copy(), scale=scale, causal=causal)
    assert np.array_equal(g.out[:L], single)
    assert np.isfinite(g.out[:L]).all()
    ref = attention_ref(q[:L], k[:L], v[:L], mask[:L], scale, causal)
    assert nmse(g.out[:L], ref) < nmse_tol(4 * hd + 2 * L + 32)
    if S <= 130:  # the naive reference skips masked keys too: same real rows within the budget, no NaN
        naive = K.attention_naive(q, k, v, mask, scale=scale, causal=causal)
        assert nmse(naive[:L], ref) < nmse_tol(4 * hd + 2 * L + 32)
