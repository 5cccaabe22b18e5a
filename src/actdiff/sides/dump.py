"""One shard of token ids through any side, recorded in actdiff's HDF5 layout (docs/formats.md).

Every dump rule (reference, engine, llama.cpp) and ``actdiff import`` end here: the common attributes
(model, side, variant, shard, architecture, weights), the token-column choice, placeholders for nodes the
side cannot provide, the progress log and the atomic write are done once.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import pyarrow.parquet as pq

from ..batching import streams_rows
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
    or an imported model's equivalent). A side that can stream does so where the values are large
    (actdiff.batching.streams_rows): the writer puts each node's rows where the file keeps them as they come.
    Returns the progress counters (prompts, seconds, NaN/Inf prompts)."""
    graph = side.graph
    attrs = {
        **provenance,
        "side": side.name,
        "variant": str(side.variant),
        "shard": int(shard),
        "arch": graph.dims.arch,
        **side.provenance(),
    }
    progress = Progress(log, f"{side.name} {side.variant}", len(items))
    stream = getattr(side, "stream", None) if streams_rows(graph) else None
    plan = [(pid, len(ids)) for pid, ids in items] if stream is not None else None
    with ActivationWriter(out, graph, attrs, compression=compression, plan=plan) as w:
        sink = _Sink(w, side, items, progress, out)
        if stream is not None:
            stream(items, sink)
        else:
            for pid, vals in side.forward(items):
                sink.append(pid, vals)
    log.info(
        "%s %s: dumped %d prompts, %d tokens, %d nodes (%d missing) in %.1f s (%.1f prompts/s); "
        "%d prompts with NaN/Inf",
        side.name,
        str(side.variant),
        len(items),
        sum(len(i) for _, i in items),
        len(graph),
        len(side.missing_nodes),
        progress.seconds,
        progress.rate,
        progress.n_bad,
    )
    return progress


class _Sink:
    """The writer as a side's RowSink (actdiff.sides.base), or fed whole prompts in order (:meth:`append`): either
    way, the nodes the side cannot provide are written as placeholders, the prompt's NaN/Inf nodes counted in
    the progress log, and a value the writer refuses is a DumpError naming the file and the side."""

    def __init__(self, writer: ActivationWriter, side: Side, items: list[tuple[str, list[int]]], progress, out):
        self.w, self.side, self.items, self.progress, self.out = writer, side, items, progress, out
        self.missing = tuple(side.missing_nodes)
        self.ids_of = dict(items)

    def put(self, index: int, name: str, value) -> None:
        with self._named():
            self.w.put(index, name, value)

    def done(self, index: int) -> None:
        pid, ids = self.items[index]
        with self._named():
            for n in self.missing:
                self.w.put(index, n, placeholder(self.side.graph, n, len(ids)))
            bad = self.w.done(index, input_ids=ids if self.side.records_input_ids else None)
        self.progress.step(pid, [b for b in bad if b not in self.missing])

    def append(self, pid: str, vals: dict) -> None:
        ids = self.ids_of[pid]
        for n in self.missing:
            vals[n] = placeholder(self.side.graph, n, len(ids))
        with self._named():
            bad = self.w.append(pid, vals, input_ids=ids if self.side.records_input_ids else None)
        self.progress.step(pid, [b for b in bad if b not in self.missing])

    @contextlib.contextmanager
    def _named(self):
        try:
            yield
        except DumpError as e:
            raise DumpError(f"{self.out}: {self.side.name}: {e}") from None
