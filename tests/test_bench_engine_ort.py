"""bench/engine_ort.py: the FLOPs ORT executes (dense-gather MoE) and the model-file cache (no export run:
``_make`` is replaced by a stub that writes a small file, so these tests take well under a second)."""

from __future__ import annotations

import json
import os
import sys

from helpers import REPO

sys.path.insert(0, str(REPO / "bench"))

import engine_ort  # noqa: E402

# the released shapes that matter for the count (H, F, layers, experts, top-k, MoE every 2nd layer)
CFG = {"n_embd": 768, "n_inner": 3072, "n_layer": 12, "num_experts": 8, "moe_top_k": 2, "moe_every_n_layers": 2}


def test_dense_gather_flops_are_top_k_plus_the_unrouted_experts():
    H, F, E, k, T = 768, 3072, 8, 2, 128
    n_moe = 6  # layers 1, 3, ..., 11
    attn = 2 * T * H * 3 * H + 2 * T * H * H + 4 * T * T * H
    top_k = 12 * attn + 6 * 4 * T * H * F + n_moe * (2 * T * H * E + k * 4 * T * H * F)
    # dense-gather: fc1 for all E experts on every token, fc2 for all E experts on every one of the k slots
    extra = n_moe * (2 * T * E * H * F + 2 * T * k * E * F * H - k * 4 * T * H * F)
    got = engine_ort.count_flops_dense_gather(CFG, T)
    assert got == top_k + extra  # integers: exact
    # the expert work alone is E * (1 + k) / (2 k) = 6x top-2 routing's for 8 experts
    assert (2 * T * E * H * F + 2 * T * k * E * F * H) == 6 * k * 4 * T * H * F
    assert engine_ort.count_flops_dense_gather(CFG, T, B=8) == 8 * got  # a padded batch: B x its padded length


def _fake_model(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CFG))
    (d / "model.safetensors").write_bytes(b"w" * 16)
    return d


def test_cache_reuses_files_and_remakes_them_when_the_checkpoint_changes(tmp_path, monkeypatch):
    made = []

    def stub(kind, model_dir, src, out):
        made.append(kind)
        out.write_bytes(kind.encode())
        return {"seconds": 0.0, "peak_rss_bytes": 0, "info": {}, "bytes": out.stat().st_size, "path": str(out)}

    monkeypatch.setattr(engine_ort, "_make", stub)
    d, cache = _fake_model(tmp_path), tmp_path / "cache"
    paths, man = engine_ort.ensure_ort_models(d, cache)
    assert made == ["export", "int8-dynamic", "int8-static"]
    assert set(paths) == set(engine_ort.ORT_VARIANTS) and all(p.is_file() for p in paths.values())
    assert paths["fp32"].parent.name == f"m-onnx-{engine_ort.config_key(d)}"  # keyed by config.json
    engine_ort.ensure_ort_models(d, cache)
    assert len(made) == 3  # all reused
    st = (d / "model.safetensors").stat()
    os.utime(d / "model.safetensors", (st.st_atime, st.st_mtime + 10))  # a rebuilt checkpoint: stale
    _, man = engine_ort.ensure_ort_models(d, cache)
    assert made[3:] == ["export", "int8-dynamic", "int8-static"]
    assert not any(f["reused"] for f in man["files"].values())
    (d / "config.json").write_text(json.dumps({**CFG, "n_layer": 6}))  # another config: another directory
    p2, _ = engine_ort.ensure_ort_models(d, cache, variants=("fp32",))
    assert p2["fp32"].parent != paths["fp32"].parent and made[6:] == ["export"]
