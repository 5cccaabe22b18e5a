"""Embedding-level agreement: per-prompt cosine, and on a fixed, bounded sample of the corpus the overlap
of each prompt's top-10 nearest neighbours and the rank correlation of the two similarity matrices.

The sample is the ``size`` prompts with the smallest sha256(prompt_id): fixed for a corpus, independent of
sharding and row order, and bounded, so memory never grows with the corpus.
"""

from __future__ import annotations

import hashlib
import heapq
import math

import numpy as np


def sample_key(prompt_id: str) -> int:
    return int.from_bytes(hashlib.sha256(prompt_id.encode()).digest()[:8], "big")


class BoundedSample:
    """Keeps the ``size`` items with the smallest sample key (a max-heap on the key)."""

    def __init__(self, size: int):
        self.size = size
        self._heap: list[tuple[int, str, np.ndarray, np.ndarray]] = []

    def offer(self, prompt_id: str, ref: np.ndarray, eng: np.ndarray) -> None:
        key = -sample_key(prompt_id)
        item = (key, prompt_id, np.asarray(ref, np.float32), np.asarray(eng, np.float32))
        if len(self._heap) < self.size:
            heapq.heappush(self._heap, item)
        elif key > self._heap[0][0]:
            heapq.heapreplace(self._heap, item)

    def items(self) -> list[tuple[str, np.ndarray, np.ndarray]]:
        return [(p, r, e) for _, p, r, e in sorted(self._heap, key=lambda t: -t[0])]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return math.nan  # not measurable: a NaN/Inf embedding is reported as such, never as a cosine of 0
    na, nb = np.sqrt(np.sum(a * a)), np.sqrt(np.sum(b * b))
    return float(np.sum(a * b) / (na * nb)) if na > 0 and nb > 0 else 0.0


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


def neighbour_overlap(ref: np.ndarray, eng: np.ndarray, k: int = 10) -> np.ndarray:
    """Per prompt: |top-k neighbours under ref ∩ under eng| / k (cosine similarity, self excluded)."""
    n = ref.shape[0]
    if n < 2:
        return np.ones(n)
    k = min(k, n - 1)
    out = np.empty(n)
    sr, se = _unit(ref) @ _unit(ref).T, _unit(eng) @ _unit(eng).T
    np.fill_diagonal(sr, -np.inf)
    np.fill_diagonal(se, -np.inf)
    nr = np.argsort(-sr, axis=1, kind="stable")[:, :k]
    ne = np.argsort(-se, axis=1, kind="stable")[:, :k]
    for i in range(n):
        out[i] = len(set(nr[i]) & set(ne[i])) / k
    return out


def similarity_rank_correlation(ref: np.ndarray, eng: np.ndarray) -> float:
    """Spearman correlation between the upper triangles of the two cosine-similarity matrices: the Pearson
    correlation of their ranks, ties given their average rank (as scipy.stats.spearmanr, whose import was a
    third of an aggregation job's CPU time). NaN when either triangle is constant or holds a NaN (an engine's
    non-finite embedding: scipy propagates it too)."""
    n = ref.shape[0]
    if n < 3:
        return 1.0
    iu = np.triu_indices(n, 1)
    sr, se = (_unit(ref) @ _unit(ref).T)[iu], (_unit(eng) @ _unit(eng).T)[iu]
    if np.isnan(sr).any() or np.isnan(se).any():
        return math.nan
    a, b = average_ranks(sr), average_ranks(se)
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / den if den > 0 else math.nan


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``, tied values all given the mean of the ranks they span."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])  # first position of each run of equal values
    counts = np.diff(np.r_[starts, len(x)])
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(starts + (counts + 1) / 2.0, counts)
    return ranks
