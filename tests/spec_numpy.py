"""Float64 numpy oracle of the NomicBERT-MoE forward pass, used by the tests.

This is an independent re-implementation written only from the spec text in
``/work/shared/spec/nomic-embed-text-v2-moe.md`` (section "Forward pass" and the
configuration / tensor tables). It does not import any other project code. Every
intermediate value ("node") is returned in float64 (router top-k indices in int64),
so tests can compare another implementation against it node by node.

Quirks of the released model that this oracle follows on purpose (see the spec):
  * attention is bidirectional (no causal mask);
  * rotary is GPT-NeoX "rotate half" over all head dims, inv_freq[j] = base^(-2j/head_dim);
  * GELU is the exact erf form, not the tanh approximation;
  * post-norm LayerNorm with eps from the config;
  * router has no bias, softmax over all experts, top-k weights are NOT renormalised
    (unless the config sets ``moe_normalize_expert_weights``);
  * experts.mlp.w1 AND experts.mlp.w2 are both viewed as (E, F, H);
    expert e computes gelu(x @ w1[e].T) @ w2[e];
  * the shared expert bias is added once, after the weighted sum over the top-k experts;
  * mean pooling over real tokens, then x / max(||x||, 1e-12).

Beyond the released config (each as the original NomicBERT code, nomic-ai/contrastors
modeling_hf_nomic_bert.py): ``rotary_scaling_factor`` (dynamic NTK: for T > max_trained_positions the
base is base * ((factor * T / max_trained) - (factor - 1)) ** (hd / (hd - 2))); ``qkv_proj_bias: false``
(no Wqkv nor out_proj bias); ``mlp_fc1_bias`` / ``mlp_fc2_bias: false`` (no dense fc1 / fc2 bias).
"""

from __future__ import annotations

import math

import numpy as np

try:  # scipy is available in the project venv; fall back to math.erf otherwise
    from scipy.special import erf as _erf
except ImportError:  # pragma: no cover
    _erf = np.vectorize(math.erf, otypes=[np.float64])

__all__ = [
    "forward_nomic_moe",
    "gelu_erf",
    "layer_norm",
    "softmax",
    "rotary_neox",
    "is_moe_layer",
]


# --------------------------------------------------------------------------------------
# Elementary ops
# --------------------------------------------------------------------------------------


def gelu_erf(x: np.ndarray) -> np.ndarray:
    # spec: "activation | GELU, exact erf form (torch.nn.functional.gelu default)"
    x = np.asarray(x, dtype=np.float64)
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    # spec: "LayerNorm eps | 1e-5 everywhere" (taken from config layer_norm_epsilon);
    # standard LayerNorm over the last axis with biased variance.
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    # numerically stable softmax (subtract the max before exponentiating)
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - m)
    return e / e.sum(axis=axis, keepdims=True)


def rotary_neox(x: np.ndarray, base: float) -> np.ndarray:
    """Apply NeoX rotate-half rotary to x of shape [T, nh, hd] with positions 0..T-1."""
    T, _, hd = x.shape
    half = hd // 2
    # spec: "inv_freq[j] = 10000^(-2j/64), j < 32"  (base and head_dim from config)
    j = np.arange(half, dtype=np.float64)
    inv_freq = float(base) ** (-2.0 * j / hd)
    # spec: "rotary on q and k with positions 0..S-1"
    pos = np.arange(T, dtype=np.float64)
    freqs = pos[:, None] * inv_freq[None, :]  # [T, hd/2]
    # spec: "cos, sin of shape [S, 32], widened to [S, 64] by concatenating with themselves"
    cos = np.concatenate([np.cos(freqs), np.cos(freqs)], axis=-1)  # [T, hd]
    sin = np.concatenate([np.sin(freqs), np.sin(freqs)], axis=-1)  # [T, hd]
    cos = cos[:, None, :]  # broadcast over heads
    sin = sin[:, None, :]
    # spec: "rot(v) = v * cos + concat(-v[32:], v[:32]) * sin"
    rotated_half = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated_half * sin


def is_moe_layer(i: int, moe_every_n_layers: int) -> bool:
    # spec: "MoE layers | moe_every_n_layers = 2, MoE where layer_index % 2 == 1"
    n = int(moe_every_n_layers or 0)
    return n > 0 and i % n == 1


# --------------------------------------------------------------------------------------
# Forward pass
# --------------------------------------------------------------------------------------


def _f64(a) -> np.ndarray:
    # "any float dtype -- cast to float64" (also accepts bf16 numpy arrays / array-likes)
    return np.asarray(a).astype(np.float64)


def forward_nomic_moe(
    config: dict,
    weights: dict,
    ids: np.ndarray,
    attention_mask: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Run the NomicBERT-MoE forward pass of the spec for one prompt (batch 1).

    config: the raw config.json dict (released key names: n_embd, n_head, n_layer,
        n_inner, num_experts, moe_top_k, moe_every_n_layers, rotary_emb_base,
        layer_norm_epsilon, rotary_emb_fraction, rotary_emb_interleaved,
        moe_normalize_expert_weights).
    weights: checkpoint tensors by state-dict key (no prefix), any float dtype.
    ids: 1-D int array of token ids (all tokens real by default).
    attention_mask: optional 1-D {0,1} array (1 = real token). Default: all ones.
        Only used for the additive attention mask and the pooling, as in the spec
        (the MoE routes every token regardless of the mask).

    Returns every node as float64 (router top-k indices as int64). Per-layer nodes are
    prefixed ``encoder.layers.{i}.``.
    """
    H = int(config["n_embd"])
    nh = int(config["n_head"])
    n_layer = int(config["n_layer"])
    F = int(config.get("n_inner") or 4 * H)
    E = int(config.get("num_experts", 0) or 0)
    k = int(config.get("moe_top_k", 0) or 0)
    every = int(config.get("moe_every_n_layers", 0) or 0)
    base = float(config.get("rotary_emb_base", 10000))
    eps = float(config.get("layer_norm_epsilon", 1e-5))
    normalize_topk = bool(config.get("moe_normalize_expert_weights", False))
    factor = config.get("rotary_scaling_factor")
    max_trained = int(config.get("max_trained_positions", 2048))
    if float(config.get("rotary_emb_fraction", 1.0)) != 1.0:
        raise NotImplementedError("spec oracle only supports rotary_emb_fraction == 1.0")
    if bool(config.get("rotary_emb_interleaved", False)):
        raise NotImplementedError("spec oracle only supports non-interleaved (NeoX) rotary")
    if H % nh != 0:
        raise ValueError(f"n_embd {H} not divisible by n_head {nh}")
    hd = H // nh
    if hd % 2 != 0:
        raise ValueError("head_dim must be even for rotate-half rotary")

    W = lambda name: _f64(weights[name])  # noqa: E731
    # a bias the config switches off is absent from the checkpoint: adding nothing is adding zero
    B = lambda name, on: W(name) if on else 0.0  # noqa: E731
    qkv_bias = bool(config.get("qkv_proj_bias", True))
    fc1_bias, fc2_bias = bool(config.get("mlp_fc1_bias", True)), bool(config.get("mlp_fc2_bias", True))

    ids = np.asarray(ids).astype(np.int64).reshape(-1)
    T = ids.shape[0]
    if attention_mask is None:
        mask = np.ones(T, dtype=np.float64)
    else:
        mask = np.asarray(attention_mask).astype(np.float64).reshape(-1)
        assert mask.shape == (T,)

    nodes: dict[str, np.ndarray] = {}
    if factor and T > max_trained:  # dynamic NTK rotary scaling, from this prompt's length
        base = base * ((factor * T / max_trained) - (factor - 1)) ** (hd / (hd - 2))

    # spec: "x = word_emb[ids] + token_type_emb[0]"  (type_vocab_size 1: row 0 always added)
    word_emb = W("embeddings.word_embeddings.weight")
    tok_type = W("embeddings.token_type_embeddings.weight")
    x = word_emb[ids] + tok_type[0][None, :]
    nodes["embeddings"] = x

    # spec: "x = LayerNorm_emb(x)   # emb_ln"
    x = layer_norm(x, W("emb_ln.weight"), W("emb_ln.bias"), eps)
    nodes["emb_ln"] = x

    # spec: "additive mask = (1 - attention_mask)[:, None, None, :] * finfo(dtype).min"
    # (bidirectional, NOT causal: the mask only depends on the key position)
    add_mask = (1.0 - mask)[None, None, :] * np.finfo(np.float64).min  # [1, 1, T_k]

    for i in range(n_layer):
        p = f"encoder.layers.{i}."

        # spec: "qkv = x @ Wqkv.T + b"
        qkv = x @ W(p + "attn.Wqkv.weight").T + B(p + "attn.Wqkv.bias", qkv_bias)
        nodes[p + "attn.qkv"] = qkv

        # spec: "split into q, k, v, each [B, S, 12, 64]"; "rows = q(768) | k(768) | v(768);
        # heads contiguous inside each"
        q = qkv[:, 0 * H : 1 * H].reshape(T, nh, hd)
        kk = qkv[:, 1 * H : 2 * H].reshape(T, nh, hd)
        v = qkv[:, 2 * H : 3 * H].reshape(T, nh, hd)
        nodes[p + "attn.q"] = q
        nodes[p + "attn.k"] = kk
        nodes[p + "attn.v"] = v

        # spec: "rotary on q and k with positions 0..S-1" (NeoX rotate half, all head dims)
        q_rot = rotary_neox(q, base)
        k_rot = rotary_neox(kk, base)
        nodes[p + "attn.q_rot"] = q_rot
        nodes[p + "attn.k_rot"] = k_rot

        # spec: "attn = softmax(q k^T / sqrt(64) + mask) v   -> [B, S, 768]"
        scores = np.einsum("qhd,khd->hqk", q_rot, k_rot) / math.sqrt(hd)  # [nh, T_q, T_k]
        probs = softmax(scores + add_mask, axis=-1)
        ctx = np.einsum("hqk,khd->qhd", probs, v)  # [T, nh, hd]
        context = ctx.reshape(T, H)  # index h*hd + d
        nodes[p + "attn.context"] = context

        # spec: "-> out_proj"
        attn_out = context @ W(p + "attn.out_proj.weight").T + B(p + "attn.out_proj.bias", qkv_bias)
        nodes[p + "attn.out_proj"] = attn_out

        # spec: "h = norm1(x + attn)   # post-norm"
        resid_attn = x + attn_out
        nodes[p + "resid_attn"] = resid_attn
        h = layer_norm(resid_attn, W(p + "norm1.weight"), W(p + "norm1.bias"), eps)
        nodes[p + "norm1"] = h

        if not is_moe_layer(i, every):
            # spec: "m = fc2(gelu_erf(fc1(h)))  if i is even"
            fc1 = h @ W(p + "mlp.fc1.weight").T + B(p + "mlp.fc1.bias", fc1_bias)
            act = gelu_erf(fc1)
            fc2 = act @ W(p + "mlp.fc2.weight").T + B(p + "mlp.fc2.bias", fc2_bias)
            nodes[p + "mlp.fc1"] = fc1
            nodes[p + "mlp.act"] = act
            nodes[p + "mlp.fc2"] = fc2
            m = fc2
        else:
            m = _moe(nodes, p, h, W, H, F, E, k, normalize_topk)

        # spec: "x = norm2(h + m)   # layer output"
        resid_mlp = h + m
        nodes[p + "resid_mlp"] = resid_mlp
        x = layer_norm(resid_mlp, W(p + "norm2.weight"), W(p + "norm2.bias"), eps)
        nodes[p + "norm2"] = x

    # spec: "pooling | mask-weighted mean over tokens, then L2 normalisation (eps 1e-12)"
    pooled = (x * mask[:, None]).sum(axis=0, keepdims=True) / max(mask.sum(), 1e-9)
    nodes["pooled"] = pooled
    norm = np.sqrt((pooled**2).sum(axis=-1, keepdims=True))
    nodes["embedding"] = pooled / np.maximum(norm, 1e-12)
    return nodes


def _moe(nodes, p, h, W, H, F, E, k, normalize_topk):
    if E <= 0 or k <= 0 or k > E:
        raise ValueError(f"bad MoE config: num_experts={E}, moe_top_k={k}")

    # spec: "router | Linear(768 -> 8), no bias"; "p = softmax(h[t] @ Wr.T)  # over all 8 experts"
    # (the reference does this in fp32; the oracle stays in float64)
    Wr = W(p + "mlp.router.layer.weight")
    assert Wr.shape == (E, H), Wr.shape
    logits = h @ Wr.T
    probs = softmax(logits, axis=-1)
    nodes[p + "mlp.router.logits"] = logits
    nodes[p + "mlp.router.probs"] = probs

    # spec: "(w_1, e_1), (w_2, e_2) = top-2 of p   # no renormalisation of w"
    # descending probability; stable sort on -p puts the lower expert index first on ties
    topk_idx = np.argsort(-probs, axis=-1, kind="stable")[:, :k].astype(np.int64)
    topk_w = np.take_along_axis(probs, topk_idx, axis=-1)
    if normalize_topk:
        # only if the config asks for it (the released model has moe_normalize_expert_weights=false)
        topk_w = topk_w / topk_w.sum(axis=-1, keepdims=True)
    nodes[p + "mlp.router.topk_weights"] = topk_w
    nodes[p + "mlp.router.topk_indices"] = topk_idx

    # spec: "experts.mlp.w1 [24576, 768] viewed as (8, 3072, 768), expert axis outermost"
    # spec: "experts.mlp.w2 [24576, 768] ALSO viewed as (8, 3072, 768)"
    w1 = _expert_view(W(p + "mlp.experts.mlp.w1"), E, F, H, "w1")
    w2 = _expert_view(W(p + "mlp.experts.mlp.w2"), E, F, H, "w2")
    bias = W(p + "mlp.experts.bias")
    assert bias.shape == (H,), bias.shape

    # spec: "out[t] = sum_k w_k * (gelu_erf(h[t] @ w1[e_k].T) @ w2[e_k])"
    # per token t and slot j: fc1 = h[t] @ w1[e].T (no per-expert bias), act = gelu, out = act @ w2[e]
    w1_sel = w1[topk_idx]  # [T, k, F, H]
    w2_sel = w2[topk_idx]  # [T, k, F, H]
    e_fc1 = np.einsum("th,tjfh->tjf", h, w1_sel)  # [T, k, F]
    e_act = gelu_erf(e_fc1)  # [T, k, F]
    e_out = np.einsum("tjf,tjfh->tjh", e_act, w2_sel)  # [T, k, H]  (unweighted)
    weighted_sum = np.einsum("tj,tjh->th", topk_w, e_out)  # [T, H]
    nodes[p + "mlp.experts.fc1"] = e_fc1
    nodes[p + "mlp.experts.act"] = e_act
    nodes[p + "mlp.experts.out"] = e_out
    nodes[p + "mlp.experts.weighted_sum"] = weighted_sum

    # spec: "return out + experts.bias   # shared bias, once"
    bias_add = weighted_sum + bias[None, :]
    nodes[p + "mlp.experts.bias_add"] = bias_add
    return bias_add


def _expert_view(w: np.ndarray, E: int, F: int, H: int, name: str) -> np.ndarray:
    # Accept the checkpoint layout [E*F, H] (or an already-viewed (E, F, H)); anything else
    # (e.g. an (E, H, F) orientation) is rejected rather than silently reshaped.
    if w.ndim == 2 and w.shape == (E * F, H):
        return w.reshape(E, F, H)
    if w.ndim == 3 and w.shape == (E, F, H):
        return w
    raise ValueError(f"experts.mlp.{name} has shape {w.shape}; expected ({E * F}, {H}) or ({E}, {F}, {H})")
