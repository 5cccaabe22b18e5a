"""The embedded tiny-nomic-moe: deterministic generation, released tokenizer structure, realistic routing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import REPO

from actdiff.models.tiny import TRAINING_TEXT, generate_tiny_model

FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "sentencepiece.bpe.model")


@pytest.fixture(scope="module")
def two_generations(tmp_path_factory, released_config):
    dirs = []
    for name in ("a", "b"):
        d = tmp_path_factory.mktemp(name)
        generate_tiny_model(d, TRAINING_TEXT, released_config, seed=0)
        dirs.append(d)
    return dirs


def test_generation_is_bitwise_deterministic(two_generations, tiny_model_dir):
    a, b = two_generations
    for f in FILES:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
        # the pipeline's own run produced the same bytes too
        assert (a / f).read_bytes() == (tiny_model_dir / f).read_bytes(), f


def test_different_seed_changes_weights(tmp_path, released_config, two_generations):
    generate_tiny_model(tmp_path, TRAINING_TEXT, released_config, seed=1)
    assert (tmp_path / "model.safetensors").read_bytes() != (two_generations[0] / "model.safetensors").read_bytes()


def test_config_keeps_released_format(two_generations, released_config):
    cfg = json.loads((two_generations[0] / "config.json").read_text())
    assert set(released_config) <= set(cfg)  # every released key present, same names
    assert cfg["model_type"] == "nomic_bert" and cfg["architectures"] == ["NomicBertModel"]
    assert cfg["n_positions"] == cfg["max_trained_positions"] == 2048
    assert (cfg["n_embd"], cfg["n_head"], cfg["n_layer"], cfg["num_experts"], cfg["moe_top_k"]) == (128, 4, 4, 8, 2)
    assert cfg["vocab_size"] % 64 == 0


def test_tokenizer_has_released_structure(two_generations):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    d = two_generations[0]
    tj = json.loads((d / "tokenizer.json").read_text())
    # bare Precompiled normalizer holding the SentencePiece charsmap (llama.cpp reads it directly)
    assert tj["normalizer"]["type"] == "Precompiled" and len(tj["normalizer"]["precompiled_charsmap"]) > 1000
    assert tj["pre_tokenizer"]["type"] == "Metaspace" and tj["pre_tokenizer"]["replacement"] == "▁"
    assert tj["model"]["type"] == "Unigram" and tj["model"]["unk_id"] == 3
    vocab = [p for p, _ in tj["model"]["vocab"]]
    assert vocab[:4] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert vocab[-1] == "<mask>"
    cfg = json.loads((d / "config.json").read_text())
    assert len(vocab) <= cfg["vocab_size"] < len(vocab) + 64
    # +1 id offset: SentencePiece id i (i >= 3) is tokenizer id i + 1
    sp = spm.SentencePieceProcessor(model_file=str(d / "sentencepiece.bpe.model"))
    for i in (3, 4, 100, sp.get_piece_size() - 1):
        assert vocab[i + 1] == sp.id_to_piece(i)
    tok = AutoTokenizer.from_pretrained(str(d))
    assert tok.convert_tokens_to_ids("<mask>") == len(vocab) - 1
    ids = tok("Cactus activation inspection test.")["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2 and len(ids) > 4
    assert tok("")["input_ids"] == [0, 2]


def test_routing_near_ties_look_trained(tiny_model_dir):
    """In every MoE layer, 1%..10% of the bundled corpus's tokens have a k-th vs (k+1)-th gap < 1e-2."""
    from actdiff.models.loading import load_reference_model
    from actdiff.nodes import build_graph
    from actdiff.prompts import load_prompt_sheet
    from actdiff.reference import ReferenceRunner
    from actdiff.token_shards import load_reference_tokenizer, tokenize_texts

    df = load_prompt_sheet(REPO / "config/prompts/default.tsv")
    tok = load_reference_tokenizer(tiny_model_dir)
    ids = [r["ids"] for r in tokenize_texts(tok, df["text"].tolist(), 512)]
    model, cfg, _ = load_reference_model(tiny_model_dir)
    graph = build_graph(cfg)
    runner = ReferenceRunner(model, graph)
    moe_layers = [i for i in range(graph.dims.layers) if graph.dims.is_moe_layer(i)]
    probs = {i: [] for i in moe_layers}
    order = sorted(range(len(ids)), key=lambda j: len(ids[j]))
    for _, vals in runner.run(((str(j), ids[j]) for j in order), batch_size=16):
        for i in moe_layers:
            probs[i].append(vals[f"encoder.layers.{i}.mlp.router.probs"])
    k = graph.dims.top_k
    for i in moe_layers:
        p = -np.sort(-np.concatenate(probs[i]), axis=1)
        frac = float(np.mean(p[:, k - 1] - p[:, k] < 1e-2))
        assert 0.01 <= frac <= 0.10, (i, frac)
        top_sum = p[:, :k].sum(axis=1)
        assert np.all(top_sum < 1.0)  # no renormalisation
