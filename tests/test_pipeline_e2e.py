"""End to end on config/ci.yaml (one shared run): outputs, HDF5 contents derived from config.json,
tokenization Parquet, warnings, idempotence, lint."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pandas as pd
import pytest
from helpers import BIN, REPO, run_cmd, snakemake

from actdiff.h5io import ActivationReader
from actdiff.prompts import load_prompt_sheet, shard_of

MODELS = ("tiny-nomic-moe", "minilm-l6")


def expected_nodes(cfg: dict) -> dict[str, tuple]:
    """Node names and per-row shapes derived from config.json alone, independently of actdiff.nodes."""
    if cfg["model_type"] == "nomic_bert":
        H, nh, L, F = cfg["n_embd"], cfg["n_head"], cfg["n_layer"], cfg["n_inner"]
        E, k, every = cfg["num_experts"], cfg["moe_top_k"], cfg["moe_every_n_layers"]
    else:
        H, nh, L, F = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"], cfg["intermediate_size"]
        E = k = every = 0
    hd = H // nh
    out = {"embeddings": (H,), "emb_ln": (H,), "pooled": (H,), "embedding": (H,)}
    for i in range(L):
        p = f"encoder.layers.{i}."
        for n in ("attn.q", "attn.k", "attn.v"):
            out[p + n] = (nh, hd)
        if cfg["model_type"] == "nomic_bert":
            out[p + "attn.qkv"] = (3 * H,)
            out[p + "attn.q_rot"] = out[p + "attn.k_rot"] = (nh, hd)
        for n in ("attn.context", "attn.out_proj", "resid_attn", "norm1", "resid_mlp", "norm2"):
            out[p + n] = (H,)
        if every and i % every == 1:
            m = p + "mlp."
            out.update({m + "router.logits": (E,), m + "router.probs": (E,), m + "router.topk_weights": (k,),
                        m + "router.topk_indices": (k,), m + "experts.fc1": (k, F), m + "experts.act": (k, F),
                        m + "experts.out": (k, H), m + "experts.weighted_sum": (H,), m + "experts.bias_add": (H,)})
        else:
            out.update({p + "mlp.fc1": (F,), p + "mlp.act": (F,), p + "mlp.fc2": (H,)})
    return out


DUMPS = [(m, "reference", "fp32") for m in MODELS] + [
    ("tiny-nomic-moe", "actdiff", "fp32"), ("tiny-nomic-moe", "actdiff", "fp32+fault=causal_mask"),
    ("minilm-l6", "actdiff", "fp32"),
]


FILTERS = {"none": None, "lzf": "lzf", "gzip": "gzip"}  # activation_compression -> the h5py filter name


@pytest.mark.e2e
@pytest.mark.parametrize("model, side, variant", DUMPS)
def test_hdf5_holds_exactly_the_graph(ci_run, model, side, variant):
    info = json.loads((ci_run.results / model / "model.json").read_text())
    want = expected_nodes(info["config"])
    n_layers = info["config"].get("n_layer", info["config"].get("num_hidden_layers"))
    if model == "tiny-nomic-moe":
        assert len(want) == 4 + 4 * 12 + 2 * 3 + 2 * 9  # L=4: 12 per layer, +3 per dense, +9 per MoE layer
    else:
        assert len(want) == 4 + 12 * n_layers
    total_prompts = 0
    for s in range(ci_run.config["shards"]):
        path = ci_run.results / model / side / variant / "activations" / f"shard-{s}.h5"
        with h5py.File(path) as f:
            assert set(f["nodes"]) == set(want)
            offsets = f["token_offsets"][()]
            n_prompts = len(f["prompt_ids"])
            total_prompts += n_prompts
            assert offsets[0] == 0 and len(offsets) == n_prompts + 1 and np.all(np.diff(offsets) >= 2)
            for name, trailing in want.items():
                d = f["nodes"][name]
                rows = n_prompts if name in ("pooled", "embedding") else offsets[-1]
                assert d.shape == (rows, *trailing), name
                assert d.dtype == (np.int64 if name.endswith("topk_indices") else np.float32), name
                assert d.compression == FILTERS[ci_run.config["activation_compression"]] and d.chunks is not None
                assert d.fletcher32, name  # schema 2: per-chunk checksums
            assert f.attrs["schema_version"] == 2 and f.attrs["weights_sha256"] == info["weights_sha256"]
            assert f.attrs["compression"] == ci_run.config["activation_compression"]
            assert f.attrs["model"] == model and f.attrs["side"] == side and f.attrs["variant"] == variant
            assert f["nodes"]["emb_ln"].attrs["op"] == "LAYERNORM" and f["nodes"]["emb_ln"].attrs["index"] == 1
            assert json.loads(f.attrs["library_versions"])["torch"]
            assert len(json.loads(f.attrs["graph"])["nodes"]) == len(want)
    assert total_prompts == 47


@pytest.mark.e2e
@pytest.mark.parametrize("model", MODELS)
def test_token_parquet(ci_run, model):
    sheet = load_prompt_sheet(REPO / ci_run.config["prompts"])
    max_len = ci_run.config["models"][model]["max_length"]
    frames = []
    for s in range(ci_run.config["shards"]):
        df = pd.read_parquet(ci_run.results / model / "tokens" / f"shard-{s}.parquet")
        assert all(shard_of(p, ci_run.config["shards"]) == s for p in df["prompt_id"])
        frames.append(df)
    df = pd.concat(frames).set_index("prompt_id")
    assert set(df.index) == set(sheet["prompt_id"])
    for col in ("reference_ids", "reference_length", "reference_truncated", "engine_ids", "ids_match", "first_diff"):
        assert col in df.columns
    assert (df["reference_length"] == df["reference_ids"].map(len)).all()
    # the engine's own tokenizer agrees on every prompt (full corpus: tests/test_engine_tokenizer.py)
    assert df["ids_match"].all() and df["first_diff"].isna().all()
    assert (df["engine_ids"].map(list) == df["reference_ids"].map(list)).all()
    assert (df["reference_length"] <= max_len).all()
    long = df[df["category"] == "long"]
    assert len(long) == 2 and long["reference_truncated"].all() and (long["reference_length"] == max_len).all()
    assert (long["reference_length_untruncated"] > max_len).all()
    assert not df.loc[df["category"] != "long", "reference_truncated"].any()
    bos, eos = (0, 2) if model == "tiny-nomic-moe" else (101, 102)
    assert list(df.loc["short-empty", "reference_ids"]) == [bos, eos]
    assert all(ids[0] == bos and ids[-1] == eos for ids in df["reference_ids"])
    # the dump's token counts are the tokenizer's
    with ActivationReader(ci_run.results / model / "reference/fp32/activations/shard-0.h5") as r:
        for i, pid in enumerate(r.prompt_ids):
            assert r.offsets[i + 1] - r.offsets[i] == df.loc[pid, "reference_length"]


@pytest.mark.e2e
def test_warnings_for_long_and_empty_prompts(ci_run):
    logs = "".join(p.read_text() for p in (ci_run.results / "logs/tokenize/tiny-nomic-moe").glob("*.log"))
    assert "prompt 'short-empty' is empty" in logs
    assert logs.count("more than max_length 512; truncated to 512 and flagged") == 2
    assert "Traceback" not in logs


@pytest.mark.e2e
def test_reference_dump_matches_a_direct_run(ci_run, tiny_model_dir):
    """Values in the HDF5 are what the reference computes for that prompt (spot check, bitwise at the same
    thread count as the rule: ci.yaml pins the reference to 1 thread)."""
    import torch

    from actdiff.models.loading import load_reference_model
    from actdiff.nodes import build_graph
    from actdiff.reference import ReferenceRunner

    tokens = pd.read_parquet(ci_run.results / "tiny-nomic-moe/tokens/shard-1.parquet").set_index("prompt_id")
    model, cfg, _ = load_reference_model(tiny_model_dir)
    runner = ReferenceRunner(model, build_graph(cfg))
    threads = torch.get_num_threads()
    torch.set_num_threads(ci_run.config["reference"]["threads"])
    with ActivationReader(ci_run.results / "tiny-nomic-moe/reference/fp32/activations/shard-1.h5") as r:
        for pid in r.prompt_ids[:3]:
            vals = runner.run_batch([list(tokens.loc[pid, "reference_ids"])])[0]
            for name in ("emb_ln", "encoder.layers.1.mlp.experts.out", "encoder.layers.3.norm2", "embedding"):
                np.testing.assert_array_equal(r.node(name, pid), vals[name])
    torch.set_num_threads(threads)


@pytest.mark.e2e
@pytest.mark.parametrize("variant", ["fp32", "fp32+fault=causal_mask"])
def test_engine_dump_matches_a_direct_run(ci_run, tiny_model_dir, variant):
    """The engine dump holds what the engine computes (bitwise: same kernels, same thread count)."""
    from actdiff import kernels
    from actdiff.engine.core import Engine

    tokens = pd.read_parquet(ci_run.results / "tiny-nomic-moe/tokens/shard-0.parquet").set_index("prompt_id")
    engine = Engine(tiny_model_dir, threads=ci_run.config["engine_threads"])
    path = ci_run.results / "tiny-nomic-moe/actdiff" / variant / "activations/shard-0.h5"
    with ActivationReader(path) as r:
        assert json.loads(r.attrs["understood_config"])["attention"] == (
            "causal" if "causal" in variant else "bidirectional")
        for pid in r.prompt_ids[:3]:
            vals = engine.forward(list(tokens.loc[pid, "reference_ids"]), variant)
            for name in r.node_names:
                np.testing.assert_array_equal(r.node(name, pid), vals[name], err_msg=name)
    kernels.set_num_threads(2)


@pytest.mark.e2e
def test_second_run_does_nothing(ci_run):
    p = snakemake("-n", "--cores", "2", "--configfile", "config/ci.yaml")
    assert p.returncode == 0, p.stderr
    assert "Nothing to be done" in p.stdout + p.stderr


def test_snakemake_lint_is_clean():
    p = snakemake("--lint")
    assert p.returncode == 0, p.stdout + p.stderr


def test_ruff_is_clean():
    p = run_cmd([str(BIN / "ruff"), "check", "src", "tests", "workflow", "bench"])
    assert p.returncode == 0, p.stdout + p.stderr
