"""Length-sorted, padded batches of prompts, results in the input order: one policy for every side that runs
batches (the reference, ``actdiff.reference.ReferenceRunner.run``, and the engine, ``actdiff.sides.engine``),
so both see the same batches of the same prompts. No torch here."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np

MAX_BATCH_TOKENS = 2048  # padded tokens per batch: memory per batch is bounded, not per prompt count
WINDOW_BATCHES = 8  # prompts are length-sorted within a window of this many batches
# A window's results are held until its first prompt's turn comes: every node's rows of all its prompts. A window
# also closes once its prompts hold this many bytes of them (window_tokens_for): 128 prompts of the released model
# (about 1 MB of rows per token) were 20 GB and more. Not less: a smaller window sorts fewer prompts by length, so
# its batches pad more, and a padded batch's capture costs more than the window saves (1 GiB: the released model's
# dumps of 8 bundled prompts, 1,264 tokens, two windows instead of one, peaked at 4.8 GB instead of 3.9). The small
# models' windows of the bundled corpus stay below it (at most 7k tokens, the tiny model's limit is 36k)
WINDOW_BYTES = 2 << 30


def token_bytes(graph) -> int:
    """Bytes one more token adds to a prompt's rows of every node, as the dumps store them
    (actdiff.h5io.prompt_values_bytes)."""
    from .h5io import prompt_values_bytes

    return max(1, prompt_values_bytes(graph, 1) - prompt_values_bytes(graph, 0))


def window_tokens_for(graph) -> int:
    """Tokens whose rows of every node fill WINDOW_BYTES."""
    return max(1, WINDOW_BYTES // token_bytes(graph))


def windows(lengths: list[int], batch_size: int, window_tokens: int | None = None) -> list[list[int]]:
    """The windows batched_in_order forms over prompts of these lengths (consecutive indices)."""
    out: list[list[int]] = [[]]
    tokens = 0
    for i, n in enumerate(lengths):
        out[-1].append(i)
        tokens += n
        if _window_full(len(out[-1]), tokens, batch_size, window_tokens):
            out.append([])
            tokens = 0
    return [w for w in out if w]


def _window_full(prompts: int, tokens: int, batch_size: int, window_tokens: int | None) -> bool:
    size = batch_size * WINDOW_BATCHES if batch_size > 1 else 1
    return prompts >= size or (window_tokens is not None and tokens >= window_tokens)


def length_sorted_batches(
    lengths: list[int], batch_size: int, max_batch_tokens: int = MAX_BATCH_TOKENS
) -> list[list[int]]:
    """Indices of ``lengths`` grouped into batches in ascending length: at most ``batch_size`` prompts and
    ``max_batch_tokens`` padded tokens each (a prompt longer than that still gets a batch of its own)."""
    batches: list[list[int]] = []
    batch: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):  # the last prompt added sets the padded length
        if batch and (len(batch) >= batch_size or (len(batch) + 1) * lengths[i] > max_batch_tokens):
            batches.append(batch)
            batch = []
        batch.append(i)
    if batch:
        batches.append(batch)
    return batches


def batch_plan(
    lengths: list[int], batch_size: int, max_batch_tokens: int = MAX_BATCH_TOKENS, window_tokens: int | None = None
) -> list[list[int]]:
    """The batches, as indices into ``lengths``, in the order batched_in_order runs them: its windows
    (:func:`windows`), each cut into length_sorted_batches. A side that streams its rows to the dump
    (:func:`streams_rows`) runs the same batches, so a streamed dump holds the same values as one held in order."""
    plan: list[list[int]] = []
    for w in windows(lengths, batch_size, window_tokens):
        sorted_batches = length_sorted_batches([lengths[i] for i in w], batch_size, max_batch_tokens)
        plan.extend([w[i] for i in b] for b in sorted_batches)
    return plan


# A side that can stream (``Side.stream``: every node's rows handed to the dump as computed, none held) does so
# when a batch of MAX_BATCH_TOKENS tokens holds more than this many bytes of node values. Streaming writes each
# prompt's rows of each node on their own, ~0.2-0.3 ms apiece (HDF5 rewriting partial 256 KiB chunks), which
# is nothing beside a full-size prompt's forward and as much as a small model's: measured (Zen 4, one thread,
# 357 bundled prompts, batch 16), MiniLM's engine dump 4.3-4.6 CPU-s and 1.5 GB held in order against 10.5-10.7
# CPU-s and 0.21 GB streamed (330 MiB per batch, below this); the released model's (2,065 MiB per batch, 8
# bundled prompts) 3.9 GB (reference) and 3.7 GB (engine) in order against 2.1 and 1.5 GB streamed, at the same
# speed within the guest's noise, 1.9 GB of it the weights. Bit for bit the same dump either way.
STREAM_BYTES = 1 << 30


def streams_rows(graph) -> bool:
    """Does a dump of this graph stream each node's rows to the file as computed (see STREAM_BYTES)?"""
    return token_bytes(graph) * MAX_BATCH_TOKENS > STREAM_BYTES


def stream_batches(items, sink, run_into: Callable, batch_size: int, graph, max_batch_tokens: int = MAX_BATCH_TOKENS):
    """``Side.stream`` of a side whose forward runs batched_in_order's batches: the same batches (:func:`batch_plan`),
    ``run_into(batch_ids, put)`` running one and handing each value to ``put(b, name, value)`` (``b``: the prompt's
    place in the batch); here the values go on to ``sink`` (actdiff.sides.base.RowSink) by the prompt's place in
    ``items``, and each prompt is done once its batch has run."""
    items = list(items)
    lengths = [len(ids) for _, ids in items]
    for batch in batch_plan(lengths, batch_size, max_batch_tokens, window_tokens_for(graph)):
        run_into([items[i][1] for i in batch], lambda b, name, value, batch=batch: sink.put(batch[b], name, value))
        for i in batch:
            sink.done(i)


def batched_in_order(
    items: Iterable[tuple[str, list[int]]],
    run_batch: Callable[[list[list[int]]], list],
    batch_size: int = 1,
    max_batch_tokens: int = MAX_BATCH_TOKENS,
    window_tokens: int | None = None,
) -> Iterator[tuple[str, object]]:
    """Stream (prompt_id, run_batch's result for it) in the input order. With batch_size > 1, prompts are taken
    a window of WINDOW_BATCHES batches at a time and sorted by length inside the window, so a batch pads little
    (a shard's order is a hash order, lengths are random); memory is bounded by the window, not the corpus. A
    window also closes at ``window_tokens`` tokens (the side's window_tokens_for its graph; :func:`windows`)."""
    window: list[tuple[str, list[int]]] = []
    tokens = 0

    def flush() -> Iterator[tuple[str, object]]:
        results: dict[int, object] = {}
        for idx in length_sorted_batches([len(ids) for _, ids in window], batch_size, max_batch_tokens):
            for i, vals in zip(idx, run_batch([window[i][1] for i in idx]), strict=True):
                results[i] = vals
        for i, (pid, _) in enumerate(window):
            yield pid, results.pop(i)
        window.clear()

    for item in items:
        window.append(item)
        tokens += len(item[1])
        if _window_full(len(window), tokens, batch_size, window_tokens):
            yield from flush()
            tokens = 0
    if window:
        yield from flush()


def stack_rows(parts: list) -> np.ndarray:
    """``parts`` (arrays of one dtype and row shape) one after another along their first axis, as np.concatenate
    gives them; a read-only view of the memory they lie in where they lie there back to back: consecutive prompts'
    rows of a node read from a dump are slices of one read window (actdiff.h5io), which a statistics job stacked
    for every node of every group of prompts it replays (copying its dumps once more)."""
    at = _consecutive(parts) if len(parts) > 1 else None
    if at is None:
        return np.concatenate(parts)
    first, owner = parts[0], parts[0].base
    shape = (sum(len(p) for p in parts), *first.shape[1:])
    view = np.ndarray(shape, first.dtype, buffer=owner, offset=at - owner.__array_interface__["data"][0])
    view.flags.writeable = False
    return view


def _consecutive(parts: list) -> int | None:
    """The address of the first of ``parts`` where they are C-contiguous views of one C-contiguous array (their
    common ``base``, which owns the memory), of one dtype and row shape, lying back to back in order; else None.
    The cheap checks first: values made apart, as the propagation's, fail at the first part."""
    first = parts[0]
    owner = first.base if type(first) is np.ndarray else None
    if type(owner) is not np.ndarray or first.ndim == 0 or not owner.flags.c_contiguous:
        return None
    for p in parts:
        if (type(p) is not np.ndarray or p.base is not owner or p.dtype != first.dtype or p.shape[1:] != first.shape[1:]
                or not p.flags.c_contiguous):  # fmt: skip
            return None
    at = start = first.__array_interface__["data"][0]
    for p in parts:
        if p.__array_interface__["data"][0] != at:
            return None
        at += p.nbytes
    return start


def split_rows(y: np.ndarray, rows: list[int]) -> list[np.ndarray]:
    """``y``'s rows cut into consecutive parts of ``rows`` rows each (views; what np.split at the cumulative
    counts gives, without its per-call overhead)."""
    out, at = [], 0
    for n in rows:
        out.append(y[at : at + n])
        at += n
    return out
