"""Quantisation searcher (actdiff.compare.search): the op run on uniformly quantised operands.

Candidates are generated from the definition of uniform affine quantisation (actdiff.compare.refops.quantise),
never from a particular engine's choices: a scheme is a bit width (:data:`BITS`), symmetric or asymmetric, a
granularity (one range per tensor, i.e. per prompt for an activation; per row (token, or output channel of a
stored [out, in] weight); per column; for expert weights per expert block or per column of each block) and a
range: dynamic (each tensor's own min/max at run time) or static (one fixed [lo, hi] for every prompt, as a
calibrated model has, fitted here).

A quantised kernel quantises its operands jointly (a dynamic-quantised MatMul quantises both the activation and
the weight; quantising one of them explains neither), so the schemes of every float operand of the op (its
float inputs and its 2-D weights; biases and LayerNorm vectors stay float) are combined: the whole product
when it is at most :data:`MAX_JOINT` candidates, else coordinate descent (each operand's best scheme with the
others fixed, :data:`PASSES` sweeps). Then, only when some dynamic combination reduces the error (SCREEN_PASS),
each activation's range is fitted as a static one (below), and the output's own quantisation is tried on top.

Static range: quantisation dequantises onto the grid scale * (q - zp); the zero point moves no grid point
(multiples of the scale, 0 included), it only sets where values clip. So the scale is fitted first (a 1-D
log-spaced grid of ratio 2^(1/64) around the sample's own scale, refined by bounded Brent), with the zero
point of the sample's overall [min, max]; then the zero point, an integer, over a window around it (walked
on while the residual falls). Reported as the fitted [lo, hi] = [-zp * scale, (qmax - zp) * scale]. The
activations' ranges and the weights' schemes are chosen in turn, each with the others' current
quantisation (coordinate descent); the best choice's static steps are then refined jointly (a compass
search on their log2, _joint_refine), since a step fitted while another value's rounding was still off
lands beside its narrow basin.

Cost: every candidate is scored on whole prompts of at most MAX_FIT_ROWS rows (search_fit._prompt_subset)
and only the best few on the whole sample; a MATMUL input's scale grid with float32 products where nothing rounds
after the product, the points near its least again in float64 (search.coarse_scores: the same least); a step's
fit takes the op's products once (refops.shared_products). Registered after the cheap searchers of search_fit
(SEARCH_MODULES), it does not delay what they explain.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar

from .findings import Finding, sample_error
from .refops import ROUND_STEPS, NotApplicable, round_output, run_op, shared_products
from .search import SearchContext, coarse_scores, float32_rounding, linear_after_product, register
from .search_fit import (
    SCREEN_PASS,
    _evaluate,
    _finding,
    _improves,
    _prompt_subset,
    _residual,
    _searchable,
    _step_words,
    fmt,
)

BITS = (8,)  # 8-bit integer kernels; 4 would double the candidates for a scheme no CPU engine here runs
GRANULARITIES = ("tensor", "row", "column")
BLOCK_GRANULARITIES = ("block", "block_column")  # expert weights: E matrices stored as one [E*F, H] tensor
MAX_JOINT = 128  # operands' schemes combined exhaustively up to this many candidates, else coordinate descent
PASSES = 2  # coordinate-descent sweeps
KEEP = 3  # candidates re-evaluated on the whole sample after scoring on the subset
# static scale grid: 2^(k/64), k in [-SCALE_STEPS, SCALE_STEPS] (a factor 2 each side, 1.1% steps): a wrong step
# moves every value by about |q| times the relative error, so the residual's basin around the right step is
# about 1/|q|max ~ 1% wide at 8 bits (measured: 0.5% off leaves 80% of the error); the grid must land in it
SCALE_STEPS = 64
F32_ULPS = 64  # a fitted static step is polished over +- this many float32 ulps (8e-6 relative; _polish)
# joint refinement of the static steps (_joint_refine) down to a stride of 1e-7 in log2 of a step (7e-8 relative,
# about one float32 ulp: _polish takes it from there)
JOINT_TOL = 1e-7
ZP_WINDOW = 8  # static zero points tried at each edge of the no-clipping interval (_zero_points)
EXPERT_OPS = ("EXPERT_FC1", "EXPERT_FC2")
INTEGER_KERNEL_OPS = ("MATMUL", "ROUTER", "EXPERT_FC1")  # ops refops can run as an integer kernel (int_pairs)
KERNELS = ("saturate16",)  # integer accumulations other than the exact 32-bit sum (refops.saturated_pairs)


@dataclass(frozen=True)
class Operand:
    key: str  # round_at step: "input.<i>" / "weight.<i>"; "output" for the result
    name: str  # the node input's or checkpoint tensor's name
    activation: bool
    blocks: int = 1  # expert matrices in a stored weight


def _operands(ctx: SearchContext) -> list[Operand]:
    """The op's float inputs (one value per prompt) and its 2-D weights (matrices, embedding tables)."""
    x0, node = ctx.inputs[0], ctx.node
    ops = [Operand(f"input.{i}", n, True) for i, n in enumerate(node.inputs)
           if np.asarray(x0[n]).dtype.kind == "f" and np.ndim(x0[n]) >= 2]  # fmt: skip
    blocks = ctx.graph.dims.experts if node.op in EXPERT_OPS else 1
    for i, n in enumerate(node.weights):
        if np.ndim(ctx.weights[n]) == 2:
            ops.append(Operand(f"weight.{i}", n, False, blocks))
    if node.op in INTEGER_KERNEL_OPS and ops[:1] and ops[0].key == "input.0" and len(ops) > 1:
        ops.append(Operand("kernel", "int_pairs", False))
    return ops


def _schemes(o: Operand) -> list[dict]:
    """Every dynamic scheme of one operand (JSON-safe refops quantisation specs)."""
    if o.key == "kernel":
        return list(KERNELS)
    grans = GRANULARITIES + (BLOCK_GRANULARITIES if o.blocks > 1 else ())
    if not o.key.startswith(("input.", "weight.")):  # the op's intermediate values and its output
        grans = ("tensor", "row")
    out = []
    for bits, sym, gran in itertools.product(BITS, (True, False), grans):
        spec = {"bits": bits, "symmetric": sym, "granularity": gran, "range": "dynamic"}
        if gran in BLOCK_GRANULARITIES:
            spec["blocks"] = o.blocks
        out.append(spec)
    return out


def _params(operands: list[Operand], choice: tuple) -> dict:
    """refops parameters quantising each operand as ``choice`` says (None: left in float)."""
    round_at = {o.key: s for o, s in zip(operands, choice, strict=True)
                if s is not None and o.key not in ("output", "kernel")}  # fmt: skip
    p: dict = {"round_at": round_at}
    kernel = [s for o, s in zip(operands, choice, strict=True) if o.key == "kernel" and s is not None]
    if kernel:
        p["int_pairs"] = kernel[0]
    out = [s for o, s in zip(operands, choice, strict=True) if o.key == "output" and s is not None]
    if out:
        p["output_precision"] = out[0]
    return p


class _Scorer:
    """Scores candidates on the subset (whole prompts, MAX_FIT_ROWS rows) and keeps the best few."""

    def __init__(self, ctx: SearchContext):
        self.ctx, self.sub = ctx, _prompt_subset(ctx)
        self.scored: dict[str, tuple[float, tuple]] = {}
        self.unrounded: tuple[str, list | None] = ("", None)  # (params, the op's values before output rounding)

    def score(self, operands: list[Operand], choice: tuple, counted: bool = True) -> float:
        """The residual of ``choice`` on the subset, float64, memoised; ``counted`` False: a candidate already
        counted in ``tried`` (scored again in float64 after a float32 grid)."""
        key = repr(choice)
        if key not in self.scored:
            before = self.sub.tried
            params = _params(operands, choice)
            out = params.pop("output_precision", None)
            e = _evaluate(self.sub, params) if out is None else self._rounded_output(params, out)
            self._tally(before, counted)
            self.scored[key] = (e, choice)
        return self.scored[key][0]

    def _tally(self, before: int, counted: bool = True) -> None:
        """The candidates the subset scored since its count was ``before`` counted in the run's ``tried`` (or not at
        all: candidates scored again)."""
        if not counted:
            self.sub.tried = before
        elif self.sub is not self.ctx:
            self.ctx.tried += self.sub.tried - before

    def grid(self, operands: list[Operand], choices: list[tuple], coarse: bool) -> list[float] | None:
        """The residuals of a grid's ``choices`` (None once the deadline passes). ``coarse`` (a MATMUL whose product
        nothing rounds after it, _coarse_grid): search.coarse_scores, float32 products then float64 near the least:
        the float64 grid's least and its residual."""
        if coarse and math.isfinite(float32_rounding(self.sub)):
            vals = coarse_scores(self.sub, choices, lambda c: self._score32(operands, c),
                                 lambda c: self.score(operands, c, counted=False))  # fmt: skip
            return vals if len(vals) == len(choices) else None
        vals = []
        for c in choices:
            if self.ctx.deadline.expired():
                return None
            vals.append(self.score(operands, c))
        return vals

    def _score32(self, operands: list[Operand], choice: tuple) -> float:
        key = repr(choice)
        if key in self.scored:  # a float64 residual is as good
            return self.scored[key][0]
        before = self.sub.tried
        e = _evaluate(self.sub, _params(operands, choice))
        self._tally(before)
        return e

    def _rounded_output(self, params: dict, out) -> float:
        """The residual with the op's output rounded as ``out`` says: the op's values before that rounding
        depend on the rest of ``params`` only, so a fit of the output's range (hundreds of candidates) runs
        the op once (an expert op's grouped matmuls were half of an EXPERT_FC1 search)."""
        key = repr(params)
        if self.unrounded[0] != key:
            try:
                with np.errstate(all="ignore"):
                    sub, unrounded = self.sub, {**self.sub.spec, **params, "output_precision": "fp64"}
                    vals = [run_op(sub.graph, sub.node, x, sub.weights, unrounded) for x in sub.inputs]
            except (NotApplicable, KeyError, ValueError, FloatingPointError):
                vals = None
            self.unrounded = (key, vals)
        if self.unrounded[1] is None:
            self.sub.tried += 1
            return math.inf
        with np.errstate(all="ignore"):
            return self.sub.error_of([round_output(v, out) for v in self.unrounded[1]])

    def best(self, n: int) -> list[tuple]:
        return [c for e, c in sorted(self.scored.values(), key=lambda ec: ec[0]) if math.isfinite(e)][:n]


def _joint(ctx: SearchContext, operands: list[Operand], scorer: _Scorer) -> None:
    """Scores every combination of the operands' schemes (or coordinate descent when there are too many)."""
    options = [[None] if o.key == "kernel" else [None, *_schemes(o)] for o in operands]
    if math.prod(len(o) for o in options) <= MAX_JOINT:
        for choice in itertools.product(*options):
            if ctx.deadline.expired():
                return
            if any(s is not None for s in choice):
                scorer.score(operands, choice)
        return
    current = [None] * len(operands)
    best = math.inf
    for _ in range(PASSES):
        for i, opts in enumerate(options):
            for s in opts:
                if ctx.deadline.expired():
                    return
                choice = tuple(current[:i] + [s] + current[i + 1 :])
                if any(c is not None for c in choice):
                    e = scorer.score(operands, choice)
                    if e < best:
                        best, current = e, list(choice)


def _kernels(ctx: SearchContext, operands: list[Operand], scorer: _Scorer) -> None:
    """The best few joint choices run as an integer kernel with another accumulation (KERNELS)."""
    k = [i for i, o in enumerate(operands) if o.key == "kernel"]
    for choice in scorer.best(KEEP) if k else []:
        for kernel in KERNELS:
            if not ctx.deadline.expired():
                scorer.score(operands, _with(choice, k[0], kernel))


def _static_range(spec: dict, scale: float, zp: int) -> dict:
    qmax = 2 ** (spec["bits"] - 1) - 1 if spec["symmetric"] else 2 ** spec["bits"] - 1
    lo, hi = (-qmax * scale, qmax * scale) if spec["symmetric"] else (-zp * scale, (qmax - zp) * scale)
    return {**spec, "granularity": "tensor", "range": [float(lo), float(hi)]}


def _seed(ctx: SearchContext, o: Operand, spec: dict) -> tuple[float, int]:
    """Scale and zero point of the sample's overall [min, max] of the operand (what a calibration on these
    prompts would give)."""
    lo, hi = _sample_range(ctx, o)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if spec["symmetric"]:
        return max(-lo, hi) / (2 ** (spec["bits"] - 1) - 1) or 1.0, 0
    scale = (hi - lo) / (2 ** spec["bits"] - 1) or 1.0
    return scale, int(np.rint(-lo / scale))


def _fit_scale(ctx: SearchContext, scorer: _Scorer, operands: list[Operand], base: tuple, i: int) -> tuple | None:
    """The static step of operand ``i`` (grid then Brent), the others as in ``base``: (scale, zp0, spec)."""
    spec = {"bits": BITS[0], "symmetric": False, "granularity": "tensor", "range": "dynamic"}
    s0, zp0 = _seed(ctx, operands[i], spec)

    def at(u: float) -> tuple:
        return _with(base, i, _static_range(spec, s0 * 2.0**u, zp0))

    def f(u: float) -> float:
        return scorer.score(operands, at(u))

    # the basin narrows as the values' largest |q - zp| grows: an asymmetric range with its zero point near one
    # end (a GELU's output: ORT's zero point 10) reaches |q - zp| ~ 245, twice a centred range's, so the grid is
    # made as much finer (ORT's tiny L3 experts.out: a 0.3% half-width basin between grid points 1.1% apart)
    n = SCALE_STEPS * math.ceil(max(zp0, 2 ** spec["bits"] - 1 - zp0) / 2 ** (spec["bits"] - 1))
    grid = np.arange(-n, n + 1) / n
    vals = scorer.grid(operands, [at(u) for u in grid], _coarse_grid(ctx, operands, base, i))
    if vals is None:
        return None
    k = int(np.argmin(vals))
    lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
    r = minimize_scalar(f, bounds=(lo, hi), method="bounded", options={"xatol": 1e-10, "maxiter": 100})
    return s0 * 2.0 ** (r.x if r.fun <= vals[k] else grid[k]), zp0, spec


def _coarse_grid(ctx: SearchContext, operands: list[Operand], base: tuple, i: int) -> bool:
    """May the grid of operand ``i``'s static step be scored with float32 products (_Scorer.grid)? An input's, where
    the op with ``base`` is a MATMUL whose product nothing rounds after it (search.linear_after_product)."""
    return operands[i].key.startswith("input.") and linear_after_product(ctx, _params(operands, base))


def _with(choice: tuple, i: int, spec: dict) -> tuple:
    return tuple(spec if j == i else s for j, s in enumerate(choice))


def _fit_static(ctx: SearchContext, scorer: _Scorer, operands: list[Operand], base: tuple, i: int) -> list[tuple]:
    """``base`` with operand ``i`` quantised per tensor over a fixed range fitted to the data: the symmetric and
    the asymmetric candidate at the fitted step (the same grid: they differ only where values clip)."""
    fitted = _fit_scale(ctx, scorer, operands, base, i)
    if fitted is None:
        return []
    scale, zp0, spec = fitted
    sym = _with(base, i, _static_range({**spec, "symmetric": True}, scale, 0))
    return [sym, _best_zero_point(ctx, scorer, operands, _with(base, i, _static_range(spec, scale, zp0)), i)]


def _best_zero_point(ctx: SearchContext, scorer: _Scorer, operands: list[Operand], choice: tuple, i: int) -> tuple:
    """``choice`` with operand ``i``'s asymmetric static range at the best zero point for its step: the best of
    _zero_points, then walked one at a time away from it while the residual falls. Past the window the
    residual grows with every zero point further into the clipping (each clips more values), so the walk ends
    where the calibrated range does: ORT's L1 router input clips the sample's top 17 zero points past the
    no-clipping interval, twice ZP_WINDOW."""
    spec, step = choice[i], _step(choice[i])

    def at(z: int) -> tuple:
        return _with(choice, i, _static_range(spec, step, z))

    score = {z: scorer.score(operands, at(z)) for z in _zero_points(ctx, operands[i], step, spec)}
    if not score:
        return choice
    best = min(score, key=score.get)
    for direction in (1, -1):
        z = best
        while 0 <= z + direction <= 2 ** spec["bits"] - 1 and not ctx.deadline.expired():
            e = score[z + direction] if z + direction in score else scorer.score(operands, at(z + direction))
            if not e < score[best]:
                break
            z += direction
            score[z], best = e, z
    return at(best)


def _zero_points(ctx: SearchContext, o: Operand, scale: float, spec: dict) -> list[int]:
    """The zero points worth trying at a fitted step: every zero point in [za, zb] clips none of the sample's
    values and gives the same result (one of them stands for all), so the candidates are those that start to
    clip at the bottom (just below za) or at the top (just above zb). When the step is too small for the
    sample's range (za > zb: a range calibrated on other prompts, narrower than these), every zero point clips
    at one end or both, and each one between does so differently: all of them are candidates (ORT's
    L1.attn.out_proj: zero point 123 in a sample that clips from 106 down and from 149 up)."""
    qmax = 2 ** spec["bits"] - 1
    lo, hi = _sample_range(ctx, o)
    za, zb = math.ceil(-min(lo, 0.0) / scale), math.floor(qmax - max(hi, 0.0) / scale)
    zs = {*range(za - ZP_WINDOW, za + 1), *range(zb, zb + ZP_WINDOW + 1), (za + zb) // 2}
    if za > zb:
        zs |= set(range(zb, za + 1))
    return sorted(z for z in zs if 0 <= z <= qmax)


def _sample_range(ctx: SearchContext, o: Operand) -> tuple[float, float]:
    # an intermediate value or the output: the target's range (a product differs from it by a bias)
    vals = [np.asarray(x[o.name]) for x in ctx.inputs] if o.key.startswith("input.") else ctx.targets
    return min(float(v.min()) for v in vals), max(float(v.max()) for v in vals)


def _score_of(scorer: _Scorer, operands: list[Operand], choice: tuple) -> float:
    return scorer.score(operands, choice) if any(c is not None for c in choice) else scorer.sub.err0


def _improve(ctx, scorer, operands, base: tuple, i: int, dynamic: bool) -> tuple:
    """``base`` with operand ``i`` quantised the best way found (its dynamic schemes when asked, then a fitted
    static range if it is an activation: a stored weight's one range is its own), or ``base`` itself when
    nothing improves on it."""
    cands = [_with(base, i, s) for s in _schemes(operands[i])] if dynamic else []
    for c in cands:
        if not ctx.deadline.expired():
            scorer.score(operands, c)
    if operands[i].activation and not ctx.deadline.expired():
        cands += _fit_static(ctx, scorer, operands, base, i)
    return min([base, *cands], key=lambda c: _score_of(scorer, operands, c))


def _result_steps(ctx: SearchContext) -> list[Operand]:
    """The op's intermediate values (refops.ROUND_STEPS) and its output, as operands the search may quantise."""
    return [Operand(s, s, True) for s in ROUND_STEPS.get(ctx.node.op, ())] + [Operand("output", ctx.node.name, True)]


def _refine(ctx: SearchContext, scorer: _Scorer, operands: list[Operand]) -> list[Operand]:
    """Static ranges for the input activations, the weights' schemes again, then the op's intermediate values
    (refops.ROUND_STEPS: a matmul's product before its bias, quantised between two kernels) and its output,
    dynamic or static, on top of the best dynamic choice, each kept only if it improves, until the node is
    explained. Returns the operands with
    the steps and the output appended (shorter choices are padded with None)."""
    best = scorer.best(1)
    steps = _result_steps(ctx)
    full = [*operands, *steps]
    pad = (None,) * len(steps)

    def explained(c: tuple) -> bool:  # within the budget itself: explains()'s 5%-of-the-divergence floor
        return _score_of(scorer, full, c) <= ctx.budget  # would stop a static fit one float32 ulp short

    if best and explained((*best[0], *pad)):
        return full  # a dynamic scheme explains the node: nothing to refine
    # start from the best dynamic choice if it moves the error at all (a weight's quantisation is found there
    # even when the activation's is static), else from the operands in float (a static range of an activation
    # is a different grid from its own range's: the dynamic candidates then leave the error where it was)
    moves = best and scorer.score(operands, best[0]) < SCREEN_PASS * scorer.sub.err0
    base = (*(best[0] if moves else (None,) * len(operands)), *pad)
    # coordinate descent: each value's range is fitted with the others' current quantisation, so a second
    # sweep refits the input's step once the product's quantisation no longer blurs its basin
    for sweep, i, o in [(sweep, i, o) for sweep in range(PASSES) for i, o in enumerate(full)]:
        if ctx.deadline.expired() or explained(base):
            break
        if i >= len(operands) and not _score_of(scorer, full, base) < SCREEN_PASS * scorer.sub.err0:
            # quantised intermediates come with quantised operands: when none moved the error, only the values
            # that set the result's grid (the last intermediate step, e.g. a matmul's product before its bias,
            # and the output) are fitted, once: such a requantisation can dominate alone (MiniLM's fc2 product,
            # ORT's step 0.77, leaves its input's quantisation, step 0.097, a 1% change alone)
            if sweep or i < len(full) - 2:
                continue

        if o.activation:
            # a step's (or the output's) candidates all take the same products, of operands quantised as in
            # ``base``: computed once (refops.shared_products; the same float64 values). A fit of MiniLM's fc2
            # product step ran the 256 x 1536 x 384 product afresh for each of its ~300 candidates. Not for an
            # input's fit: each of its candidates has other operand values, and the memo would only compare them
            with shared_products() if i >= len(operands) else contextlib.nullcontext():
                base = _improve(ctx, scorer, full, base, i, dynamic=i >= len(operands))
        elif o.key.startswith("weight."):
            # a weight's scheme is chosen again with the activations' static ranges in place: alone (the dynamic
            # stage) a per-channel s8 weight moved ORT's L0.attn.out_proj by 5% only, under SCREEN_PASS, beside an
            # input whose static grid no dynamic range reproduces, so it was left in float for good
            base = _improve(ctx, scorer, full, base, i, dynamic=True)
    return full


def _is_static(spec) -> bool:
    return isinstance(spec, dict) and spec["range"] != "dynamic"


def _zero_point(spec: dict) -> int:
    return 0 if spec["symmetric"] else int(np.rint(-min(spec["range"][0], 0.0) / _step(spec)))


def _directions(n: int) -> list[np.ndarray]:
    """Compass directions in n dimensions (each step alone, up and down), then every step together (all sign
    combinations): a move of two steps at once reaches a point where each alone makes things worse."""
    eye = np.eye(n)
    together = [np.array(signs) for signs in itertools.product((1.0, -1.0), repeat=n)] if n > 1 else []
    return [d for i in range(n) for d in (eye[i], -eye[i])] + together


def _joint_refine(ctx: SearchContext, scorer: _Scorer, operands: list[Operand], choice: tuple) -> tuple:
    """Every fitted static step of ``choice`` refined jointly: a compass search on their log2 (the directions of
    _directions, a move kept only if it lowers the residual, the stride halved when none does) from one grid
    spacing down to JOINT_TOL, then each asymmetric zero point chosen again at the refined steps. The 1-D fits
    leave a step short of its basin when another operand's rounding is still off (they saw a blurred basin),
    and Brent stalls on the residual's plateaus (it is a staircase: a rounding flips at each step value that
    puts a value on a tie; ORT's steps were left 1e-5 off); a compass search needs only that a move towards
    the minimum lowers the residual, which holds on a staircase that falls monotonically towards it."""
    idx = [i for i, spec in enumerate(choice) if _is_static(spec)]
    if not idx:
        return choice
    steps = np.array([_step(choice[i]) for i in idx])
    zps = [_zero_point(choice[i]) for i in idx]

    def at(u: np.ndarray) -> tuple:
        c = choice
        for i, s, z, du in zip(idx, steps, zps, u, strict=True):
            c = _with(c, i, _static_range(choice[i], float(s * 2.0**du), z))
        return c

    u, best, h = np.zeros(len(idx)), scorer.score(operands, choice), 1.0 / SCALE_STEPS
    while h > JOINT_TOL and not ctx.deadline.expired() and best > ctx.budget:
        moves = [(scorer.score(operands, at(u + h * d)), tuple(d)) for d in _directions(len(idx))]
        e, d = min(moves)
        if e < best:
            best, u = e, u + h * np.array(d)
        else:
            h /= 2
    choice = at(u)
    for i in idx:
        if not choice[i]["symmetric"] and not ctx.deadline.expired():
            choice = min([choice, _best_zero_point(ctx, scorer, operands, choice, i)],
                         key=lambda c: scorer.score(operands, c))  # fmt: skip
    return choice


def _polish(ctx: SearchContext, scorer: _Scorer, operands: list[Operand], choice: tuple) -> tuple:
    """Each fitted static step moved to the best float32 value within F32_ULPS units of it. The scale is a
    float32 tensor (ONNX QuantizeLinear) and x / scale a float32 division, so one ulp (1.2e-7 relative) of
    the step moves the quotients near a rounding tie across it: the residual is flat only on the exact value,
    finer than Brent resolves a floor of rounding flips (it stopped 5.7e-6 and 3.7e-6 off on ORT's int8-static
    qkv of layer 1, both polished to the exact float32 scale). PASSES sweeps: one step is found more easily
    once the other is exact."""
    for i, spec in [(i, choice[i]) for _ in range(PASSES) for i in range(len(choice))]:
        spec = choice[i]
        if ctx.deadline.expired() or not isinstance(spec, dict) or spec["range"] == "dynamic":
            continue
        step = np.float32(_step(spec))
        zp = 0 if spec["symmetric"] else int(np.rint(-min(spec["range"][0], 0.0) / float(step)))
        steps = [step]
        for direction in (np.float32(np.inf), np.float32(0)):
            s = step
            for _ in range(F32_ULPS):
                s = np.nextafter(s, direction)
                steps.append(s)
        cands = [_with(choice, i, _static_range(spec, float(s), zp)) for s in steps]
        choice = min(cands, key=lambda c: scorer.score(operands, c))
    return choice


def _simplest(ctx: SearchContext, operands: list[Operand], choice: tuple, err: float) -> tuple[tuple, float]:
    """``choice`` with every operand left in float whose quantisation the residual does not need (it stays
    within the budget, or within 1% of ``err``): the fewest causes that explain."""
    for i in range(len(choice)):
        if choice[i] is None or sum(c is not None for c in choice) == 1:
            continue
        c = _with(choice, i, None)
        e = _evaluate(ctx, _params(operands, c))
        if e <= max(ctx.budget, 1.01 * err):
            choice, err = c, e
    return choice, err


# ----------------------------------------------------------------------------------------------- words
def _gran_words(ctx: SearchContext, o: Operand, spec: dict) -> str:
    gran = spec["granularity"]
    if gran == "tensor":
        return "per tensor (one range per prompt)" if o.activation and spec["range"] == "dynamic" else "per tensor"
    if o.activation:
        return {"row": "per token (row)", "column": "per feature (column)"}[gran]
    op = ctx.node.op
    if op == "EMBED":
        return {"row": "per row (token)", "column": "per column (feature)"}[gran]
    rows_out = op != "EXPERT_FC2"  # stored [out, in] everywhere but the second expert matrix ([E*F, H], F in)
    channel = {"row": "output" if rows_out else "input", "column": "input" if rows_out else "output"}
    if gran == "block":
        return "per expert"
    if gran == "block_column":
        return f"per expert and {channel['column']} channel"
    return f"per {channel[gran]} channel"


def _operand_words(ctx: SearchContext, o: Operand, spec) -> str:
    if o.key == "kernel":
        return ("the integer products summed two at a time into a saturating 16-bit integer (a u8 x s8 "
                "multiply-add without a wider accumulator), then in 32 bits")  # fmt: skip
    what = {"input": "the input", "weight": "the weight", "output": "the output"}.get(o.key.split(".")[0])
    what = f"{what} {o.name}" if what else _step_words(ctx, o.key)
    kind = "symmetric" if spec["symmetric"] else "asymmetric"
    words = f"{what} to {spec['bits']}-bit {kind} {_gran_words(ctx, o, spec)}"
    if spec["range"] == "dynamic":
        return words + (" with its own range at run time" if o.activation else "")
    lo, hi = spec["range"]
    note = ""
    if o.key.startswith("input."):
        vals = [np.asarray(x[o.name]) for x in ctx.inputs]
        vlo, vhi = min(float(v.min()) for v in vals), max(float(v.max()) for v in vals)
        if lo < vlo and vhi < hi:  # nothing clips: the bounds are not identified, only the step
            note = f"; the sample's values [{fmt(vlo)}, {fmt(vhi)}] never reach the bounds, so only the step is "
            note += "identified"
    return words + f" with the fixed range [{fmt(lo)}, {fmt(hi)}] (fitted, step {fmt(_step(spec))}{note})"


def _step(spec: dict) -> float:
    lo, hi = spec["range"]
    if spec["symmetric"]:
        return max(-lo, hi) / (2 ** (spec["bits"] - 1) - 1)
    return (max(hi, 0.0) - min(lo, 0.0)) / (2 ** spec["bits"] - 1)


def _says(ctx: SearchContext, operands: list[Operand], choice: tuple, err: float) -> str:
    parts = [_operand_words(ctx, o, s) for o, s in zip(operands, choice, strict=True) if s is not None]
    joined = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + ", and " + parts[-1]
    return f"quantised: {joined}; {_residual(ctx, err)}"


def _name(ctx: SearchContext, operands: list[Operand], choice: tuple) -> str:
    def short(s) -> str:
        if isinstance(s, str):
            return s
        r = "dyn" if s["range"] == "dynamic" else "static"
        return f"{'s' if s['symmetric'] else 'u'}{s['bits']}/{s['granularity']}/{r}"

    items = [f"{o.key}={short(s)}" for o, s in zip(operands, choice, strict=True) if s is not None]
    return f"{ctx.node.op}.quant." + "+".join(items)


# How far a static range may be from the values it quantises: up to REACH x as wide as their own range (an
# 8-bit grid REACH x coarser: 6 bits of resolution left at 4). The static fits (seconds per operand on an
# expert op) run only where quantisation on such grids can move the op's output as far as the engine's is.
REACH = 4.0
# Out of that reach the static fits still run, on this share of the search's time left: a range calibrated on
# other prompts can be far wider than these prompts' values (MiniLM's fc2 product: ORT's step 0.77 from
# calibration prompts with the outlier feature, 5x the step of a shard's prompts without it), but a divergence
# that large is more often something else, which the later searchers (recovered weights, expert maps) must
# still have time to find.
OUT_OF_REACH_SHARE = 0.25


def _within_reach(ctx: SearchContext, sub: SearchContext, operands: list[Operand]) -> bool:
    """Whether quantisation can account for the divergence at all. An explaining candidate lies within the
    budget of the engine's output, so it moves the op's output from the spec by about ``err0`` (triangle
    inequality). Every value the search quantises (operands, intermediate steps, output) on its own range's
    coarsest grid (BITS[0], per tensor, asymmetric, dynamic) moves it by ``d``; a static range at most REACH x
    wider moves each value at most REACH x as far, so ``err0 > REACH * d`` (e.g. a permuted expert, err0 ~ 1
    against d ~ 1e-2) is out of reach: the static fits then get OUT_OF_REACH_SHARE of the time left."""
    coarse = {"bits": min(BITS), "symmetric": False, "granularity": "tensor", "range": "dynamic"}
    steps = _result_steps(ctx)
    full = [o for o in (*operands, *steps) if o.key != "kernel"]
    params = _params(full, tuple(coarse for _ in full))
    try:
        moved = [run_op(sub.graph, sub.node, x, sub.weights, {**sub.spec, **params}) for x in sub.inputs]
    except (NotApplicable, KeyError, ValueError, FloatingPointError):
        return True  # cannot tell: search as before
    d = sample_error(sub.spec_out, moved, sub.denom)
    err0 = sub.err0 or ctx.err0
    return not (math.isfinite(d) and err0 > REACH * d)


@register
def quantisation(ctx: SearchContext) -> Iterator[Finding]:
    """The op on uniformly quantised operands (joint schemes, static ranges fitted, then the output)."""
    if not _searchable(ctx):
        return
    operands = _operands(ctx)
    if not operands:
        return
    scorer = _Scorer(ctx)
    _joint(ctx, operands, scorer)
    _kernels(ctx, operands, scorer)
    reach = _within_reach(ctx, scorer.sub, operands)
    with ctx.deadline.capped(math.inf if reach else OUT_OF_REACH_SHARE * ctx.deadline.left()):
        operands = _refine(ctx, scorer, operands)
    n, seen = len(operands), set()
    for rank, choice in enumerate(scorer.best(KEEP)):
        choice = tuple(choice) + (None,) * (n - len(choice))
        if rank == 0 and not scorer.score(operands, choice) <= ctx.budget:
            # the best only: ~20 strides x (2n + 2^n) candidates, then 2 x 129 a static step
            choice = _polish(ctx, scorer, operands, _joint_refine(ctx, scorer, operands, choice))
        err = _evaluate(ctx, _params(operands, choice))
        choice, err = _simplest(ctx, operands, choice, err)
        if repr(choice) in seen or not _improves(ctx, err):
            continue
        seen.add(repr(choice))
        yield _finding("precision", _name(ctx, operands, choice), _says(ctx, operands, choice, err), err,
                       _params(operands, choice))  # fmt: skip
