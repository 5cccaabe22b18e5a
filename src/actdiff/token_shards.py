"""Tokenization of a prompt shard with the reference tokenizer (transformers, from tokenizer.json).

Output Parquet (one file per model and shard; schema in docs/formats.md): prompt_id, text, the sheet's
metadata columns, and per side ``<side>_ids`` (list<int32>), ``<side>_length``,
``<side>_length_untruncated``, ``<side>_truncated``. The engine side's columns (``engine_ids`` ...)
and the parity columns (``ids_match``, ``first_diff``) are present from the start and filled by the
engine tokenizer, so the schema never changes shape.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_path
from .errors import ModelError, PromptError

log = logging.getLogger(__name__)

SIDES = ("reference", "engine")
ENGINE_COLUMNS = (
    "engine_ids",
    "engine_length",
    "engine_length_untruncated",
    "engine_truncated",
    "ids_match",
    "first_diff",
)


def load_reference_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:  # transformers raises many types here
        raise ModelError(f"{model_dir}: cannot load the reference tokenizer ({type(e).__name__}: {e})") from None
    if not getattr(tok, "is_fast", False):
        raise ModelError(f"{model_dir}: expected a fast tokenizer from tokenizer.json")
    return tok


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


def arrow_schema(meta_columns: list[str]) -> pa.Schema:
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
    return pa.schema(fields)


def first_difference(a: list[int], b: list[int]) -> int | None:
    """First position where two id sequences differ (the shorter length if one is a prefix); None if equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def tokenize_shard(
    prompts: pd.DataFrame,
    model_dir: str | Path,
    max_length: int,
    out_path: str | Path,
    model_name: str = "",
    engine_tokenizer=None,
) -> pd.DataFrame:
    """Tokenize one shard's prompts with the reference tokenizer (and the engine's own tokenizer, if given:
    both id sequences and a per-prompt parity flag with the first differing position); write the Parquet
    atomically."""
    tok = load_reference_tokenizer(model_dir)
    texts = prompts["text"].tolist()
    res = tokenize_texts(tok, texts, max_length)
    for pid, text, r in zip(prompts["prompt_id"], texts, res, strict=True):
        if text == "":
            log.warning(
                "model %s: prompt %r is empty; it is encoded as %s (special tokens only)", model_name, pid, r["ids"]
            )
        if r["truncated"]:
            log.warning(
                "model %s: prompt %r has %d tokens, more than max_length %d; truncated to %d and flagged "
                "(reference_truncated=true)",
                model_name,
                pid,
                r["length_untruncated"],
                max_length,
                max_length,
            )
    meta = [c for c in prompts.columns if c not in ("prompt_id", "text")]
    data = {"prompt_id": prompts["prompt_id"].tolist(), "text": texts}
    for c in meta:
        data[c] = prompts[c].astype(str).tolist()
    data["reference_ids"] = [r["ids"] for r in res]
    data["reference_length"] = [r["length"] for r in res]
    data["reference_length_untruncated"] = [r["length_untruncated"] for r in res]
    data["reference_truncated"] = [r["truncated"] for r in res]
    n = len(res)
    if engine_tokenizer is None:
        for col in ENGINE_COLUMNS:
            data[col] = [None] * n
    else:
        eng = [engine_tokenizer.encode(t, max_length) for t in texts]
        data["engine_ids"] = [ids for ids, _ in eng]
        data["engine_length"] = [len(ids) for ids, _ in eng]
        data["engine_length_untruncated"] = [full for _, full in eng]
        data["engine_truncated"] = [full > max_length for _, full in eng]
        data["first_diff"] = [
            first_difference(e, r) for e, r in zip(data["engine_ids"], data["reference_ids"], strict=True)
        ]
        data["ids_match"] = [d is None for d in data["first_diff"]]
        for pid, pos in zip(data["prompt_id"], data["first_diff"], strict=True):
            if pos is not None:
                log.warning(
                    "model %s: prompt %r: engine tokenizer ids differ from the reference at position %d",
                    model_name,
                    pid,
                    pos,
                )
    table = pa.Table.from_pydict(data, schema=arrow_schema(meta))
    with atomic_path(out_path) as tmp:
        pq.write_table(table, tmp)
    return table.to_pandas()
