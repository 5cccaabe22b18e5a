"""The PyTorch reference against the independent float64 numpy oracle (tests/spec_numpy.py), and property
tests for what a misreading of the spec would break.

Tolerances:
- The reference run in float64 must match the float64 oracle within 1e-6 absolute on every node: both
  compute the same function in double precision, so any difference above ~1e-12 is a logic error; 1e-6
  leaves room only for the router softmax, which the spec computes in fp32 (relative 6e-8 on values <= 1).
- The fp32 reference against the oracle: each node's relative L2 error must be below 1e-5. A length-K
  fp32 dot product has relative error ~ sqrt(K) * 2^-24 (K <= 512 here: ~1.3e-6); a few layers of
  LayerNorm and attention compound it a few times, far below 1e-5 and far above anything a real bug gives.
- Batch padding: the real tokens of a right-padded batch equal batch-1 values within 1e-6 of the node's
  scale (max(1, max|x|)): the same fp32 function, summed in a different blocking order by the GEMM.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import spec_numpy
import torch
from safetensors.numpy import load_file

from actdiff.models.loading import load_reference_model, nomic_config_from_dict
from actdiff.models.nomic_moe import NomicBertMoeModel
from actdiff.nodes import build_graph
from actdiff.reference import ReferenceRunner

TEXTS = [
    "Cactus activation inspection test.",
    "search_query: what is the boiling point of water at altitude?",
    "Der schnelle braune Fuchs springt über den faulen Hund. 🦊",
    "def f(x):\n    return x ** 2  # square",
    "",
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from actdiff.token_shards import load_reference_tokenizer, tokenize_texts

    model, cfg, _ = load_reference_model(tiny_model_dir)
    graph = build_graph(cfg)
    tok = load_reference_tokenizer(tiny_model_dir)
    ids = [r["ids"] for r in tokenize_texts(tok, TEXTS, 512)]
    weights = load_file(str(tiny_model_dir / "model.safetensors"))
    return model, cfg, graph, ids, weights


def _run(model, graph, ids_list, dtype=torch.float32):
    model = model.to(dtype)
    runner = ReferenceRunner(model, graph)
    try:
        # ReferenceRunner casts to float32 for the dump; read raw captures for float64
        out = []
        for ids in ids_list:
            runner.run_batch([ids])
            out.append({k: v[0].double().numpy() if v.is_floating_point() else v[0].numpy()
                        for k, v in ((n.name, _reshaped(runner, graph, n, len(ids))) for n in graph)})
        return out
    finally:
        runner.close()
        model.to(torch.float32)


def _reshaped(runner, graph, node, T):
    t = runner._captured[node.name]
    lead = (1, 1) if node.axis == "prompt" else (1, T)
    return t.reshape(*lead, *graph.trailing_shape(node.name))


def test_float64_reference_matches_oracle_every_node(tiny):
    model, cfg, graph, ids_list, weights = tiny
    outs = _run(model, graph, ids_list, torch.float64)
    for ids, got in zip(ids_list, outs, strict=True):
        want = spec_numpy.forward_nomic_moe(cfg, weights, np.array(ids))
        assert set(want) == set(graph.names())
        for name in graph.names():
            assert got[name].shape == want[name].shape, name
            if graph[name].kind == "index":
                assert np.array_equal(got[name], want[name]), name
            else:
                err = float(np.max(np.abs(got[name] - want[name])))
                assert err <= 1e-6, (name, err)


def test_float32_reference_matches_oracle(tiny):
    model, cfg, graph, ids_list, weights = tiny
    runner = ReferenceRunner(model, graph)
    for ids in ids_list:
        got = runner.run_batch([ids])[0]
        want = spec_numpy.forward_nomic_moe(cfg, weights, np.array(ids))
        for name in graph.names():
            if graph[name].kind == "index":
                assert np.array_equal(got[name], want[name]), name
                continue
            rel = np.linalg.norm(got[name] - want[name]) / max(np.linalg.norm(want[name]), 1e-30)
            assert rel < 1e-5, (name, rel)
    runner.close()


def test_batch_padding_equals_batch_one(tiny):
    model, _, graph, ids_list, _ = tiny
    runner = ReferenceRunner(model, graph)
    single = [runner.run_batch([ids])[0] for ids in ids_list]
    batched = runner.run_batch(ids_list)  # right-padded to the longest prompt
    for s, b in zip(single, batched, strict=True):
        for name in graph.names():
            assert b[name].shape == s[name].shape
            if graph[name].kind == "index":
                assert np.array_equal(b[name], s[name]), name
            else:
                scale = max(1.0, float(np.max(np.abs(s[name]))))
                assert np.max(np.abs(b[name] - s[name])) <= 1e-6 * scale, name
    runner.close()


def test_attention_is_bidirectional(tiny):
    model, _, graph, ids_list, _ = tiny
    runner = ReferenceRunner(model, graph)
    ids = ids_list[0]
    changed = ids[:-2] + [ids[-2] + 1, ids[-1]]  # change the last real token before </s>
    a, b = runner.run_batch([ids])[0], runner.run_batch([changed])[0]
    # token 0 at emb_ln only sees itself; after layer 0 it must see the change at the end
    assert np.array_equal(a["emb_ln"][0], b["emb_ln"][0])
    assert np.max(np.abs(a["encoder.layers.0.attn.context"][0] - b["encoder.layers.0.attn.context"][0])) > 1e-4
    assert np.max(np.abs(a["encoder.layers.0.norm2"][0] - b["encoder.layers.0.norm2"][0])) > 1e-4
    runner.close()


def test_topk_weights_not_renormalised(tiny):
    model, _, graph, ids_list, _ = tiny
    runner = ReferenceRunner(model, graph)
    for ids in ids_list:
        vals = runner.run_batch([ids])[0]
        for i in (1, 3):
            w = vals[f"encoder.layers.{i}.mlp.router.topk_weights"]
            p = vals[f"encoder.layers.{i}.mlp.router.probs"]
            idx = vals[f"encoder.layers.{i}.mlp.router.topk_indices"]
            assert np.all(w.sum(axis=1) < 1.0 - 1e-4)
            np.testing.assert_array_equal(w, np.take_along_axis(p, idx, axis=1))
            np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=0, atol=1e-6)
    runner.close()


def _hand_built_moe_model():
    """One MoE layer with hand-set experts, F != H, so w2's orientation and the bias count are visible."""
    cfg = {"vocab_size": 16, "n_embd": 4, "n_head": 1, "n_layer": 2, "n_inner": 6, "num_experts": 2,
           "moe_top_k": 2, "moe_every_n_layers": 2, "layer_norm_epsilon": 1e-5, "rotary_emb_base": 10000,
           "type_vocab_size": 1, "activation_function": "gelu"}  # as released (omitted: the original's gelu_new)
    torch.manual_seed(0)
    model = NomicBertMoeModel(nomic_config_from_dict(cfg)).eval()
    return model


def test_w2_orientation_and_bias_once_hand_built():
    model = _hand_built_moe_model()
    experts = model.encoder.layers[1].mlp.experts
    E, F, H = 2, 6, 4
    w1 = torch.zeros(E, F, H)
    w2 = torch.zeros(E, F, H)
    # expert 0: fc1 copies h[0] into inner unit 0; w2[0] maps inner unit 0 to output channel 3 (F x H layout)
    w1[0, 0, 0] = 1.0
    w2[0, 0, 3] = 2.0
    # expert 1: inner unit 5 reads h[1]; w2[1] maps inner unit 5 to output channel 0
    w1[1, 5, 1] = 1.0
    w2[1, 5, 0] = -1.0
    with torch.no_grad():
        experts.mlp.w1.copy_(w1.reshape(E * F, H))
        experts.mlp.w2.copy_(w2.reshape(E * F, H))
        experts.bias.copy_(torch.tensor([0.5, 0.25, -0.125, 1.0]))
    h = torch.tensor([[3.0, 2.0, 0.0, 0.0]])
    wts = torch.tensor([[0.6, 0.3]])  # sums to 0.9: not renormalised
    idx = torch.tensor([[0, 1]])
    out = experts(h, wts, idx)
    g = torch.nn.functional.gelu
    expected = torch.tensor([[0.3 * -g(torch.tensor(2.0)), 0.0, 0.0, 0.6 * 2.0 * g(torch.tensor(3.0))]])
    expected += experts.bias  # once, after the weighted sum
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    # a transposed reading of w2 would need (H, F) blocks: the (F, H) layout cannot be read that way
    assert experts.mlp.w2.shape == (E * F, H)


def test_bias_added_once_with_zero_experts():
    model = _hand_built_moe_model()
    experts = model.encoder.layers[1].mlp.experts
    with torch.no_grad():
        experts.mlp.w1.zero_()
        experts.mlp.w2.zero_()
        experts.bias.copy_(torch.tensor([1.0, -2.0, 3.0, 0.5]))
    out = experts(torch.randn(5, 4), torch.full((5, 2), 0.4), torch.tensor([[0, 1]] * 5))
    torch.testing.assert_close(out, experts.bias.expand(5, 4), rtol=0, atol=0)


def test_topk_tie_order_of_torch_is_unspecified():
    """torch.topk (the reference's top-k, as in the released code) gives no order among exact ties.

    On CPU it returns e.g. experts [2, 3] (not [0, 1]) for four equal probabilities, while our kernels and the
    oracle send ties to the lowest index. Exact fp32 ties in router probabilities do not occur in practice;
    the comparison stage treats a permutation among exactly tied experts as agreement.
    """
    p = torch.tensor([[0.2, 0.3, 0.3, 0.2], [0.25, 0.25, 0.25, 0.25]])
    w, idx = torch.topk(p, 2, dim=-1)
    assert w.tolist() == [[pytest.approx(0.3)] * 2, [0.25, 0.25]]
    assert sorted(idx[0].tolist()) == [1, 2]  # the tied maximum pair, in some order
    assert set(idx[1].tolist()) <= {0, 1, 2, 3} and len(set(idx[1].tolist())) == 2


def test_minilm_reference_runs_all_nodes(minilm_model_dir):
    model, cfg, arch = load_reference_model(minilm_model_dir)
    assert arch == "bert" and type(model).__name__ == "BertModel"
    graph = build_graph(cfg)
    runner = ReferenceRunner(model, graph)
    vals = runner.run_batch([[101, 7592, 2088, 102]])[0]
    assert set(vals) == set(graph.names())
    emb = vals["embedding"][0]
    assert abs(np.linalg.norm(emb) - 1.0) < 1e-6
    # sentence-transformers pipeline equivalence: mean of last hidden state, normalised
    last = vals[f"encoder.layers.{cfg['num_hidden_layers'] - 1}.norm2"]
    pooled = last.mean(axis=0)
    np.testing.assert_allclose(vals["pooled"][0], pooled, rtol=0, atol=1e-6)
    np.testing.assert_allclose(emb, pooled / np.linalg.norm(pooled), rtol=0, atol=1e-6)
    runner.close()


def test_minilm_embedding_semantics(minilm_model_dir):
    """Real weights: related sentences are closer than unrelated ones (a sanity check of the real model)."""
    from actdiff.token_shards import load_reference_tokenizer, tokenize_texts

    model, cfg, _ = load_reference_model(minilm_model_dir)
    graph = build_graph(cfg)
    tok = load_reference_tokenizer(minilm_model_dir)
    texts = ["A man is playing a guitar.", "Someone plays an acoustic guitar.", "The stock market fell today."]
    ids = [r["ids"] for r in tokenize_texts(tok, texts, 256)]
    runner = ReferenceRunner(model, graph)
    e = np.stack([runner.run_batch([i])[0]["embedding"][0] for i in ids])
    runner.close()
    sim = e @ e.T
    assert sim[0, 1] > 0.5 > sim[0, 2]
    json.dumps(cfg)  # config stays plain JSON
