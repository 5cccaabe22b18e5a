"""The quantisation searcher (actdiff.compare.search_quant): uniformly quantised operands found from the data.

Each target is the tiny model's op run by refops on quantised operands (the scheme planted), rounded to fp32 as
an engine hands it over; the right candidate then leaves ~3e-8 of fp32 rounding, well inside BUDGET, and every
wrong scheme leaves an error of the order of the quantisation step (~1e-2 relative at 8 bits). The negative
cases are errors of the same size that are not quantisation: the searcher must not claim them.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from helpers import ensure_tiny_model
from test_hypotheses import TINY, Model
from test_search_fit import PROMPTS

from actdiff.compare.findings import Deadline, explains
from actdiff.compare.refops import quantise, quantise_int, round_to, run_op, saturated_pairs
from actdiff.compare.search import make_context, search_node, searchers
from actdiff.compare.search_quant import quantisation

BUDGET = 1e-5  # ~300x the fp32 rounding of the targets, ~1e-3 of the 8-bit quantisation error
QKV, EXPERT_FC1 = "encoder.layers.0.attn.qkv", "encoder.layers.1.mlp.experts.fc1"


def _scheme(sym: bool, gran: str, rng="dynamic", **kw) -> dict:
    return {"bits": 8, "symmetric": sym, "granularity": gran, "range": rng, **kw}


@pytest.fixture(scope="module")
def tiny() -> Model:
    ensure_tiny_model()
    return Model(TINY, PROMPTS)


def _targets(m: Model, node: str, params: dict, noise: float = 0.0) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    out = []
    for v in m.vals:
        t = run_op(m.graph, node, v, m.weights, params)
        out.append((t + noise * float(np.sqrt(np.mean(t * t))) * rng.standard_normal(t.shape)).astype(np.float32))
    return out


def _quant_findings(m: Model, node: str, targets: list[np.ndarray]):
    ctx = make_context(m.graph, node, m.vals, targets, m.weights, BUDGET, Deadline(600))
    t0 = time.monotonic()
    found = sorted(quantisation(ctx), key=lambda f: f.error)
    return ctx, found, time.monotonic() - t0


def _static_range(m: Model, node: str) -> list[float]:
    """A calibrated range as another sample would give it: wider than these prompts' values (1.3x, 1.2x)."""
    x = np.concatenate([np.ravel(v[m.graph[node].inputs[0]]) for v in m.vals])
    return [1.3 * float(x.min()), 1.2 * float(x.max())]


CASES = {
    "dynamic-input-per-tensor+weight-per-channel": (QKV, lambda m: {"input.0": _scheme(False, "tensor"),
                                                                    "weight.0": _scheme(True, "row")}),
    "input-per-token+weight-per-tensor": (QKV, lambda m: {"input.0": _scheme(True, "row"),
                                                          "weight.0": _scheme(True, "tensor")}),
    "expert-weights-per-expert": (EXPERT_FC1, lambda m: {"input.0": _scheme(False, "tensor"),
                                                         "weight.0": _scheme(True, "block", blocks=8)}),
    "embedding-table": ("embeddings", lambda m: {"weight.0": _scheme(False, "tensor")}),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_dynamic_schemes_are_found(tiny, case):
    node, make = CASES[case]
    planted = make(tiny)
    ctx, found, _ = _quant_findings(tiny, node, _targets(tiny, node, {"round_at": planted}))
    assert found, "no quantisation candidate improved the error"
    best = found[0]
    assert explains(best.error, ctx.err0, BUDGET) and best.error < BUDGET
    assert best.params["round_at"] == planted, best.says
    json.dumps(best.params)  # JSON-safe


def test_static_range_is_fitted(tiny):
    """A fixed input range (calibrated elsewhere) with a per-channel weight: the step is fitted to 1e-6 relative
    (what leaves no rounding flip in the sample's ~4,000 values of |q| <= 255) and the residual is within the
    budget; the bounds themselves are identified only where values clip (none do here), so only the step is
    asserted, and the sentence says so."""
    lo, hi = _static_range(tiny, QKV)
    planted = {"input.0": _scheme(False, "tensor", [lo, hi]), "weight.0": _scheme(True, "row")}
    ctx, found, _ = _quant_findings(tiny, QKV, _targets(tiny, QKV, {"round_at": planted}))
    best = found[0]
    assert best.error < BUDGET, best.says
    fitted = best.params["round_at"]["input.0"]
    assert fitted["range"] != "dynamic" and best.params["round_at"]["weight.0"] == planted["weight.0"]
    step = (fitted["range"][1] - fitted["range"][0]) / (254.0 if fitted["symmetric"] else 255.0)
    assert step == pytest.approx((hi - lo) / 255.0, rel=1e-6)
    assert "only the step is identified" in best.says


def test_static_input_and_product_are_fitted_together(tiny):
    """ORT's int8-static MatMul: the input quantised over a fixed range, the weight per output channel, and the
    product (before the bias) quantised again over its own fixed range. Both ranges are calibrated on other
    prompts, narrower than these (values clip at both ends, so the zero points are identified too), and the
    two quantisation errors are of the same size (asserted): each step's basin is blurred by the other's
    error, and the weight alone moves the error by less than SCREEN_PASS. Both steps are recovered to 2e-5
    relative: a step off by d flips about d * sum|q - zp| roundings of the values it quantises (7,808 values at
    mean |q - zp| ~ 20 here: the first flip expected near d = 6e-6), one flip of the product alone leaves 4.5e-4,
    so a residual within BUDGET means no flip; 2e-5 is 3x that expected distance (measured: 1e-7 and 2e-8)."""
    node = "encoder.layers.0.attn.out_proj"
    x = np.concatenate([np.ravel(v[tiny.graph[node].inputs[0]]) for v in tiny.vals])
    bias = np.asarray(tiny.weights[tiny.graph[node].weights[1]])
    product = np.concatenate([np.ravel(run_op(tiny.graph, node, v, tiny.weights, {}) - bias) for v in tiny.vals])
    calibrated_x = [0.8 * float(x.min()), 0.84 * float(x.max())]
    calibrated_product = [0.88 * float(product.min()), 0.8 * float(product.max())]
    planted = {"input.0": _scheme(False, "tensor", calibrated_x), "weight.0": _scheme(True, "row"),
               "product": _scheme(False, "tensor", calibrated_product)}  # fmt: skip
    plain = _targets(tiny, node, {})
    errors = [_error(_targets(tiny, node, {"round_at": {k: planted[k]}}), plain) for k in ("input.0", "product")]
    assert 0.5 < errors[0] / errors[1] < 2, errors  # comparable: neither step's error dwarfs the other's
    ctx, found, _ = _quant_findings(tiny, node, _targets(tiny, node, {"round_at": planted}))
    assert found and found[0].error < BUDGET, found[0].says if found else "nothing found"
    fitted = found[0].params["round_at"]
    assert fitted["weight.0"] == planted["weight.0"]
    for key in ("input.0", "product"):
        want, got = _step_zp(planted[key]), _step_zp(fitted[key])
        assert got[0] == pytest.approx(want[0], rel=2e-5) and got[1] == want[1], (key, want, got)


def _error(targets: list[np.ndarray], plain: list[np.ndarray]) -> float:
    num = sum(float(np.sum((t.astype(np.float64) - p) ** 2)) for t, p in zip(targets, plain, strict=True))
    return float(np.sqrt(num / sum(float(np.sum(np.square(p, dtype=np.float64))) for p in plain)))


def _step_zp(spec: dict) -> tuple[float, int]:
    """An asymmetric 8-bit range's step and zero point (as refops.quantise_int derives them)."""
    lo, hi = min(spec["range"][0], 0.0), max(spec["range"][1], 0.0)
    step = (hi - lo) / 255.0
    return step, int(np.rint(np.float32(-lo) / np.float32(step)))


def test_output_quantisation_on_top(tiny):
    planted = {"round_at": {"input.0": _scheme(False, "tensor"), "weight.0": _scheme(True, "row")},
               "output_precision": _scheme(True, "row")}  # fmt: skip
    ctx, found, _ = _quant_findings(tiny, QKV, _targets(tiny, QKV, planted))
    assert found[0].error < BUDGET and found[0].params == planted, found[0].says


@pytest.mark.parametrize("what", ["weights-scaled-1.01", "noise-1e-2"])
def test_non_quantisation_errors_are_not_claimed(tiny, what):
    """An error of the quantisation's size that is not quantisation: every candidate leaves most of it."""
    if what == "weights-scaled-1.01":
        targets = _targets(tiny, QKV, {"output_scale": 1.01, "bias_scale": 1 / 1.01})
    else:
        targets = _targets(tiny, QKV, {}, noise=1e-2)
    ctx, found, seconds = _quant_findings(tiny, QKV, targets)
    assert not any(explains(f.error, ctx.err0, BUDGET) for f in found), [f.says for f in found]
    assert all(f.error > 0.5 * ctx.err0 for f in found)
    assert seconds < 60


def test_runs_after_the_cheap_searchers_and_keeps_their_findings(tiny):
    """Registered after search_fit: a bug search_fit explains is reported as before, the quantisation searcher
    never runs there (search_node stops at the first explaining searcher)."""
    names = [f.__module__.rsplit(".", 1)[-1] for f in searchers()]
    assert names.index("search_quant") == max(i for i, n in enumerate(names) if n == "search_fit") + 1
    targets = _targets(tiny, QKV, {"bias_scale": 0.5})
    res = search_node(tiny.graph, QKV, tiny.vals, targets, tiny.weights, BUDGET, Deadline(600))
    assert res.explained_by is not None and res.explained_by.name == "MATMUL.bias_scale"


def test_quantise_matches_round_to_int8_and_onnx_rounding():
    """The existing int8 precision is the symmetric per-row scheme (up to the scale held in float32, as ONNX's
    y_scale: 6e-8 relative; these 60 values have no quotient within that of a rounding tie); rounding is half
    to even (np.rint), as ONNX QuantizeLinear specifies: 0.5 and 2.5 steps round to 0 and 2."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 10))
    np.testing.assert_allclose(quantise(w, _scheme(True, "row")), round_to(w, "int8", axis=-1), rtol=1e-7)
    x = np.array([[0.5, 2.5, -0.5, 127.0]])
    assert quantise(x, _scheme(True, "tensor")).tolist() == [[0.0, 2.0, 0.0, 127.0]]
    with pytest.raises(ValueError, match="static range"):
        quantise(w, _scheme(True, "row", [-1.0, 1.0]))


def test_saturating_integer_kernel_is_found(tiny):
    """u8 x s8 products summed two at a time into a saturating int16 (before 32-bit accumulation): the planted
    kernel is found on top of the operands' schemes, and it does change the values (some pairs overflow: a
    u8 activation near 255 times an s8 weight near 127, twice, exceeds 32,767)."""
    planted = {"round_at": {"input.0": _scheme(False, "tensor"), "weight.0": _scheme(True, "row")},
               "int_pairs": "saturate16"}  # fmt: skip
    targets = _targets(tiny, QKV, planted)
    exact = _targets(tiny, QKV, {"round_at": planted["round_at"]})
    assert any(not np.array_equal(t, e) for t, e in zip(targets, exact, strict=True))
    ctx, found, _ = _quant_findings(tiny, QKV, targets)
    assert found[0].error < BUDGET and found[0].params == planted, found[0].says
    assert "saturating 16-bit" in found[0].says


def _saturated_pairs_naive(qa, qw) -> np.ndarray:
    """The kernel as written: pairs of consecutive k summed in Python integers and clipped to int16."""
    lost = np.zeros((len(qa), len(qw)))
    for t, a in enumerate(qa.astype(int).tolist()):
        for n, w in enumerate(qw.astype(int).tolist()):
            pairs = (a[k] * w[k] + a[k + 1] * w[k + 1] for k in range(0, len(a) - 1, 2))
            lost[t, n] = sum(p - min(max(p, -32768), 32767) for p in pairs)
    return lost


@pytest.mark.parametrize("bits,k", [(8, 64), (8, 33), (12, 20), (16, 17)])
def test_saturated_pairs_is_the_naive_integer_loop(bits, k):
    """Exactly (equal floats) the loop's loss, dequantised: 8-bit operands (the int32 path), wider ones (int64:
    a pair of 16-bit products passes 2^31), an odd k (the last k has no pair), rows across the 16-row blocks."""
    rng = np.random.default_rng(bits * 100 + k)
    a, w = rng.uniform(0, 3, (37, k)), rng.uniform(-1, 1, (11, k))  # u8 and s8 near their ends: pairs overflow
    sa, sw = {"bits": bits, "symmetric": False, "granularity": "tensor"}, {"bits": bits, "granularity": "row"}
    (qa, sca, _), (qw, scw, _) = quantise_int(a, sa), quantise_int(w, sw)
    expect = _saturated_pairs_naive(qa, qw) * np.reshape(sca, (-1, 1))[0] * np.reshape(scw, (1, -1))
    got = saturated_pairs(a, sa, w, sw)
    assert 0.1 * got.size < np.count_nonzero(got) <= got.size  # pairs overflow in most (t, n), not all at 8 bits
    assert bits > 8 or np.count_nonzero(got) < got.size
    np.testing.assert_array_equal(got, expect)


def test_divergence_beyond_quantisations_reach_caps_the_static_fits(tiny):
    """search_quant._within_reach: a divergence far larger than what 8-bit grids up to REACH x coarser than the
    values' own can cause (here the qkv output from weights scaled by 1.5: err0 ~ 0.3, against ~1e-2 for every
    value quantised per tensor) is out of reach, and the static fits get OUT_OF_REACH_SHARE of the time left (an
    expert op's took 20-40 s, and a shard's search deadline then left permuted experts unexplained); nothing is
    claimed. A quantised op is within reach (the positive tests above fit with the whole deadline)."""
    from actdiff.compare.search_fit import _prompt_subset
    from actdiff.compare.search_quant import _operands, _within_reach

    far = _targets(tiny, QKV, {"output_scale": 1.5, "bias_scale": 1 / 1.5})
    ctx = make_context(tiny.graph, QKV, tiny.vals, far, tiny.weights, BUDGET, Deadline(600))
    assert ctx.err0 > 0.2 and not _within_reach(ctx, _prompt_subset(ctx), _operands(ctx))
    assert not any(explains(f.error, ctx.err0, BUDGET) for f in quantisation(ctx))
    assert ctx.deadline.seconds == 600  # the cap is lifted once the fits are done
    lo, hi = _static_range(tiny, QKV)
    planted = {"input.0": _scheme(False, "tensor", [lo, hi]), "weight.0": _scheme(True, "row")}
    near = _targets(tiny, QKV, {"round_at": planted})
    ctx = make_context(tiny.graph, QKV, tiny.vals, near, tiny.weights, BUDGET, Deadline(600))
    assert _within_reach(ctx, _prompt_subset(ctx), _operands(ctx))


def test_deadline_cap_applies_within_its_block_only():
    d = Deadline(100)
    with d.capped(0.0):
        assert d.expired()
    assert not d.expired() and d.seconds == 100


def test_float32_grid_finds_the_float64_grids_least(tiny):
    """search_quant._Scorer.grid with ``coarse`` (search.coarse_scores): a static step's grid scored with float32
    products, the points near the least scored again in float64, gives the float64 grid's least point and
    residual exactly, counts each candidate once, and every other point's float32 residual lies within
    COARSE_MARGIN / 2 of the measured float32 rounding from its float64 one (the margin's premise; measured
    here: 0.05x). Where the product is quantised after the fitted input (a rounding a float32 product could
    flip), the grid stays float64."""
    from actdiff.compare.search import COARSE_MARGIN, float32_rounding
    from actdiff.compare.search_quant import _coarse_grid, _operands, _result_steps, _Scorer, _seed
    from actdiff.compare.search_quant import _static_range as static
    from actdiff.compare.search_quant import _with as with_

    lo, hi = _static_range(tiny, QKV)
    planted = {"input.0": _scheme(False, "tensor", [lo, hi]), "weight.0": _scheme(True, "row")}
    targets = _targets(tiny, QKV, {"round_at": planted})
    runs = []
    for coarse in (False, True):
        ctx = make_context(tiny.graph, QKV, tiny.vals, targets, tiny.weights, BUDGET, Deadline(600))
        scorer, operands = _Scorer(ctx), _operands(ctx)
        i = [o.key for o in operands].index("input.0")
        base = tuple(planted["weight.0"] if o.key == "weight.0" else None for o in operands)
        spec = _scheme(False, "tensor")
        s0, zp0 = _seed(ctx, operands[i], spec)
        choices = [with_(base, i, static(spec, s0 * 2.0**u, zp0)) for u in np.arange(-64, 65) / 64]
        assert _coarse_grid(ctx, operands, base, i)
        runs.append((scorer.grid(operands, choices, coarse), ctx.tried, scorer))
    (v64, tried64, _), (v32, tried32, scorer32) = runs
    k = int(np.argmin(v64))
    assert int(np.argmin(v32)) == k and v32[k] == v64[k] and tried32 == tried64
    delta = float32_rounding(scorer32.sub)
    assert 0 < delta < 1e-5
    assert max(abs(a - b) for a, b in zip(v32, v64, strict=True)) <= COARSE_MARGIN / 2 * delta
    steps = [*operands, *_result_steps(ctx)]
    product_rounded = with_((*base, *(None,) * (len(steps) - len(base))), [o.key for o in steps].index("product"),
                            _scheme(False, "tensor"))  # fmt: skip
    assert not _coarse_grid(ctx, steps, product_rounded, i)
