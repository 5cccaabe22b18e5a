"""Length-sorted, padded batches of prompts, results in the input order: one policy for every side that runs
batches (the reference, ``actdiff.reference.ReferenceRunner.run``, and the engine, ``actdiff.sides.engine``),
so both see the same batches of the same prompts. No torch here."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

MAX_BATCH_TOKENS = 2048  # padded tokens per batch: memory per batch is bounded, not per prompt count
WINDOW_BATCHES = 8  # prompts are length-sorted within a window of this many batches


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


def batched_in_order(
    items: Iterable[tuple[str, list[int]]],
    run_batch: Callable[[list[list[int]]], list],
    batch_size: int = 1,
    max_batch_tokens: int = MAX_BATCH_TOKENS,
) -> Iterator[tuple[str, object]]:
    """Stream (prompt_id, run_batch's result for it) in the input order. With batch_size > 1, prompts are taken
    a window of WINDOW_BATCHES batches at a time and sorted by length inside the window, so a batch pads little
    (a shard's order is a hash order, lengths are random); memory is bounded by the window, not the corpus."""
    window: list[tuple[str, list[int]]] = []
    window_size = batch_size * WINDOW_BATCHES if batch_size > 1 else 1

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
        if len(window) >= window_size:
            yield from flush()
    if window:
        yield from flush()
