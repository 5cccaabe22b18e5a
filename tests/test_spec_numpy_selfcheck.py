"""Self-checks of the float64 numpy spec oracle (tests/spec_numpy.py).

These use only numpy (+ the oracle itself) and tiny random weights; they do not depend on
any other project code.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

try:
    from spec_numpy import forward_nomic_moe, gelu_erf, rotary_neox
except ImportError:  # pragma: no cover - if tests/ becomes a package
    from tests.spec_numpy import forward_nomic_moe, gelu_erf, rotary_neox

H, NH, F, E, K, L, V = 16, 2, 24, 4, 2, 2, 50
HD = H // NH


def tiny_config(**over) -> dict:
    cfg = {
        "n_embd": H,
        "n_head": NH,
        "n_layer": L,
        "n_inner": F,
        "num_experts": E,
        "moe_top_k": K,
        "moe_every_n_layers": 2,
        "rotary_emb_base": 10000,
        "rotary_emb_fraction": 1.0,
        "rotary_emb_interleaved": False,
        "layer_norm_epsilon": 1e-5,
        "moe_normalize_expert_weights": False,
        "vocab_size": V,
        "type_vocab_size": 1,
    }
    cfg.update(over)
    return cfg


def tiny_weights(seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def r(*shape, scale=0.3):
        return (rng.standard_normal(shape) * scale).astype(dtype)

    w = {
        "embeddings.word_embeddings.weight": r(V, H, scale=1.0),
        "embeddings.token_type_embeddings.weight": r(1, H),
        "emb_ln.weight": (1.0 + r(H, scale=0.1)),
        "emb_ln.bias": r(H, scale=0.1),
    }
    for i in range(L):
        p = f"encoder.layers.{i}."
        w[p + "attn.Wqkv.weight"] = r(3 * H, H)
        w[p + "attn.Wqkv.bias"] = r(3 * H, scale=0.1)
        w[p + "attn.out_proj.weight"] = r(H, H)
        w[p + "attn.out_proj.bias"] = r(H, scale=0.1)
        for n in ("norm1", "norm2"):
            w[p + n + ".weight"] = 1.0 + r(H, scale=0.1)
            w[p + n + ".bias"] = r(H, scale=0.1)
        if i % 2 == 0:
            w[p + "mlp.fc1.weight"] = r(F, H)
            w[p + "mlp.fc1.bias"] = r(F, scale=0.1)
            w[p + "mlp.fc2.weight"] = r(H, F)
            w[p + "mlp.fc2.bias"] = r(H, scale=0.1)
        else:
            w[p + "mlp.router.layer.weight"] = r(E, H, scale=1.0)
            w[p + "mlp.experts.mlp.w1"] = r(E * F, H)
            w[p + "mlp.experts.mlp.w2"] = r(E * F, H)
            w[p + "mlp.experts.bias"] = r(H, scale=0.5)
    return w


IDS = np.array([0, 7, 13, 42, 5, 2])
T = len(IDS)


def expected_shapes(T: int) -> dict[str, tuple]:
    s = {"embeddings": (T, H), "emb_ln": (T, H), "pooled": (1, H), "embedding": (1, H)}
    for i in range(L):
        p = f"encoder.layers.{i}."
        s.update(
            {
                p + "attn.qkv": (T, 3 * H),
                p + "attn.q": (T, NH, HD),
                p + "attn.k": (T, NH, HD),
                p + "attn.v": (T, NH, HD),
                p + "attn.q_rot": (T, NH, HD),
                p + "attn.k_rot": (T, NH, HD),
                p + "attn.context": (T, H),
                p + "attn.out_proj": (T, H),
                p + "resid_attn": (T, H),
                p + "norm1": (T, H),
                p + "resid_mlp": (T, H),
                p + "norm2": (T, H),
            }
        )
        if i % 2 == 0:
            s.update({p + "mlp.fc1": (T, F), p + "mlp.act": (T, F), p + "mlp.fc2": (T, H)})
        else:
            s.update(
                {
                    p + "mlp.router.logits": (T, E),
                    p + "mlp.router.probs": (T, E),
                    p + "mlp.router.topk_weights": (T, K),
                    p + "mlp.router.topk_indices": (T, K),
                    p + "mlp.experts.fc1": (T, K, F),
                    p + "mlp.experts.act": (T, K, F),
                    p + "mlp.experts.out": (T, K, H),
                    p + "mlp.experts.weighted_sum": (T, H),
                    p + "mlp.experts.bias_add": (T, H),
                }
            )
    return s


def test_node_names_shapes_and_dtypes():
    nodes = forward_nomic_moe(tiny_config(), tiny_weights(), IDS)
    exp = expected_shapes(T)
    assert set(nodes) == set(exp)
    for name, shape in exp.items():
        assert nodes[name].shape == shape, name
        want = np.int64 if name.endswith("topk_indices") else np.float64
        assert nodes[name].dtype == want, name
        assert np.all(np.isfinite(nodes[name])), name


def test_basic_identities():
    w = tiny_weights()
    nodes = forward_nomic_moe(tiny_config(), w, IDS)
    emb = w["embeddings.word_embeddings.weight"].astype(np.float64)[IDS]
    emb += w["embeddings.token_type_embeddings.weight"].astype(np.float64)[0]
    np.testing.assert_array_equal(nodes["embeddings"], emb)
    # q | k | v split of qkv, heads contiguous
    p = "encoder.layers.0."
    np.testing.assert_array_equal(nodes[p + "attn.k"][:, 1, :], nodes[p + "attn.qkv"][:, H + HD : H + 2 * HD])
    # rotary is the identity at position 0
    np.testing.assert_allclose(nodes[p + "attn.q_rot"][0], nodes[p + "attn.q"][0], rtol=0, atol=1e-15)
    # post-norm LayerNorm outputs: weighted / biased unit-variance rows
    x = nodes[p + "resid_attn"]
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    ref = ref * w[p + "norm1.weight"].astype(np.float64) + w[p + "norm1.bias"].astype(np.float64)
    np.testing.assert_allclose(nodes[p + "norm1"], ref, rtol=1e-12, atol=1e-12)
    # pooling / normalisation
    np.testing.assert_allclose(nodes["pooled"][0], nodes[f"encoder.layers.{L - 1}.norm2"].mean(0), atol=1e-14)
    assert abs(np.linalg.norm(nodes["embedding"]) - 1.0) < 1e-12


def test_gelu_is_exact_erf():
    assert gelu_erf(np.array([1.0]))[0] == pytest.approx(0.5 * (1 + math.erf(1 / math.sqrt(2))), abs=1e-15)
    x = np.array([-3.0, -0.5, 0.7, 2.0])
    tanh_gelu = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    assert np.max(np.abs(gelu_erf(x) - tanh_gelu)) > 1e-5


def test_rotary_rotate_half_at_position_1():
    hd, base = 8, 10000.0
    x = np.zeros((2, 1, hd))
    x[1, 0, 0] = 1.0  # unit vector in dim 0 at position 1 -> pairs with dim hd/2
    y = rotary_neox(x, base)
    theta = 1.0 * base**0.0  # j = 0
    exp = np.zeros(hd)
    exp[0] = math.cos(theta)
    exp[hd // 2] = math.sin(theta)
    np.testing.assert_allclose(y[1, 0], exp, atol=1e-15)
    # dim 1 uses inv_freq[1] = base^(-2/hd)
    x2 = np.zeros((2, 1, hd))
    x2[1, 0, 1] = 1.0
    th = base ** (-2.0 / hd)
    y2 = rotary_neox(x2, base)
    assert y2[1, 0, 1] == pytest.approx(math.cos(th), abs=1e-15)
    assert y2[1, 0, 1 + hd // 2] == pytest.approx(math.sin(th), abs=1e-15)


def test_attention_is_bidirectional():
    cfg, w = tiny_config(), tiny_weights()
    a = forward_nomic_moe(cfg, w, IDS)
    ids2 = IDS.copy()
    ids2[-1] = 31
    b = forward_nomic_moe(cfg, w, ids2)
    # identical up to (and including) emb_ln of token 0
    np.testing.assert_array_equal(a["emb_ln"][0], b["emb_ln"][0])
    # ...but the last token influences token 0 through attention in layer 0
    assert np.max(np.abs(a["encoder.layers.0.norm2"][0] - b["encoder.layers.0.norm2"][0])) > 1e-6


def test_topk_not_renormalised_and_ordered():
    nodes = forward_nomic_moe(tiny_config(), tiny_weights(), IDS)
    p = "encoder.layers.1.mlp.router."
    probs, tw, ti = nodes[p + "probs"], nodes[p + "topk_weights"], nodes[p + "topk_indices"]
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-14)
    assert np.all(tw.sum(-1) < 1.0 - 1e-9)
    np.testing.assert_array_equal(tw, np.take_along_axis(probs, ti, -1))
    assert np.all(tw[:, 0] >= tw[:, 1])
    assert np.all(tw[:, 1] >= np.sort(probs, -1)[:, -K])
    # the config flag is honoured when set
    n2 = forward_nomic_moe(tiny_config(moe_normalize_expert_weights=True), tiny_weights(), IDS)
    np.testing.assert_allclose(n2[p + "topk_weights"].sum(-1), 1.0, atol=1e-14)


def test_w2_orientation_hand_built_experts():
    """w1 and w2 are both (E*F, H) viewed as (E, F, H); expert e = gelu(x @ w1[e].T) @ w2[e]."""
    rng = np.random.default_rng(123)
    w = tiny_weights()
    p = "encoder.layers.1."
    W1 = rng.standard_normal((E, F, H)) * 0.3
    W2 = rng.standard_normal((E, F, H)) * 0.3
    w[p + "mlp.experts.mlp.w1"] = W1.reshape(E * F, H)
    w[p + "mlp.experts.mlp.w2"] = W2.reshape(E * F, H)
    nodes = forward_nomic_moe(tiny_config(), w, IDS)
    h = nodes[p + "norm1"]
    ti = nodes[p + "mlp.router.topk_indices"]
    tw = nodes[p + "mlp.router.topk_weights"]
    bias = w[p + "mlp.experts.bias"].astype(np.float64)
    total = np.zeros((T, H))
    for t in range(T):
        for j in range(K):
            e = ti[t, j]
            a = np.zeros(F)
            for f in range(F):  # explicit loops: fc1[f] = sum_h x[h] * W1[e, f, h]
                a[f] = gelu_erf(np.array([np.dot(h[t], W1[e, f])]))[0]
            out = np.zeros(H)
            for f in range(F):  # out[h] = sum_f act[f] * W2[e, f, h]
                out += a[f] * W2[e, f]
            np.testing.assert_allclose(nodes[p + "mlp.experts.act"][t, j], a, rtol=1e-12, atol=1e-13)
            np.testing.assert_allclose(nodes[p + "mlp.experts.out"][t, j], out, rtol=1e-12, atol=1e-13)
            total += tw[t, j] * out * (np.arange(T) == t)[:, None]
    np.testing.assert_allclose(nodes[p + "mlp.experts.weighted_sum"], total, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(nodes[p + "mlp.experts.bias_add"], total + bias, rtol=1e-12, atol=1e-13)
    # A transposed (E, H, F) reading of w2 is not what the oracle does: with F != H the naive
    # "act @ w2.reshape(E, H, F)[e]" does not even type-check, and a transposed value differs.
    assert F != H
    with pytest.raises(ValueError):
        act = nodes[p + "mlp.experts.act"][0, 0]
        np.matmul(act, W2.reshape(E * F * H).reshape(E, H, F)[ti[0, 0]])
    wrong = nodes[p + "mlp.experts.act"][0, 0] @ W2.reshape(E, H, F)[ti[0, 0]].T
    assert np.max(np.abs(wrong - nodes[p + "mlp.experts.out"][0, 0])) > 1e-3
    # and the oracle rejects a 3-D w2 given in the wrong orientation
    w_bad = dict(w)
    w_bad[p + "mlp.experts.mlp.w2"] = W2.reshape(E, H, F)
    with pytest.raises(ValueError):
        forward_nomic_moe(tiny_config(), w_bad, IDS)


def test_expert_bias_added_once_and_ties_to_lower_index():
    w = tiny_weights()
    p = "encoder.layers.1."
    w[p + "mlp.experts.mlp.w1"] = np.zeros((E * F, H), np.float32)
    w[p + "mlp.experts.mlp.w2"] = np.zeros((E * F, H), np.float32)
    w[p + "mlp.router.layer.weight"] = np.zeros((E, H), np.float32)  # all probs tie at 1/E
    nodes = forward_nomic_moe(tiny_config(), w, IDS)
    bias = w[p + "mlp.experts.bias"].astype(np.float64)
    np.testing.assert_array_equal(nodes[p + "mlp.experts.weighted_sum"], 0.0)
    np.testing.assert_array_equal(nodes[p + "mlp.experts.bias_add"], np.broadcast_to(bias, (T, H)))
    np.testing.assert_array_equal(nodes[p + "resid_mlp"], nodes[p + "norm1"] + bias)
    np.testing.assert_array_equal(nodes[p + "mlp.router.topk_indices"], np.tile(np.arange(K), (T, 1)))
    np.testing.assert_allclose(nodes[p + "mlp.router.topk_weights"], 1.0 / E, atol=1e-15)


def test_input_dtype_does_not_matter_much():
    a = forward_nomic_moe(tiny_config(), tiny_weights(dtype=np.float32), IDS)
    b = forward_nomic_moe(tiny_config(), tiny_weights(dtype=np.float16), IDS)
    # different rounding of the weights, same computation in float64 -> close but finite
    assert np.max(np.abs(a["embedding"] - b["embedding"])) < 5e-2
    assert b["embedding"].dtype == np.float64
