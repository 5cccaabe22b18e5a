"""Tokenization of a prompt shard three ways: the reference tokenizer (transformers as installed, from
tokenizer.json: what the reference model runs on), the ``tokenizers`` library reading tokenizer.json literally
(``Tokenizer.from_file``: transformers 5 rebuilds some pipelines, so the two can differ), and the engine's own.

Output Parquet (one file per model and shard; schema in docs/formats.md): prompt_id, text, the sheet's
metadata columns, and per side ``<side>_ids`` (list<int32>), ``<side>_length``,
``<side>_length_untruncated``, ``<side>_truncated`` for the sides reference, tokenizers and engine; the
per-pair agreement flags; ``ids_match``/``first_diff``: the engine against the tokenization it is held to
(``engine_target``). The engine's columns are present from the start (null without the engine side), so the
schema never changes shape. The file's metadata (key ``actdiff.tokenization``, JSON) records the
max_length used and where it came from, the engine's target and the library versions.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_path
from .errors import ModelError, PromptError

log = logging.getLogger(__name__)

SIDES = ("reference", "tokenizers", "engine")
# the three per-pair agreement flags: (column, first side, second side)
AGREEMENT = (
    ("engine_eq_transformers", "engine", "reference"),
    ("engine_eq_tokenizers", "engine", "tokenizers"),
    ("transformers_eq_tokenizers", "reference", "tokenizers"),
)
ENGINE_COLUMNS = (
    "engine_ids",
    "engine_length",
    "engine_length_untruncated",
    "engine_truncated",
    "ids_match",
    "first_diff",
    "engine_eq_transformers",
    "engine_eq_tokenizers",
)
ENGINE_TARGETS = {"transformers": "reference", "tokenizers": "tokenizers"}  # config value -> side it names
METADATA_KEY = b"actdiff.tokenization"
SENTINEL_MAX_LENGTH = 10**9  # transformers writes int(1e30) (and the like) for "no limit": not a model's limit


def load_reference_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    if not (Path(model_dir) / "tokenizer.json").is_file():  # transformers 5 would build an EMPTY BertTokenizer
        raise ModelError(
            f"{model_dir}: tokenizer.json not found; tokenizing texts needs it (add it to the directory, or give "
            "token ids instead of texts)"
        )

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:  # transformers raises many types here
        raise ModelError(f"{model_dir}: cannot load the reference tokenizer ({type(e).__name__}: {e})") from None
    if not getattr(tok, "is_fast", False):
        raise ModelError(f"{model_dir}: expected a fast tokenizer from tokenizer.json")
    return tok


def load_literal_tokenizer(model_dir: str | Path):
    """tokenizer.json as the ``tokenizers`` library reads it, with its own truncation/padding blocks off (the
    explicit max_length applies, as for transformers)."""
    from tokenizers import Tokenizer

    path = Path(model_dir) / "tokenizer.json"
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exception for a bad file
        raise ModelError(f"{path}: tokenizers cannot read it ({type(e).__name__}: {e})") from None
    tok.no_truncation()
    tok.no_padding()
    return tok


def tokenize_literal(tok, texts: list[str], max_length: int) -> list[dict]:
    """``tokenize_texts`` for a ``tokenizers.Tokenizer``: special tokens added, truncation keeps them (tokenizers
    truncates the content to max_length minus the post-processor's added tokens, as transformers does)."""
    full = [e.ids for e in tok.encode_batch(texts, add_special_tokens=True)]
    tok.enable_truncation(max_length)
    try:
        trunc = [e.ids for e in tok.encode_batch(texts, add_special_tokens=True)]
    finally:
        tok.no_truncation()
    return [
        {"ids": t, "length": len(t), "length_untruncated": len(f), "truncated": len(f) > max_length}
        for f, t in zip(full, trunc, strict=True)
    ]


def _positive_int(value, where: str) -> int | None:
    """A length from a model file: None if absent or a "no limit" sentinel; ModelError if not a length."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ModelError(f"{where} is {value!r}: not a usable maximum length (an integer >= 2)")
    return None if value >= SENTINEL_MAX_LENGTH else value


# where a model states its own limit, most specific first: (file, keys in order)
MAX_LENGTH_SOURCES = (
    ("sentence_bert_config.json", ("max_seq_length",)),
    ("tokenizer_config.json", ("model_max_length",)),
    ("config.json", ("max_position_embeddings", "n_positions")),
)


def model_max_length(model_dir: str | Path) -> tuple[int, str]:
    """The model's own maximum length and where it came from (``file:key``), for a config without max_length."""
    d = Path(model_dir)
    for name, keys in MAX_LENGTH_SOURCES:
        path = d / name
        if not path.is_file():
            continue
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
        for key in keys:
            value = _positive_int(obj.get(key) if isinstance(obj, dict) else None, f"{path}: {key}")
            if value is not None:
                return value, f"{name}:{key}"
    raise ModelError(
        f"{d}: no maximum length: the config sets no models.<model>.max_length and none of "
        + ", ".join(f"{n} {'/'.join(k)}" for n, k in MAX_LENGTH_SOURCES)
        + " states one; set max_length in the config"
    )


def tokenize_texts(tok, texts: list[str], max_length: int) -> list[dict]:
    """Token ids with special tokens; over-long inputs are truncated to max_length (specials kept)."""
    if max_length < 2:
        raise PromptError(f"max_length={max_length} leaves no room for the special tokens")
    if not texts:  # a shard the hash gave no prompt (fewer prompts than shards); the tokenizer fails on []
        return []
    full = tok(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    trunc = tok(texts, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    return [
        {"ids": t, "length": len(t), "length_untruncated": len(f), "truncated": len(f) > max_length}
        for f, t in zip(full, trunc, strict=True)
    ]


def arrow_schema(meta_columns: list[str], metadata: dict | None = None) -> pa.Schema:
    fields = [pa.field("prompt_id", pa.string()), pa.field("text", pa.string())]
    fields += [pa.field(c, pa.string()) for c in meta_columns]
    for side in SIDES:
        fields += [
            pa.field(f"{side}_ids", pa.list_(pa.int32())),
            pa.field(f"{side}_length", pa.int32()),
            pa.field(f"{side}_length_untruncated", pa.int32()),
            pa.field(f"{side}_truncated", pa.bool_()),
        ]
    fields += [pa.field("ids_match", pa.bool_()), pa.field("first_diff", pa.int32())]
    fields += [pa.field(col, pa.bool_()) for col, _, _ in AGREEMENT]
    schema = pa.schema(fields)
    return schema.with_metadata({METADATA_KEY: json.dumps(metadata)}) if metadata else schema


def read_tokenization_metadata(path: str | Path) -> dict:
    """The ``actdiff.tokenization`` metadata of a tokens Parquet ({} for files written before it existed)."""
    raw = (pq.read_schema(path).metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def first_difference(a: list[int], b: list[int]) -> int | None:
    """First position where two id sequences differ (the shorter length if one is a prefix); None if equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def library_versions() -> dict:
    import tokenizers
    import transformers

    return {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__}


def _side_columns(data: dict, side: str, res: list[dict]) -> None:
    data[f"{side}_ids"] = [r["ids"] for r in res]
    data[f"{side}_length"] = [r["length"] for r in res]
    data[f"{side}_length_untruncated"] = [r["length_untruncated"] for r in res]
    data[f"{side}_truncated"] = [r["truncated"] for r in res]


def _log_prompts(model_name: str, prompt_ids, texts, res: list[dict], max_length: int, source: str) -> None:
    for pid, text, r in zip(prompt_ids, texts, res, strict=True):
        if text == "":
            log.warning(
                "model %s: prompt %r is empty; it is encoded as %s (special tokens only)", model_name, pid, r["ids"]
            )
        if r["truncated"]:
            log.warning(
                "model %s: prompt %r has %d tokens, more than max_length %d; truncated to %d and flagged "
                "(reference_truncated=true; max_length from %s)",
                model_name, pid, r["length_untruncated"], max_length, max_length, source,
            )  # fmt: skip


def _engine_columns(data: dict, engine_tokenizer, texts: list[str], max_length: int, target: str, model_name: str):
    """The engine's own ids, ``ids_match``/``first_diff`` against the target side, and its agreement flags."""
    n = len(texts)
    if engine_tokenizer is None:
        for col in ENGINE_COLUMNS:
            data[col] = [None] * n
    else:
        eng = [engine_tokenizer.encode(t, max_length) for t in texts]
        _side_columns(data, "engine", [
            {"ids": ids, "length": len(ids), "length_untruncated": full, "truncated": full > max_length}
            for ids, full in eng
        ])  # fmt: skip
        target_side = ENGINE_TARGETS[target]
        data["first_diff"] = [
            first_difference(e, r) for e, r in zip(data["engine_ids"], data[f"{target_side}_ids"], strict=True)
        ]
        data["ids_match"] = [d is None for d in data["first_diff"]]
        for pid, pos in zip(data["prompt_id"], data["first_diff"], strict=True):
            if pos is not None:
                log.warning(
                    "model %s: prompt %r: engine tokenizer ids differ from %s's at position %d",
                    model_name, pid, target, pos,
                )  # fmt: skip


def _agreement_columns(data: dict, engine_present: bool) -> None:
    for col, a, b in AGREEMENT:
        if engine_present or "engine" not in (a, b):  # without the engine side its flags stay null
            data[col] = [x == y for x, y in zip(data[f"{a}_ids"], data[f"{b}_ids"], strict=True)]


def tokenize_shard(
    prompts: pd.DataFrame,
    model_dir: str | Path,
    max_length: int | None,
    out_path: str | Path,
    model_name: str = "",
    engine_tokenizer=None,
    engine_target: str = "transformers",
) -> pd.DataFrame:
    """Tokenize one shard's prompts three ways: transformers (the reference's ids), the ``tokenizers`` library
    literally, and the engine's own tokenizer if given (held to ``engine_target``: ``ids_match`` and the first
    differing position); write the Parquet atomically. ``max_length`` None: the model's own limit
    (:func:`model_max_length`)."""
    if engine_target not in ENGINE_TARGETS:
        raise PromptError(f"engine_tokenizer_target {engine_target!r}: expected one of {', '.join(ENGINE_TARGETS)}")
    source = "config"
    if max_length is None:
        max_length, source = model_max_length(model_dir)
        log.info("model %s: max_length %d from %s (the config sets none)", model_name, max_length, source)
    texts = prompts["text"].tolist()
    res = tokenize_texts(load_reference_tokenizer(model_dir), texts, max_length)
    _log_prompts(model_name, prompts["prompt_id"], texts, res, max_length, source)
    meta = [c for c in prompts.columns if c not in ("prompt_id", "text")]
    data = {"prompt_id": prompts["prompt_id"].tolist(), "text": texts}
    for c in meta:
        data[c] = prompts[c].astype(str).tolist()
    _side_columns(data, "reference", res)
    _side_columns(data, "tokenizers", tokenize_literal(load_literal_tokenizer(model_dir), texts, max_length))
    _engine_columns(data, engine_tokenizer, texts, max_length, engine_target, model_name)
    _agreement_columns(data, engine_tokenizer is not None)
    metadata = {
        "reference": "transformers",
        "engine_target": engine_target,
        "max_length": max_length,
        "max_length_source": source,
        "versions": library_versions(),
    }
    table = pa.Table.from_pydict(data, schema=arrow_schema(meta, metadata))
    with atomic_path(out_path) as tmp:
        pq.write_table(table, tmp)
    return table.to_pandas()
