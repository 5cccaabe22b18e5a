"""The released config.json builds a reference whose state dict equals the released tensor list exactly.

Built on the meta device: no 1.9 GB allocation.
"""

from __future__ import annotations

import torch
from helpers import DATA

from actdiff.models.loading import nomic_config_from_dict
from actdiff.models.nomic_moe import NomicBertMoeModel
from actdiff.nodes import build_graph


def _released_tensors() -> dict[str, tuple[list[int], str]]:
    out = {}
    for line in (DATA / "nomic-embed-text-v2-moe.tensors.tsv").read_text().splitlines():
        name, shape, dtype = line.split("\t")
        out[name] = ([int(x) for x in shape.strip("[]").split(",")], dtype)
    return out


def test_state_dict_equals_released_tensor_list(released_config):
    with torch.device("meta"):
        model = NomicBertMoeModel(nomic_config_from_dict(released_config))
    got = {k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}
    expected = _released_tensors()
    assert len(expected) == 148
    assert set(got) == set(expected), (sorted(set(got) - set(expected)), sorted(set(expected) - set(got)))
    for k in expected:
        assert got[k] == expected[k], k
    n_params = sum(int(torch.tensor(s).prod()) for s, _ in expected.values())
    assert n_params == 475_292_928
    assert sum(p.numel() for p in model.parameters()) == n_params


def test_released_config_fields_are_read(released_config):
    cfg = nomic_config_from_dict(released_config)
    assert (cfg.n_embd, cfg.n_head, cfg.n_layer, cfg.n_inner) == (768, 12, 12, 3072)
    assert (cfg.num_experts, cfg.moe_top_k, cfg.moe_every_n_layers) == (8, 2, 2)
    assert cfg.rotary_emb_base == 10000 and cfg.layer_norm_epsilon == 1e-5 and cfg.vocab_size == 250048
    assert [i for i in range(12) if cfg.is_moe_layer(i)] == [1, 3, 5, 7, 9, 11]
    assert not cfg.moe_normalize_expert_weights and not cfg.causal


def test_released_graph(released_config):
    g = build_graph(released_config)
    # 2 embedding nodes + 12 shared per layer + 3 (dense) or 9 (MoE) + pooled + embedding
    assert len(g) == 2 + 12 * 12 + 6 * 3 + 6 * 9 + 2
    assert g.shape("encoder.layers.1.mlp.experts.out", 7) == (7, 2, 768)
    assert g.shape("encoder.layers.0.attn.qkv", 3) == (3, 2304)
    assert g.shape("encoder.layers.11.mlp.router.topk_indices", 5) == (5, 2)
    assert g.shape("embedding", 5) == (1, 768)
    assert "node   4 SPLIT      encoder.layers.0.attn.k [T, 12, 64]" in g.describe()
    # every checkpoint tensor is used by some node
    used = {w for n in g for w in n.weights}
    assert used == set(_released_tensors())
