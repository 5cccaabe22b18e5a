"""Loading real models offline: local dir, HF cache layout, refusal of the silent wrong class, safetensors
only, and clear errors for broken checkpoints."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import model_copy, run_cmd

from actdiff.errors import ModelError
from actdiff.models.loading import load_reference_model, resolve_model_dir

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _fake_hf_cache(root, repo_id: str, model_dir):
    """The huggingface_hub cache layout: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / f, snap / f)
    return snap


def test_load_from_hf_cache_offline(tmp_path, tiny_model_dir, monkeypatch):
    snap = _fake_hf_cache(tmp_path, "nomic-ai/nomic-embed-text-v2-moe", tiny_model_dir)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    d = resolve_model_dir("nomic", {"hf": "nomic-ai/nomic-embed-text-v2-moe"})
    assert d.resolve() == snap.resolve()
    model, cfg, arch = load_reference_model(d)
    assert arch == "nomic_bert_moe" and type(model).__name__ == "NomicBertMoeModel"
    ref, _, _ = load_reference_model(tiny_model_dir)
    ids = torch.tensor([[0, 10, 20, 2]])
    torch.testing.assert_close(model(ids), ref(ids), rtol=0, atol=0)


def test_load_from_hf_cache_in_a_subprocess_with_offline_env(tmp_path, tiny_model_dir):
    """The same through a fresh interpreter, so HF_HUB_OFFLINE is read at import time as users set it."""
    _fake_hf_cache(tmp_path, "org/tiny", tiny_model_dir)
    code = (
        "from actdiff.models.loading import resolve_model_dir, load_reference_model;"
        "d = resolve_model_dir('t', {'hf': 'org/tiny'}); m, c, a = load_reference_model(d); print(a)"
    )
    import sys

    p = run_cmd([sys.executable, "-c", code], env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path)})
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "nomic_bert_moe"


def test_missing_from_hf_cache_is_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelError, match="not in the local HuggingFace cache.*never downloads"):
        resolve_model_dir("nomic", {"hf": "nomic-ai/nomic-embed-text-v2-moe"})


def test_plain_automodel_is_refused(tiny_model_dir):
    with pytest.raises(ModelError, match="native dense NomicBert"):
        load_reference_model(tiny_model_dir, impl="automodel")


def test_remote_code_without_local_code_is_clear(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelError, match="trust_remote_code"):
        load_reference_model(tiny_model_dir, impl="remote_code")



def test_pickle_checkpoint_refused_by_default(tiny_model_dir, tmp_path):
    d = model_copy(tiny_model_dir, tmp_path / "m")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelError, match="safetensors only"):
        load_reference_model(d)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda w: w.pop("encoder.layers.1.mlp.experts.bias"), r"missing tensor.*layers\.1\.mlp\.experts\.bias"),
        (lambda w: w.__setitem__("emb_ln.weight", np.ones(7, np.float32)), r"'emb_ln\.weight' has shape \[7\]"),
        (lambda w: w.__setitem__("emb_ln.bias", np.zeros(128, np.int32)), r"'emb_ln\.bias' has dtype"),
        (lambda w: w.__setitem__("extra.tensor", np.zeros(3, np.float32)), r"unexpected tensor.*extra\.tensor"),
    ],
)
def test_bad_checkpoint_names_the_tensor(tiny_model_dir, tmp_path, mutate, message):
    d = model_copy(tiny_model_dir, tmp_path / "m", mutate)
    with pytest.raises(ModelError, match=message):
        load_reference_model(d)


def test_truncated_checkpoint_is_clear(tiny_model_dir, tmp_path):
    d = model_copy(tiny_model_dir, tmp_path / "m")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="truncated or corrupted"):
        load_reference_model(d)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.pop("n_embd"), "required key 'n_embd' is missing"),
        (lambda c: c.__setitem__("n_head", "four"), "key 'n_head' must be int"),
        (lambda c: c.__setitem__("moe_top_k", 9), "moe_top_k=9"),
        (lambda c: c.__setitem__("model_type", "llama"), "model_type 'llama' is not supported"),
    ],
)
def test_malformed_model_config_names_the_key(tiny_model_dir, tmp_path, edit, message):
    d = model_copy(tiny_model_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=message):
        load_reference_model(d)


def test_missing_model_directory(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_dir("mine", {"path": str(tmp_path / "nope")})
