"""The spec ops' softmax and attention write their passes into arrays they allocate (actdiff.compare.refops
``_softmax``, ``_attention``): bitwise the values of the plain formula with a fresh array per pass, for every
mode, every rounding the catalogue asks of them, and rows that are all -inf (a causal mask) or hold NaN."""

import numpy as np
import pytest

from actdiff.compare import refops


def plain_softmax(s, mode, axis, p):
    """The formula the op had before it wrote in place: a new array per pass."""
    e = np.exp(s - s.max(axis=axis, keepdims=True)) if mode == "stable" else np.exp(s)
    e = refops._r(p, "exp", e)
    with np.errstate(invalid="ignore", divide="ignore"):
        return e / refops._r(p, "sum", e.sum(axis=axis, keepdims=True))


def scores(seed: int, T: int = 37, nh: int = 4) -> np.ndarray:
    s = np.random.default_rng(seed).standard_normal((nh, T, T)) * 4.0
    s[0, 3] = -np.inf  # a row every key of which is masked: 0/0 -> NaN in both
    s[1, 5, 7] = np.nan
    s[2] = np.where(np.tril(np.ones((T, T), dtype=bool)), s[2], -np.inf)  # causal
    return s


ROUNDINGS = [{}, {"round_at": {"exp": "fp32"}}, {"round_at": {"exp": "bf16", "sum": "fp16"}}]


@pytest.mark.parametrize("mode", ["stable", "naive"])
@pytest.mark.parametrize("axis", [-1, 1, 0])
@pytest.mark.parametrize("p", ROUNDINGS)
def test_softmax_is_bitwise_the_plain_formula(mode, axis, p):
    s = scores(1)
    with np.errstate(over="ignore", invalid="ignore"):
        want = plain_softmax(s, mode, axis, p)
        got = refops._softmax(s, mode, axis, p)
    assert got.dtype == want.dtype == np.float64
    np.testing.assert_array_equal(got, want)  # NaN where NaN, and every other value to the bit
    assert np.array_equal(s, scores(1), equal_nan=True)  # the input is not written


def plain_attention(q, k, v, p):
    T, nh, hd = q.shape
    scale = refops.attention_scale(p["scale"], hd)
    dots = refops._r(p, "dots", q.transpose(1, 0, 2) @ k.transpose(1, 2, 0))
    s = refops._r(p, "scores", dots * refops._r(p, "scale", scale))
    if p["mask"] == "causal":
        s = np.where(np.tril(np.ones((T, T), dtype=bool))[None], s, -np.inf)
    probs = refops._r(p, "probs", plain_softmax(s, p["softmax"], -1, {"round_at": {"exp": p["round_at"].get("exp")}}))
    return (probs @ v.transpose(1, 0, 2)).transpose(1, 0, 2).reshape(T, nh * hd)


@pytest.mark.parametrize("mask", ["bidirectional", "causal"])
@pytest.mark.parametrize("round_at", [{}, {"dots": "fp32", "scale": "fp16"}, {"scores": "bf16", "probs": "fp16"}])
def test_attention_is_bitwise_the_plain_formula(mask, round_at):
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((29, 3, 16)) for _ in range(3))
    p = {"scale": "inv_sqrt_head_dim", "mask": mask, "softmax": "stable", "output_layout": "heads_outer",
         "round_at": round_at}  # fmt: skip
    ins = [a.copy() for a in (q, k, v)]
    got = refops._attention(None, None, ins, {}, p)
    np.testing.assert_array_equal(got, plain_attention(q, k, v, p))
    for a, b in zip(ins, (q, k, v), strict=True):
        np.testing.assert_array_equal(a, b)  # the inputs are not written
