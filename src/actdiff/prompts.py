"""Prompt sheets and sharding.

A prompt sheet is a UTF-8 TSV with a header row. Required columns: ``prompt_id`` (unique, non-empty,
``[A-Za-z0-9._:-]+``) and ``text``; any other columns (``category``, ``lang``, ...) are kept as metadata.
The text column is read with quoting disabled and these escapes decoded: ``\\t`` tab, ``\\n`` newline,
``\\r`` carriage return, ``\\\\`` backslash. Empty text is allowed (it tokenizes to ``<s></s>``).

Shard of a prompt = first 8 bytes of sha256(prompt_id) as an unsigned integer, modulo the shard count:
stable across runs, machines and sheet order.
"""

from __future__ import annotations

import csv
import hashlib
import re
from pathlib import Path

import pandas as pd

from .errors import PromptError

REQUIRED_COLUMNS = ("prompt_id", "text")
PROMPT_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]+$")
_ESCAPE_RE = re.compile(r"\\(.)")
_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", "\\": "\\"}


def decode_text(s: str) -> str:
    return _ESCAPE_RE.sub(lambda m: _ESCAPES.get(m.group(1), m.group(0)), s)


def prompt_hash(prompt_id: str) -> int:
    """The stable hash a prompt's shard is taken from (modulo the shard count)."""
    return int.from_bytes(hashlib.sha256(prompt_id.encode("utf-8")).digest()[:8], "big")


def shard_of(prompt_id: str, n_shards: int) -> int:
    return prompt_hash(prompt_id) % n_shards


def read_prompt_ids(path: str | Path) -> list[str]:
    """The prompt_id column of a sheet without parsing the rest (the workflow plans its shards from it at every
    start); rows are not validated here (rule split_prompts does, naming the line)."""
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"prompt sheet {path} not found; set 'prompts' in the config to an existing TSV file")
    with open(path, encoding="utf-8", errors="replace", newline="\n") as f:
        header = f.readline().rstrip("\r\n").split("\t")
        _check_columns(path, header)
        col = header.index("prompt_id")
        fields = (line.rstrip("\r\n").split("\t", col + 1) for line in f if line.strip())
        return [row[col] if len(row) > col else "" for row in fields]


def _check_field_counts(path: Path) -> None:
    """Every row must have as many tab-separated fields as the header (pandas would drop or shift data)."""
    with open(path, encoding="utf-8", errors="replace", newline="\n") as f:
        header = f.readline().rstrip("\r\n")
        n = header.count("\t")
        for lineno, line in enumerate(f, start=2):
            line = line.rstrip("\r\n")
            if line and line.count("\t") != n:
                raise PromptError(
                    f"prompt sheet {path}, line {lineno}: cannot parse as TSV: {line.count(chr(9)) + 1} fields, the "
                    f"header has {n + 1}; tabs inside text must be written as \\t"
                )


def _check_columns(path: Path, columns: list[str]) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise PromptError(
            f"prompt sheet {path}: missing required column(s) {missing}; found columns {columns}. "
            "The header row must name at least prompt_id and text (tab-separated)"
        )


def load_prompt_sheet(path: str | Path) -> pd.DataFrame:
    """Read and validate a prompt sheet; errors name the file, the line and the column."""
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"prompt sheet {path} not found; set 'prompts' in the config to an existing TSV file")
    _check_field_counts(path)
    try:
        df = pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, dtype=str, keep_default_na=False, encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PromptError(f"prompt sheet {path}: not valid UTF-8 ({e})") from None
    except pd.errors.ParserError as e:
        raise PromptError(
            f"prompt sheet {path}: cannot parse as TSV ({e}); each row needs the same number of "
            "tab-separated fields, and tabs inside text must be written as \\t"
        ) from None
    except pd.errors.EmptyDataError:
        raise PromptError(f"prompt sheet {path} is empty; it needs a header row with prompt_id and text") from None
    _check_columns(path, list(df.columns))
    if len(df) == 0:
        raise PromptError(f"prompt sheet {path} has a header but no prompts")
    bad = df.index[~df["prompt_id"].str.match(PROMPT_ID_RE)]
    if len(bad):
        i = bad[0]
        raise PromptError(
            f"prompt sheet {path}, line {i + 2}: prompt_id {df.at[i, 'prompt_id']!r} is empty or has characters "
            "other than letters, digits and . _ : -"
        )
    dup = df["prompt_id"][df["prompt_id"].duplicated()]
    if len(dup):
        raise PromptError(f"prompt sheet {path}: prompt_id {dup.iloc[0]!r} appears more than once; ids must be unique")
    df["text"] = df["text"].map(decode_text)
    return df


def split_into_shards(df: pd.DataFrame, n_shards: int) -> list[pd.DataFrame]:
    shards = df["prompt_id"].map(lambda p: shard_of(p, n_shards))
    return [df[shards == s].reset_index(drop=True) for s in range(n_shards)]
