"""One shard of token ids through any side, recorded in actdiff's HDF5 layout (docs/formats.md).

Every dump rule (reference, engine, llama.cpp) and ``actdiff import`` end here: the common attributes
(model, side, variant, shard, architecture, weights), the token-column choice, placeholders for nodes the
side cannot provide, the progress log and the atomic write are done once.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow.parquet as pq

from ..errors import ConfigError, DumpError
from ..h5io import ActivationWriter
from ..progress import Progress
from .base import Side, placeholder

log = logging.getLogger(__name__)

IDS_COLUMNS = {"reference": "reference_ids", "own": "engine_ids"}


def ids_column(engine_ids: str) -> str:
    """The tokens column an engine reads under the config key ``engine_ids``."""
    if engine_ids not in IDS_COLUMNS:
        raise ConfigError(f"engine_ids {engine_ids!r}: use 'reference' or 'own'")
    return IDS_COLUMNS[engine_ids]


def read_token_items(tokens: str | Path, column: str) -> list[tuple[str, list[int]]]:
    """(prompt_id, ids) of a tokens shard in file order."""
    try:  # ParquetFile, not pandas or pq.read_table (its dataset module loads pandas: a tenth of a tiny dump job)
        toks = pq.ParquetFile(tokens).read(columns=["prompt_id", column])
        pids, ids = toks.column("prompt_id"), toks.column(column)  # a missing column: KeyError here
    except (OSError, ValueError, KeyError) as e:
        raise DumpError(f"{tokens}: cannot read prompt_id and {column} ({e})") from None
    if ids.null_count:
        raise DumpError(f"{tokens}: column {column} is empty; engine_ids: own needs the engine tokenizer side")
    pids, ids = pids.to_pylist(), ids.to_pylist()
    return [(pid, [int(i) for i in x]) for pid, x in zip(pids, ids, strict=True)]


def dump_shard(
    side: Side, provenance: dict, items: list[tuple[str, list[int]]], out: str | Path, shard: int, compression="none"
) -> Progress:
    """Write ``side``'s values for ``items`` to ``out``; ``provenance`` is the model's (ModelRecord.provenance
    or an imported model's equivalent). Returns the progress counters (prompts, seconds, NaN/Inf prompts)."""
    graph, missing = side.graph, tuple(side.missing_nodes)
    attrs = {
        **provenance,
        "side": side.name,
        "variant": str(side.variant),
        "shard": int(shard),
        "arch": graph.dims.arch,
        **side.provenance(),
    }
    ids_of = dict(items)
    progress = Progress(log, f"{side.name} {side.variant}", len(items))
    with ActivationWriter(out, graph, attrs, compression=compression) as w:
        for pid, vals in side.forward(items):
            ids = ids_of[pid]
            for n in missing:
                vals[n] = placeholder(graph, n, len(ids))
            try:
                bad = w.append(pid, vals, input_ids=ids if side.records_input_ids else None)
            except DumpError as e:
                raise DumpError(f"{out}: {side.name}: {e}") from None
            progress.step(pid, [b for b in bad if b not in missing])
    log.info(
        "%s %s: dumped %d prompts, %d tokens, %d nodes (%d missing) in %.1f s (%.1f prompts/s); "
        "%d prompts with NaN/Inf",
        side.name,
        str(side.variant),
        len(items),
        sum(len(i) for _, i in items),
        len(graph),
        len(missing),
        progress.seconds,
        progress.rate,
        progress.n_bad,
    )
    return progress
