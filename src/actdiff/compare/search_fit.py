"""Searchers that generate candidate explanations from the op's own definition (actdiff.compare.search).

Nothing here lists known bugs: every candidate is a parameter set of the parametric op
(:mod:`actdiff.compare.refops`) derived from what the op computes, so the same code serves any model the
graph supports. Registered cheap-first:

1. ``term_scales``: each additive term of the op (ADD operands, biases, LayerNorm gamma/beta, embedding
   tables) and the whole output, scaled by a coefficient fitted in closed form (the output is linear in
   them): "residual branch scaled by 0.5".
2. ``structure``: every axis the op could reduce over (softmax over tokens instead of experts, LayerNorm over
   tokens, attention softmax over queries), every role permutation of same-shaped operands (q/k/v, gamma/beta)
   and which third of a fused projection a split reads.
3. ``precision``: each named intermediate value of the op, each input and each weight rounded to fp16 or
   bf16, then the whole output and the whole kernel; then a SET of them rounded jointly, with the format the
   result is computed in (``rounding_points``: a float16 model's kernels round at several points at once).
4. ``continuous``: the op's continuous constants fitted with scipy.optimize: bounded scalar minimisation in
   log space seeded by a coarse grid (eps, attention scale, softmax temperature, GELU coefficients, the
   variance denominator) and a grid then Nelder-Mead in 2-D (rotary base with position offset, the tanh
   GELU's two coefficients).

A candidate is reported only if it at least halves the spec's own error (:data:`IMPROVES`) and differs from
the spec; whether it *explains* is judged by the caller with :func:`actdiff.compare.findings.explains`.
Cost is bounded: the optimisers run on about MAX_FIT_ROWS rows of the sample (evenly spaced rows of row-wise
ops, whole prompts otherwise) and discrete candidates are screened on whole prompts first; every reported
residual is measured on the whole sample.
Fitted values are snapped to a simpler nearby value (an integer, one or two significant figures, 1/n,
1/sqrt(n)) only if the snapped value's residual stays within the budget (or the fit's own residual).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize, minimize_scalar

from .findings import Finding, explains
from .refops import AXES, PATH_STEPS, ROUND_STEPS, TERM_SCALES, attention_scale, round_to, run_op, shared_products
from .search import SearchContext, make_context, register

IMPROVES = 0.5  # a candidate is reported only if its residual is below this fraction of the spec's error
SAME_AS_SPEC = 1e-3  # a fitted value within this relative distance of the spec value is the spec value
PRECISIONS = ("fp16", "bf16")  # reduced formats tried at intermediate steps (fp32 rounding is budget-sized)
# formats a kernel may compute a result in before storing it in a narrower one (rounding_points): alone their
# rounding is budget-sized, but before a second rounding it moves the near-ties of the narrow format
ARITHMETIC_FORMATS = ("fp32",)
MAX_STRUCTURE_COMBOS = 8  # an op's structural choices are combined when that makes at most this many candidates
ROW_WISE = ("LAYERNORM", "GELU", "SOFTMAX")  # ops whose rows are independent (at the spec's axis)
MAX_FIT_ROWS = 256  # rows of the sample the continuous fits run on (see _fit_context)
ROPE_FIT_POSITIONS = 32  # rotary fits run on each prompt's first positions (see _fit_context)
SCREEN_PASS = 0.9  # a discrete candidate goes on to the whole sample if it reduces the error on a subset


# ------------------------------------------------------------------------------------------- helpers
def _searchable(ctx: SearchContext) -> bool:
    """Float nodes with a finite, non-zero divergence to explain."""
    return ctx.node.kind != "index" and math.isfinite(ctx.err0) and ctx.err0 > 0


def _evaluate(ctx: SearchContext, params: dict) -> float:
    with np.errstate(all="ignore"):  # fp16 overflow in a candidate is a bad candidate, not an error
        return ctx.evaluate(params)


def _improves(ctx: SearchContext, err: float) -> bool:
    return math.isfinite(err) and err < IMPROVES * ctx.err0


def fmt(v: float) -> str:
    """A number for a sentence: 4 significant figures, thousands separated ("4,980", "0.003", "1.5e-12")."""
    if isinstance(v, (int, np.integer)) or (abs(v) < 1e15 and float(v).is_integer()):
        return f"{int(v):,}"
    a = abs(v)
    if 1e3 <= a < 1e9:
        return f"{float(f'{v:.4g}'):,.{max(0, 3 - int(math.floor(math.log10(a))))}f}"
    return f"{v:.4g}"


def _residual(ctx: SearchContext, err: float) -> str:
    return f"residual {err:.1e} (spec {ctx.err0:.1e}, budget {ctx.budget:.1e})"


def simple_values(v: float) -> list[tuple[float, str]]:
    """Simpler numbers near ``v``, simplest first, each with how it reads: the nearest integer (0 too), 1-3
    significant figures, 1/n, 1/sqrt(n), sqrt(n) (n an integer): the forms a constant in code takes."""
    out: list[tuple[float, str]] = []
    if v == 0 or not math.isfinite(v):
        return [(0.0, "0")]
    out.append((float(round(v)), fmt(round(v))))  # 0 included: a term dropped, an offset of none
    for digits in (1, 2):
        r = float(f"{v:.{digits - 1}e}")
        out.append((r, fmt(r)))
    if 0 < abs(v) < 1:
        n = round(1 / abs(v))
        out.append((math.copysign(1 / n, v), f"{'-' if v < 0 else ''}1/{n}"))
        n2 = round(1 / (v * v))
        if n2 > 0:
            out.append((math.copysign(1 / math.sqrt(n2), v), f"{'-' if v < 0 else ''}1/sqrt({n2})"))
    elif abs(v) > 1:
        n2 = round(v * v)
        out.append((math.copysign(math.sqrt(n2), v), f"{'-' if v < 0 else ''}sqrt({n2})"))
    r3 = float(f"{v:.2e}")
    out.append((r3, fmt(r3)))
    seen, uniq = set(), []
    for val, label in out:
        if val not in seen:
            seen.add(val)
            uniq.append((val, label))
    return uniq


def _differs(value: float, spec: float) -> bool:
    return abs(value - spec) > SAME_AS_SPEC * max(abs(spec), 1e-300) if spec != 0 else abs(value) > SAME_AS_SPEC


def _snap(ctx: SearchContext, value: float, spec: float, err: float, params_for: Callable[[float], dict]):
    """The simplest value near ``value`` (not the spec's) whose residual stays within the budget (or within the
    fit's own residual when that is larger): (value, how it reads, residual), or None."""
    limit = max(ctx.budget, err)
    for v, label in simple_values(value):
        if v == value or not _differs(v, spec):
            continue
        e = _evaluate(ctx, params_for(v))
        if e <= limit:
            return v, label, e
    return None


def _finding(kind: str, name: str, says: str, err: float, params: dict) -> Finding:
    return Finding(kind, name, says, float(err), _json_safe(params))


def _json_safe(v):
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v)
    return v


# ------------------------------------------------------------------------------ 1. additive terms
def _term_words(ctx: SearchContext, name: str) -> str:
    ins = ctx.node.inputs
    return {
        "first_scale": f"first operand ({ins[0]})",
        "second_scale": f"second operand ({ins[-1]})",
        "bias_scale": "bias",
        "gamma_scale": "normalized value times gamma",
        "beta_scale": "beta (the shift)",
        "word_scale": "word embedding",
        "position_scale": "position embedding",
        "token_type_scale": "token-type embedding",
        "output_scale": "whole output",
    }.get(name, name)


def _run_all(ctx: SearchContext, params: dict) -> list[np.ndarray] | None:
    """The op's outputs on every prompt under ``params`` (None when they cannot apply)."""
    try:
        with np.errstate(all="ignore"):
            return [run_op(ctx.graph, ctx.node, x, ctx.weights, {**ctx.spec, **params}) for x in ctx.inputs]
    except (ValueError, KeyError, FloatingPointError):  # NotApplicable is a ValueError
        return None


def _least_squares(ctx: SearchContext, columns: list[list[np.ndarray]]) -> np.ndarray | None:
    """Coefficients d minimising ||target - spec - sum_j d_j column_j|| over the whole sample."""
    pairs = zip(ctx.targets, ctx.spec_out, strict=True)
    b = np.concatenate([(np.asarray(t, np.float64) - s).ravel() for t, s in pairs])
    a = np.stack([np.concatenate([c.ravel() for c in col]) for col in columns], axis=1)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return None
    return np.linalg.lstsq(a, b, rcond=None)[0]


def _fitted_terms(ctx: SearchContext, names: list[str]) -> dict[str, float]:
    """Each term's coefficient, fitted jointly: the output is spec + sum_j (c_j - 1) * term_j, where term_j is
    what the op loses when c_j = 0 (or the whole output for ``output_scale``)."""
    columns = []
    for name in names:
        if name == "output_scale":
            columns.append(ctx.spec_out)
            continue
        without = _run_all(ctx, {name: 0.0})
        if without is None:
            return {}
        columns.append([s - w for s, w in zip(ctx.spec_out, without, strict=True)])
    d = _least_squares(ctx, columns)
    return {} if d is None else {n: 1.0 + float(x) for n, x in zip(names, d, strict=True)}


def _report_terms(ctx: SearchContext, coefs: dict[str, float]) -> Iterator[Finding]:
    changed = {n: c for n, c in coefs.items() if _differs(c, 1.0)}
    if not changed:
        return
    err = _evaluate(ctx, changed)
    if not _improves(ctx, err):
        return
    raw = dict(changed)
    for n, c in raw.items():
        snap = _snap(ctx, c, 1.0, err, lambda v, n=n: {**changed, n: v})
        if snap is not None:
            changed[n], err = snap[0], snap[2]
    notes = {n: f"; snapped from {raw[n]:.8g}, within the budget" if changed[n] != raw[n] else "" for n in raw}
    parts = [f"{_term_words(ctx, n)} scaled by {_label(changed[n])} (spec 1{notes[n]})" for n in changed]
    parts += _equivalent_forms(ctx, changed)
    says = f"{'; '.join(parts)}, {_residual(ctx, err)}"
    yield _finding("fit", f"{ctx.node.op}.{'+'.join(changed)}", says, err, changed)


def _equivalent_forms(ctx: SearchContext, changed: dict[str, float]) -> list[str]:
    """Other readings of the same function the data cannot tell apart. A LayerNorm whose normalized values
    are scaled by s is, up to eps, one whose variance is divided by n*s^2 instead of n (n - ddof)."""
    s = changed.get("gamma_scale")
    if ctx.node.op != "LAYERNORM" or s is None or s <= 0 or ctx.spec.get("axis") != "hidden":
        return []
    n = np.shape(ctx.inputs[0][ctx.node.inputs[0]])[-1]
    return [
        f"equivalently (up to eps) the variance divided by {n * s * s:.4g} instead of {n} (ddof {n * (1 - s * s):.3g})"
    ]


@register
def term_scales(ctx: SearchContext) -> Iterator[Finding]:
    """The whole output scaled, then every additive term of the op scaled (dropped = 0, doubled = 2)."""
    if not _searchable(ctx):
        return
    yield from _report_terms(ctx, _fitted_terms(ctx, ["output_scale"]))
    names = [n for n in TERM_SCALES.get(ctx.node.op, ()) if n in ctx.spec]
    if names and not ctx.deadline.expired():
        yield from _report_terms(ctx, _fitted_terms(ctx, names))


# ------------------------------------------------------------------------------------ 2. structure
def _role_permutations(arrays: list) -> list[list[int]]:
    """Every permutation of the operands in which each operand takes the role of one of the same shape and
    type (the identity first); a single identity when nothing can trade roles."""
    facts = [(np.shape(a), np.asarray(a).dtype.kind) for a in arrays]
    perms = [list(p) for p in itertools.permutations(range(len(arrays)))]
    return [p for p in perms if all(facts[j] == facts[i] for i, j in enumerate(p))]


def _structure_choices(ctx: SearchContext) -> dict[str, list]:
    """The op's structural choices: the axes it could reduce over (refops.AXES) and who plays which role."""
    choices = {k: list(v) for k, v in AXES.get(ctx.node.op, {}).items() if k in ctx.spec}
    x0 = ctx.inputs[0]
    operands = {
        "input_order": [x0[n] for n in ctx.node.inputs],
        "weight_order": [ctx.weights[k] for k in ctx.node.weights],
    }
    for key, arrays in operands.items():
        perms = _role_permutations(arrays)
        if len(perms) > 1:
            choices[key] = perms
    return choices


def _structure_candidates(ctx: SearchContext) -> Iterator[dict]:
    """Every combination of the choices when there are few, else every single change; the spec excluded."""
    choices = _structure_choices(ctx)
    keys = list(choices)
    n = math.prod(len(v) for v in choices.values()) if choices else 0
    if n <= MAX_STRUCTURE_COMBOS:
        combos = (dict(zip(keys, vals, strict=True)) for vals in itertools.product(*choices.values()))
    else:
        combos = ({k: v} for k in keys for v in choices[k])
    for combo in combos:
        changed = {k: v for k, v in combo.items() if v != ctx.spec[k]}
        if changed:
            yield changed


def _show(v) -> str:
    return "[" + ",".join(str(x) for x in v) + "]" if isinstance(v, list) else str(v)


def _structure_words(ctx: SearchContext, key: str, value) -> str:
    node, spec = ctx.node, ctx.spec[key]
    if key in ("input_order", "weight_order"):
        names = list(node.inputs) if key == "input_order" else list(node.weights)
        moved = [i for i, j in enumerate(value) if i != j]
        if len(moved) == 2:  # a transposition: say it the way a porter would
            a, b = moved
            return f"{names[a]} and {names[b]} are swapped (each is used in the other's role)"
        swaps = [f"{names[j]} in the role of {names[i]}" for i, j in enumerate(value) if i != j]
        return f"operands trade roles: {', '.join(swaps)}"
    if key == "part":
        roles = "qkv"
        return (
            f"reads the {roles[value]} third (part {value}) of the fused projection instead of the {roles[spec]} third"
        )
    if key == "order":
        return f"reads the fused projection {value.replace('_', '-')} instead of {spec.replace('_', '-')}"
    what = {
        "SOFTMAX": "softmax",
        "LAYERNORM": "LayerNorm statistics",
        "ATTENTION": "attention softmax",
        "POOL": "pooling",
        "L2NORM": "the L2 norm",
    }
    return f"{what.get(node.op, node.op)} taken over the {value} axis instead of the {spec} axis"


@register
def structure(ctx: SearchContext) -> Iterator[Finding]:
    """Alternatives generated from the op's definition: each axis, each role permutation of its operands."""
    if not _searchable(ctx):
        return
    screen = _Screened(ctx)
    for changed in _structure_candidates(ctx):
        if ctx.deadline.expired():
            return
        err = screen.error(changed)
        if not _improves(ctx, err):
            continue
        name = f"{ctx.node.op}." + "+".join(f"{k}={_show(v)}" for k, v in changed.items())
        words = "; ".join(_structure_words(ctx, k, v) for k, v in changed.items())
        yield _finding("structure", name, f"{words}, {_residual(ctx, err)}", err, changed)


# ------------------------------------------------------------------------------------ 3. precision
# How each intermediate step reads in a sentence (the rounding comes right after it is computed)
_STEP_WORDS = {
    "mean": "the row mean",
    "centered": "the centred values (x - mean)",
    "var": "the variance",
    "rstd": "1/sqrt(variance + eps)",
    "normalized": "the normalized values (before gamma and beta)",
    "scaled": "the normalized values times gamma (before beta)",
    "product": "the matrix product (before the bias)",
    "positions": "the token positions",
    "inv_freq": "the rotary inverse frequencies",
    "angles": "the rotary angles",
    "cos_sin": "the rotary cos/sin values",
    "q_scaled": "the scaled queries (before the dot products)",
    "scores": "the attention scores (before the softmax)",
    "exp": "the softmax exponentials (before normalising)",
    "probs": "the attention probabilities (before multiplying V)",
    "inner": "the GELU's inner argument",
    "cdf": "the GELU's gate (the factor multiplying x)",
    "sum": "the sum (before dividing)",
    "products": "each slot's weighted expert output (before summing the slots)",
    "norm": "the L2 norm",
    "dots": "the q.k dot products (before the scale)",
    "scale": "the attention scale factor (a constant)",
    "scale_divisor": "the attention scale's divisor 1/scale (a constant the scores are divided by)",
    "constant": "the GELU form's constants",
    "divisor": "the GELU's divisor 1/erf_scale (sqrt(2), a constant x is divided by)",
    "fn": "the GELU's erf / tanh / exp value (before 1 + it)",
    "output": "the output",
}
_OP_STEP_WORDS = {("ROPE", "products"): "the rotary products x*cos and x*sin (before adding them)"}


def _step_words(ctx: SearchContext, step: str) -> str:
    if step.startswith("input."):
        return f"the input {ctx.node.inputs[int(step[6:])]}"
    if step.startswith("weight."):
        return f"the weight {ctx.node.weights[int(step[7:])]}"
    return _OP_STEP_WORDS.get((ctx.node.op, step), _STEP_WORDS.get(step, step))


def _precision_candidates(ctx: SearchContext) -> Iterator[tuple[dict, str, str]]:
    """(params, name, words) for every step and format, then the whole output and the whole kernel."""
    op, x0 = ctx.node.op, ctx.inputs[0]
    steps = [f"input.{i}" for i, n in enumerate(ctx.node.inputs) if np.asarray(x0[n]).dtype.kind == "f"]
    steps += [f"weight.{i}" for i in range(len(ctx.node.weights))] + list(ROUND_STEPS.get(op, ()))
    for step in steps:
        for prec in PRECISIONS:
            words = f"{_step_words(ctx, step)} rounded to {prec}"
            yield {"round_at": {step: prec}}, f"{op}.round_at.{step}={prec}", words
    for key, what in (("output_precision", "the output"), ("accumulate", "every operand, weight and the result")):
        if key in ctx.spec:
            for prec in PRECISIONS:
                yield {key: prec}, f"{op}.{key}={prec}", f"{what} rounded to {prec}"


@register
def precision(ctx: SearchContext) -> Iterator[Finding]:
    """Reduced precision inserted at each intermediate step of the op (one step and one format at a time),
    then at every rounding point jointly (:func:`rounding_points`): a kernel whose every intermediate value is
    stored in a narrow format rounds at several points, none of which explains it alone."""
    if not _searchable(ctx):
        return
    # the candidates round values before or after the same few products (the input and weight rounded or not):
    # each product computed once (refops.shared_products; the same float64 values). Found in the block, yielded
    # after it: a generator suspended inside the block would leave the memo on for its caller's code
    with shared_products():
        found = _precision_findings(ctx)
    yield from found


def _precision_findings(ctx: SearchContext) -> list[Finding]:
    screen = _Screened(ctx)
    singles, out = [], []
    for params, name, words in _precision_candidates(ctx):
        if ctx.deadline.expired():
            break
        err = screen.error(params)
        if _improves(ctx, err):
            singles.append(_finding("precision", name, f"{words}, {_residual(ctx, err)}", err, params))
    if not any(f.error == 0 for f in singles):  # a single point that leaves nothing cannot be bettered
        for prec in PRECISIONS:
            if ctx.deadline.expired():
                break
            # first: at an equal residual the joint set wins (the findings' sort is stable), as it says more
            found = list(rounding_points(ctx, prec))
            out += found
            if any(explains(f.error, ctx.err0, ctx.budget) for f in found):
                break  # the next format's set is not needed (halves the cost where fp16 explains)
    return out + singles


def _rounding_point_names(ctx: SearchContext) -> list[str]:
    """Every value of the op a kernel could store in a narrow format: its float inputs, its weights, its named
    intermediate values and constants (ROUND_STEPS), its output."""
    x0 = ctx.inputs[0]
    points = [f"input.{i}" for i, n in enumerate(ctx.node.inputs) if np.asarray(x0[n]).dtype.kind == "f"]
    points += [f"weight.{i}" for i in range(len(ctx.node.weights))] + list(ROUND_STEPS.get(ctx.node.op, ()))
    if "output_precision" not in ctx.spec:
        return points
    # the format the result is computed in before it is stored in prec: a pseudo-point, with the output only
    return points + ["output"] + [f"arithmetic.{a}" for a in ARITHMETIC_FORMATS]


def _points_params(points, prec: str) -> dict:
    p: dict = {"round_at": {k: prec for k in points if k != "output" and not k.startswith("arithmetic.")}}
    if "output" in points:
        p["output_precision"] = prec
        arith = [k.split(".", 1)[1] for k in points if k.startswith("arithmetic.")]
        if arith:
            p["arithmetic"] = arith[0]
    return p


def _stepwise(ctx: SearchContext, points: list[str], prec: str) -> tuple[list[str], float]:
    """Stepwise selection of the rounded set, from every point but the PATH_STEPS (which change how the op
    computes, not only where it rounds): each round takes the best move, dropping a point when that does not
    raise the error (a rounding that changes nothing is not claimed) or adding one when that lowers it, until no
    move helps. The error never rises and every add lowers it, so it ends; O(n) evaluations a round, on ``ctx``
    (the caller passes a subset)."""
    path = set(PATH_STEPS.get(ctx.node.op, ()))
    keep = [k for k in points if k not in path]
    err = _evaluate(ctx, _points_params(keep, prec))
    while not ctx.deadline.expired():
        moves = [(_evaluate(ctx, _points_params([k for k in keep if k != d], prec)), 0, [k for k in keep if k != d])
                 for d in keep]  # fmt: skip
        moves += [(_evaluate(ctx, _points_params(keep + [a], prec)), 1, [k for k in points if k in keep or k == a])
                  for a in points if a not in keep]  # fmt: skip
        if not moves:
            break
        e, add, chosen = min(moves, key=lambda m: (m[0], m[1]))  # ties: a drop, the simpler set
        if not (e < err or (e <= err and not add)):
            break
        keep, err = chosen, e
    return keep, err


def _already_in(ctx: SearchContext, prec: str) -> list[str]:
    """Inputs and weights whose values are already representable in ``prec`` (rounding them changes nothing)."""
    out = []
    for i, n in enumerate(ctx.node.inputs):
        a = np.asarray(ctx.inputs[0][n])
        if a.dtype.kind == "f" and all(np.array_equal(round_to(x[n], prec), x[n]) for x in ctx.inputs):
            out.append(_step_words(ctx, f"input.{i}"))
    for i, k in enumerate(ctx.node.weights):
        if np.size(ctx.weights[k]) > 1 << 24:
            continue  # a full-size embedding table: not converted whole for a remark
        w = np.asarray(ctx.weights[k], np.float64)
        if np.array_equal(round_to(w, prec), w):
            out.append(_step_words(ctx, f"weight.{i}"))
    return out


def _format_ulp(x: np.ndarray, prec: str) -> np.ndarray:
    """The spacing of ``prec`` (fp16 / bf16) at each value of ``x``."""
    a = np.abs(np.asarray(x, np.float64))
    if prec == "fp16":
        return np.spacing(a.astype(np.float16)).astype(np.float64)
    e = np.floor(np.log2(np.maximum(a, np.finfo(np.float32).tiny)))
    return np.exp2(e - 7)  # bf16: 8 significant bits


def _ulps_left(ctx: SearchContext, params: dict, prec: str) -> str:
    """What a rounded-output candidate leaves, in the format's own units: how many output values still differ and
    by how many ulps. Values one ulp apart sit near a rounding boundary of ``prec`` that the kernel's own (float32,
    its operation order) arithmetic crosses where the float64 emulation does not."""
    preds = _run_all(ctx, params)
    if preds is None:
        return ""
    n = total = 0
    worst = 0.0
    for t, p in zip(ctx.targets, preds, strict=True):
        t = np.asarray(t, np.float64).reshape(np.shape(p))
        d = t != p
        n, total = n + int(d.sum()), total + d.size
        if d.any():
            worst = max(worst, float(np.max(np.abs(t[d] - p[d]) / _format_ulp(t[d], prec))))
    if n == 0:
        return ""
    if worst <= 1.0 + 1e-9:
        return (f"; it leaves {fmt(n)} of {fmt(total)} output values one {prec} ulp apart (the kernel's own "
                f"arithmetic put them on the other side of a rounding boundary)")  # fmt: skip
    return f"; it leaves {fmt(n)} of {fmt(total)} output values apart, by up to {worst:.3g} {prec} ulps"


def rounding_points(ctx: SearchContext, prec: str) -> Iterator[Finding]:
    """The op computed with a SET of its values rounded to ``prec`` (inputs, weights, intermediate values and
    constants, output; :func:`_rounding_point_names`) and everything between them in float64, or with the result
    rounded to a wider format first (``arithmetic``, ARITHMETIC_FORMATS), the set found by stepwise selection
    (:func:`_stepwise`). The arithmetic between the points is what a kernel does in a wider format (float32
    accumulation agrees with float64 far below a narrow format's rounding), so the set says both where the kernel
    rounds and that it accumulates wider than ``prec`` where no intermediate is kept."""
    points = _rounding_point_names(ctx)
    if len(points) < 2:
        return  # a single point is a single-step candidate of precision()
    sub = _prompt_subset(ctx)
    keep, err = _stepwise(sub, points, prec)
    if sub is not ctx:
        ctx.tried += sub.tried
    if len(keep) < 2:
        return  # nothing, or one point: the single-step candidates already said it
    params = _points_params(keep, prec)
    arith = params.get("arithmetic")
    keep = [k for k in keep if not k.startswith("arithmetic.")]
    err = _evaluate(ctx, params)
    if not _improves(ctx, err):
        return
    steps = set(ROUND_STEPS.get(ctx.node.op, ()))
    inner = [k for k in keep if k in steps]
    words = f"computed with {', '.join(_step_words(ctx, k) for k in keep)} rounded to {prec}"
    if arith is not None:
        words += (f"; the result computed in {arith} and rounded from {arith} to {prec} (a double rounding that "
                  f"float64 arithmetic does not reproduce at near-ties)")  # fmt: skip
    elif not inner:
        words += f"; the arithmetic between them in a wider format than {prec} (e.g. float32 accumulation)"
    same = [w for w in _already_in(ctx, prec) if w not in words]
    if same:
        words += f"; {', '.join(same)} already hold {prec} values (rounding them changes nothing)"
    if "output" in keep and err > 0:
        words += _ulps_left(ctx, params, prec)
    name = f"{ctx.node.op}.round_points={'+'.join(keep)}@{prec}" + (f"+arithmetic={arith}" if arith else "")
    yield _finding("precision", name, f"{words}, {_residual(ctx, err)}", err, params)


# ---------------------------------------------------------------------------------- 4. continuous
@dataclass(frozen=True)
class Dim:
    """One fitted parameter: its grid in fit space (log10 of the value when ``log``) and its spec value."""

    param: str
    words: str  # how it reads: "rotary base"
    spec: float
    lo: float
    hi: float
    n: int
    log: bool = True

    def value(self, u: float) -> float:
        return 10.0**u if self.log else float(u)


@dataclass(frozen=True)
class Fit:
    dims: tuple[Dim, ...]
    fixed: dict  # parameters set for this fit (e.g. the GELU form whose coefficients are fitted)
    form_note: str = ""  # set when ``fixed`` departs from the spec: the fit is a finding whatever its value


def _around(spec: float, decades: float) -> tuple[float, float]:
    return math.log10(spec) - decades, math.log10(spec) + decades


def _gelu_fits(ctx: SearchContext) -> list[Fit]:
    s, form = ctx.spec, ctx.spec["form"]
    spec_form = {"erf": "the spec's erf form", "tanh": "the spec's tanh form"}.get(form, f"spec form {form}")
    fits = []
    for f, dims in (
        ("erf", (Dim("erf_scale", "c in 0.5*x*(1+erf(c*x))", s["erf_scale"], *_around(s["erf_scale"], 1), 21),)),
        ("sigmoid", (Dim("sigmoid_scale", "a in x*sigmoid(a*x)", s["sigmoid_scale"], -1.0, 1.5, 26),)),
        ("tanh", (
            Dim("tanh_scale", "tanh GELU's outer coefficient", s["tanh_scale"], *_around(s["tanh_scale"], 1), 5),
            Dim("tanh_cubic", "tanh GELU's cubic coefficient", s["tanh_cubic"], -0.2, 0.3, 6, log=False),
        )),
    ):  # fmt: skip
        note = "" if f == form else f"GELU computed in the {f} form instead of {spec_form}"
        fits.append(Fit(dims, {"form": f}, note))
    return fits


def _fits(ctx: SearchContext) -> list[Fit]:
    """The op's continuous constants with the range each is searched over (generous: several decades)."""
    op, s = ctx.node.op, ctx.spec
    if op == "LAYERNORM":
        n = np.shape(ctx.inputs[0][ctx.node.inputs[0]])[-1]
        return [
            Fit((Dim("eps", "LayerNorm eps", s["eps"], -16.0, 0.0, 33),), {}),
            Fit(
                (Dim("eps", "LayerNorm eps", s["eps"], -16.0, 0.0, 33),),
                {"eps_placement": "outside"},
                "eps added to the standard deviation instead of inside the square root",
            ),
            Fit((Dim("ddof", "variance divisor offset (divides by n - ddof)", 0.0, -3.0 * n, n - 1.0, 41, False),), {}),
        ]
    if op == "ROPE":
        base = Dim("base", "rotary base", s["base"], 1.0, 7.0, 13)
        offset = Dim("position_offset", "rotary position offset", s["position_offset"], -16.0, 16.0, 17, log=False)
        return [Fit((base, offset), {})]
    if op == "ATTENTION":
        hd = ctx.graph.dims.head_dim
        sc = attention_scale(s["scale"], hd)
        return [Fit((Dim("scale", "attention scale", sc, *_around(sc, 3), 13),), {})]
    if op == "GELU":
        return _gelu_fits(ctx)
    if op == "SOFTMAX":
        return [Fit((Dim("temperature", "softmax logit scale", 1.0, -2.0, 2.0, 25),), {})]
    if op == "L2NORM":
        eps = Dim("eps", "L2 normalisation eps", s["eps"], -16.0, 4.0, 21)
        return [
            Fit((eps,), {}),
            Fit((eps,), {"eps_placement": "add"}, "eps added to the norm instead of bounding it from below"),
            Fit((eps,), {"eps_placement": "inside"}, "eps added to the squared norm inside the square root"),
        ]
    return []


def _subset(ctx: SearchContext, keep: list) -> SearchContext:
    """A context on the rows ``keep[i]`` of each prompt i (None: prompt left out)."""
    inputs, targets = [], []
    for x, t, idx in zip(ctx.inputs, ctx.targets, keep, strict=True):
        if idx is not None:
            inputs.append({**x, **{n: np.asarray(x[n])[idx] for n in ctx.node.inputs}})
            targets.append(np.asarray(t)[idx])
    return make_context(ctx.graph, ctx.node, inputs, targets, ctx.weights, ctx.budget, ctx.deadline)


def _prompt_subset(ctx: SearchContext) -> SearchContext:
    """Whole prompts, as many as fit in MAX_FIT_ROWS rows (at least one): valid for every op and candidate."""
    keep, total = [], 0
    for t in ctx.targets:
        take = not keep or total + len(t) <= MAX_FIT_ROWS
        keep.append(np.arange(len(t)) if take else None)
        total += len(t) if take else 0
    return ctx if total == sum(len(t) for t in ctx.targets) else _subset(ctx, keep)


def _fit_context(ctx: SearchContext) -> SearchContext:
    """The sample the optimisers work on, about MAX_FIT_ROWS rows of it: a fit evaluates a few hundred
    candidates and the constants are the same in every row and prompt. Ops whose rows are computed
    independently (ROW_WISE) keep evenly spaced rows of every prompt; the others (rotary positions, attention
    over all keys) keep whole prompts. The reported residual is always re-evaluated on the whole sample."""
    if ctx.node.op == "ROPE" and max(len(t) for t in ctx.targets) > ROPE_FIT_POSITIONS:
        # a rotary row depends on its own values and its position only, so a prefix of every prompt is a valid
        # sample; and it must be a short one: the angles grow with the position, so on long prompts the residual
        # oscillates in the base faster than a grid can follow (a 300-token prompt hid a base of 5,000)
        return _subset(ctx, [np.arange(min(len(t), ROPE_FIT_POSITIONS)) for t in ctx.targets])
    rows = sum(len(t) for t in ctx.targets)
    if rows <= MAX_FIT_ROWS:
        return ctx
    if ctx.node.op not in ROW_WISE:
        return _prompt_subset(ctx)
    stride = math.ceil(rows / MAX_FIT_ROWS)
    return _subset(ctx, [np.arange(0, len(t), stride) for t in ctx.targets])


class _Screened:
    """Evaluates a stream of discrete candidates on whole prompts first (_prompt_subset) when that is at most
    half the sample, and on the whole sample only those that reduce the error there at all (a candidate that
    halves the error overall cannot leave it unchanged on whole prompts of the same sample, short of a bug
    that shows only in the prompts left out, hence the loose SCREEN_PASS)."""

    def __init__(self, ctx: SearchContext):
        self.ctx = ctx
        sub = _prompt_subset(ctx)
        rows = sum(len(t) for t in ctx.targets)
        self.sub = sub if sub is not ctx and 2 * sum(len(t) for t in sub.targets) <= rows else None

    def error(self, params: dict) -> float:
        if self.sub is not None:
            before = self.sub.tried
            e = _evaluate(self.sub, params)
            self.ctx.tried += self.sub.tried - before
            if not (math.isfinite(e) and e < SCREEN_PASS * self.sub.err0):
                return math.inf
        return _evaluate(self.ctx, params)


class _Expired(Exception):
    """Raised inside an optimiser's objective when the search's time is up."""


def _objective(ctx: SearchContext, fit: Fit) -> Callable[[np.ndarray], float]:
    def f(u) -> float:
        if ctx.deadline.expired():
            raise _Expired
        u = np.atleast_1d(u)
        e = _evaluate(ctx, {**fit.fixed, **{d.param: d.value(x) for d, x in zip(fit.dims, u, strict=True)}})
        return e * e if math.isfinite(e) else 1e300  # squared: smooth at the optimum, which Brent/NM like

    return f


def _fit_1d(f, d: Dim) -> np.ndarray:
    grid = np.linspace(d.lo, d.hi, d.n)
    vals = [f(u) for u in grid]
    i = int(np.argmin(vals))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, d.n - 1)]
    r = minimize_scalar(f, bounds=(lo, hi), method="bounded", options={"xatol": 1e-9 * (d.hi - d.lo), "maxiter": 200})
    return np.array([r.x if r.fun <= vals[i] else grid[i]])


def _fit_nd(f, dims: tuple[Dim, ...], fatol: float, starts: int = 2) -> np.ndarray:
    """Grid over the product of the dims' grids, then Nelder-Mead from the best few grid points."""
    grids = [np.linspace(d.lo, d.hi, d.n) for d in dims]
    points = list(itertools.product(*grids))
    vals = np.array([f(np.array(p)) for p in points])
    step = np.array([(d.hi - d.lo) / (d.n - 1) for d in dims])
    best_u, best_f = np.array(points[int(np.argmin(vals))]), float(vals.min())
    for i in np.argsort(vals)[:starts]:
        x0 = np.array(points[i])
        simplex = np.vstack([x0] + [x0 + 0.5 * step * np.eye(len(dims))[k] for k in range(len(dims))])
        opts = {"initial_simplex": simplex, "xatol": 1e-7, "fatol": fatol, "maxfev": 150}
        r = minimize(f, x0, method="Nelder-Mead", options=opts)
        if r.fun < best_f:
            best_u, best_f = r.x, float(r.fun)
    return best_u


def _fit_words(fit: Fit, params: dict, raw: dict) -> str:
    """'rotary base fitted 5,000 (spec 10,000; snapped from 4,999.9998, within the budget)' per changed dim."""
    parts = []
    for d in fit.dims:
        if d.param not in params:
            continue
        v, note = params[d.param], ""
        if v != raw[d.param]:
            note = f"; snapped from {raw[d.param]:.8g}, within the budget"
        spec = f"the form's usual {fmt(d.spec)}" if fit.form_note else f"spec {fmt(d.spec)}"
        parts.append(f"{d.words} fitted {_label(v)} ({spec}{note})")
    return (f"{fit.form_note}: " if fit.form_note else "") + "; ".join(parts)


def _label(v: float) -> str:
    """A snapped value as its simple form reads (1/128, sqrt(768)) when it has one, else its number."""
    for val, label in simple_values(v):
        if val == v:
            return label
    return fmt(v)


def _report_fit(ctx: SearchContext, fit: Fit, u: np.ndarray) -> Iterator[Finding]:
    """The fitted values that differ from the spec (the others back at the spec), snapped where the budget
    allows, as one Finding if they at least halve the error."""
    values = {d.param: d.value(x) for d, x in zip(fit.dims, u, strict=True)}
    changed = {d.param: values[d.param] for d in fit.dims if fit.form_note or _differs(values[d.param], d.spec)}
    if not changed:
        return
    params = {**fit.fixed, **changed}
    err = _evaluate(ctx, params)
    if not _improves(ctx, err):
        return
    for d in fit.dims:
        if d.param in changed:
            snap = _snap(ctx, changed[d.param], d.spec, err, lambda x, k=d.param: {**params, k: x})
            if snap is not None:
                params[d.param], err = snap[0], snap[2]
    if params.get("form") == "tanh" and params.get("tanh_cubic") == 0.0:
        return  # 0.5*(1 + tanh(c*x)) is sigmoid(2c*x): the same function, which the sigmoid form's fit reports
    says = f"{_fit_words(fit, params, changed)}, {_residual(ctx, err)}"
    name = f"{ctx.node.op}.{'+'.join(changed)}"
    yield _finding("fit", name, says, err, params)


@register
def continuous(ctx: SearchContext) -> Iterator[Finding]:
    """The op's continuous constants fitted to the engine's output (scalars: grid then bounded Brent in log
    space; pairs: grid then Nelder-Mead)."""
    if not _searchable(ctx):
        return
    for fit in _fits(ctx):
        if ctx.deadline.expired():
            return
        fctx = _fit_context(ctx)
        f = _objective(fctx, fit)
        try:
            u = _fit_1d(f, fit.dims[0]) if len(fit.dims) == 1 else _fit_nd(f, fit.dims, (1e-2 * ctx.budget) ** 2)
        except _Expired:
            return
        finally:
            if fctx is not ctx:
                ctx.tried += fctx.tried
        yield from _report_fit(ctx, fit, u)
