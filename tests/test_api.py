"""The Python API (actdiff.load, Model.encode/nodes) against the pipeline's own path on the tiny model.

Tolerances: the API drives the same side objects as the pipeline's dump stage, so at the same batching its
values are the pipeline's bit for bit (asserted with array_equal). Only where the reference runs padded
batches of another composition (the API's default batch_size 16 against batch 1) is a tolerance stated:
1e-6 absolute, the padded-batch bound tests/test_reference_model.py holds the runner to.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import actdiff
from actdiff.api import Model
from actdiff.errors import ActdiffError, ConfigError, ModelError
from actdiff.models.loading import load_reference_model, resolve_model_dir
from actdiff.nodes import build_graph

TEXTS = ["Cactus activation inspection test.", "Der schnelle braune Fuchs springt über den faulen Hund. 🦊", ""]
LONG = "inspection " * 1500  # far beyond every model's limit


@pytest.fixture(scope="module")
def ref(tiny_model_dir):
    with actdiff.load(tiny_model_dir, batch_size=1) as m:
        yield m


@pytest.fixture(scope="module")
def runner(tiny_model_dir):
    from actdiff.reference import ReferenceRunner

    model, cfg, _ = load_reference_model(tiny_model_dir)
    r = ReferenceRunner(model, build_graph(cfg))
    yield r
    r.close()


def _pipeline_ids(model_dir, texts, max_length=512):
    from actdiff.token_shards import load_reference_tokenizer, tokenize_texts

    return [r["ids"] for r in tokenize_texts(load_reference_tokenizer(model_dir), texts, max_length)]


def test_reference_encode_is_the_runners_embedding(ref, runner, tiny_model_dir):
    ids = _pipeline_ids(tiny_model_dir, TEXTS)
    assert ref.tokenize(TEXTS) == ids  # the tokens stage's reference_ids
    want = np.stack([runner.run_batch([x])[0]["embedding"][0] for x in ids])
    got = ref.encode(TEXTS)
    assert got.shape == (3, 128) and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)  # batch 1 both: bit for bit
    with actdiff.load(tiny_model_dir) as batched:  # default batch_size 16: one padded batch
        np.testing.assert_allclose(batched.encode(TEXTS), want, rtol=0, atol=1e-6)


def test_engine_encode_is_engine_forward(tiny_model_dir):
    from actdiff.engine.core import Engine
    from actdiff.engine.tokenizer import EngineTokenizer

    tok = EngineTokenizer.from_file(tiny_model_dir / "tokenizer.json")
    ids = [tok.encode(t, 512)[0] for t in TEXTS]  # the engine's own tokenizer, as engine_ids: own
    engine = Engine(tiny_model_dir)
    for variant in ("fp32", "int8"):
        with actdiff.load(tiny_model_dir, side="actdiff", variant=variant) as m:
            assert m.tokenize(TEXTS) == ids
            want = np.stack([engine.forward(x, variant)["embedding"][0] for x in ids])
            np.testing.assert_array_equal(m.encode(TEXTS), want)
            nodes = m.nodes(TEXTS[:1])[0]
            assert set(nodes) == set(m.graph.names())
            np.testing.assert_array_equal(nodes["pooled"], engine.forward(ids[0], variant)["pooled"])


def test_truncation_defaults_to_the_models_limit(ref, minilm_model_dir):
    ids = ref.tokenize([LONG])[0]
    assert len(ids) == 512 and ids[-1] == 2  # tokenizer_config.json model_max_length; </s> kept
    assert ids == _pipeline_ids(ref.record.dir, [LONG], 512)[0]
    assert ref.nodes([LONG])[0]["encoder.layers.0.norm1"].shape == (512, 128)
    with actdiff.load(minilm_model_dir, side="actdiff") as m:  # sentence_bert_config.json max_seq_length
        assert m.max_length() == 256 and len(m.tokenize([LONG])[0]) == 256


def test_explicit_max_length(tiny_model_dir, ref):
    with actdiff.load(tiny_model_dir, side="actdiff", max_length=16) as m:
        assert len(m.tokenize([LONG])[0]) == 16  # load's max_length
        vals = m.nodes([LONG], max_length=8)[0]  # the call's wins
        assert vals["encoder.layers.0.norm1"].shape == (8, 128)
        np.testing.assert_array_equal(m.encode([LONG], max_length=8), vals["embedding"])
    assert ref.tokenize([LONG], max_length=8) == _pipeline_ids(tiny_model_dir, [LONG], 8)
    with pytest.raises(ActdiffError, match="input 0 has 10 ids"):
        ref.nodes([list(range(10))], max_length=8)  # ids are never cut: refused, saying why


def test_ids_input_equals_text_input(ref):
    ids = ref.tokenize(TEXTS)
    np.testing.assert_array_equal(ref.encode(ids), ref.encode(TEXTS))
    by_ids, by_text = ref.nodes([np.array(ids[1])])[0], ref.nodes([TEXTS[1]])[0]
    for name in by_text:
        np.testing.assert_array_equal(by_ids[name], by_text[name])
    assert ref.encode([]).shape == (0, 128)
    with pytest.raises(ActdiffError, match="all texts"):
        ref.encode(["text", [0, 2]])
    with pytest.raises(ActdiffError, match="input 0 has 0 ids"):
        ref.nodes([[]])


def test_reference_forward_is_a_model_output(tiny_model_dir, runner):
    from transformers.utils import ModelOutput

    model, _, _ = load_reference_model(tiny_model_dir)
    ids = _pipeline_ids(tiny_model_dir, TEXTS[:1])
    x = torch.tensor(ids)
    mask = torch.ones_like(x)
    with torch.inference_mode():
        out = model(input_ids=x, attention_mask=mask)
        plain = model(input_ids=x, attention_mask=mask, return_dict=False)
        pooled = model.pool(out[0], mask)
    assert isinstance(out, ModelOutput) and out[0] is out.last_hidden_state
    assert out[0].shape == (1, len(ids[0]), 128) and out.pooler_output.shape == (1, 128)
    torch.testing.assert_close(plain[0], out[0], rtol=0, atol=0)
    torch.testing.assert_close(pooled, out.pooler_output, rtol=0, atol=0)
    want = runner.run_batch(ids)[0]
    np.testing.assert_array_equal(out.pooler_output.numpy(), want["embedding"])  # sentence embedding
    np.testing.assert_array_equal(out.last_hidden_state[0].numpy(), want["encoder.layers.3.norm2"])


def test_ids_only_use_needs_no_tokenizer(tiny_model_dir, tmp_path):
    d = tmp_path / "weights-only"
    d.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / f, d / f)
    model, _, arch = load_reference_model(d)  # formerly refused: tokenizer.json not found
    assert arch == "nomic_bert_moe"
    ids = [[0, 1061, 76, 2]]
    with actdiff.load(tiny_model_dir, batch_size=1) as full, actdiff.load(d, batch_size=1) as bare:
        np.testing.assert_array_equal(bare.encode(ids), full.encode(ids))
        with pytest.raises(ModelError, match="weights-only: tokenizer.json not found; tokenizing texts needs it"):
            bare.encode(["a text needs the tokenizer"])


def test_resolve_model_dir_plain_path_without_a_name(tiny_model_dir, tmp_path):
    assert resolve_model_dir(source={"path": str(tiny_model_dir)}) == tiny_model_dir
    assert resolve_model_dir(source=tiny_model_dir) == tiny_model_dir
    assert resolve_model_dir("t", {"path": str(tiny_model_dir)}) == tiny_model_dir  # the old call
    with pytest.raises(ModelError, match=r"^model: directory .*nope does not exist; pass a directory"):
        resolve_model_dir(source={"path": str(tmp_path / "nope")})


def test_embedded_defaults_by_name_and_clear_errors(tiny_model_dir, minilm_model_dir, monkeypatch, tmp_path):
    monkeypatch.chdir(tiny_model_dir.parents[2])  # the checkout: its resources/models copy is used
    with actdiff.load("tiny-nomic-moe", side="actdiff") as m:
        assert m.record.dir == tiny_model_dir.resolve() and m.record.name == "tiny-nomic-moe"
    with actdiff.load("minilm-l6", side="actdiff") as m:
        assert m.record.dir == minilm_model_dir.resolve() and m.encode(["hi"]).shape == (1, 384)
    with pytest.raises(ModelError, match="neither a model directory nor an embedded default"):
        actdiff.load("no-such-model")
    with pytest.raises(ConfigError, match="unknown side 'onnx'"):
        actdiff.load(tiny_model_dir, side="onnx")
    with pytest.raises(ConfigError, match="variant 'fp33' is not valid"):
        actdiff.load(tiny_model_dir, side="actdiff", variant="fp33")
    with pytest.raises(ConfigError, match="side 'actdiff' on .*: no option impl; it takes threads, engine_ids"):
        actdiff.load(tiny_model_dir, side="actdiff", impl="automodel")


def test_tiny_model_generated_into_the_cache(tiny_model_dir, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no resources/models here
    monkeypatch.setenv("ACTDIFF_CACHE", str(tmp_path / "cache"))
    from actdiff.api import model_dir

    d = model_dir("tiny-nomic-moe")
    assert d == tmp_path / "cache/models/tiny-nomic-moe"
    for f in ("config.json", "model.safetensors", "tokenizer.json"):  # deterministic: the pipeline's bytes
        assert (d / f).read_bytes() == (tiny_model_dir / f).read_bytes(), f


def test_pipeline_dump_runs_through_the_api(tiny_model_dir, tmp_path, monkeypatch):
    from actdiff import pipeline
    from actdiff.h5io import ActivationReader
    from actdiff.models.loading import model_summary

    opened = []
    real = Model.from_record.__func__
    monkeypatch.setattr(
        Model, "from_record", classmethod(lambda cls, *a, **k: opened.append(a[1]) or real(cls, *a, **k))
    )
    mj = tmp_path / "model.json"
    mj.write_text(json.dumps(model_summary("tiny-nomic-moe", tiny_model_dir)))
    import pandas as pd

    pd.DataFrame({"prompt_id": ["a", "b"], "text": TEXTS[:2]}).to_parquet(tmp_path / "p.parquet", index=False)
    pipeline.tokenize(str(mj), str(tmp_path / "p.parquet"), None, str(tmp_path / "t.parquet"))
    pipeline.dump(str(mj), str(tmp_path / "t.parquet"), str(tmp_path / "e.h5"), "actdiff", "int8", 0)
    assert opened == ["actdiff"]
    with actdiff.load(tiny_model_dir, side="actdiff", variant="int8") as m, ActivationReader(tmp_path / "e.h5") as r:
        np.testing.assert_array_equal(m.encode(TEXTS[:2]), r.node_all("embedding").reshape(2, -1))


def test_llamacpp_side(tiny_model_dir, tmp_path, monkeypatch):
    from actdiff.llamacpp import available

    ok, why = available()
    if not ok:
        pytest.skip(why)
    from actdiff.models.record import ModelRecord
    from actdiff.sides import open_side

    monkeypatch.setenv("ACTDIFF_CACHE", str(tmp_path))
    with actdiff.load(tiny_model_dir, side="llamacpp", variant="fp32") as m:
        got = m.encode(TEXTS)
        gguf = m.side.gguf
    assert gguf.startswith(str(tmp_path / "gguf")) and got.shape == (3, 128)
    side = open_side("llamacpp", ModelRecord.from_dir(tiny_model_dir), "fp32", gguf=gguf)  # the pipeline's way
    try:
        ids = _pipeline_ids(tiny_model_dir, TEXTS)
        want = np.stack([v["embedding"][0] for _, v in side.forward([(str(i), x) for i, x in enumerate(ids)])])
    finally:
        side.close()
    np.testing.assert_array_equal(got, want)
