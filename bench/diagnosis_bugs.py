"""The planted engine bugs of bench/diagnosis.py: porting mistakes that are neither catalogue entries
(src/actdiff/data/hypotheses.yaml) nor the engine's deliberate faults (actdiff.engine.faults).

Each bug is a set of replacements for methods of :class:`actdiff.engine.core.Engine` (its ``_op_<op>``
methods, ``forward``, ``forced_moe``, ``_expert_weights``, ``_fused_moe``), applied to the class by
:func:`engine_patched` inside the benchmark's process only: the engine's dump AND the statistics stage's
replay of the engine's per-node code (``actdiff.sides.open_replay`` builds an Engine) then run the buggy
code, as a real port's would. The comparison code is never patched.

The engine's forward runs a whole MoE block as one fused kernel (``_fused_moe``); a bug in an op inside
the block is planted in the per-node op, and the forward and ``forced_moe`` are switched to the per-node
ops (:func:`per_node_moe`), so forward and replay run the same buggy code. The one exception is
``fused_w1_rolled``: a bug in the fused kernel's call only, while the per-node ops stay right.

A bug says which node it first changes (by graph query, :func:`node_of`) and which cause a right diagnosis
names (``accepts``: a predicate over one entry of the verdict's ``causes``, checking its params and
sentence for the planted value, robustly rather than by exact wording).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from actdiff import kernels
from actdiff.engine.core import Engine
from actdiff.nodes import Graph

Patch = dict[str, Callable]  # Engine attribute -> replacement
Predicate = Callable[[dict], bool]


@dataclass(frozen=True)
class Bug:
    id: str
    category: str
    description: str  # the porting mistake, one line
    patch: Callable[[Graph], Patch]
    node: Callable[[Graph], str]  # the first node where the engine diverges
    expect: str  # the cause a right diagnosis names, in words
    accepts: Predicate  # over one verdict cause
    no_effect: bool = False  # the outputs do not change: a right verdict "deviates", not "fail"
    weight: Callable[[Graph], str] | None = None  # a tensor the right cause must name (another layer's)

    def predicate(self, g: Graph) -> Predicate:
        """``accepts``, and (when the bug reads another tensor) the cause names that tensor."""
        if self.weight is None:
            return self.accepts
        return all_of(self.accepts, says_any(self.weight(g)))


# ------------------------------------------------------------------------------------------- patching
_ORIG = dict(vars(Engine))  # the unpatched methods, captured at import


@contextmanager
def engine_patched(patch: Patch):
    """Replace Engine methods for the duration of the block (the class itself: every Engine built inside,
    the dumping side's and the statistics stage's replay, runs the patched code)."""
    saved = {k: Engine.__dict__[k] for k in patch}
    try:
        for k, f in patch.items():
            setattr(Engine, k, f)
        yield
    finally:
        for k, f in saved.items():
            setattr(Engine, k, f)


def node_of(g: Graph, op: str, layer: int | None = None, part=None, suffix: str | None = None, nth: int = 0) -> str:
    """The ``nth`` node of an op type (optionally in one layer, of one split part, or whose name ends so)."""
    hits = [
        n.name
        for n in g
        if n.op == op
        and (layer is None or n.layer == layer)
        and (part is None or n.attrs.get("part") == part)
        and (suffix is None or n.name.endswith(suffix))
    ]
    return hits[nth]


def moe_layers(g: Graph) -> list[int]:
    return [b.layer for b in g.moe_blocks()]


def per_node_moe() -> Patch:
    """The forward and the forced-routing MoE through the per-node ops (no fused kernel)."""
    orig_forward = _ORIG["forward"]

    def forward(self, ids, variant="fp32", fused_moe=True):
        return orig_forward(self, ids, variant, fused_moe=False)

    def forced_moe(self, router_name, h, indices, weights, variant="fp32"):
        p = self.prepare(variant)
        block = self._moe_block(router_name)
        vals = {block.input: h, block.topk_indices: np.asarray(indices), block.topk_weights: np.asarray(weights)}
        for name in (block.fc1, block.act, block.expert_out, block.weighted_sum, block.output):
            vals[name] = self.run_node(name, {i: vals[i] for i in self.graph[name].inputs}, p)
        return vals[block.output]

    return {"forward": forward, "forced_moe": forced_moe}


def op_patch(op: str, fn: Callable, when: Callable | None = None, moe: bool = False) -> Patch:
    """Replace ``Engine._op_<op>`` by ``fn(self, node, x, p, orig)`` on the nodes ``when(node)`` accepts."""
    orig = _ORIG[f"_op_{op}"]

    def patched(self, node, x, p):
        if when is not None and not when(node):
            return orig(self, node, x, p)
        return fn(self, node, x, p, orig)

    return {f"_op_{op}": patched, **(per_node_moe() if moe else {})}


# ------------------------------------------------------------------------------- numpy op variants
def _f32(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def _round(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "fp16":
        return a.astype(np.float16).astype(np.float32)
    return kernels.bf16_to_f32(kernels.f32_to_bf16(_f32(a)))


def layernorm_np(x, gamma, beta, eps, axis=-1, round_to=None) -> np.ndarray:
    x = x.astype(np.float64)
    mu = x.mean(axis=axis, keepdims=True)
    var = x.var(axis=axis, keepdims=True)
    n = _f32((x - mu) / np.sqrt(var + eps))
    if round_to:
        n = _round(n, round_to)
    return _f32(n.astype(np.float64) * gamma + beta)


def attention_probs_rounded(q, k, v, scale, dtype: str) -> np.ndarray:
    """Bidirectional attention with the probabilities rounded to ``dtype`` before they weight the values."""
    s = np.einsum("qhd,khd->hqk", q.astype(np.float64), k.astype(np.float64)) * scale
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    probs = _round(_f32(e / e.sum(axis=-1, keepdims=True)), dtype)
    ctx = np.einsum("hqk,khd->qhd", probs.astype(np.float64), v.astype(np.float64))
    return _f32(ctx.reshape(q.shape[0], -1))


def _rope_at(self, node, x, p, positions: np.ndarray, base: float | None = None):
    return kernels.rotary(
        x[0], positions=positions.astype(np.int64), base=base or self.dims.rotary_base,
        interleaved=self._rope_interleaved(p.fault, node),
    )  # fmt: skip


# --------------------------------------------------------------------------------- cause predicates
_DOTTED = re.compile(r"[a-z_][a-z0-9_]*(\.[a-z0-9_]+)+")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?")


def cause_text(c: dict) -> str:
    """A cause's name, sentence and params as one lower-case string (what the keyword predicates read)."""
    return " ".join(
        [str(c.get("hypothesis") or ""), str(c.get("says") or ""), json.dumps(c.get("params") or {})]
    ).lower()


def _param_numbers(v) -> list[float]:
    if isinstance(v, bool) or v is None:
        return []
    if isinstance(v, (int, float)):
        return [float(v)]
    if isinstance(v, dict):
        return [x for item in v.values() for x in _param_numbers(item)]
    if isinstance(v, (list, tuple)):
        return [x for item in v for x in _param_numbers(item)]
    if isinstance(v, str):
        return [float(m) for m in _NUMBER.findall(_DOTTED.sub(" ", v.lower()))]
    return []


def cause_numbers(c: dict) -> list[float]:
    """Every number in the cause's params and sentence (node and tensor names removed first)."""
    return _param_numbers(c.get("params") or {}) + _param_numbers(str(c.get("says") or ""))


def near(value: float, rel: float = 0.02) -> Predicate:
    return lambda c: any(abs(x - value) <= rel * abs(value) + 1e-12 for x in cause_numbers(c))


def says_any(*words: str) -> Predicate:
    return lambda c: any(w.lower() in cause_text(c) for w in words)


def none_of(*words: str) -> Predicate:
    return lambda c: not says_any(*words)(c)


def all_of(*preds: Predicate) -> Predicate:
    return lambda c: all(p(c) for p in preds)


def any_of(*preds: Predicate) -> Predicate:
    return lambda c: any(p(c) for p in preds)


def _int_lists(v) -> list[list[int]]:
    if isinstance(v, dict):
        return [x for item in v.values() for x in _int_lists(item)]
    if isinstance(v, (list, tuple)):
        if v and all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in v):
            return [[int(i) for i in v]]
        return [x for item in v for x in _int_lists(item)]
    return []


def permutation(perm: list[int]) -> Predicate:
    """A list of expert ids in the params equal to the planted permutation (or its inverse: which direction
    a report writes the map in is its choice)."""
    inverse = list(np.argsort(perm))
    return lambda c: any(lst in (list(perm), inverse) for lst in _int_lists(c.get("params") or {}))


AXIS_WORDS = ("axis", "over tokens", "token axis", "dim 0", "dimension 0", "transpos", "across tokens")


# ------------------------------------------------------------------------------------------ the bugs
ROLL = 2  # fused_w1_rolled: expert e reads expert (e - 2)'s w1 rows
PERM = (5, 2, 7, 0, 6, 1, 3, 4)  # expert_permuted: expert e computes with expert PERM[e]'s weights
OTHER = {"out_proj": (1, 0), "mlp_fc1": (2, 0)}  # (layer that is wrong, layer whose weight it reads)


def _fused_w1_rolled(g: Graph) -> Patch:
    """The fused kernel is handed w1 rolled by ROLL experts; the per-node ops (the replay) stay right."""
    orig_fused, orig_weights = _ORIG["_fused_moe"], _ORIG["_expert_weights"]

    def rolled(self, block, p):
        w1, w2, bias = orig_weights(self, block, p)
        scales = None if w1.scales is None else np.roll(w1.scales, ROLL, axis=0)
        rolled_ids = (np.arange(w1.data.shape[0]) - ROLL) % w1.data.shape[0]  # np.roll(w, ROLL, axis=0)
        return _replace(w1, data=_take_experts(w1.data, rolled_ids), scales=scales), w2, bias

    def fused(self, router_node, h, p):
        self._expert_weights = rolled.__get__(self)  # this call only: forced_moe and the ops keep the right w1
        try:
            return orig_fused(self, router_node, h, p)
        finally:
            del self._expert_weights

    return {"_fused_moe": fused}


def _take_experts(data, experts):
    """Expert weights with expert e read from expert experts[e]: a plain array or a packed fp32 weight
    (the engine packs fp32 weights at load; whole experts move, so the packed layout stays valid)."""
    if isinstance(data, kernels.PackedF32):
        return data.take(experts)
    return np.ascontiguousarray(data[np.asarray(experts)])


def _replace(t, **changes):
    from dataclasses import replace

    return replace(t, **changes)


def _expert_permuted(g: Graph) -> Patch:
    """Per-node expert ops map each expert id through PERM; the fused kernel and forced_moe get the
    weights permuted the same way (w[e] = w[PERM[e]])."""
    perm = np.asarray(PERM, dtype=np.int64)
    orig_weights = _ORIG["_expert_weights"]

    def permuted(t):
        return _replace(t, data=_take_experts(t.data, perm), scales=None if t.scales is None else t.scales[perm])

    def weights(self, block, p):
        w1, w2, bias = orig_weights(self, block, p)
        return permuted(w1), permuted(w2), bias

    def via_perm(self, node, x, p, orig):
        return orig(self, node, [x[0], perm[np.asarray(x[1])]], p)

    return {"_expert_weights": weights, **op_patch("expert_fc1", via_perm), **op_patch("expert_fc2", via_perm)}


def _expert_fc1_other_layer(g: Graph) -> Patch:
    """The last MoE layer's experts read the first MoE layer's w1 (a copy-paste of the weight key)."""
    first, last = moe_layers(g)[0], moe_layers(g)[-1]
    src = next(n for n in g if n.op == "EXPERT_FC1" and n.layer == first).weights[0]
    orig_weights = _ORIG["_expert_weights"]

    def weights(self, block, p):
        w1, w2, bias = orig_weights(self, block, p)
        return (p.w(src) if block.layer == last else w1), w2, bias

    def fc1(self, node, x, p, orig):
        w1 = p.w(src)
        return kernels.expert_up(x[0], x[1], w1.data, scales=w1.scales)

    return {"_expert_weights": weights, **op_patch("expert_fc1", fc1, when=lambda n: n.layer == last)}


def _rope(positions: Callable[[int], np.ndarray], base: float | None = None) -> Callable[[Graph], Patch]:
    def make(g: Graph) -> Patch:
        return op_patch("rope", lambda self, node, x, p, orig: _rope_at(self, node, x, p, positions(len(x[0])), base))

    return make


def _attention(scale=None, key_limit: int | None = None, probs_dtype: str | None = None):
    def op(self, node, x, p, orig):
        q, k, v = x
        s = scale(self.dims) if scale else 1.0 / math.sqrt(self.dims.head_dim)
        if probs_dtype:
            return attention_probs_rounded(q, k, v, s, probs_dtype)
        mask = None if key_limit is None else (np.arange(len(k)) < key_limit)
        return kernels.attention(q, k, v, key_mask=mask, scale=s)

    return lambda g: op_patch("attention", op)


def _layernorm(fn: Callable, when: Callable | None = None) -> Callable[[Graph], Patch]:
    """``fn(x, gamma, beta, eps)`` in place of the LayerNorm kernel."""

    def op(self, node, x, p, orig):
        gamma, beta = (p.w(k).data for k in node.weights)
        return fn(x[0], gamma, beta, self._param(p.fault, node, "eps", self.dims.eps))

    return lambda g: op_patch("layernorm", op, when)


def _split_q_k_swapped(g: Graph) -> Patch:
    def op(self, node, x, p, orig):
        T, nh, hd = x[0].shape[0], self.dims.heads, self.dims.head_dim
        part = {0: 1, 1: 0}.get(node.attrs["part"], node.attrs["part"])
        return np.ascontiguousarray(x[0].reshape(T, 3, nh, hd)[:, part])

    return op_patch("split", op)


def _matmul_other_layer(kind: str) -> Callable[[Graph], Patch]:
    def make(g: Graph) -> Patch:
        bad, src = (node_of(g, "MATMUL", layer, suffix=_SUFFIX[kind]) for layer in OTHER[kind])

        def op(self, node, x, p, orig):
            inp = x[0].reshape(x[0].shape[0], -1)
            out = self._matmul(inp, p.w(g[src].weights[0]), p.w(node.weights[1]))
            return out.reshape(self.graph.shape(node.name, inp.shape[0]))

        return op_patch("matmul", op, when=lambda n: n.name == bad)

    return make


_SUFFIX = {"out_proj": "attn.out_proj", "mlp_fc1": "mlp.fc1"}


def _other_weight(kind: str) -> Callable[[Graph], str]:
    return lambda g: g[node_of(g, "MATMUL", OTHER[kind][1], suffix=_SUFFIX[kind])].weights[0]


def _bias_scaled(g: Graph) -> Patch:
    def op(self, node, x, p, orig):
        inp = x[0].reshape(x[0].shape[0], -1)
        w, b = p.w(node.weights[0]), p.w(node.weights[1])
        out = kernels.matmul(inp, w.data, _f32(b.data.astype(np.float32) * 0.9), scales=w.scales)
        return out.reshape(self.graph.shape(node.name, inp.shape[0]))

    return op_patch("matmul", op, when=lambda n: len(n.weights) > 1)


def _simple(op: str, fn: Callable, when: Callable | None = None, moe: bool = False) -> Callable[[Graph], Patch]:
    """A patch of one op whose replacement needs only ``fn(self, node, x, p, orig)``."""
    return lambda g: op_patch(op, fn, when, moe)


def _embed_ids_shifted(self, node, x, p, orig):
    return orig(self, node, [np.minimum(np.asarray(x[0]) + 1, self.dims.vocab - 1)], p)


def _gelu_sigmoid_15(self, node, x, p, orig):
    return _f32(x[0] / (1.0 + np.exp(-1.5 * x[0].astype(np.float64))))


def _pool_without_last(self, node, x, p, orig):
    mask = np.ones(len(x[0]), dtype=bool)
    mask[-1] = len(mask) == 1
    return kernels.mean_pool(x[0], mask).reshape(1, -1)


def _l2_eps_added(self, node, x, p, orig):
    v = x[0].astype(np.float64)
    return _f32(v / (np.linalg.norm(v, axis=-1, keepdims=True) + 0.1))


def _ln(eps: float | None = None, axis: int = -1, round_to: str | None = None) -> Callable:
    """A numpy LayerNorm with a planted eps, axis or rounding of the normalised value."""
    return lambda x, gamma, beta, spec_eps: layernorm_np(x, gamma, beta, eps or spec_eps, axis, round_to)


def _first(op: str, **kw) -> Callable[[Graph], str]:
    return lambda g: node_of(g, op, **kw)


def _first_moe(op: str, nth_layer: int = 0, **kw) -> Callable[[Graph], str]:
    return lambda g: node_of(g, op, layer=moe_layers(g)[nth_layer], **kw)


_SCALE_NUMBERS = any_of(near(1 / 128), near(128), near(math.sqrt(32) / 128), near(128 / math.sqrt(32)))

BUGS: list[Bug] = [
    Bug("fused_w1_rolled", "fused path only",
        "the fused MoE kernel is given expert w1 rolled by 2 experts (the per-node ops are right)",
        _fused_w1_rolled, _first_moe("EXPERT_FC1"), "fused/replay mismatch or experts shifted by 2",
        any_of(says_any("fused", "replay", "forward differs"), permutation([(e - ROLL) % 8 for e in range(8)]))),
    Bug("rope_offset_3", "no effect", "rotary positions start at 3 instead of 0 (scores see relative positions only)",
        _rope(lambda T: np.arange(T) + 3), _first("ROPE", layer=0), "rotary position offset of 3",
        all_of(says_any("position", "offset", "rotary", "rope"), near(3, 0)), no_effect=True),
    Bug("rope_base_5000", "continuous parameter", "rotary base 5000 instead of the config's 10000",
        _rope(np.arange, 5000.0), _first("ROPE", layer=0), "rotary base fitted within 2% of 5000", near(5000)),
    Bug("ln_eps_3e-3", "continuous parameter", "LayerNorm eps 3e-3 instead of the config's",
        _layernorm(_ln(3e-3)), _first("LAYERNORM"), "LayerNorm eps fitted within 10% of 3e-3", near(3e-3, 0.1)),
    Bug("ln_gamma_beta_swapped", "weight-role swap", "LayerNorm weight and bias passed in swapped order",
        _layernorm(lambda x, gamma, beta, eps: kernels.layernorm(x, beta, gamma, eps=eps)), _first("LAYERNORM"),
        "LayerNorm gamma and beta swapped", all_of(says_any("swap", "exchang"), says_any("bias", "beta"))),
    Bug("qk_swapped", "weight-role swap", "the QKV split reads q from the k rows and k from the q rows",
        _split_q_k_swapped, _first("SPLIT", layer=0, part=0), "q and k parts of the QKV split swapped",
        any_of(all_of(says_any("swap", "exchang"), says_any("key", "query", "attn.k", "part")),
               says_any("k rows", "reads k", "q reads", '"part": 1'))),
    Bug("out_proj_other_layer", "weight-role swap", "layer 1's attention out_proj uses layer 0's weight",
        _matmul_other_layer("out_proj"), _first("MATMUL", layer=1, suffix="attn.out_proj"),
        "out_proj reads layer 0's weight", lambda c: True, weight=_other_weight("out_proj")),
    Bug("mlp_fc1_other_layer", "weight-role swap", "layer 2's dense fc1 uses layer 0's weight",
        _matmul_other_layer("mlp_fc1"), _first("MATMUL", layer=2, suffix="mlp.fc1"),
        "fc1 reads layer 0's weight", lambda c: True, weight=_other_weight("mlp_fc1")),
    Bug("expert_fc1_other_layer", "weight-role swap", "the last MoE layer's experts use the first MoE layer's w1",
        _expert_fc1_other_layer, _first_moe("EXPERT_FC1", -1), "expert w1 of the first MoE layer",
        lambda c: True, weight=lambda g: g[_first_moe("EXPERT_FC1")(g)].weights[0]),
    Bug("router_softmax_tokens", "wrong axis", "router softmax over the token axis instead of the experts",
        _simple("softmax", lambda self, node, x, p, orig: np.ascontiguousarray(kernels.softmax(_f32(x[0].T)).T),
                moe=True),
        _first_moe("SOFTMAX"), "softmax over the wrong (token) axis", says_any(*AXIS_WORDS)),
    Bug("ln_token_axis", "wrong axis", "the encoder's LayerNorm normalises over tokens instead of channels",
        _layernorm(_ln(axis=0), when=lambda n: n.layer is not None), _first("LAYERNORM", layer=0),
        "LayerNorm over the wrong (token) axis", says_any(*AXIS_WORDS)),
    Bug("attn_probs_fp16", "intermediate precision", "attention probabilities rounded to fp16 inside the op",
        _attention(probs_dtype="fp16"), _first("ATTENTION", layer=0), "fp16 rounding inside attention",
        says_any("fp16", "float16", "half")),
    Bug("ln_normalized_bf16", "intermediate precision", "LayerNorm's normalised value rounded to bf16",
        _layernorm(_ln(round_to="bf16")), _first("LAYERNORM"), "bf16 rounding inside LayerNorm",
        says_any("bf16", "bfloat16")),
    Bug("expert_permuted", "expert permutation", f"expert ids mapped through the fixed permutation {list(PERM)}",
        _expert_permuted, _first_moe("EXPERT_FC1"), "the planted expert permutation (or its inverse)",
        permutation(list(PERM))),
    Bug("rope_wrap_128", "long prompts only", "rotary positions wrap at 128 (a cache sized 128)",
        _rope(lambda T: np.arange(T) % 128), _first("ROPE", layer=0), "rotary positions wrapping at 128",
        all_of(near(128, 0), says_any("position", "wrap", "modulo", "rotary", "rope"))),
    Bug("attn_keys_160", "long prompts only", "attention drops keys at positions >= 160 (a window of 160)",
        _attention(key_limit=160), _first("ATTENTION", layer=0), "keys beyond position 160 masked",
        any_of(near(160, 0.01), near(159, 0))),
    Bug("attn_scale_inv_hidden", "other", "attention scale 1/hidden instead of 1/sqrt(head_dim)",
        _attention(scale=lambda d: 1.0 / d.hidden), _first("ATTENTION", layer=0), "attention scale 1/128",
        all_of(says_any("scale"), _SCALE_NUMBERS)),
    Bug("gelu_sigmoid_1.5", "other", "GELU computed as x*sigmoid(1.5x)",
        _simple("gelu", _gelu_sigmoid_15, moe=True), _first("GELU"), "sigmoid GELU with coefficient 1.5",
        all_of(says_any("sigmoid"), near(1.5))),
    Bug("resid_attn_half", "other", "the attention residual adds half the branch (x + 0.5*attn)",
        _simple("add", lambda self, node, x, p, orig: kernels.add(x[0], _f32(0.5 * x[1])),
                when=lambda n: n.name.endswith("resid_attn")),
        _first("ADD", suffix="resid_attn"), "residual branch scaled by 0.5", near(0.5)),
    Bug("matmul_bias_0.9", "other", "every dense bias scaled by 0.9 (a stray scaling of the bias load)",
        _bias_scaled, _first("MATMUL"), "matmul bias scaled by 0.9", all_of(says_any("bias"), near(0.9))),
    Bug("embed_ids_shifted", "other", "token ids shifted by +1 before the embedding lookup",
        _simple("embed", _embed_ids_shifted), _first("EMBED"), "token ids offset by 1",
        all_of(says_any("token id", "token_id", "input_id", "input id", "ids"), none_of("position"), near(1, 0))),
    Bug("l2norm_eps_added", "other", "L2 normalisation divides by ||x|| + 0.1",
        _simple("l2norm", _l2_eps_added), _first("L2NORM"), "L2 norm eps 0.1 (added)", near(0.1, 0.1)),
    Bug("pool_without_last", "other", "mean pooling leaves out the last token",
        _simple("pool", _pool_without_last), _first("POOL"), "pooling excludes the last token", says_any("last")),
    Bug("router_scaled_1.25", "other", "router weight scaled by 1.25 (a stray temperature)",
        _simple("router", lambda self, node, x, p, orig: kernels.matmul(x[0], _f32(p.w(node.weights[0]).data * 1.25)),
                moe=True),
        _first_moe("ROUTER"), "router logits scaled by 1.25", any_of(near(1.25), near(0.8))),
]  # fmt: skip
