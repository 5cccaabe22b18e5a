"""Prompts a side was fitted on, left out of its comparison.

A side may have been fitted on some prompts of the corpus (a statically quantised model's activation ranges
calibrated on them): on those prompts its errors are optimistic, so they must not count. Its dump's provenance
names them in the attribute :data:`FITTED_ATTR`, JSON ``{"prompts": [prompt ids], ...}`` (``"none"`` or absent:
none). The statistics stage (actdiff.compare.stats) skips them for that side, so no shard table holds them, and
records the ids it skipped in the metadata of the shard's ``nodes`` table (:data:`EXCLUDED_META`); aggregation
(actdiff.compare.aggregate) reads them back, so every summary, the worst prompts, the prompt table and the
verdict leave them out, and the verdict says how many were excluded and which.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from ..errors import DumpError

FITTED_ATTR = "calibration"  # dump attribute: the prompts the side was fitted (calibrated) on
EXCLUDED_META = b"actdiff.excluded_prompts"  # nodes-table metadata: JSON list of the shard's excluded prompt ids
SHOWN_IDS = 10  # ids named in the verdict's sentence (all of them are in verdict["excluded_prompts"]["ids"])


def fitted_prompts(attrs: Mapping, where: str = "the dump") -> frozenset[str]:
    """The prompt ids a dump's provenance says its side was fitted on (empty when it names none)."""
    raw = attrs.get(FITTED_ATTR)
    raw = raw.decode() if isinstance(raw, bytes) else raw
    if raw is None or str(raw).strip() in ("", "none"):
        return frozenset()
    try:
        data = json.loads(raw)
        ids = data["prompts"] if isinstance(data, dict) else data
        if not isinstance(ids, list) or not all(isinstance(p, str) for p in ids):
            raise TypeError("prompts is not a list of prompt ids")
    except (ValueError, KeyError, TypeError) as e:
        raise DumpError(
            f'{where}: attribute {FITTED_ATTR!r} must be JSON {{"prompts": [prompt ids]}} or "none", got '
            f"{str(raw)[:200]!r} ({e}); rewrite the dump with the side's current code"
        ) from None
    return frozenset(ids)


def shard_metadata(excluded: Iterable[str]) -> dict[bytes, bytes]:
    """The nodes table's schema metadata recording the prompts a shard excluded."""
    return {EXCLUDED_META: json.dumps(sorted(excluded)).encode()}


def read_excluded(nodes_tables: Iterable[str]) -> list[str]:
    """Every prompt id the shards' statistics excluded (their nodes tables' metadata), sorted."""
    import pyarrow.parquet as pq

    out: set[str] = set()
    for p in nodes_tables:
        meta = pq.read_schema(p).metadata or {}
        if EXCLUDED_META in meta:
            out.update(json.loads(meta[EXCLUDED_META]))
    return sorted(out)


def excluded_summary(ids: list[str]) -> dict:
    """The verdict's record of the excluded prompts."""
    return {"n": len(ids), "ids": list(ids), "why": "the side was fitted (calibrated) on them"}


def excluded_words(ex: dict | None) -> str:
    """'N calibration prompts excluded (ids ...)', or '' when none were."""
    if not ex or not ex.get("n"):
        return ""
    ids = ex["ids"][:SHOWN_IDS]
    more = f" and {ex['n'] - len(ids)} more" if ex["n"] > len(ids) else ""
    return (
        f"{ex['n']} calibration prompt(s) excluded (ids {', '.join(ids)}{more}): the side was fitted on them, so "
        "they are not compared."
    )
