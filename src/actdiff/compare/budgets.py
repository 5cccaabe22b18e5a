"""Error budgets: how much LOCAL (teacher-forced) relative L2 error a correct engine may show at a node.

A node's local error is the error of the engine's op alone, run on the reference's inputs. For a correct
implementation it has three sources:

- fp32 rounding (every side): the node's **fp32 noise**, recovered from the data for each prompt rather than
  predicted per op: the reference's own value against the same op computed in float64 (the spec op of
  actdiff.compare.refops on the reference's own inputs; column ``ref_fp32_error``). It is what computing
  this node, on these values, in fp32 costs, and it already holds what an analytic model would have to
  guess (reduction length, blocking, cancellation, exp/erf accuracy, rotary angles built in fp32 on long
  prompts). Where the reference's kernel can be far more accurate than a plain loop (long sums: SUM_OPS)
  the noise is at least the sequential-summation envelope (:func:`sequential_sum_noise`; for LayerNorm and
  the L2 normalisation, whose row sums PyTorch also computes far better than a loop,
  :func:`normalisation_noise`), also computed from the data. Column ``fp32_noise``;
- weight storage: fp16 (u = 2^-11), bf16 (2^-8), int8 per-channel symmetric (step = max|w|/127; relative
  rms error of a weight ~ (max|w|/rms|w|) / (127 * sqrt(12)) ~ 2^-7 for Gaussian-like rows of width
  768; taken as 2^-7). Each output is a sum of many independently rounded terms, so the output's relative
  error is about u itself;
- activation rounding (fp16-act, ONNX Runtime's fp16): output and inputs rounded to fp16, u = 2^-11 each;
- the reference's own precision (:data:`U_REFERENCE`, from the dump's ``reference_precision``:
  actdiff.reference_device). The terms above assume the reference computed in fp32, whatever its device: on
  CUDA with TF32 off its noise is still measured from its own values (its GEMM order, its libdevice exp/erf
  within R_IMPL's 3 ulp), so "fp32" adds nothing. With TF32 allowed (``reference.allow_tf32``) the reference's
  matmul-like ops round both operands of every product to a 10-bit mantissa (u = 2^-11 each, so a product's
  relative error is up to 2u) and accumulate in fp32: like weight storage, a sum of many independently
  rounded products has a relative error of about 2u = 2^-10, which an fp32 engine does not share, so its
  local error against that reference carries it in full. It is added at :data:`TF32_OPS`, and the measured
  noise need not show it (a node whose spec op cannot run, an envelope larger than the measurement).

budget = SAFETY * (max(noise, NOISE_FLOOR) + u_weights + u_activations + u_reference)

SAFETY = CONCENTRATION * sqrt(1 + R_IMPL^2) = 2 * sqrt(10) ~ 6.3. A correct engine's error against exact
is r x the noise, r the ratio of two correct fp32 implementations' accuracy (1-ulp against 3-ulp exp/erf:
the scalar, AVX2 and AVX-512 paths differ by up to 2.9x in softmax, measured; summation order is covered
by the envelope), R_IMPL = 3. Its error against the reference then has rms sqrt(1 + r^2) x the noise
(independent roundings). A relative L2 over n >= 16 values concentrates: it exceeds twice its rms with
probability below 1e-6 (chi-square tail), CONCENTRATION = 2.

What it guarantees (the criterion tests/test_stats.py checks on every ISA path the CPU runs): a bug whose own
error at a node exceeds 6.3x the node's fp32 noise fails there; and since the noise is never more than
1.6x the fp32 error actually present at a node (the larger of a correct engine's local error and the
reference's own error, on every path), every budget is within 10x of that error, so a bug at 10x the fp32
error of a node is caught. The earlier analytic model (8 * 2^-24 * sqrt(K)) was 5-100x the observed error
depending on the op: a bug 90x the noise could hide in a LayerNorm, and the fixed "budget <= 100x observed"
test it was checked with passed on AVX-512 and failed on AVX2.

NOISE_FLOOR = 2^-25 (half a unit roundoff, the rms of one rounding): where the reference's value is exact
(a copy, a split, an add whose sum is representable) the measured noise is 0, but another correct order of
the same operations may still round once. The budget (per prompt and node) is written beside the local error
in the nodes table; ``budgets: {"<node glob>": value}`` in the config overrides it.
"""

from __future__ import annotations

import fnmatch
import math
from collections import ChainMap
from typing import NamedTuple

import numpy as np

from ..nodes import INPUT_IDS, Graph, Node
from ..variants import policy
from .refops import NotApplicable, linear_in_rows, run_op, run_op_many, spec_params, squared_weights_output_sum

U32 = 2.0**-24
R_IMPL = 3.0  # accuracy ratio between two correct fp32 implementations of one op (see the module docstring)
CONCENTRATION = 2.0  # a relative L2 over >= 16 roundings stays within 2x its rms (p > 1 - 1e-6)
SAFETY = CONCENTRATION * math.sqrt(1.0 + R_IMPL**2)
# Every precision of every engine is budgeted by its policy (actdiff.variants.POLICIES: weight format, the
# weighted ops it keeps at fp32, activation format), so one format gets one rule whatever engine runs it:
# int8, int8-dynamic and int8-static all get 2^-7 wherever their weights are int8 (each policy names the
# weighted ops it keeps at fp32: our engine's int8 its routers and embeddings).
# q8_0 (llama.cpp): blocks of 32 weights sharing an fp16 scale max|w|/127, so like int8 per channel but
# with a tighter range per block; taken as 2^-7 as well. llama.cpp also rounds the activations entering a
# quantised matmul to q8_0 (f16 for an f16 GGUF); both stay well inside SAFETY * u_weights.
U_WEIGHTS = {"fp32": 0.0, "fp16": 2.0**-11, "bf16": 2.0**-8, "int8": 2.0**-7}  # by weight format
# by activation format. 8-bit activations (int8-dynamic, int8-static: per-tensor scales, (max - min) / 255 set
# by the tensor's outliers) have no rule: their error is not a bounded unit roundoff, so no allowance is
# derived and such a precision is never PASS (:func:`unbudgeted`; compare.aggregate).
U_ACT = {"fp32": 0.0, "fp16": 2.0**-11}
WEIGHTED_OPS = ("MATMUL", "ROUTER", "EXPERT_FC1", "EXPERT_FC2", "EMBED")
# by the reference's own precision (the dump's reference_precision): TF32 rounds both factors of each product
# to u = 2^-11, so 2 * 2^-11 per product; accumulation stays fp32 (the measured noise)
U_REFERENCE = {"fp32": 0.0, "tf32": 2 * 2.0**-11}
# the ops whose products the reference runs as cuBLAS GEMMs on CUDA, where TF32 applies: linear layers, the
# router, the experts (x @ w), and attention's QK^T and PV (einsum in NomicAttention, matmul in transformers'
# eager BERT attention: batched GEMMs). Pooling is an elementwise product and a sum, embeddings a lookup.
TF32_OPS = ("MATMUL", "ROUTER", "EXPERT_FC1", "EXPERT_FC2", "ATTENTION")


NOISE_FLOOR = U32 / 2


class Noise(NamedTuple):
    """A node's fp32 noise on one prompt: ``measured`` (the reference against float64) and ``envelope`` (the
    sequential-summation model, 0 outside SUM_OPS); ``value`` is what the budget scales."""

    measured: float
    envelope: float = 0.0

    @property
    def value(self) -> float:
        return max(self.measured, self.envelope) if math.isfinite(self.measured) else self.envelope


def fp32_noise(
    graph: Graph, node: Node, ref: dict, weights, exact: np.ndarray | None = None, q: float | None = None
) -> Noise:
    """The reference's own fp32 rounding error at ``node`` on one prompt: its value against the float64 spec
    op (refops) on the reference's own inputs (``ref`` holds every node of the prompt; ``exact``: that op's
    value when the caller has it, :func:`fp32_noise_many`; ``q``: likewise :func:`_squared_op_sum`'s value).
    NaN when the spec op cannot run on them (the budget then falls back to the floor) or for index nodes, which
    have no noise."""
    if node.kind == "index":
        return Noise(math.nan)
    params = spec_params(graph, node)
    if exact is None:
        try:
            exact = run_op(graph, node, ref, weights, params)
        except NotApplicable:
            return Noise(math.nan)
    value = np.asarray(ref[node.name], dtype=np.float64).reshape(exact.shape)
    if not (np.all(np.isfinite(value)) and np.all(np.isfinite(exact))):
        return Noise(math.nan)
    den = float(np.linalg.norm(exact))
    diff = float(np.linalg.norm(value - exact))
    measured = diff / den if den > 0 else (0.0 if diff == 0 else math.inf)
    if node.op in SUM_OPS:
        return Noise(measured, sequential_sum_noise(graph, node, ref, weights, params, exact, q))
    if node.op in NORM_OPS and params.get("axis", "hidden") == "hidden":
        return Noise(measured, normalisation_noise(node, ref, weights, params, exact))
    return Noise(measured)


def fp32_noise_many(graph: Graph, node: Node, refs: list[dict], weights) -> list[Noise]:
    """:func:`fp32_noise` of each prompt of ``refs``, the spec op run once over their stacked rows where
    refops.run_op_many stacks them (a row-wise op: a MATMUL's product then is one float64 matmul whose every
    element is the same chain of fused multiply-adds as in the prompt's own, actdiff.kernels.matmul_f64). One
    float64 product per prompt and node was half of the reference noise's time on MiniLM's short prompts."""
    if node.kind == "index" or len(refs) < 2:
        return [fp32_noise(graph, node, ref, weights) for ref in refs]
    params = spec_params(graph, node)
    try:
        exacts = run_op_many(graph, node, refs, weights, params)
    except NotApplicable:  # maybe not on every prompt alone: each its own
        return [fp32_noise(graph, node, ref, weights) for ref in refs]
    qs = _squared_op_sums(graph, node, refs, weights, params) if node.op in SUM_OPS else [None] * len(refs)
    return [fp32_noise(graph, node, ref, weights, exact, q) for ref, exact, q in zip(refs, exacts, qs, strict=True)]


# Ops whose output is a long sum of products (or of values) where the reference's kernel may be far more
# accurate than a plain loop: PyTorch pools with cascade summation, and its GEMM on a few tokens (MKL's small-M
# paths) measured below one unit roundoff at K = 1536, where a sequential FMA chain is 5-30x less accurate.
# There the reference's measured noise under-states what a correct fp32 implementation costs, so the noise is
# the larger of it and the sequential-summation envelope. Elsewhere (attention, softmax, GELU, rotary, adds)
# a correct engine measured at most 3x the reference's noise on every ISA path; normalisations: NORM_OPS.
SUM_OPS = ("MATMUL", "ROUTER", "EXPERT_FC1", "EXPERT_FC2", "POOL")
# Normalisations reduce each row too (a sum of squares; LayerNorm also a sum for the mean), and PyTorch's
# kernels do it far more accurately than a loop: ONNX Runtime's fp32 L2 normalisation measured up to 6.6x the
# reference's noise and its LayerNorm 5.4x (MiniLM, hidden 384), past R_IMPL = 3, on prompts where the
# reference's own error was 2-3e-8. Their noise is at least :func:`normalisation_noise`.
NORM_OPS = ("LAYERNORM", "L2NORM")


def sequential_sum_noise(
    graph: Graph, node: Node, ref: dict, weights, params: dict, exact: np.ndarray, q: float | None = None
) -> float:
    """Rms relative error of computing ``node`` as K-term sums in fp32, one term after another (with FMA).

    Each addition s_k = s_(k-1) + t_k rounds with a relative error uniform in [-u, u] (u = 2^-24, rms
    u/sqrt(3)) times the partial sum, so an output's error has variance u^2/3 * sum_k s_k^2. For the K terms
    of an output summed in an arbitrary order, sum_k s_k^2 ~ (K/6) q + (K/3) y^2 with q = sum_k t_k^2 and
    y = sum_k t_k (random-permutation average: (K+1)/6 (q - y^2/K) for the spread, sum (k y/K)^2 for the
    drift). q is the same op on squared inputs and squared weights, so cancellation (q >> y^2) is accounted
    for from the data; only its sum over the outputs enters (:func:`_squared_op_sum`, or ``q`` where the caller
    has it: :func:`_squared_op_sums`). One more rounding for the bias (or the mean's division)."""
    T = len(ref[INPUT_IDS])
    if node.op == "POOL":
        x = np.asarray(ref[node.inputs[0]], dtype=np.float64).reshape(T, -1)
        k, q, y = graph.reduction_length(node, tokens=T), float(np.sum(x * x)), np.sum(x, axis=0)
    else:
        k = graph.reduction_length(node)
        q = _squared_op_sum(graph, node, ref, weights, params) if q is None else q
        y = exact
        if params.get("bias") == "once":  # the sum itself: the spec output less its bias (no second matmul)
            b = np.asarray(weights[node.weights[1]], dtype=np.float64)
            y = (exact.reshape(exact.shape[0], -1) - b).reshape(exact.shape)
    total = float(np.linalg.norm(y))
    if total == 0.0 or k < 2:
        return 0.0
    var = k / 6.0 * q + k / 3.0 * float(np.sum(np.square(y)))
    return U32 / math.sqrt(3.0) * (math.sqrt(var) / total + 1.0)


def _squared_op_sum(graph: Graph, node: Node, ref: dict, weights, params: dict) -> float:
    """The sum over the op's outputs of the op (without its bias) on squared inputs and squared weights.

    Where the op is linear in each row (refops.linear_in_rows: every product of the spec), the sum over the rows
    that share their index inputs (a token's experts; all rows of a MATMUL) is the op on those rows summed, so
    the op runs once per distinct index row: one row of a MATMUL instead of T, at most a few dozen of an expert
    product's. The squared product over every row was a third of the reference noise's float64 products. On the
    spec's plain products not even that: the summed rows dotted with the weights' squares summed over the outputs
    (refops.squared_weights_output_sum), no squared weight made."""
    squares = _float_squares(node, ref)
    no_bias = _without_bias(params)
    if linear_in_rows(node, no_bias):
        summed = _rows_summed(node, ref, squares)
        q = squared_weights_output_sum(graph, node, summed, weights, no_bias)
        if q is not None:
            return q
        return float(np.sum(run_op(graph, node, summed, _squared_weights(node, weights), no_bias)))
    squared = ChainMap(squares, ref)  # not a copy: a prompt read node by node (h5io.NodeByNode) would read all
    # squared once per node and prompt in a reused buffer where the mapping offers it (compare.stats)
    return float(np.sum(run_op(graph, node, squared, _squared_weights(node, weights), no_bias)))


def _squared_op_sums(graph: Graph, node: Node, refs: list[dict], weights, params: dict) -> list[float | None]:
    """:func:`_squared_op_sum` of each prompt of ``refs`` where the op is linear in rows: on the spec's plain
    products each prompt's own (a dot product, refops.squared_weights_output_sum), else the op run once over the
    prompts' summed rows stacked (refops.run_op_many: each row's float64 products are its own bits, so each sum is
    the one the prompt alone gives): one summed row per prompt and MATMUL read the whole squared weight for each
    prompt (MiniLM's reference noise: 2-3 of its 22 CPU-s). None for a prompt where the caller computes its own."""
    no_bias = _without_bias(params)
    if len(refs) < 2 or not linear_in_rows(node, no_bias):  # (no POOL: not one of its ops)
        return [None] * len(refs)
    summed = [_rows_summed(node, ref, _float_squares(node, ref)) for ref in refs]
    qs = [squared_weights_output_sum(graph, node, s, weights, no_bias) for s in summed]
    if all(q is not None for q in qs):
        return qs
    return [float(np.sum(y)) for y in run_op_many(graph, node, summed, _squared_weights(node, weights), no_bias)]


def _float_squares(node: Node, ref: dict) -> dict[str, np.ndarray]:
    """The node's float inputs squared, in float64."""
    squares = {}
    for i in node.inputs:
        v = np.asarray(ref[i])
        if v.dtype.kind == "f":
            squares[i] = np.square(v, dtype=np.float64)
    return squares


def _squared_weights(node: Node, weights) -> dict[str, np.ndarray]:
    """The node's weights squared in float64 (the mapping's own memoised squares where it has them:
    compare.stats.NodeWeights64.squared)."""
    square = getattr(weights, "squared", None) or (lambda w: np.square(np.asarray(weights[w], dtype=np.float64)))
    return {w: square(w) for w in node.weights}


def _without_bias(params: dict) -> dict:
    return {**params, "bias": "none"} if "bias" in params else params


def _rows_summed(node: Node, ref: dict, floats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The node's inputs with the rows of its float inputs (``floats``) summed over each group of rows whose
    index inputs are equal, one row per group (its index inputs' first row)."""
    index = [i for i in node.inputs if i not in floats]
    if not index:
        return {i: v.sum(axis=0, keepdims=True) for i, v in floats.items()}
    T = len(np.asarray(ref[index[0]]))
    keys = np.concatenate([np.asarray(ref[i]).reshape(T, -1) for i in index], axis=1)
    _, first, group = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    group = group.reshape(-1)
    summed = {}
    for i, v in floats.items():
        summed[i] = np.zeros((len(first), *v.shape[1:]))
        np.add.at(summed[i], group, v)
    return {**summed, **{i: np.asarray(ref[i])[first] for i in index}}


def _sum_rounding_rms(t: np.ndarray) -> np.ndarray:
    """Rms absolute error of summing each row of ``t`` (last axis) in fp32 one term after another, in an
    arbitrary order: u/sqrt(3) * sqrt(K/6 q + K/3 y^2), as :func:`sequential_sum_noise` derives."""
    k = t.shape[-1]
    q, y = np.sum(t * t, axis=-1), np.sum(t, axis=-1)
    return U32 / math.sqrt(3.0) * np.sqrt(k / 6.0 * q + k / 3.0 * y * y)


def normalisation_noise(node: Node, ref: dict, weights, params: dict, exact: np.ndarray) -> float:
    """Rms relative L2 error of a LayerNorm or L2 normalisation over the hidden axis whose row sums are
    computed one term after another in fp32 (:func:`_sum_rounding_rms`), and one rounding of each output
    (rms u/sqrt(3)), independent of the sums', so added in quadrature. 0 where the op is a copy (L2NORM with
    normalize off)."""
    x = np.asarray(ref[node.inputs[0]], dtype=np.float64)
    x = x.reshape(-1, x.shape[-1])
    if node.op == "L2NORM":
        if not params.get("normalize", True):
            return 0.0
        err, total = _l2norm_sum_error(x)
    else:
        err, total = _layernorm_sum_error(x, weights, node, params)
        total = float(np.linalg.norm(exact))
    return math.hypot(err / total, U32 / math.sqrt(3.0)) if total > 0.0 else 0.0


def _l2norm_sum_error(x: np.ndarray) -> tuple[float, float]:
    """y = x / ||x|| row by row: the sum of squares S errs by delta_S (relative), the norm by delta_S / 2, a
    common scale on the row, so the row's relative error is delta_S / 2. Rows have unit norm: the total is
    sqrt(rows). (error norm, output norm)."""
    s = np.sum(x * x, axis=-1)
    live = s > 0
    rel = 0.5 * _sum_rounding_rms(x[live] * x[live]) / s[live]
    return float(np.sqrt(np.sum(rel**2))), float(np.sqrt(np.count_nonzero(live)))


def _layernorm_sum_error(x: np.ndarray, weights, node: Node, params: dict) -> tuple[float, float]:
    """y = g * (x - m) / s + b row by row. The mean's error d_m (the sum's error / K) shifts every centred
    value: (d_m / s) * ||g|| on the row. The sum of squares of the centred values V errs by delta_V, scaling
    the normalised row by delta_V / 2 * V / (V + K eps): that times ||g * (x - m) / s||. Independent, so added
    in quadrature over every row. (error norm, 0: the caller takes the output's norm)."""
    k, eps, centred = x.shape[-1], float(params.get("eps", 0.0)), bool(params.get("centered", True))
    c = x - x.mean(axis=-1, keepdims=True) if centred else x
    v = np.sum(c * c, axis=-1)
    sd = np.sqrt(v / k + eps)
    sd = np.where(sd > 0, sd, 1.0)
    g = np.asarray(weights[node.weights[0]], dtype=np.float64) if params.get("affine", True) else np.ones(k)
    scale_err = 0.5 * _sum_rounding_rms(c * c) / np.maximum(v + k * eps, np.finfo(float).tiny)
    shift_err = _sum_rounding_rms(x) / k / sd if centred else np.zeros_like(sd)
    normalised2 = np.sum((g * c / sd[:, None]) ** 2, axis=-1)
    return float(np.sqrt(np.sum(scale_err**2 * normalised2 + shift_err**2 * float(np.sum(g * g))))), 0.0


def budget(
    node: Node,
    precision: str,
    noise: Noise,
    overrides: dict | None = None,
    reference: str = "fp32",
    side: str | None = None,
) -> float:
    """Relative-L2 budget of the node's local error for engine ``side`` at ``precision`` (its policy:
    actdiff.variants.policy), given the node's fp32 noise on this prompt (:func:`fp32_noise`) and the
    reference's own precision (``reference``: the dump's reference_precision, :data:`U_REFERENCE`)."""
    return budget_of(budget_terms(node, precision, overrides, reference, side), noise)


class BudgetTerms(NamedTuple):
    """What a node's budget adds to its fp32 noise at one precision (:func:`budget_terms`): the same for every
    prompt, so a statistics job works them out once per node (a budget is asked for twice per node and prompt)."""

    override: float | None  # the configured budget of a node an ``overrides`` pattern names
    u_w: float  # the weights' rounding
    u_a: float  # the activations' rounding, on the node's inputs and its output
    u_r: float  # the reference's own precision (tf32 products)


def budget_terms(
    node: Node, precision: str, overrides: dict | None = None, reference: str = "fp32", side: str | None = None
) -> BudgetTerms:
    """The prompt-independent terms of :func:`budget` for ``node``."""
    for pattern, value in (overrides or {}).items():
        if fnmatch.fnmatchcase(node.name, pattern):
            return BudgetTerms(float(value), 0.0, 0.0, 0.0)
    pol = policy(precision, side)
    u_w = U_WEIGHTS[pol.weights] if node.op in WEIGHTED_OPS and node.op not in pol.fp32_ops else 0.0
    u_a = U_ACT.get(pol.activations, 0.0) * (2 if node.kind != "index" else 0)
    u_r = U_REFERENCE[reference] if node.op in TF32_OPS else 0.0
    return BudgetTerms(None, u_w, u_a, u_r)


def budget_of(terms: BudgetTerms, noise: Noise) -> float:
    """:func:`budget` from the node's terms and its fp32 noise on the prompt (the same sum, in the same order)."""
    if terms.override is not None:
        return terms.override
    v = noise.value
    floor = v if math.isfinite(v) and v > NOISE_FLOOR else NOISE_FLOOR
    return SAFETY * (floor + terms.u_w + terms.u_a + terms.u_r)


def reference_precision_of(attrs, where: str = "the reference dump") -> str:
    """The reference's own precision from its dump's attributes ("fp32" for a dump written before the
    reference recorded it: those all ran on the CPU)."""
    from ..errors import DumpError

    raw = attrs.get("reference_precision", "fp32")
    raw = raw.decode() if isinstance(raw, bytes) else str(raw)
    if raw not in U_REFERENCE:
        raise DumpError(f"{where}: attribute reference_precision is {raw!r}, not one of {', '.join(U_REFERENCE)}; "
                        "rewrite the dump with this version's dump_reference")  # fmt: skip
    return raw


def unbudgeted(precision: str, side: str | None = None) -> str | None:
    """What engine ``side``'s precision rounds that no budget allows for (None: every error source has its rule)."""
    pol = policy(precision, side)
    if pol.activations not in U_ACT:
        return f"activations quantised to {pol.activations}, which no precision policy budgets"
    return None


def status(local_rel_l2: float, propagated_rel_l2: float, node_budget: float, nonfinite_new: bool) -> str:
    """fail: the node's own error is over budget (or it produced NaN/Inf the reference does not have);
    warn: its own error is fine but it carries inherited error above 10x its budget; pass otherwise."""
    if nonfinite_new or not local_rel_l2 <= node_budget:
        return "fail"
    if propagated_rel_l2 > 10 * node_budget:
        return "warn"
    return "pass"


def check_budget_globs(budgets: dict, graphs: dict[str, Graph], unknown: tuple[str, ...] = ()) -> None:
    """Refuse a ``budgets:`` glob that matches no node of any configured model (``graphs``: model name ->
    graph): it would be ignored silently, and the budget the user meant to set never applied. A glob needs to
    match in one model only: budgets apply to every model, and a MoE-only glob has nothing to match in a dense
    one. ``unknown``: models whose graph is not known yet (their directory is missing, which resolve_model
    reports); a glob could match there, so it is not judged."""
    from ..errors import ConfigError

    for pattern in budgets:
        if unknown or any(fnmatch.fnmatchcase(n, pattern) for g in graphs.values() for n in g.names()):
            continue
        models = "; ".join(
            f"{m!r} ({len(g)} nodes, e.g. {', '.join(g.names()[i] for i in (0, 1, 2, len(g) // 2, -1))})"
            for m, g in graphs.items()
        )
        which = f"model {models}" if len(graphs) == 1 else f"any model: {models}"
        raise ConfigError(
            f"config key 'budgets': the node glob {pattern!r} matches no node of {which}. Node names "
            "are listed by `actdiff nodes MODEL_DIR` (docs/nodes.md); globs use * and ? (fnmatch, case-sensitive)"
        )
