"""The vocabulary of explanations: what the diagnosis found at a node, and the one rule for "it explains".

An explanation is a function that, run on the SAME inputs as the engine's op, reproduces the engine's output.
Catalogue entries (actdiff/data/hypotheses.yaml) are looked up; the search (actdiff.compare.search) fits
continuous parameters, tries structural alternatives generated from the op's definition, inserts reduced
precision at intermediate steps, and recovers linear parameters from the data. All of them report a
:class:`Finding`, judged by :func:`explains` against the same baseline (the spec op's own error).

Error measure (shared with actdiff.compare.hypotheses): relative L2 over the sample,
``sqrt(sum ||target - h||^2) / sqrt(sum ||spec||^2)`` with the SAME denominator for the baseline and every
candidate, so residuals are directly comparable.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import numpy as np

RESIDUAL_FRACTION = 0.05  # an explaining candidate may leave at most this fraction of err0 (or the budget)
MIN_IMPROVEMENT = 10.0  # ... and must reduce the error at least this many times

KINDS = ("catalogue", "fit", "structure", "precision", "recovered")


def explains(err: float, err0: float, budget: float) -> bool:
    """A candidate explains the engine if what it leaves is the engine's own noise (within the node's budget,
    or 5% of the divergence when reduced-precision noise alone exceeds the fp32-sized budget) AND it removes at
    least 90% of the divergence (a wrong candidate moving in the right direction improves by order one, never
    by ten). The derivation is in actdiff.compare.hypotheses' module docstring."""
    return err <= max(budget, RESIDUAL_FRACTION * err0) and err < err0 / MIN_IMPROVEMENT


@dataclass(frozen=True)
class Finding:
    """One candidate explanation of a node, with its residual."""

    kind: str  # one of KINDS
    name: str  # stable identifier, e.g. "ROPE.base", "SOFTMAX.axis=tokens", "MATMUL.weight<-encoder.layers.1..."
    says: str  # one plain-words sentence WITH its numbers: "rotary base fitted 4,980 (spec 10,000)"
    error: float  # residual (relative L2 over the sample, same denominator as the baseline)
    params: dict = field(default_factory=dict)  # JSON-safe: what differs from the spec (values, tensors, axes)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SearchResult:
    """Everything the search did at one node: what it tried, how long, and what it found (best first)."""

    node: str
    op: str
    baseline_error: float  # the spec op's own error against the target, over the sample
    budget: float
    prompts: int  # prompts in the sample
    rows: int  # rows (tokens) in the sample
    tried: int = 0  # candidates evaluated
    seconds: float = 0.0
    timed_out: bool = False
    findings: list[Finding] = field(default_factory=list)

    @property
    def best(self) -> Finding | None:
        return min(self.findings, key=lambda f: f.error) if self.findings else None

    @property
    def explained_by(self) -> Finding | None:
        b = self.best
        return b if b is not None and explains(b.error, self.baseline_error, self.budget) else None


def cpu_seconds() -> float:
    """CPU seconds the calling thread has used (user + system): the search's clock. The thread's, not the
    process's: another library's idle worker threads (OpenBLAS, ONNX Runtime) spin between calls and would spend
    the budget while the search waits; the statistics job runs its numpy and C kernels on this one thread."""
    return time.thread_time()


class Deadline:
    """A budget of this process's CPU seconds shared by every searcher of a shard. CPU time, not wall time: on a
    loaded machine (a workflow's other jobs, a CI beside it) a wall-clock budget bought a fraction of the work,
    and the same dumps got another diagnosis (the fast diagnosis bench caught 2 of 5 bugs at load 12-17 on 2
    cores, 4 of 5 at load 3). The statistics job runs single-threaded, so a CPU second is a core second."""

    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self.start = cpu_seconds()

    def spent(self) -> float:
        return cpu_seconds() - self.start

    def left(self) -> float:
        return self.seconds - self.spent()

    def expired(self) -> bool:
        return self.left() <= 0

    @contextmanager
    def capped(self, seconds: float):
        """Within the block, at most ``seconds`` more (every context sharing this deadline sees the cap)."""
        saved = self.seconds
        self.seconds = min(saved, self.spent() + seconds)
        try:
            yield self
        finally:
            self.seconds = saved


def sample_error(targets: list[np.ndarray], preds: list[np.ndarray], denom: float) -> float:
    """Relative L2 of ``preds`` against ``targets`` over every prompt of the sample (float64)."""
    num = 0.0
    for t, p in zip(targets, preds, strict=True):
        if np.shape(t) != np.shape(p):
            return math.inf
        d = np.atleast_1d(np.asarray(t, np.float64) - np.asarray(p, np.float64))  # a new array: squared in place
        num += float(np.sum(np.multiply(d, d, out=d)))  # (the same values as d * d, summed alike)
    if not math.isfinite(num):
        return math.inf
    if denom > 0:
        return math.sqrt(num) / denom
    return 0.0 if num == 0.0 else math.inf
