"""The node graph's cost model (Graph.node_flops, Graph.flops, Graph.weight_elements, Graph.bytes_moved)
against counts worked out by hand for the tiny model, and the issue's per-token figure for the released
config. Every expected value below is exact integer arithmetic, so the tests compare with ==."""

from __future__ import annotations

import json

import pytest
from helpers import REPO

from actdiff.models.tiny import tiny_config
from actdiff.nodes import build_graph

T = 10  # tokens of the hand count


@pytest.fixture(scope="module")
def tiny(released_config):
    # H 128, 4 heads, F 512, 4 layers, 8 experts, top-2, MoE in layers 1 and 3 (tests/test_graph_queries.py)
    return build_graph(tiny_config(released_config, n_tokens=4000))


def test_tiny_flops_by_hand(tiny):
    H, F, nh, k = 128, 512, 4, 2
    # every layer: qkv (+bias), rotary on q and k, attention (QK^T, PV, scale + softmax), out_proj (+bias),
    # two residual adds, two LayerNorms
    common = (
        (2 * T * H * 3 * H + T * 3 * H)
        + 2 * 3 * T * H
        + (4 * T * T * H + 5 * nh * T * T)
        + (2 * T * H * H + T * H)
        + 2 * T * H
        + 2 * 8 * T * H
    )
    dense = (2 * T * H * F + T * F) + 5 * T * F + (2 * T * F * H + T * H)
    # router (no bias), softmax over 8 experts, top-2 (no renormalisation: 0), fc1/act/fc2 on the 2 chosen
    # experts only, weighted sum of 2 rows (2 mul + 1 add per element), shared expert bias
    moe = 2 * T * H * 8 + 4 * T * 8 + 2 * T * k * H * F + 5 * T * k * F + 2 * T * k * F * H + 3 * T * H + T * H
    ends = T * H + 8 * T * H + T * H + 3 * H  # embeddings (word + token type), emb_ln, mean pool, L2 norm
    assert tiny.flops(T) == 4 * common + 2 * dense + 2 * moe + ends == 21_559_104
    assert sum(tiny.node_flops(n, T) for n in tiny) == tiny.flops(T)
    b = tiny.moe_blocks()[0]
    assert tiny.node_flops(b.fc1, T) == 2 * T * k * H * F  # top-k experts, never all 8
    assert tiny.node_flops(b.topk_indices, T) == 0


def test_tiny_bytes_by_hand(tiny):
    H, F, E = 128, 512, 8
    per_layer = (H * 3 * H + 3 * H) + (H * H + H) + 2 * 2 * H
    dense = (H * F + F) + (F * H + H)
    moe = E * H + 2 * min(E, T * 2) * H * F + H  # router, the experts 10 tokens x top-2 can reach, bias
    weights = T * H + 1 * H + 2 * H + 4 * per_layer + 2 * dense + 2 * moe  # embedding rows gathered, emb_ln
    acts_layer = T * 3 * H + 3 * T * H + 2 * T * H + 6 * T * H  # qkv, q k v, rotated q k, 6 [T, H] nodes
    acts_dense = 2 * T * F + T * H
    acts_moe = 2 * T * E + T * 2 + 2 * T * 2 * F + T * 2 * H + 2 * T * H  # float nodes; the ids are int64
    acts = 4 * (2 * T * H + 4 * acts_layer + 2 * acts_dense + 2 * acts_moe + 2 * H) + 8 * 2 * (T * 2)
    got = tiny.bytes_moved(T)
    assert got == {"weights": 4 * weights, "activations": acts, "total": 4 * weights + acts}
    assert got["weights"] == 10_523_136 and got["activations"] == 596_704
    # one token reaches 2 experts per MoE layer; 3 tokens x top-2 = 6 of 8
    b = tiny.moe_blocks()[0]
    assert tiny.weight_elements(b.fc1, 1) == 2 * H * F
    assert tiny.weight_elements(b.fc1, 3) == 6 * H * F
    assert tiny.bytes_moved(T, weight_itemsize=2)["weights"] == 2 * weights


def test_released_config_per_token(released_config):
    # issue 19: about 226 MFLOP per token at full size (attention projections, dense MLPs, two of eight
    # experts); the elementwise ops and attention's T^2 add the rest. Hand count of the matmuls per token:
    H, F, L = 768, 3072, 12
    matmuls = L * (2 * H * 3 * H + 2 * H * H) + 6 * 2 * 2 * H * F + 6 * 2 * 2 * 2 * H * F + 6 * 2 * H * 8
    g = build_graph(released_config)
    assert matmuls == 226_566_144
    # the rest at T=1 (biases, LayerNorms, GELU, attention of one token, ...) is 0.28 % on top
    assert matmuls < g.flops(1) < 1.003 * matmuls
    # attention grows with T: 4 T^2 H + 5 nh T^2 per layer, so per token at 512 it adds 4*512*768*12 ~ 18.9 M
    # (less the per-prompt L2 norm, 3H, which a 512-token prompt computes once, not 512 times)
    assert g.flops(512) - 512 * g.flops(1) == 12 * (4 * 768 + 5 * 12) * (512 * 512 - 512) - 3 * 768 * 511


def test_bert_flops_count_three_embedding_tables(minilm_model_dir):
    g = build_graph(json.loads((minilm_model_dir / "config.json").read_text()))
    emb = next(n for n in g if n.op == "EMBED")
    assert g.node_flops(emb, T) == 2 * T * g.dims.hidden  # word + position + token type: 2 adds
    assert g.weight_elements(emb, T) == (T + T + 2) * g.dims.hidden  # T word rows, T positions, 2-row token types



def test_bench_floor_uses_the_graph():
    # the pipeline benchmark counts FLOPs through the graph, not a copy of the formulae
    src = (REPO / "bench/pipeline.py").read_text(encoding="utf-8")
    assert ".flops(" in src and ".bytes_moved(" in src
