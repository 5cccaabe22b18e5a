"""The joint rounding-point search (actdiff.compare.search_fit.rounding_points): an op computed with SEVERAL of its
values stored in float16 (operands, weights, intermediates, constants, output), as a float16 model's kernels do, is
found and named from the data; an error of the same size that is not rounding is not claimed.

Each planted kernel is a refops parameter set run on the reference model's own inputs; the target is that output
rounded to fp32 (what an engine hands over). Tolerances: the right set leaves only the target's fp32 rounding,
at most 2^-24 (6.0e-8) relative per element, so its relative L2 is below 6.0e-8 < FP32_LEFT; a wrong set leaves
float16-sized differences (2^-11 relative on the elements it rounds differently, ~1e-5 and more over a tensor).
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import ensure_tiny_model
from test_hypotheses import TINY, Model
from test_search_fit import _planted_targets

from actdiff.compare.findings import Deadline, explains
from actdiff.compare.refops import run_op
from actdiff.compare.search import make_context, search_node
from actdiff.compare.search_fit import rounding_points

BUDGET = 1e-5  # fp32-sized, as test_search_fit: float16 rounding (~3e-4) is 30x over it
FP32_LEFT = 1e-7  # see the module docstring: the target's own fp32 rounding is below 2^-24 = 6.0e-8
L0 = "encoder.layers.0."
MOE = "encoder.layers.1.mlp."
_rng = np.random.default_rng(3)
PROMPTS = [[0, 1037, 2003, 1037, 3231, 2], [0, *_rng.integers(5, 4000, size=30).tolist(), 2]]


def _fp16(*points: str, output: bool = True) -> dict:
    p: dict = {"round_at": dict.fromkeys(points, "fp16")}
    if output:
        p["output_precision"] = "fp16"
    return p


# (node, planted parameters): kernels of a float16 model, each rounding at several points and none alone
CASES = [
    # a MatMul with float16 operands, weights and output, accumulated wider (no intermediate but the product)
    (L0 + "attn.qkv", _fp16("input.0", "weight.0", "weight.1", "product")),
    # attention: float16 dot products, divided by sqrt(head_dim) stored in float16, float16 scores and probs
    (L0 + "attn.context", _fp16("dots", "scale_divisor", "scores", "probs")),
    # the erf GELU as x / fp16(sqrt(2)), each intermediate stored
    (MOE + "experts.act", _fp16("divisor", "inner", "fn", "cdf")),
    # rotary embedding: fp16 inverse frequencies, angles, cos/sin and products
    (L0 + "attn.q_rot", _fp16("inv_freq", "angles", "cos_sin", "products")),
    # a LayerNorm computed in float32 on fp32 values with float16 gamma and beta (no output rounding)
    (L0 + "norm1", _fp16("weight.0", "weight.1", output=False)),
]
IDS = [f"p{i + 1}" for i in range(len(CASES))]


@pytest.fixture(scope="module")
def tiny() -> Model:
    ensure_tiny_model()
    return Model(TINY, PROMPTS)


def _rounded_set(params: dict) -> set[str]:
    out = set(params.get("round_at", {}))
    return out | ({"output"} if params.get("output_precision") == "fp16" else set())


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fp16_kernel_is_found_and_named(tiny, case):
    node, planted = case
    targets = _planted_targets(tiny, node, planted)
    res = search_node(tiny.graph, node, tiny.vals, targets, tiny.weights, BUDGET, Deadline(600))
    assert res.baseline_error > 10 * BUDGET  # float16 rounding is far over the fp32-sized budget
    best = res.explained_by
    assert best is not None, [(f.name, f.error) for f in res.findings[:5]]
    assert best.kind == "precision" and "round_points" in best.name
    assert _rounded_set(best.params) == _rounded_set(planted), best.says
    assert best.error < FP32_LEFT
    assert "rounded to fp16" in best.says


def test_wider_accumulation_is_said(tiny):
    """No intermediate rounded: the sentence says the arithmetic between the rounded values is wider."""
    node, planted = CASES[-1]
    ctx = make_context(tiny.graph, node, tiny.vals, _planted_targets(tiny, node, planted), tiny.weights, BUDGET,
                       Deadline(600))  # fmt: skip
    (f,) = list(rounding_points(ctx, "fp16"))
    assert "wider format than fp16" in f.says and f.error < FP32_LEFT


@pytest.mark.parametrize("node", [L0 + "attn.qkv", L0 + "attn.context", MOE + "experts.act", L0 + "norm1"])
def test_error_of_fp16_size_that_is_not_rounding_is_not_claimed(tiny, node):
    """Random noise of float16's size (3e-4 relative, 30x the budget) and a non-precision change (a LayerNorm eps
    of 1e-3, a GELU in the tanh form, an attention scale of 1/33, a bias 5% too large): no rounding set explains
    either, since no set of roundings reproduces a perturbation the op's values do not carry."""
    rng = np.random.default_rng(11)
    spec = [run_op(tiny.graph, node, v, tiny.weights, {}) for v in tiny.vals]
    rms = np.sqrt(sum(float(np.sum(s * s)) for s in spec) / sum(s.size for s in spec))
    noisy = [(s + 3e-4 * rms * rng.standard_normal(s.shape)).astype(np.float32) for s in spec]
    other = {"LAYERNORM": {"eps": 1e-3}, "GELU": {"form": "tanh"}, "ATTENTION": {"scale": 1.0 / 33},
             "MATMUL": {"bias_scale": 1.05}}[tiny.graph[node].op]  # fmt: skip
    for targets in (noisy, _planted_targets(tiny, node, other)):
        ctx = make_context(tiny.graph, node, tiny.vals, targets, tiny.weights, BUDGET, Deadline(600))
        assert ctx.err0 > 10 * BUDGET
        for f in (*rounding_points(ctx, "fp16"), *rounding_points(ctx, "bf16")):
            assert not explains(f.error, ctx.err0, BUDGET), f.says


def test_result_computed_in_fp32_before_fp16_is_found(tiny):
    """A residual add computed in float32 and stored in float16 (out = fp16(fp32(a + b))): the double rounding
    differs from fp16(a + b) exactly where a + b lies within half a float32 ulp of a float16 tie. Inputs built so
    that every sum does: a float32 in [1, 2) (multiples of 2^-23, not float16 values), b = tie - 2^-26 - a for a
    float16 tie (a multiple of 2^-11) near a + 0.01, so |b| < 2^-5 is a multiple of 2^-26 with at most 21 bits and
    exactly float32: the float64 sum rounds down, the float32 one lands on the tie and rounds to even, so about half
    the values differ by one float16 ulp (and rounding an input to float16 moves the sum off the tie instead); the
    search must name the float32 arithmetic."""
    node = L0 + "resid_attn"
    names = tiny.graph[node].inputs
    rng = np.random.default_rng(5)
    inputs, targets = [], []
    for v in tiny.vals:
        shape = np.shape(v[names[0]])
        a = rng.uniform(1.0, 1.9, size=shape).astype(np.float32).astype(np.float64)
        tie = np.floor((a + rng.uniform(0.002, 0.015, size=shape)) * 1024) / 1024 + 2.0**-11
        b = tie - 2.0**-26 - a
        assert np.all(b.astype(np.float32) == b) and np.all(np.abs(b) < 2.0**-5)
        x = {names[0]: a.astype(np.float32), names[1]: b.astype(np.float32)}
        inputs.append(x)
        targets.append(np.asarray(run_op(tiny.graph, node, x, tiny.weights, {"arithmetic": "fp32",
                                                                             "output_precision": "fp16"})))  # fmt: skip
    ctx = make_context(tiny.graph, node, inputs, targets, tiny.weights, BUDGET, Deadline(600))
    assert ctx.err0 > 10 * BUDGET
    (f,) = list(rounding_points(ctx, "fp16"))
    assert f.params == {"round_at": {}, "output_precision": "fp16", "arithmetic": "fp32"}, f.says
    assert f.error < FP32_LEFT and "double rounding" in f.says
