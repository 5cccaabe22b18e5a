"""Error budgets: how much LOCAL (teacher-forced) relative L2 error a correct engine may show at a node.

A node's local error is the error of the engine's op alone, run on the reference's inputs. For a correct
implementation it comes from three sources, each bounded by a unit roundoff u:

- accumulation: a length-K reduction (dot product, variance, softmax sum) in fp32 has relative error that
  grows like sqrt(K) * u32 for random-signed terms (u32 = 2^-24); the two sides round differently
  (blocking, vector order, exp/erf implementations), so their difference has the same order;
- weight storage: fp16 (u = 2^-11), bf16 (2^-8), int8 per-channel symmetric (step = max|w|/127; relative
  rms error of a weight ~ (max|w|/rms|w|) / (127 * sqrt(12)) ~ 2^-7 for Gaussian-like rows of width
  768; taken as 2^-7). Each output is a sum of many independently rounded terms, so the output's relative
  error is about u itself, not sqrt(K) * u;
- activation rounding (fp16-act): output and inputs rounded to fp16, u = 2^-11 each.

budget = SAFETY * (u32 * sqrt(K) + u_weights + u_activations), SAFETY = 8: random-sign error sums land
within 3 standard deviations almost always; the remaining factor covers the ratio between the rms and
the max over channels. K is the node's reduction length (``reduction_length``). Ops without a reduction
(add, split, rotary, GELU) have K = 1. Budgets are per node and can be overridden in the config
(``budgets: {"<node glob>": value}``). tests/test_stats.py checks every fp32 budget is within 100x of the
observed p99 local error of a correct run, so budgets stay tight enough to catch real bugs.
"""

from __future__ import annotations

import fnmatch
import math

from ..nodes import Graph, Node

SAFETY = 8.0
U32 = 2.0**-24
# q8_0 (llama.cpp): blocks of 32 weights sharing an fp16 scale max|w|/127, so like int8 per channel but
# with a tighter range per block; taken as 2^-7 as well. llama.cpp also rounds the activations entering a
# quantised matmul to q8_0 (f16 for an f16 GGUF); both stay well inside SAFETY * u_weights.
U_WEIGHTS = {"fp32": 0.0, "fp16": 2.0**-11, "bf16": 2.0**-8, "int8": 2.0**-7, "fp16-act": 0.0, "q8_0": 2.0**-7}
U_ACT = {"fp16-act": 2.0**-11}
WEIGHTED_OPS = ("MATMUL", "ROUTER", "EXPERT_FC1", "EXPERT_FC2", "EMBED")
# engines keep routers and embeddings at fp32 storage for int8 (see actdiff.engine.weights)
INT8_FP32_OPS = ("ROUTER", "EMBED")


def reduction_length(graph: Graph, node: Node, tokens: int) -> int:
    d = graph.dims
    op = node.op
    if op in ("MATMUL", "ROUTER", "EXPERT_FC1"):
        w = node.weights[0] if node.weights else ""
        return d.inner if (w.endswith(("fc2.weight",)) or "output.dense" in w and "attention" not in w) else d.hidden
    if op == "EXPERT_FC2":
        return d.inner
    if op == "ATTENTION":
        return d.head_dim + tokens
    if op in ("LAYERNORM", "L2NORM"):
        return d.hidden
    if op in ("SOFTMAX", "TOPK"):
        return max(d.experts, 1)
    if op == "POOL":
        return tokens
    if op == "MOE_SUM":
        return max(d.top_k, 1)
    if op == "EMBED":
        return 3
    return 1


def budget(graph: Graph, node: Node, precision: str, tokens: int, overrides: dict | None = None) -> float:
    """Relative-L2 budget of the node's local error for an engine at ``precision``."""
    for pattern, value in (overrides or {}).items():
        if fnmatch.fnmatchcase(node.name, pattern):
            return float(value)
    k = reduction_length(graph, node, tokens)
    u_w = 0.0
    if node.op in WEIGHTED_OPS and not (precision == "int8" and node.op in INT8_FP32_OPS):
        u_w = U_WEIGHTS.get(precision, 0.0)
    if precision in ("fp16", "bf16") and node.op in INT8_FP32_OPS:
        u_w = U_WEIGHTS[precision]
    u_a = U_ACT.get(precision, 0.0) * (2 if node.kind != "index" else 0)
    return SAFETY * (U32 * math.sqrt(k) + u_w + u_a)


def status(local_rel_l2: float, propagated_rel_l2: float, node_budget: float, nonfinite_new: bool) -> str:
    """fail: the node's own error is over budget (or it produced NaN/Inf the reference does not have);
    warn: its own error is fine but it carries inherited error above 10x its budget; pass otherwise."""
    if nonfinite_new or not local_rel_l2 <= node_budget:
        return "fail"
    if propagated_rel_l2 > 10 * node_budget:
        return "warn"
    return "pass"
