"""Parametric float64 numpy implementation of every op type of the canonical graph.

Each op is computed from its inputs and the raw checkpoint tensors under a dict of named parameters.
:func:`spec_params` gives the parameters the model spec prescribes (docs/spec.md); with them
:func:`run_op` reproduces the reference model's node values (to ~1e-7 relative: the reference is fp32,
this is float64). Changing one parameter gives the value a specific, plausible bug would produce; the
hypothesis catalogue (``actdiff/data/hypotheses.yaml``) is a list of such parameter overrides and
:mod:`actdiff.compare.hypotheses` ranks them against an engine's output.

Inputs are ONE prompt's values, keyed by the node's input names, shaped as the graph says ([T, ...];
``input_ids`` is [T] int). Weights are keyed by checkpoint tensor name, raw as stored (``Wqkv`` [3H, H],
experts ``w1``/``w2`` [E*F, H], ...). Results are float64 (int64 for top-k indices).

Parameters (spec value first; every op except TOPK indices also has ``output_precision``):

| op | parameters |
|---|---|
| EMBED | token_type: row0/none; weight_precision; BERT only: positions: absolute/none, position_offset: 0 |
| LAYERNORM | eps; variance: biased/unbiased; centered: True (False = RMSNorm); affine: True; accumulate |
| MATMUL | bias: once/none/twice; weight_orientation: as_stored/transposed (square only); weight_precision; accumulate |
| SPLIT | order: qkv_major/head_major |
| ROPE | layout: neox/gptj/none; base; position_offset: 0; angles: fp64/fp32_recurrence (ggml's rope cache); |
|   | ntk_scaling: None or [factor, max_trained_positions] (dynamic NTK: the base of a T-token prompt grows |
|   | with T above max_trained_positions, actdiff.nodes.ntk_rotary_base; ``base`` is the configured base) |
| ATTENTION | mask: bidirectional/causal/query_padding; scale: inv_sqrt_head_dim/inv_head_dim/none; |
|   | softmax: stable/naive; output_layout: heads_outer/heads_inner; accumulate |
| ADD | terms: both/first/second |
| GELU | form: erf/tanh/sigmoid/silu/relu/tanh_fp16_table (ggml's CPU GELU, see :func:`gelu_tanh_fp16_table`) |
| ROUTER | weight_precision; accumulate |
| SOFTMAX | function: softmax/sigmoid; softmax: stable/naive; accumulate |
| TOPK | renormalize: config value; order: by_weight/by_index |
| EXPERT_FC1 | expert_index_map: identity/reversed/off_by_one/off_by_minus_one; w1_orientation: FH/HF; |
|   | weight_precision; accumulate |
| EXPERT_FC2 | expert_index_map; w2_orientation: FH/HF; weight_precision; accumulate |
| MOE_SUM | renormalize: False; weighted: True; accumulate |
| BIAS_ADD | bias: once/none/twice/per_expert (per_expert reads the layer's top-k weights, see :func:`aux_inputs`) |
| POOL | mode: mean/cls/max/sum/last; accumulate |
| L2NORM | eps: 1e-12; normalize: True; accumulate |

Precision emulation: ``weight_precision`` (fp64/fp32/fp16/bf16/int8) rounds the weight matrices before use
(int8: symmetric per output channel over the reduced axis); ``accumulate`` (fp64/fp32/fp16/bf16) rounds
every float input, every weight and the result to that format (a reduced-precision kernel, emulated);
``output_precision`` (fp64/fp32/fp16/bf16/int8) rounds only the result (reduced-precision activations;
int8 = symmetric per-row absmax).

Search parameters (SEARCH_PARAM_NAMES; varied by actdiff.compare.search_fit, not by the catalogue; spec value
first, each reproducing the spec path exactly):

| op | parameters |
|---|---|
| every op | round_at: {} ({step: precision}: round the named intermediate value, ROUND_STEPS, or ``input.<i>`` / |
|   | ``weight.<i>``); input_order / weight_order: identity [0, 1, ...] (role i is played by operand |
|   | order[i], which must have the same shape); output_scale: 1.0 (float nodes); arithmetic: fp64 (float |
|   | nodes; not in spec_params: the format the result is computed in, rounded to before output_precision, |
|   | e.g. fp32 then fp16: a double rounding). Steps that round a |
|   | CONSTANT of the op as a kernel stores it: ATTENTION ``scale`` (the factor) / ``scale_divisor`` (the |
|   | scores divided by 1/scale, e.g. sqrt(head_dim), stored), GELU ``constant`` (the form's coefficients) / |
|   | ``divisor`` (erf form: x divided by 1/erf_scale, i.e. sqrt(2), stored) |
| EMBED | word_scale, token_type_scale: 1.0; BERT only: position_scale: 1.0 |
| LAYERNORM | ddof: 0 (variance divided by n - ddof, added to ``variance: unbiased``'s 1); axis: hidden/tokens; |
|   | gamma_scale, beta_scale: 1.0; eps_placement: inside (sqrt(var + eps)) / outside (sqrt(var) + eps) |
| MATMUL | bias_scale: 1.0 (with a bias); int_pairs: exact (see "Quantisation" below; also ROUTER, EXPERT_FC1) |
| SPLIT | part: the node's own (0/1/2: which third of the fused projection it reads) |
| ATTENTION | scale also as a float; softmax_axis: keys/queries/heads |
| ADD | first_scale, second_scale: 1.0 |
| GELU | erf_scale: 1/sqrt(2) (erf form c in 0.5*x*(1+erf(c*x))); tanh_scale: sqrt(2/pi), tanh_cubic: 0.044715; |
|   | sigmoid_scale: 1.702 (sigmoid form x*sigmoid(a*x)) |
| SOFTMAX | temperature: 1.0 (logits multiplied by it); axis: experts/tokens |
| BIAS_ADD | bias_scale: 1.0 |
| POOL | axis: tokens/hidden |
| L2NORM | axis: hidden/rows; eps_placement: max (x / max(norm, eps)) / add (norm + eps) / inside (sqrt(norm^2 + eps)) |

Quantisation (actdiff.compare.search_quant; :func:`quantise`): anywhere a precision name is accepted
(``round_at`` steps, ``input.<i>`` / ``weight.<i>``, ``output_precision``), a JSON-safe dict is uniform affine
quantisation, returned dequantised; every precision name above keeps its exact behaviour.

| key | values |
|---|---|
| bits | 8 (2-16) |
| symmetric | true: zp = 0, q in [-(2^(b-1) - 1), 2^(b-1) - 1], scale = absmax / qmax; false: the range widened to |
|   | include 0, scale = (hi - lo) / (2^b - 1), zp = rint(-lo / scale), q in [0, 2^b - 1] |
| granularity | tensor (an activation: per prompt) / row (per token; a stored [out, in] weight: per output channel) / |
|   | column / block (``blocks`` equal groups of rows: an expert's matrix) / block_column |
| range | dynamic (the tensor's own min/max) or [lo, hi] (static, one per tensor, e.g. calibrated) |
| blocks | for block granularities |

Rounding is half to even (np.rint), as ONNX QuantizeLinear. An embedding table's ranges (granularity other than
row) are the whole table's, though only the gathered rows are rounded. ``int_pairs: saturate16`` (MATMUL,
ROUTER, EXPERT_FC1; needs input.0 and weight.0 quantised, one scale per row) runs the product as an integer
kernel that sums u8 x s8 products two at a time into a saturating 16-bit integer (:func:`saturated_pairs`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import weakref
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

from ..batching import split_rows, stack_rows
from ..nodes import ARCH_BERT, LAYOUT_OPS, Graph, Node, ntk_rotary_base


def _erf(x: np.ndarray) -> np.ndarray:
    """float64 erf (actdiff.kernels.erf_f64: glibc's vector erf, within a few ULP of libm's): scipy's scalar loop
    took 15-37 ns a value, 3-7 % of a statistics job with GELU nodes, and its import 0.3 s of every job that
    took one."""
    from ..kernels import erf_f64

    return erf_f64(x)


OPS = (
    "EMBED",
    "LAYERNORM",
    "MATMUL",
    "SPLIT",
    "ROPE",
    "ATTENTION",
    "ADD",
    "GELU",
    "ROUTER",
    "SOFTMAX",
    "TOPK",
    "EXPERT_FC1",
    "EXPERT_FC2",
    "MOE_SUM",
    "BIAS_ADD",
    "POOL",
    "L2NORM",
)

PRECISIONS = ("fp64", "fp32", "fp16", "bf16", "int8")

# every parameter name each op understands (the catalogue loader validates overrides against this)
PARAM_NAMES: dict[str, frozenset[str]] = {
    op: frozenset(names) | {"output_precision"}
    for op, names in {
        "EMBED": ("token_type", "positions", "position_offset", "weight_precision"),
        "LAYERNORM": ("eps", "variance", "centered", "affine", "accumulate"),
        "MATMUL": ("bias", "weight_orientation", "weight_precision", "accumulate"),
        "SPLIT": ("order",),
        "ROPE": ("layout", "base", "position_offset", "angles", "ntk_scaling"),
        "ATTENTION": ("mask", "scale", "softmax", "output_layout", "accumulate"),
        "ADD": ("terms",),
        "GELU": ("form",),
        "ROUTER": ("weight_precision", "accumulate"),
        "SOFTMAX": ("function", "softmax", "accumulate"),
        "TOPK": ("renormalize", "order"),
        "EXPERT_FC1": ("expert_index_map", "w1_orientation", "weight_precision", "accumulate"),
        "EXPERT_FC2": ("expert_index_map", "w2_orientation", "weight_precision", "accumulate"),
        "MOE_SUM": ("renormalize", "weighted", "accumulate"),
        "BIAS_ADD": ("bias",),
        "POOL": ("mode", "accumulate"),
        "L2NORM": ("eps", "normalize", "accumulate"),
    }.items()
}


# Parameters the search varies (actdiff.compare.search_fit) beyond the catalogue's: continuous forms of the
# op's constants, the axis it reduces over, the role an operand plays, the weight of each additive term, and
# reduced precision at a named intermediate step. They are not in PARAM_NAMES (the catalogue names discrete
# bugs and covers every one of those); run_op accepts both. Spec values are in spec_params.
GENERIC_SEARCH_PARAMS = ("round_at", "input_order", "weight_order", "output_scale", "arithmetic")
SEARCH_PARAM_NAMES: dict[str, frozenset[str]] = {
    op: frozenset(names) | set(GENERIC_SEARCH_PARAMS)
    for op, names in {
        "EMBED": ("word_scale", "position_scale", "token_type_scale"),
        "LAYERNORM": ("ddof", "axis", "gamma_scale", "beta_scale", "eps_placement"),
        "MATMUL": ("bias_scale", "int_pairs"),
        "SPLIT": ("part",),
        "ROPE": (),
        "ATTENTION": ("softmax_axis",),
        "ADD": ("first_scale", "second_scale"),
        "GELU": ("erf_scale", "tanh_scale", "tanh_cubic", "sigmoid_scale"),
        "ROUTER": ("int_pairs",),
        "SOFTMAX": ("temperature", "axis"),
        "TOPK": (),
        "EXPERT_FC1": ("int_pairs",),
        "EXPERT_FC2": (),
        "MOE_SUM": (),
        "BIAS_ADD": ("bias_scale",),
        "POOL": ("axis",),
        "L2NORM": ("axis", "eps_placement"),
    }.items()
}

# Intermediate values each op can round (``round_at: {step: precision}``), in computation order. Besides these
# every op understands ``input.<i>`` (its i-th input) and ``weight.<i>`` (its i-th checkpoint tensor).
ROUND_STEPS: dict[str, tuple[str, ...]] = {
    "EMBED": (),
    "LAYERNORM": ("mean", "centered", "var", "rstd", "normalized", "scaled"),
    "MATMUL": ("product",),
    "SPLIT": (),
    "ROPE": ("positions", "inv_freq", "angles", "cos_sin", "products"),
    "ATTENTION": ("q_scaled", "dots", "scale", "scale_divisor", "scores", "exp", "probs"),
    "ADD": (),
    "GELU": ("constant", "divisor", "inner", "fn", "cdf"),
    "ROUTER": (),
    "SOFTMAX": ("exp", "sum"),
    "TOPK": (),
    "EXPERT_FC1": (),
    "EXPERT_FC2": (),
    "MOE_SUM": ("products",),
    "BIAS_ADD": (),
    "POOL": ("sum",),
    "L2NORM": ("norm",),
}

# Steps whose rounding also changes HOW the op computes (the order of a scaling, a constant multiplied or divided
# by): they exclude each other's paths, so a search over sets of rounding points adds them one at a time instead
# of starting from all of them (actdiff.compare.search_fit.rounding_points)
PATH_STEPS: dict[str, tuple[str, ...]] = {"ATTENTION": ("q_scaled", "scale_divisor"), "GELU": ("constant", "divisor")}

# Coefficients of the op's additive terms (spec 1.0 each; the output is linear in them, so they are fitted in
# closed form), and the values each structural choice of the op can take (the spec's among them).
TERM_SCALES: dict[str, tuple[str, ...]] = {
    "EMBED": ("word_scale", "position_scale", "token_type_scale"),
    "LAYERNORM": ("gamma_scale", "beta_scale"),
    "MATMUL": ("bias_scale",),
    "ADD": ("first_scale", "second_scale"),
    "BIAS_ADD": ("bias_scale",),
}
AXES: dict[str, dict[str, tuple]] = {
    "LAYERNORM": {"axis": ("hidden", "tokens")},
    "ATTENTION": {"softmax_axis": ("keys", "queries", "heads")},
    "SOFTMAX": {"axis": ("experts", "tokens")},
    "POOL": {"axis": ("tokens", "hidden")},
    "L2NORM": {"axis": ("hidden", "rows")},
    "SPLIT": {"part": (0, 1, 2), "order": ("qkv_major", "head_major")},
}

# Named values of the attention scale (a float is also accepted)
ATTENTION_SCALES = ("inv_sqrt_head_dim", "inv_head_dim", "none")
INV_SQRT2 = 1.0 / math.sqrt(2.0)
TANH_SCALE = math.sqrt(2.0 / math.pi)
TANH_CUBIC = 0.044715
SIGMOID_SCALE = 1.702


class NotApplicable(ValueError):
    """The parameters cannot apply to this node (e.g. transposing a non-square weight)."""


# ----------------------------------------------------------------------------------------- spec params
def spec_params(graph: Graph, node: Node) -> dict:
    """The parameters the model spec prescribes for ``node`` (a fresh dict)."""
    d = graph.dims
    op = node.op
    if op == "EMBED":
        p = {"token_type": "row0", "weight_precision": "fp64"}
        if d.arch == ARCH_BERT:
            p.update(positions="absolute", position_offset=0)
    elif op == "LAYERNORM":
        p = {"eps": float(d.eps), "variance": "biased", "centered": True, "affine": True, "accumulate": "fp64"}
    elif op == "MATMUL":
        p = {
            "bias": "once" if len(node.weights) > 1 else "none",
            "weight_orientation": "as_stored",
            "weight_precision": "fp64",
            "accumulate": "fp64",
        }
    elif op == "SPLIT":
        p = {"order": "qkv_major"}
    elif op == "ROPE":
        p = {
            "layout": "gptj" if d.rotary_interleaved else "neox",
            "base": float(d.rotary_base),
            "position_offset": 0,
            "angles": "fp64",
            # the config's rotary_scaling_factor: the base of a prompt then depends on its length (_rope_base)
            "ntk_scaling": [d.rotary_scaling_factor, d.max_trained_positions] if d.rotary_scaling_factor else None,
        }
    elif op == "ATTENTION":
        p = {
            "mask": "bidirectional",
            "scale": "inv_sqrt_head_dim",
            "softmax": "stable",
            "output_layout": "heads_outer",
            "accumulate": "fp64",
        }
    elif op == "ADD":
        p = {"terms": "both"}
    elif op == "GELU":
        p = {"form": "erf" if d.activation == "gelu" else "tanh"}
    elif op == "ROUTER":
        p = {"weight_precision": "fp64", "accumulate": "fp64"}
    elif op == "SOFTMAX":
        p = {"function": "softmax", "softmax": "stable", "accumulate": "fp64"}
    elif op == "TOPK":
        p = {"renormalize": bool(d.normalize_expert_weights), "order": "by_weight"}
    elif op == "EXPERT_FC1":
        p = {"expert_index_map": "identity", "w1_orientation": "FH", "weight_precision": "fp64", "accumulate": "fp64"}
    elif op == "EXPERT_FC2":
        p = {"expert_index_map": "identity", "w2_orientation": "FH", "weight_precision": "fp64", "accumulate": "fp64"}
    elif op == "MOE_SUM":
        p = {"renormalize": False, "weighted": True, "accumulate": "fp64"}
    elif op == "BIAS_ADD":
        p = {"bias": "once"}
    elif op == "POOL":
        p = {"mode": "mean", "accumulate": "fp64"}
    elif op == "L2NORM":
        p = {"eps": 1e-12, "normalize": True, "accumulate": "fp64"}
    else:
        raise ValueError(f"node {node.name}: unknown op type {op!r}")
    if node.kind != "index":
        p["output_precision"] = "fp64"
    p.update(_search_spec(graph, node))
    return p


def _search_spec(graph: Graph, node: Node) -> dict:
    """Spec values of the search's parameters (SEARCH_PARAM_NAMES): the identity everywhere."""
    op = node.op
    p: dict = {"round_at": {}, "input_order": list(range(len(node.inputs)))}
    p["weight_order"] = list(range(len(node.weights)))
    if node.kind != "index":
        p["output_scale"] = 1.0
    per_op = {
        "EMBED": {"word_scale": 1.0, "token_type_scale": 1.0},
        "LAYERNORM": {"ddof": 0.0, "axis": "hidden", "gamma_scale": 1.0, "beta_scale": 1.0},
        "MATMUL": {"bias_scale": 1.0} if len(node.weights) > 1 else {},
        "SPLIT": {"part": node.attrs.get("part", 0)},
        "ATTENTION": {"softmax_axis": "keys"},
        "ADD": {"first_scale": 1.0, "second_scale": 1.0},
        "GELU": {"erf_scale": INV_SQRT2, "tanh_scale": TANH_SCALE, "tanh_cubic": TANH_CUBIC},
        "SOFTMAX": {"temperature": 1.0, "axis": "experts"},
        "BIAS_ADD": {"bias_scale": 1.0},
        "POOL": {"axis": "tokens"},
        "L2NORM": {"axis": "hidden"},
    }.get(op, {})
    p.update(per_op)
    if op == "GELU":
        p["sigmoid_scale"] = SIGMOID_SCALE
    if op == "EMBED" and graph.dims.arch == ARCH_BERT:
        p["position_scale"] = 1.0
    return p


def _r(p: dict, step: str, x):
    """``x`` rounded as ``round_at`` asks for this intermediate step (unchanged when not asked)."""
    prec = p.get("round_at", {}).get(step)
    if prec is None or prec == "fp64":
        return x
    with np.errstate(over="ignore", invalid="ignore"):
        return round_to(np.asarray(x, dtype=np.float64), prec)


def aux_inputs(graph: Graph, node: Node, params: dict) -> list[str]:
    """Nodes besides ``node.inputs`` that ``run_op`` reads under ``params`` (values of other nodes).

    Only BIAS_ADD with ``bias: per_expert`` needs one: the layer's top-k weights (bias added inside the
    per-expert loop is scaled by each expert's weight, so the result depends on their sum)."""
    if node.op == "BIAS_ADD" and params.get("bias") == "per_expert":
        block = graph.moe_block_of(node.name)
        if block is not None:
            return [block.topk_weights]
        raise NotApplicable(f"node {node.name}: no top-k weights node in layer {node.layer}")
    return []


# ------------------------------------------------------------------------------------------ rounding
def _bf16(x: np.ndarray) -> np.ndarray:
    """To float32, then to bfloat16 (nearest even on the upper 16 bits), as float64; a NaN stays a NaN
    (actdiff.kernels.round_f64: five numpy passes took 11.5 ns a value, the kernel 2)."""
    from ..kernels import round_f64

    return round_f64(x, "bf16")


def round_to(x: np.ndarray, precision, axis: int = -1, like: np.ndarray | None = None) -> np.ndarray:
    """Round float64 values to ``precision``; int8 is symmetric absmax quantisation along ``axis``; a dict is a
    uniform affine quantisation spec (:func:`quantise`; ``like``: the tensor its ranges come from, default x)."""
    if isinstance(precision, dict):
        return quantise(x, precision, like)
    if precision == "fp64":
        return np.asarray(x, dtype=np.float64)
    if precision == "fp32":
        return np.asarray(x, dtype=np.float32).astype(np.float64)
    if precision == "fp16":  # numpy's float16 rounding, bit for bit (actdiff.kernels.round_f64: 1.7 ns against 4.9)
        from ..kernels import round_f64

        return round_f64(x, "fp16")
    if precision == "bf16":
        return _bf16(x)
    if precision == "int8":
        x = np.asarray(x, dtype=np.float64)
        scale = np.abs(x).max(axis=axis, keepdims=True) / 127.0
        scale = np.where(scale > 0, scale, 1.0)
        return np.clip(np.rint(x / scale), -127, 127) * scale
    raise ValueError(f"unknown precision {precision!r} (known: {', '.join(PRECISIONS)})")


QUANT_GRANULARITIES = ("tensor", "row", "column", "block", "block_column")


def check_quant_spec(spec: dict) -> tuple[int, bool, str, object]:
    """(bits, symmetric, granularity, range) of a quantisation spec, or ValueError naming what is wrong."""
    unknown = set(spec) - {"bits", "symmetric", "granularity", "range", "blocks"}
    bits, sym = int(spec.get("bits", 8)), bool(spec.get("symmetric", True))
    gran, rng = spec.get("granularity", "tensor"), spec.get("range", "dynamic")
    if unknown or not 2 <= bits <= 16 or gran not in QUANT_GRANULARITIES:
        raise ValueError(f"quantisation spec {spec!r}: keys bits (2-16), symmetric, granularity "
                         f"({'/'.join(QUANT_GRANULARITIES)}), range (dynamic or [lo, hi]), blocks")  # fmt: skip
    if rng != "dynamic" and (gran != "tensor" or len(rng) != 2 or not rng[0] <= rng[1]):
        raise ValueError(f"quantisation spec {spec!r}: a static range [lo, hi] (lo <= hi) is one per tensor")
    return bits, sym, gran, rng


def _as_matrix(a: np.ndarray) -> np.ndarray:
    """[rows, cols]: a vector is one row; [T, k, F] is T rows."""
    return a.reshape(1, -1) if a.ndim <= 1 else a.reshape(a.shape[0], -1)


def _quant_view(a: np.ndarray, gran: str, blocks: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """``a`` as a 2-D [rows, cols] matrix (3-D [blocks, rows/block, cols] for block granularities) and the axes
    one quantisation range spans."""
    m = _as_matrix(a)
    if gran in ("block", "block_column"):
        if blocks < 1 or m.shape[0] % blocks:
            raise NotApplicable(f"{m.shape[0]} rows do not split into {blocks} blocks")
        return m.reshape(blocks, -1, m.shape[1]), (1, 2) if gran == "block" else (1,)
    return m, {"tensor": (0, 1), "row": (1,), "column": (0,)}[gran]


def quantise_int(x: np.ndarray, spec: dict, like: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, object]:
    """Uniform affine quantisation of ``x``: the integers q as stored (float64 holding integers, [rows, cols], or
    [blocks, rows/block, cols]), their scale and zero point (broadcastable to q), as ONNX QuantizeLinear
    computes them: q = clip(rint(x / scale) + zp, qmin, qmax); DequantizeLinear gives x' = (q - zp) * scale.

    ``spec`` (JSON-safe): ``bits``; ``symmetric`` (zp = 0, q in [-(2^(b-1) - 1), 2^(b-1) - 1], scale =
    absmax / qmax) or asymmetric (the range widened to include 0, scale = (hi - lo) / (2^b - 1), zp =
    rint(-lo / scale), q in [0, 2^b - 1]); ``granularity``: one range per ``tensor``, per ``row`` (token of an
    activation, output channel of a stored [out, in] weight), per ``column``, per ``block`` of rows (``blocks``
    of them: an expert's matrix) or per column of each block (``block_column``); ``range``: ``dynamic`` (the
    tensor's own min/max, at run time) or a fixed ``[lo, hi]`` (a calibrated, static range; per tensor).
    ``like``: the tensor the ranges are taken from (default ``x``; an embedding table's whole table when ``x`` are
    rows gathered from it, for granularities other than ``row``)."""
    xv, scale, zp, qmin, qmax, per = _quant_ranges(x, spec, like)
    return _quantised(xv, scale, zp, qmin, qmax, per), scale.astype(np.float64), zp


def _quantised(xv: np.ndarray, scale, zp, qmin: int, qmax: int, per: str | None, dequantise: bool = False):
    """q of :func:`quantise_int` (or (q - zp) * scale where ``dequantise``) from :func:`_quant_ranges`' operands:
    one pass in C where one scale spans a tensor, row or column (a search scores hundreds of ranges on one sample:
    numpy's seven passes took longer than the float64 product after them), the same bits as the numpy here."""
    if per is not None:
        from ..kernels import quantise_f64

        return quantise_f64(xv, scale, zp, qmin, qmax, per, dequantise=dequantise)
    # np.rint rounds half to even, as ONNX QuantizeLinear specifies
    q = np.clip(np.rint(xv.astype(np.float32) / scale).astype(np.float64) + zp, qmin, qmax)
    return (q - zp) * scale.astype(np.float64) if dequantise else q


def _quant_ranges(x: np.ndarray, spec: dict, like: np.ndarray | None) -> tuple:
    """:func:`quantise_int`'s operands: (x as its [rows, cols] or [blocks, rows/block, cols] view, the float32
    scale and the zero point, broadcastable to it, qmin, qmax, and what one scale spans for
    actdiff.kernels.quantise_f64: "tensor", "row", "column", or None for a block granularity)."""
    bits, sym, gran, rng = check_quant_spec(spec)
    x = np.asarray(x, dtype=np.float64)
    src = x if like is None else np.asarray(like)
    if rng == "dynamic":
        view, axes = _quant_view(src, gran, int(spec.get("blocks", 1)))
        lo, hi = view.min(axis=axes, keepdims=True).astype(np.float64), view.max(axis=axes, keepdims=True)
        hi = hi.astype(np.float64)
    else:
        lo, hi = np.float64(rng[0]), np.float64(rng[1])
    if sym:
        qmin, qmax = -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
        scale, zp = np.maximum(np.abs(lo), np.abs(hi)) / qmax, 0.0
    else:
        qmin, qmax = 0, 2**bits - 1
        lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
        scale = (hi - lo) / qmax
    # the scale is a float32 tensor and x / scale a float32 division, as in ONNX QuantizeLinear (whose x and
    # y_scale are float tensors): in float64 a quotient of 19.49999994 rounds to 19 where float32 gives 19.5 -> 20
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    if not sym:
        zp = np.clip(np.rint(np.float32(-lo) / scale), qmin, qmax).astype(np.float64)
    m = _as_matrix(x)
    fits = all(s in (1, n) for s, n in zip(np.shape(scale)[-2:], m.shape, strict=False))
    if not fits and not gran.startswith("block"):
        raise NotApplicable(f"ranges of a {list(np.shape(src))} tensor cannot apply to {list(x.shape)} values")
    if gran.startswith("block"):
        return m.reshape(scale.shape[0], -1, m.shape[1]), scale, zp, qmin, qmax, None
    shape = np.shape(scale)
    per = "tensor" if np.size(scale) == 1 else "row" if shape == (m.shape[0], 1) else "column"
    return np.ascontiguousarray(m), scale, zp, qmin, qmax, per


def quantise(x: np.ndarray, spec: dict, like: np.ndarray | None = None) -> np.ndarray:
    """``x`` quantised as ``spec`` says and dequantised (see :func:`quantise_int`), shaped as ``x``."""
    return _quantised(*_quant_ranges(x, spec, like), dequantise=True).reshape(np.shape(x))


def saturated_pairs(a: np.ndarray, spec_a: dict, w: np.ndarray, spec_w: dict) -> np.ndarray:
    """What an integer kernel that sums the products of a [T, K] by w [N, K] TWO AT A TIME into a saturating
    16-bit integer (then in 32 bits) loses against the exact integer sum, dequantised: [T, N] (0 where no pair
    overflows). The pairs are of consecutive k of the integers as stored (zero points included: the kernel
    corrects for them afterwards, exactly). Needs one scale per row of a and of w (granularity tensor or row:
    a per-k scale does not factor out of an integer sum)."""
    if spec_a.get("granularity") not in ("tensor", "row") or spec_w.get("granularity") not in ("tensor", "row",
                                                                                             "block"):  # fmt: skip
        raise NotApplicable("an integer kernel needs one scale per row of each operand (tensor, row or block)")
    qa, sa, _ = quantise_int(a, spec_a)
    qw, sw, _ = quantise_int(w, spec_w)
    sa = np.broadcast_to(sa, qa.shape)[..., 0].reshape(-1)  # one scale per row (constant along k)
    sw = np.broadcast_to(sw, qw.shape)[..., 0].reshape(-1)
    qa, qw = qa.reshape(-1, qa.shape[-1]), qw.reshape(-1, qw.shape[-1])
    # in integers, exactly as the kernel: int32 holds a pair of 8-bit products (|pair| <= 2 * 255 * 127) and runs
    # at a third of the float64 version's time; wider integers (up to 16 bits) take int64
    big = 2.0 * np.abs(qa).max(initial=0) * np.abs(qw).max(initial=0) >= 2**31
    dt = np.int64 if big else np.int32
    k2 = qa.shape[1] // 2 * 2
    a0, a1 = (np.ascontiguousarray(qa[:, j:k2:2], dtype=dt) for j in (0, 1))
    w0, w1 = (np.ascontiguousarray(qw[:, j:k2:2], dtype=dt) for j in (0, 1))
    lost = np.zeros((qa.shape[0], qw.shape[0]))
    for t0 in range(0, qa.shape[0], 16):  # [16, N, K/2] at a time
        pair = a0[t0 : t0 + 16, None] * w0[None]
        pair += a1[t0 : t0 + 16, None] * w1[None]
        pair -= np.clip(pair, -32768, 32767)
        lost[t0 : t0 + 16] = pair.sum(axis=-1, dtype=np.int64)
    return lost * np.reshape(sa, (-1, 1)) * np.reshape(sw, (1, -1))


def _int_pairs_loss(p: dict, rows: int) -> np.ndarray | float:
    """The loss of :func:`saturated_pairs` for ``int_pairs: saturate16`` (0 for the spec's ``exact``), on the
    node's first input and first weight as given to run_op (``_int_raw``), quantised as ``round_at``'s input.0
    and weight.0 say."""
    mode = p.get("int_pairs", "exact")
    if mode == "exact":
        return 0.0
    ra = p.get("round_at", {})
    if mode != "saturate16" or not (isinstance(ra.get("input.0"), dict) and isinstance(ra.get("weight.0"), dict)):
        raise NotApplicable(f"int_pairs {mode!r} needs input.0 and weight.0 quantised (round_at specs)")
    a, w = p["_int_raw"]
    return saturated_pairs(_f(a).reshape(rows, -1), ra["input.0"], _f(w), ra["weight.0"])


def _f(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


# --------------------------------------------------------------------------------------------- ops
def _embed(graph, node, x, w, p):
    ids = np.asarray(x[0], dtype=np.int64).reshape(-1)
    T = ids.shape[0]
    n = len(node.weights)

    def rows(i: int, which) -> np.ndarray:
        # gather first, then round: every rounding here is elementwise or per row (int8 over axis 1), so it
        # commutes with the gather, and the table (250k x 768 in the released model) is never copied whole
        table = np.asarray(w[node.weights[i]])
        r = round_to(_f(table[which]), p["weight_precision"], axis=-1)
        q = p.get("round_at", {}).get(f"weight.{i}")
        if isinstance(q, dict) and q.get("granularity", "tensor") != "row":  # ranges of the whole table
            return quantise(r.reshape(-1, table.shape[-1]), q, like=table).reshape(r.shape)
        return _r(p, f"weight.{i}", r)

    out = _scaled(rows(0, ids), p.get("word_scale", 1.0))
    positions = p.get("positions", "none")
    if positions not in ("absolute", "none"):
        raise ValueError(f"positions {positions!r}")
    if positions == "absolute":
        pos = np.arange(T) + int(p["position_offset"])
        if pos.size and (pos.min() < 0 or pos.max() >= np.shape(w[node.weights[1]])[0]):
            raise NotApplicable(f"positions {pos.min()}..{pos.max()} outside the position table")
        out += _times(rows(1, pos), p.get("position_scale", 1.0))
    if p["token_type"] == "row0":
        out += _times(rows(n - 1, 0), p.get("token_type_scale", 1.0))
    elif p["token_type"] != "none":
        raise ValueError(f"token_type {p['token_type']!r}")
    return out


def _scaled(x, c) -> np.ndarray:
    """``c * x``; the term itself (a copy) at the spec's 1.0, so the spec path is bit-identical."""
    c = float(c)
    return np.array(x, dtype=np.float64) if c == 1.0 else c * _f(x)


def _times(x, c) -> np.ndarray:
    """:func:`_scaled` for a term that is only read: ``x`` itself (as float64) at 1.0, not a copy."""
    c = float(c)
    return _f(x) if c == 1.0 else c * _f(x)


def _variance_denominator(n: int, p: dict) -> float:
    """Divisor of the sum of squares: n at the spec, n - 1 for ``variance: unbiased``, minus ``ddof`` more."""
    if p["variance"] not in ("biased", "unbiased"):
        raise ValueError(f"variance {p['variance']!r}")
    ddof = float(p.get("ddof", 0.0)) + (1.0 if p["variance"] == "unbiased" else 0.0)
    return max(n - ddof, 1.0) if p["variance"] == "unbiased" else n - ddof


def _eps_std(var: np.ndarray, eps: float, placement: str) -> np.ndarray:
    """The LayerNorm denominator: sqrt(var + eps) as specified ("inside"), or sqrt(var) + eps ("outside")."""
    if placement == "inside":
        return np.sqrt(var + eps)
    if placement == "outside":
        return np.sqrt(var) + eps
    raise ValueError(f"eps_placement {placement!r}")


def _layernorm(graph, node, x, w, p):
    a = _f(x[0])
    axis = {"hidden": -1, "tokens": 0}.get(p.get("axis", "hidden"))
    if axis is None:
        raise ValueError(f"axis {p['axis']!r}")
    n = a.shape[axis]
    mean = _r(p, "mean", a.mean(axis=axis, keepdims=True)) if p["centered"] else 0.0
    c = _r(p, "centered", a - mean)
    den = _variance_denominator(n, p)
    if den <= 0:
        raise NotApplicable(f"variance denominator {den} is not positive")
    if not p["centered"]:  # RMSNorm: mean of squares
        var = (c * c).mean(axis=axis, keepdims=True)
    elif den == n:
        var = (c * c).mean(axis=axis, keepdims=True)
    else:
        var = (c * c).sum(axis=axis, keepdims=True) / den
    var = _r(p, "var", var)
    std = _eps_std(var, float(p["eps"]), p.get("eps_placement", "inside"))
    if "rstd" in p.get("round_at", {}):  # a kernel that stores 1/sqrt(var + eps) and multiplies
        y = c * _r(p, "rstd", 1.0 / std)
    else:
        y = c / std
    y = _r(p, "normalized", y)
    if p["affine"]:
        y = _r(p, "scaled", _times(y * _f(w[node.weights[0]]), p.get("gamma_scale", 1.0)))
        y = y + _times(w[node.weights[1]], p.get("beta_scale", 1.0))
    return y


def _apply_bias(y, b, mode, node, scale=1.0):
    if mode == "none":
        return y
    if b is None:
        raise NotApplicable(f"node {node.name} has no bias tensor")
    b = _times(b, scale)
    if mode == "once":
        return y + b
    if mode == "twice":
        return y + 2.0 * b
    raise ValueError(f"bias {mode!r}")


def _matmul(graph, node, x, w, p):
    a = _f(x[0])
    T = a.shape[0]
    a = a.reshape(T, -1)
    W = _f(w[node.weights[0]])
    if p["weight_orientation"] == "transposed":
        if W.shape[0] != W.shape[1]:
            raise NotApplicable(f"weight {node.weights[0]} {list(W.shape)} is not square")
    elif p["weight_orientation"] != "as_stored":
        raise ValueError(f"weight_orientation {p['weight_orientation']!r}")
    W = _rounded_weight(W, p["weight_precision"], axis=1, transposed=p["weight_orientation"] == "transposed")
    b = _f(w[node.weights[1]]) if len(node.weights) > 1 else None
    product, loss = _product(a, W), _int_pairs_loss(p, T)
    if not (isinstance(loss, float) and loss == 0.0):  # x - 0.0 is x: no pass over the product for the exact kernel
        product = product - loss
    y = _apply_bias(_r(p, "product", product), b, p["bias"], node, p.get("bias_scale", 1.0))
    return y.reshape(graph.shape(node.name, T))


_SHARED: list | None = None  # (weight, float32?, operand, product) of the block under shared_products; None: none
_FLOAT32_PRODUCTS = False  # inside float32_products()
SHARED_PRODUCTS_KEPT = 8


@contextlib.contextmanager
def shared_products():
    """Within the block, MATMUL's product of one weight object and equal operand values is computed once. The
    candidates ranked at a node (actdiff.compare.hypotheses) read the same inputs and weights, and half of a
    MATMUL's catalogue changes only what follows the product (its bias, its output's precision): the float64
    product was most of their cost on a quantised run. The last SHARED_PRODUCTS_KEPT products are kept, for
    as long as the block lasts; a nested block shares its outer one's."""
    global _SHARED
    outer = _SHARED
    _SHARED = [] if outer is None else outer
    try:
        yield
    finally:
        _SHARED = outer


def _shared(key, a: np.ndarray, compute) -> np.ndarray:
    """``compute(a)``, computed once per ``key`` object, equal ``a`` and arithmetic (float64, or float32 inside
    :func:`float32_products`) within a :func:`shared_products` block (read-only there); the last
    SHARED_PRODUCTS_KEPT results are kept."""
    memo = _SHARED
    if memo is None:
        return compute(a)
    for k, f32, x, y in memo:
        if k is key and f32 == _FLOAT32_PRODUCTS and x.shape == a.shape and np.array_equal(x, a):
            return y
    y = compute(a)
    y.flags.writeable = False
    memo.append((key, _FLOAT32_PRODUCTS, a, y))
    del memo[:-SHARED_PRODUCTS_KEPT]
    return y


@contextlib.contextmanager
def float32_products(on: bool = True):
    """Within the block, MATMUL's product ``a @ W.T`` is computed in float32 (both operands rounded to float32,
    :func:`_product_f32`) and returned in float64, shared (:func:`shared_products`) only with products computed
    so. For a caller whose tolerance at the node is far above what float32 rounding adds
    there (actdiff.compare.propagation.float32_product_ok): the propagation simulation, and the ranking of
    hypotheses (actdiff.compare.hypotheses), at a node whose budget is many times the fp32 budget. ``on`` False:
    the block changes nothing (the products stay as the enclosing code has them)."""
    global _FLOAT32_PRODUCTS
    outer = _FLOAT32_PRODUCTS
    _FLOAT32_PRODUCTS = outer or on
    try:
        yield
    finally:
        _FLOAT32_PRODUCTS = outer


def _product(a: np.ndarray, W: np.ndarray) -> np.ndarray:
    """``a @ W.T`` in float64 (read-only where shared: :func:`shared_products`; float32 arithmetic inside
    :func:`float32_products`)."""
    if _FLOAT32_PRODUCTS:  # the weight packed once and memoised: converting it per call was a fifth of a product
        packed = WEIGHT_MEMO.get(W, "float32 packed", lambda: _packed_f32(W))
        return _shared(W, a, lambda x: _product_f32(x, packed))
    return _shared(W, a, lambda x: _product_f64(x, W))


# A float64 product of fewer rows than this packs its weight whole once the weight comes again (memoised with the
# rounded weights, WEIGHT_MEMO); more rows pack each block of it as the kernel reaches it. On a prompt's 30 rows
# the per-call packing cost a quarter of the product (MiniLM's 30 x 384 x 1536: 0.77 ms packed whole, 0.96 packed
# per call); on 128-256 rows 3-7 %, where whole copies of every weight the search rounds (106 packings, 200 MB
# more memory, against 43 with this bound) cost more than they saved (Zen 4, bench/README.md). A weight made per
# call (the search's candidates) is used once and never packed whole.
PACK_WHOLE_BELOW_ROWS = 128


def _packed_f32(W: np.ndarray):
    from .. import kernels

    return kernels.pack_f32(np.ascontiguousarray(W, np.float32))


def _packed_f64(W: np.ndarray):
    from .. import kernels

    return kernels.pack_f64(np.ascontiguousarray(W, np.float64))


def _product_f64(a: np.ndarray, W: np.ndarray) -> np.ndarray:
    """``a @ W.T`` in float64 by the C float64 matmul (actdiff.kernels.matmul_f64): each element one fused
    multiply-add chain in k order, the same bits on every CPU, ISA path, thread count and row count, so a prompt's
    rows give the same values alone or stacked with others' (numpy's dgemm rounded by the CPU's kernel and the row
    count, and packed W again on every call). W is packed whole (memoised) for a product of few rows once W comes
    again, else its blocks are packed per call: the same bits (PACK_WHOLE_BELOW_ROWS)."""
    from .. import kernels

    packed = None
    if len(a) < PACK_WHOLE_BELOW_ROWS:
        packed = WEIGHT_MEMO.get_reused(W, "float64 packed", lambda: _packed_f64(W))
    weight = np.ascontiguousarray(W, np.float64) if packed is None else packed
    return kernels.matmul_f64(np.ascontiguousarray(a, np.float64), weight)


def _product_f32(a: np.ndarray, packed) -> np.ndarray:
    """``a @ W.T`` in float32 arithmetic, in float64: ``a`` rounded to float32, the product by the C matmul core
    on ``W`` packed once (actdiff.kernels.pack_f32), each element one fused multiply-add chain in k order: the
    engine's own fp32 arithmetic, a correct fp32 kernel's error, and the same bits on every CPU and ISA path and
    at any thread count. numpy's sgemm (OpenBLAS) took 1.10-1.22x as long on a group's stacked rows (rows x K x N
    of 160-256 x 384 x 1536, 160-256 x 1536 x 384, 200 x 384 x 384) and 1.67x on 40 rows (Zen 4, one thread
    each, the conversions included): the ranking's and the simulation's products 16-20 % less time
    (bench/README.md)."""
    from .. import kernels

    x = np.ascontiguousarray(a, np.float32)
    if x.shape[0] == 0:
        return np.zeros((0, packed.shape[0]))
    return kernels.matmul(x, packed).astype(np.float64)


def _split(graph, node, x, w, p):
    a = _f(x[0])
    T = a.shape[0]
    nh, hd = graph.dims.heads, graph.dims.head_dim
    part = int(p.get("part", node.attrs["part"]))  # which third of the fused projection this node reads
    if part not in (0, 1, 2):
        raise ValueError(f"part {part!r}")
    if p["order"] == "qkv_major":
        return a.reshape(T, 3, nh, hd)[:, part].copy()
    if p["order"] == "head_major":
        return a.reshape(T, nh, 3, hd)[:, :, part].copy()
    raise ValueError(f"order {p['order']!r}")


def _rope_base(T: int, hd: int, p: dict) -> float:
    """The base a T-token prompt is rotated with: the configured ``base``, grown by dynamic NTK scaling
    (``ntk_scaling`` [factor, max_trained_positions]) when T exceeds max_trained_positions."""
    scaling = p.get("ntk_scaling")
    if not scaling:
        return float(p["base"])
    factor, max_trained = scaling
    return ntk_rotary_base(float(p["base"]), T, float(factor), int(max_trained), hd)


def _rope_angles(T: int, hd: int, p: dict) -> np.ndarray:
    """Rotation angles [T, hd/2]: position times inverse frequency (see _rope for the fp32 recurrence)."""
    half = hd // 2
    pos = _r(p, "positions", np.arange(T, dtype=np.float64) + float(p["position_offset"]))
    angles = p.get("angles", "fp64")
    base = _rope_base(T, hd, p)
    if angles == "fp64":
        inv_freq = _r(p, "inv_freq", base ** (-np.arange(0, 2 * half, 2, dtype=np.float64) / hd))
        return _r(p, "angles", pos[:, None] * inv_freq[None, :])
    if angles == "fp32_recurrence":
        # ggml's rope cache (ggml-cpu ggml_rope_cache_init): theta starts at the position and is multiplied by
        # theta_scale = powf(base, -2/hd) once per pair, all in float32; cosf/sinf of that float32 angle
        scale = np.float32(np.power(np.float32(base), np.float32(-2.0) / np.float32(hd)))
        theta = pos.astype(np.float32)
        cols = []
        for _ in range(half):
            cols.append(theta.astype(np.float64))
            theta = (theta * scale).astype(np.float32)
        return _r(p, "angles", np.stack(cols, axis=1))
    raise ValueError(f"angles {angles!r}")


def _rope(graph, node, x, w, p):
    a = _f(x[0])
    T, _, hd = a.shape
    if p["layout"] == "none":
        return a.copy()
    half = hd // 2
    ang = _rope_angles(T, hd, p)
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]  # [T, 1, hd/2]
    if p.get("angles", "fp64") == "fp32_recurrence":  # cosf/sinf return float32
        cos, sin = cos.astype(np.float32).astype(np.float64), sin.astype(np.float32).astype(np.float64)
    cos, sin = _r(p, "cos_sin", cos), _r(p, "cos_sin", sin)
    out = a.copy()

    def rotated(x1, x2):  # each product rounded as "products" asks (a kernel storing x*cos and x*sin)
        return (_r(p, "products", x1 * cos) - _r(p, "products", x2 * sin),
                _r(p, "products", x2 * cos) + _r(p, "products", x1 * sin))  # fmt: skip

    if p["layout"] == "neox":
        out[..., :half], out[..., half : 2 * half] = rotated(a[..., :half], a[..., half : 2 * half])
    elif p["layout"] == "gptj":
        out[..., 0 : 2 * half : 2], out[..., 1 : 2 * half : 2] = rotated(a[..., 0 : 2 * half : 2],
                                                                          a[..., 1 : 2 * half : 2])  # fmt: skip
    else:
        raise ValueError(f"layout {p['layout']!r}")
    return out


def _softmax(s, mode, axis=-1, p=None):
    """Softmax along ``axis``; ``p`` (optional) rounds the exponentials / their sum as ``round_at`` asks."""
    p = p or {}
    # each pass writes into the one array it allocates (the same operations and bits as fresh arrays): an
    # attention's [heads, T, T] scores made three temporaries, and at 48 tokens and more their allocation (page
    # faults above malloc's mapping threshold) cost as much as the arithmetic (1.7x the time at 48, 2.2x at 128)
    if mode == "stable":
        e = np.subtract(s, s.max(axis=axis, keepdims=True))
        np.exp(e, out=e)
    elif mode == "naive":  # no max subtraction: identical in float64 unless exp overflows
        with np.errstate(over="ignore", invalid="ignore"):
            e = np.exp(s)
    else:
        raise ValueError(f"softmax {mode!r}")
    own = e
    e = _r(p, "exp", e)
    with np.errstate(invalid="ignore", divide="ignore"):
        d = _r(p, "sum", e.sum(axis=axis, keepdims=True))
        return np.divide(e, d, out=e) if e is own and np.result_type(e, d) == e.dtype else e / d


def attention_scale(value, head_dim: int) -> float:
    """The attention scale as a number: a named value (ATTENTION_SCALES) or a float."""
    named = {"inv_sqrt_head_dim": 1.0 / math.sqrt(head_dim), "inv_head_dim": 1.0 / head_dim, "none": 1.0}
    if isinstance(value, str):
        if value not in named:
            raise ValueError(f"scale {value!r}")
        return named[value]
    return float(value)


def _attention(graph, node, x, w, p):
    q, k, v = (_f(a) for a in x)
    T, nh, hd = q.shape
    scale = attention_scale(p["scale"], hd)
    kt = k.transpose(1, 2, 0)  # [nh, hd, T]; batched matmul is ~8x faster than einsum here (BLAS)
    ra = p.get("round_at", {})
    if "q_scaled" in ra:  # a kernel that scales q before the dot products
        s = _r(p, "scores", _r(p, "q_scaled", q * scale).transpose(1, 0, 2) @ kt)
    elif "scale_divisor" in ra:  # the dot products divided by 1/scale (sqrt(head_dim)) stored as a number
        s = _r(p, "scores", _r(p, "dots", q.transpose(1, 0, 2) @ kt) / _r(p, "scale_divisor", 1.0 / scale))
    else:  # [nh, T, T]; "scale": the factor itself stored in a format. Scaled in place (the product's own
        # array, or the rounding's): the same bits as a new array, without a third [nh, T, T] temporary
        d = _r(p, "dots", q.transpose(1, 0, 2) @ kt)
        f = _r(p, "scale", scale)
        own = d.flags.writeable and np.result_type(d, f) == d.dtype
        s = _r(p, "scores", np.multiply(d, f, out=d) if own else d * f)
    if p["mask"] == "causal":
        s = np.where(np.tril(np.ones((T, T), dtype=bool))[None], s, -np.inf)
    elif p["mask"] not in ("bidirectional", "query_padding"):
        # query_padding masks padded QUERY rows instead of padded keys: one prompt of real tokens has no
        # padding, so under teacher forcing it equals the spec (listed so the catalogue says so explicitly)
        raise ValueError(f"mask {p['mask']!r}")
    axis = {"keys": -1, "queries": 1, "heads": 0}.get(p.get("softmax_axis", "keys"))
    if axis is None:
        raise ValueError(f"softmax_axis {p['softmax_axis']!r}")
    probs = _r(p, "probs", _softmax(s, p["softmax"], axis, {"round_at": {"exp": p.get("round_at", {}).get("exp")}}))
    ctx = (probs @ v.transpose(1, 0, 2)).transpose(1, 0, 2)  # [T, nh, hd]
    if p["output_layout"] == "heads_inner":
        ctx = ctx.transpose(0, 2, 1)
    elif p["output_layout"] != "heads_outer":
        raise ValueError(f"output_layout {p['output_layout']!r}")
    return ctx.reshape(T, nh * hd)


def _add(graph, node, x, w, p):
    a = _times(x[0], p.get("first_scale", 1.0))
    b = _times(x[1], p.get("second_scale", 1.0))
    if p["terms"] == "both":
        return a + b
    if p["terms"] == "first":
        return np.array(a)  # a copy: the op's value is never one of its inputs (run_op)
    if p["terms"] == "second":
        return np.array(b)
    raise ValueError(f"terms {p['terms']!r}")


# ggml-cpu's float constants (vec.h): the table is built from these float32 values
_GGML_SQRT_2_OVER_PI = float(np.float32(0.79788456080286535587989211986876))
_GGML_GELU_COEF_A = float(np.float32(0.044715))


def gelu_tanh_fp16_table(x: np.ndarray) -> np.ndarray:
    """GELU as ggml's CPU backend computes it for f32 tensors (GGML_GELU_FP16, ggml-cpu/vec.h
    ``ggml_vec_gelu_f32``): ``x <= -10`` gives 0, ``x >= 10`` gives x, otherwise x is rounded to fp16
    (round to nearest even) and looked up in a 65536-entry table filled at init (ggml-cpu.c) with
    ``fp16(0.5*h*(1 + tanh(SQRT_2_OVER_PI*h*(1 + GELU_COEF_A*h*h))))`` for every fp16 value h. The table is
    computed here once, in float64 with ggml's float32 constants (:func:`_ggml_gelu_table`); only a rounding tie
    of the final fp16 can differ from tanhf. (Evaluating the formula per value took 32 ns a value.)"""
    x32 = np.asarray(x, dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # |x| >= 65520 becomes inf, taken from x below
        t = _ggml_gelu_table()[x32.astype(np.float16).view(np.uint16)]
    return np.where(x32 <= -10.0, 0.0, np.where(x32 >= 10.0, x32.astype(np.float64), t))


@functools.lru_cache(maxsize=1)
def _ggml_gelu_table() -> np.ndarray:
    """ggml's GELU table, as float64: entry i for the fp16 value of bits i (read-only)."""
    h = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        g = 0.5 * h * (1.0 + np.tanh(_GGML_SQRT_2_OVER_PI * h * (1.0 + _GGML_GELU_COEF_A * h * h)))
        t = g.astype(np.float16).astype(np.float64)
    t.flags.writeable = False
    return t


def _gelu_gate(a: np.ndarray, form: str, p: dict) -> np.ndarray:
    """The factor GELU multiplies x by: Phi(x) or an approximation of it, from the form's coefficients."""
    ra = p.get("round_at", {})
    if form == "erf":
        c = float(p.get("erf_scale", INV_SQRT2))
        if "divisor" in ra:  # x / d with d = 1/c (sqrt(2)) stored as a number
            inner = a / _r(p, "divisor", 1.0 / c)
        elif c == INV_SQRT2 and "constant" not in ra:
            inner = a / math.sqrt(2.0)
        else:
            inner = a * _r(p, "constant", c)
        return 0.5 * (1.0 + _r(p, "fn", _erf(_r(p, "inner", inner))))
    if form == "tanh":
        c = _r(p, "constant", float(p.get("tanh_scale", TANH_SCALE)))
        k = _r(p, "constant", float(p.get("tanh_cubic", TANH_CUBIC)))
        # a * a * a, not a**3: numpy's float64 power with exponent 3 calls pow per value (59 ns here, 100x the
        # products); the two roundings it adds are 2e-16 relative, far below any budget this is compared with
        return 0.5 * (1.0 + _r(p, "fn", np.tanh(_r(p, "inner", c * (a + k * (a * a * a))))))
    if form in ("sigmoid", "silu"):
        c = _r(p, "constant", float(p.get("sigmoid_scale", SIGMOID_SCALE))) if form == "sigmoid" else 1.0
        with np.errstate(over="ignore"):
            return 1.0 / (1.0 + _r(p, "fn", np.exp(-_r(p, "inner", c * a))))
    raise ValueError(f"form {form!r}")


def _gelu(graph, node, x, w, p):
    a = _f(x[0])
    form = p["form"]
    if form == "tanh_fp16_table":
        return gelu_tanh_fp16_table(a)
    if form == "relu":
        return np.maximum(a, 0.0)
    return a * _r(p, "cdf", _gelu_gate(a, form, p))


def _router(graph, node, x, w, p):
    W = _rounded_weight(_f(w[node.weights[0]]), p["weight_precision"], axis=1)
    return _product_f64(_f(x[0]), W) - _int_pairs_loss(p, len(x[0]))


def _softmax_op(graph, node, x, w, p):
    a = _times(x[0], p.get("temperature", 1.0))  # logits multiplied by the temperature factor
    axis = {"experts": -1, "tokens": 0}.get(p.get("axis", "experts"))
    if axis is None:
        raise ValueError(f"axis {p['axis']!r}")
    if p["function"] == "sigmoid":
        with np.errstate(over="ignore"):
            return 1.0 / (1.0 + _r(p, "exp", np.exp(-a)))
    if p["function"] != "softmax":
        raise ValueError(f"function {p['function']!r}")
    return _softmax(a, p["softmax"], axis, p)


def _topk(graph, node, x, w, p):
    probs = _f(x[0])
    k = graph.dims.top_k
    idx = np.argsort(-probs, axis=-1, kind="stable")[:, :k]  # descending, ties to the lower index
    wts = np.take_along_axis(probs, idx, axis=-1)
    if p["renormalize"]:
        wts = wts / wts.sum(axis=-1, keepdims=True)
    if p["order"] == "by_index":
        o = np.argsort(idx, axis=-1, kind="stable")
        idx, wts = np.take_along_axis(idx, o, axis=-1), np.take_along_axis(wts, o, axis=-1)
    elif p["order"] != "by_weight":
        raise ValueError(f"order {p['order']!r}")
    return wts if node.attrs["part"] == "weights" else idx.astype(np.int64)


def _map_experts(idx: np.ndarray, mode: str, E: int) -> np.ndarray:
    idx = np.asarray(idx, dtype=np.int64)
    if mode == "identity":
        return idx
    if mode == "reversed":
        return E - 1 - idx
    if mode == "off_by_one":
        return (idx + 1) % E
    if mode == "off_by_minus_one":
        return (idx - 1) % E
    raise ValueError(f"expert_index_map {mode!r}")


def _expert_weights(graph, key, w, orientation):
    """An expert weight (E*F, H) as (E, F, H): ``FH`` as released, ``HF`` = read as (E, H, F), transposed."""
    return _expert_view(graph, _f(w[key]), orientation)


def _expert_view(graph, a: np.ndarray, orientation) -> np.ndarray:
    """:func:`_expert_weights` of the tensor ``a`` in its own dtype (a view)."""
    d = graph.dims
    E, F, H = d.experts, d.inner, d.hidden
    if orientation == "FH":
        return a.reshape(E, F, H)
    if orientation == "HF":
        return a.reshape(E, H, F).transpose(0, 2, 1)
    raise ValueError(f"orientation {orientation!r}")


def _stored_float32(w, key) -> np.ndarray | None:
    """The checkpoint's own float32 tensor where the weights mapping hands it out (compare.stats.NodeWeights64.stored:
    one object per tensor while its node is visited), for a product that widens it to float64 as it packs it: the
    float64 copy the mapping would make first is not needed (at full size a 151 MB float64 copy of each expert
    tensor per node visit, 8 % of the reference noise). None where the mapping has no such tensor."""
    stored = getattr(w, "stored", None)
    a = stored(key) if stored is not None else None
    return a if isinstance(a, np.ndarray) and a.dtype == np.float32 else None


def _rounded_experts(graph, key, w, orientation, precision, axis: int) -> np.ndarray:
    """:func:`_expert_weights` rounded to ``precision`` along ``axis`` of the (E, F, H) view, memoised per stored
    tensor (:data:`WEIGHT_MEMO`)."""
    if precision == "fp64":
        return _expert_weights(graph, key, w, orientation)
    raw = w[key]
    rounding = json.dumps(["experts", orientation, precision, axis], sort_keys=True)
    return WEIGHT_MEMO.get(raw, rounding, lambda: round_to(_expert_weights(graph, key, w, orientation), precision,
                                                          axis=axis))  # fmt: skip


def _packed_experts(graph, key, w, orientation, precision, axis: int, trans: bool):
    """:func:`_rounded_experts` packed for the float64 matmul (each expert's (F, H) block: ``trans`` for x @ w1[e]^T,
    not for x @ w2[e]), memoised per stored tensor like the rounding; an unrounded float32 tensor the mapping hands
    out (:func:`_stored_float32`) packed straight from it (the same packed bits)."""
    from .. import kernels

    tag = json.dumps(["experts float64 packed", orientation, precision, axis, trans], sort_keys=True)
    f32 = _stored_float32(w, key) if precision == "fp64" else None
    if f32 is not None:
        return WEIGHT_MEMO.get(f32, tag, lambda: kernels.pack_f64(np.ascontiguousarray(_expert_view(
            graph, f32, orientation)), trans=trans))  # fmt: skip
    return WEIGHT_MEMO.get(w[key], tag, lambda: kernels.pack_f64(np.ascontiguousarray(
        _rounded_experts(graph, key, w, orientation, precision, axis)), trans=trans))  # fmt: skip


def _grouped(rows: np.ndarray, idx: np.ndarray, packed, out_dim: int) -> np.ndarray:
    """out[t, j] = rows[t, j] @ expert idx[t, j]'s weight of ``packed`` (actdiff.kernels.PackedF64, 3-D), by the
    float64 matmul, looping over experts (memory ~ T*k*out_dim): a row's bits do not depend on the other rows an
    expert gets, so stacked prompts give each prompt its own values."""
    from .. import kernels

    T, k = idx.shape
    out = np.zeros((T, k, out_dim))
    for e in np.unique(idx):
        sel = idx == e
        out[sel] = kernels.matmul_f64(np.ascontiguousarray(rows[sel], np.float64), packed.block(e))
    return out


def _expert_fc1(graph, node, x, w, p):
    h, idx = _f(x[0]), _map_experts(x[1], p["expert_index_map"], graph.dims.experts)
    # reduced precision: along H
    w1 = _packed_experts(graph, node.weights[0], w, p["w1_orientation"], p["weight_precision"], 2, trans=True)
    rows = np.broadcast_to(h[:, None, :], (*idx.shape, h.shape[-1]))
    out = _grouped(rows, idx, w1, graph.dims.inner)
    if p.get("int_pairs", "exact") != "exact":  # every expert's rows on every token, as one integer kernel
        if p["w1_orientation"] != "FH":
            raise NotApplicable("int_pairs applies to the expert weights as stored (FH)")
        loss = _int_pairs_loss(p, h.shape[0]).reshape(h.shape[0], graph.dims.experts, -1)
        out = out - np.take_along_axis(loss, idx[..., None], axis=1)
    return out


def _expert_fc2(graph, node, x, w, p):
    a, idx = _f(x[0]), _map_experts(x[1], p["expert_index_map"], graph.dims.experts)
    # reduced precision: along F
    w2 = _packed_experts(graph, node.weights[0], w, p["w2_orientation"], p["weight_precision"], 1, trans=False)
    return _grouped(a, idx, w2, graph.dims.hidden)


def _moe_sum(graph, node, x, w, p):
    eo, tw = _f(x[0]), _f(x[1])
    if not p["weighted"]:
        tw = np.ones_like(tw)
    if p["renormalize"]:
        tw = tw / tw.sum(axis=-1, keepdims=True)
    if "products" in p.get("round_at", {}):  # each slot's weighted output stored before the sum
        return _r(p, "products", eo * tw[..., None]).sum(axis=1)
    return np.einsum("tkh,tk->th", eo, tw)


def _bias_add(graph, node, x, w, p):
    a = _f(x[0])
    b = _times(w[node.weights[0]], p.get("bias_scale", 1.0))
    if p["bias"] == "per_expert":
        tw = _f(x[1])  # the aux input: top-k weights [T, k]
        return a + tw.sum(axis=-1, keepdims=True) * b
    return _apply_bias(a, b, p["bias"], node)


def _pool(graph, node, x, w, p):
    a = _f(x[0])
    if p.get("axis", "tokens") == "hidden":  # pooled over the features: [T, 1], fits only where T == 1
        a = a.T
    elif p.get("axis", "tokens") != "tokens":
        raise ValueError(f"axis {p['axis']!r}")
    mode = p["mode"]
    if mode == "mean":
        r = _r(p, "sum", a.sum(axis=0)) / a.shape[0] if "sum" in p.get("round_at", {}) else a.mean(axis=0)
    elif mode == "sum":
        r = _r(p, "sum", a.sum(axis=0))
    elif mode == "cls":
        r = a[0]
    elif mode == "last":
        r = a[-1]
    elif mode == "max":
        r = a.max(axis=0)
    else:
        raise ValueError(f"mode {mode!r}")
    return r.reshape(1, -1)


def _l2norm(graph, node, x, w, p):
    a = _f(x[0])
    if not p["normalize"]:
        return a.copy()
    axis = {"hidden": -1, "rows": 0}.get(p.get("axis", "hidden"))
    if axis is None:
        raise ValueError(f"axis {p['axis']!r}")
    n = _r(p, "norm", np.linalg.norm(a, axis=axis, keepdims=True))
    eps, placement = float(p["eps"]), p.get("eps_placement", "max")
    if placement == "max":
        return a / np.maximum(n, eps)
    if placement == "add":
        return a / (n + eps)
    if placement == "inside":
        return a / np.sqrt(n * n + eps)
    raise ValueError(f"eps_placement {placement!r}")


_IMPL = {
    "EMBED": _embed,
    "LAYERNORM": _layernorm,
    "MATMUL": _matmul,
    "SPLIT": _split,
    "ROPE": _rope,
    "ATTENTION": _attention,
    "ADD": _add,
    "GELU": _gelu,
    "ROUTER": _router,
    "SOFTMAX": _softmax_op,
    "TOPK": _topk,
    "EXPERT_FC1": _expert_fc1,
    "EXPERT_FC2": _expert_fc2,
    "MOE_SUM": _moe_sum,
    "BIAS_ADD": _bias_add,
    "POOL": _pool,
    "L2NORM": _l2norm,
}


def run_op(
    graph: Graph, node: Node | str, inputs: dict[str, np.ndarray], weights: dict[str, np.ndarray], params: dict
) -> np.ndarray:
    """Compute ``node`` under ``params`` (start from :func:`spec_params`) in float64 (int64 for indices).

    ``inputs`` holds at least the node's inputs (and :func:`aux_inputs` for some params); ``weights`` at
    least the node's checkpoint tensors. Raises :class:`NotApplicable` when the params cannot apply."""
    if isinstance(node, str):
        node = graph[node]
    p = {**spec_params(graph, node), **params}
    out = op_value(graph, node, inputs, weights, p)
    return finish_op(node, out, p, owned=_owned(node, out, inputs))


def _owned(node: Node, out: np.ndarray, inputs: Mapping) -> bool:
    """Is ``out`` an array no one else holds: writeable (the weights handed to the ops and the shared products are
    read-only) and not over any input's memory? The ops make new arrays; this holds finish_op to its word where
    one would not."""
    if not (isinstance(out, np.ndarray) and out.flags.writeable):
        return False
    return not any(np.may_share_memory(out, inputs[n]) for n in node.inputs if isinstance(inputs.get(n), np.ndarray))


# The parameters only run_op's last steps read (finish_op), after the op itself: a candidate that overrides
# nothing else has the op's value of the parameters it starts from (actdiff.compare.hypotheses reuses it)
POST_OP_PARAMS = frozenset({"output_scale", "arithmetic", "output_precision"})

# The parameters that round values computed from the inputs (run_op's operands, its intermediate steps, its
# result); weight_precision and round_at's "weight.<i>" round checkpoint tensors, the same for every row
_VALUE_PRECISIONS = ("accumulate", "arithmetic", "output_precision")


def rows_independent(node: Node, params: dict) -> bool:
    """Whether run_op computes each row (token) of its output from that row of its inputs alone under the
    complete ``params``, so that several prompts' inputs stacked along their rows give every prompt's own output
    rows (up to the last bits of a float64 product, which BLAS blocks by the row count). Not for the ops that
    read positions or mix tokens (actdiff.nodes.LAYOUT_OPS: EMBED, ROPE, ATTENTION, POOL), nor for a
    quantisation spec on values (``round_at`` on an operand or a step, or as a precision: a dynamic range spans
    the tensor's rows unless it is per row, a static one is safe but rare enough to run prompt by prompt), nor
    ``int_pairs`` (its loss is computed on the operands as given, rows counted). A string precision rounds per
    value, or per row along the last axis (int8). tests/test_hypotheses_stacked.py runs every catalogue entry at
    every node of both bundled models stacked and prompt by prompt."""
    if node.op in LAYOUT_OPS or params.get("int_pairs", "exact") != "exact":
        return False
    values = [params.get(k) for k in _VALUE_PRECISIONS]
    values += [v for k, v in params.get("round_at", {}).items() if not k.startswith("weight.")]
    return not any(isinstance(v, dict) for v in values)


# The products, and the parameters under which one stays linear in each row of its float inputs (given the weights
# and the row's index inputs): these only choose, lay out, permute or round the weights (the same for every row),
# or scale the result. Any other parameter, or one of the value roundings below set, makes linear_in_rows say no.
_LINEAR_OPS = frozenset({"MATMUL", "ROUTER", "EXPERT_FC1", "EXPERT_FC2"})
_LINEAR_PARAMS = frozenset({
    "weight_orientation", "w1_orientation", "w2_orientation", "weight_precision", "expert_index_map", "input_order",
    "weight_order", "output_scale", "bias", "bias_scale", "accumulate", "arithmetic", "output_precision", "round_at",
    "int_pairs",
})  # fmt: skip


def linear_in_rows(node: Node, params: dict) -> bool:
    """Whether run_op under the complete ``params`` computes each output row as a linear function of that row of
    its float inputs, for fixed weights and index inputs: a product whose values are rounded nowhere (accumulate,
    arithmetic and output precision fp64, round_at on weights only, exact int_pairs), without a bias, and with no
    parameter outside _LINEAR_PARAMS. Then summing such an op's outputs over rows that share their index inputs
    equals the op on those rows summed (actdiff.compare.budgets.sequential_sum_noise)."""
    if node.op not in _LINEAR_OPS or not rows_independent(node, params) or set(params) - _LINEAR_PARAMS:
        return False
    if any(params.get(k, "fp64") != "fp64" for k in _VALUE_PRECISIONS):
        return False
    if any(not k.startswith("weight.") for k in params.get("round_at", {})):
        return False
    return params.get("bias", "none") == "none"


def squared_weights_output_sum(graph: Graph, node: Node, inputs: Mapping, weights, params: dict) -> float | None:
    """The sum over every output of run_op on ``inputs`` with the node's weight squared element by element, computed
    without the product; None where ``params`` are not the plain product this reads (the caller then runs the op on
    squared weights). The sum envelope's q (actdiff.compare.budgets.sequential_sum_noise) is this on squared inputs.

    A product's outputs summed are its input rows dotted with its weight summed over the outputs: y = x W^T gives
    sum_j y_tj = sum_k x_tk c_k, c_k = sum_j W_jk^2 here; an expert product the same per expert (c per expert and
    input feature). c is memoised per stored tensor (:data:`WEIGHT_MEMO`: K values, or E x K). The op on squared
    weights made a float64 square of each weight and packed it for the product: at full size 0.3 GB per MoE
    layer's pair of expert tensors, squared and packed per node visit. The same value up to float64's rounding of
    another summation order (terms of one sign: ~(T + K + N) 2^-53 relative; tests/test_hypotheses_stacked.py).

    The plain product: ``params`` linear in rows (:func:`linear_in_rows`, so no bias and no value rounding), the
    weight unrounded (weight_precision fp64, no round_at), operands and weights in their own roles, output scale 1;
    any weight orientation and expert index map."""
    p = {**spec_params(graph, node), **params}
    plain = (p.get("weight_precision", "fp64") == "fp64" and not p.get("round_at") and p.get("output_scale", 1.0) == 1.0
             and list(p.get("input_order", range(len(node.inputs)))) == list(range(len(node.inputs)))
             and list(p.get("weight_order", range(len(node.weights)))) == list(range(len(node.weights))))  # fmt: skip
    if not (plain and linear_in_rows(node, p)):
        return None
    key, x = node.weights[0], _f(inputs[node.inputs[0]])
    if node.op in ("MATMUL", "ROUTER"):
        transposed = p.get("weight_orientation", "as_stored") == "transposed"
        tag = json.dumps(["squares summed over the outputs", transposed])
        c = WEIGHT_MEMO.get(weights[key], tag, lambda: _squares_summed(_f(weights[key]), 1 if transposed else 0))
        return float(np.sum(x.reshape(-1, len(c)) @ c))
    idx = _map_experts(inputs[node.inputs[1]], p["expert_index_map"], graph.dims.experts)
    fc1 = node.op == "EXPERT_FC1"
    orientation = p["w1_orientation" if fc1 else "w2_orientation"]
    tag = json.dumps(["expert squares summed over the outputs", node.op, orientation])
    # (E, F, H): fc1 maps H to F (summed over F), fc2 F to H (summed over H); squares of float32 values are exact in
    # float64, so the checkpoint's own tensor where the mapping hands it out (no float64 copy made for this)
    a = _stored_float32(weights, key)
    a = _f(weights[key]) if a is None else a
    c = WEIGHT_MEMO.get(a, tag, lambda: _squares_summed(_expert_view(graph, a, orientation), 1 if fc1 else 2))
    rows = x[:, None, :] if fc1 else x  # fc1's row is the token's for each of its k experts
    return float(np.einsum("tsi,tsi->", np.broadcast_to(rows, (*idx.shape, c.shape[-1])), c[idx]))


def _squares_summed(a: np.ndarray, axis: int) -> np.ndarray:
    """sum over ``axis`` of ``a`` squared, in float64 (a float32 ``a``'s squares exact), without a squared copy."""
    letters = "ijk"[: a.ndim]
    kept = letters.replace(letters[axis], "")
    return np.einsum(f"{letters},{letters}->{kept}", a, a, dtype=np.float64)


def stacked_rows(inputs: list[Mapping], names: list[str]) -> tuple[dict[str, np.ndarray], list[int]] | None:
    """The named values of several prompts stacked along their rows, and each prompt's row count; None where a
    prompt lacks one or the named values of a prompt do not have the same rows."""
    parts = {n: [np.asarray(x[n]) if n in x else None for x in inputs] for n in names}
    if not names or any(a is None or a.ndim == 0 for p in parts.values() for a in p):
        return None
    rows = [len(a) for a in parts[names[0]]]
    if any([len(a) for a in p] != rows for p in parts.values()):
        return None
    return {n: stack_rows(p) for n, p in parts.items()}, rows


def run_op_many(graph: Graph, node: Node, inputs: list[Mapping], weights, params: dict) -> list[np.ndarray]:
    """:func:`run_op` on each prompt's ``inputs`` (``params`` complete: spec_params with overrides): one call over
    their stacked rows where :func:`rows_independent` allows, one per prompt elsewhere. One float64 op per prompt
    and node was most of the spec's cost on short prompts (microseconds of arithmetic behind a Python call). A
    stacked product may round differently from a prompt's own in its last bits (BLAS blocks by the row count)."""
    names = list(node.inputs) + aux_inputs(graph, node, params)
    stacked = stacked_rows(inputs, names) if len(inputs) > 1 and rows_independent(node, params) else None
    if stacked is not None:
        x, rows = stacked
        y = run_op(graph, node, x, weights, params)
        if y.ndim > 0 and len(y) == sum(rows):
            return split_rows(y, rows)
    return [run_op(graph, node, x, weights, params) for x in inputs]


def op_value(graph: Graph, node: Node, inputs: dict[str, np.ndarray], weights: dict[str, np.ndarray],
             p: dict) -> np.ndarray:  # fmt: skip
    """The op's value under the complete parameters ``p`` (spec_params with overrides), before
    :func:`finish_op`, which never writes to it."""
    unknown = set(p) - PARAM_NAMES[node.op] - SEARCH_PARAM_NAMES[node.op]
    if unknown:
        raise ValueError(f"node {node.name} ({node.op}): unknown parameter(s) {sorted(unknown)}")
    names = list(node.inputs) + aux_inputs(graph, node, p)
    missing = [n for n in names if n not in inputs]
    if missing:
        raise KeyError(f"node {node.name}: missing input(s) {missing}")
    if p.get("int_pairs", "exact") != "exact":  # the integer kernel needs the operands before quantisation
        spec_roles = list(p["input_order"]) == list(range(len(node.inputs)))
        if not spec_roles or p.get("weight_orientation", "as_stored") != "as_stored":
            raise NotApplicable("int_pairs applies to the operands in their spec roles and orientation")
        p["_int_raw"] = (np.asarray(inputs[node.inputs[0]]), weights[node.weights[0]])
    xs = _operands([np.asarray(inputs[n]) for n in names], p["input_order"], "input", p)
    if list(p["weight_order"]) == list(range(len(node.weights))) and not any(
        k.startswith("weight.") for k in p.get("round_at", {})
    ):  # the weights as given: read when the op reads them (_NodeWeights)
        w = _NodeWeights(weights, node.weights)
    else:
        ws = _operands([weights[k] for k in node.weights], p["weight_order"], "weight", p, node.op == "EMBED")
        w = dict(zip(node.weights, ws, strict=True))
    acc = p.get("accumulate", "fp64")
    if acc != "fp64":  # reduced-precision kernel: operands and result rounded
        xs = [a if a.dtype.kind in "iu" else round_to(a, acc) for a in xs]
        w = {k: _rounded_weight(v, acc, axis=-1) for k, v in w.items()}  # the weights: memoised
    return _IMPL[node.op](graph, node, xs, w, p)


class _NodeWeights(Mapping):
    """A node's weights in their own roles, each read from the caller's mapping when the op reads it, and that
    mapping's stored tensors where it has them (:func:`_stored_float32`): an op that packs a float32 tensor straight
    for its float64 product never has its float64 copy made."""

    def __init__(self, weights: Mapping, keys):
        self.weights, self.keys_ = weights, tuple(keys)

    def __getitem__(self, key: str):
        if key not in self.keys_:
            raise KeyError(key)
        return self.weights[key]

    def __iter__(self):
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)

    def stored(self, key: str):
        stored = getattr(self.weights, "stored", None)
        return stored(key) if stored is not None and key in self.keys_ else None


def finish_op(node: Node, out: np.ndarray, p: dict, owned: bool = False) -> np.ndarray:
    """run_op's last steps on the op's value ``out`` (:func:`op_value`): indices as int64; else the output
    scale, the reduced-precision kernel's and the arithmetic's rounding, the output precision (new arrays:
    ``out`` is not changed). ``owned``: no one else holds ``out`` (run_op's own op value), which may then be the
    result itself (a copy of every spec value was 1.5 % of a report's statistics)."""
    acc = p.get("accumulate", "fp64")
    if node.kind == "index":
        return np.asarray(out, dtype=np.int64)
    out = (_times if owned else _scaled)(out, p.get("output_scale", 1.0))
    if acc != "fp64":
        out = round_to(out, acc)
    if p.get("arithmetic", "fp64") != "fp64":  # the result as computed in that format, before output_precision
        out = round_to(out, p["arithmetic"])
    return np.asarray(round_output(out, p.get("output_precision", "fp64")), dtype=np.float64)


def round_output(out: np.ndarray, precision) -> np.ndarray:
    """An op's result rounded as ``output_precision`` says (the last step of :func:`run_op`; per row of its
    [rows, ...] values where the precision has ranges)."""
    if precision == "fp64":
        return out
    return round_to(out.reshape(out.shape[0], -1), precision, axis=-1).reshape(out.shape)


def _operands(arrays: list, order, kind: str, p: dict, embed: bool = False) -> list:
    """The op's inputs (or weights) with their roles permuted by ``order`` (``order[i]``: which operand plays
    role i; operands that trade roles must have the same shape) and rounded where ``round_at`` names them
    (``input.<i>`` / ``weight.<i>``, after the permutation). Extra (aux) inputs keep their place."""
    order = [int(i) for i in order]
    n = len(order)
    if sorted(order) != list(range(n)) or n > len(arrays):
        raise ValueError(f"{kind}_order {order} is not a permutation of 0..{n - 1}")
    out = [arrays[i] for i in order] + list(arrays[n:])
    for i in range(n):
        a, b = np.asarray(out[i]), np.asarray(arrays[i])
        if a.shape != b.shape or a.dtype.kind != b.dtype.kind:
            raise NotApplicable(f"{kind} {order[i]} cannot play the role of {kind} {i} (shape or type differs)")
    for i, a in enumerate(out):
        prec = p.get("round_at", {}).get(f"{kind}.{i}")
        if kind == "weight" and embed:
            continue  # EMBED rounds the rows it gathers (see _embed)
        if prec not in (None, "fp64") and np.asarray(a).dtype.kind == "f":
            out[i] = _weight_quantised(a, prec) if kind == "weight" else _r({"round_at": {"x": prec}}, "x", a)
    return out


class WeightMemo:
    """Rounded weight tensors, memoised (read-only) per (tensor object, rounding) within a byte bound, least
    recently used first out. A weight is rounded the same way for every prompt, hypothesis and search candidate
    that reads it: rounding it again each time was most of the spec ops' time where a precision rounds weights
    (MiniLM's statistics against ONNX Runtime int8: the bf16 hypothesis's rounding alone was a seventh of the job;
    ORT's 4096 x 128 expert weight quantised again per candidate was 80% of a search's EXPERT_FC1 evaluation).
    Keyed by the tensor object: the statistics' float64 weights (compare.stats.NodeWeights64) hand out one
    object per tensor for as long as they hold it (the whole job for a resident model, a node's visit otherwise).
    An entry goes with its tensor (weak reference with a callback), so a tensor made per call (a caller's own
    float64 copy) never fills the memo with rounded copies no one can hit, and an id reused later never matches."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.items: OrderedDict = OrderedDict()  # (id of the tensor, rounding) -> (weak reference to it, result)
        self.seen: dict = {}  # (id of the tensor, rounding) -> weak reference: asked for once (get_reused)
        self.bytes = 0

    def get(self, a, rounding: str, compute) -> np.ndarray:
        """``compute()`` (``a`` rounded as ``rounding`` names it: an ndarray, or a weight packed for the C matmul
        core, whose panels are made read-only), memoised for the ndarray ``a``."""
        if not isinstance(a, np.ndarray):
            return compute()
        key = (id(a), rounding)
        hit = self.items.get(key)
        if hit is not None and hit[0]() is a:
            self.items.move_to_end(key)
            return hit[1]
        out = compute()
        if out.nbytes > self.max_bytes:
            return out
        (out if isinstance(out, np.ndarray) else out.data).flags.writeable = False  # shared by every later caller
        self._drop(key)
        self.items[key] = (weakref.ref(a, lambda _ref, key=key: self._drop(key)), out)
        self.bytes += out.nbytes
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self.items)))
        return out

    def get_reused(self, a, rounding: str, compute):
        """:meth:`get` for a tensor memoised or seen once before under ``rounding``; None the first time, which is
        remembered as long as the tensor lives: for a result that pays only when the tensor is used again (a
        weight packed whole for the C float64 matmul, where the search makes a candidate's weight per call)."""
        if not isinstance(a, np.ndarray):
            return None
        key = (id(a), rounding)
        hit, seen = self.items.get(key), self.seen.get(key)
        if (hit is not None and hit[0]() is a) or (seen is not None and seen() is a):
            self.seen.pop(key, None)
            return self.get(a, rounding, compute)
        self.seen[key] = weakref.ref(a, lambda ref, key=key: self.seen.pop(key) if self.seen.get(key) is ref else None)
        return None

    def _drop(self, key) -> None:
        old = self.items.pop(key, None)
        if old is not None:
            self.bytes -= old[1].nbytes


# MiniLM-L6's weights at the four precisions the statistics' spec ops and hypotheses round them to (fp32, fp16,
# bf16, int8 per channel: 0.36 GB) fit; the released MoE's 151 MB expert weights keep a few at a time (its float64
# weights are held one node at a time anyway)
WEIGHT_MEMO = WeightMemo(2**29)


def _rounded_weight(a, precision, axis: int, transposed: bool = False) -> np.ndarray:
    """Checkpoint tensor ``a`` (float64), transposed first when asked, rounded to ``precision`` along ``axis``
    (:func:`round_to`), memoised per stored tensor."""
    src = a.T if transposed else a
    if precision == "fp64":
        return np.asarray(src, dtype=np.float64)
    key = json.dumps([precision, axis, transposed], sort_keys=True)
    return WEIGHT_MEMO.get(a, key, lambda: round_to(src, precision, axis=axis))


def _weight_quantised(a, prec) -> np.ndarray:
    """Checkpoint tensor ``a`` rounded as a ``round_at`` entry says (``prec``: a precision or a quantisation
    spec), memoised (:data:`WEIGHT_MEMO`)."""
    key = json.dumps(["round_at", prec], sort_keys=True)
    return WEIGHT_MEMO.get(a, key, lambda: _r({"round_at": {"x": prec}}, "x", a))
