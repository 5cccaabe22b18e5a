"""Progress of a per-prompt loop in a rule's log: prompts done of total with the rate, and NaN/Inf warnings."""

from __future__ import annotations

import logging
import time


class Progress:
    """``step(prompt_id, bad_nodes)`` once per prompt; every ``every`` prompts a line "label: done/total
    prompts (rate prompts/s)" goes to ``log``; prompts with NaN/Inf nodes are warned about and counted."""

    def __init__(self, log: logging.Logger, label: str, total: int, every: int = 100):
        self.log, self.label, self.total, self.every = log, label, total, every
        self.done = 0
        self.n_bad = 0
        self.t0 = time.perf_counter()

    def step(self, prompt_id: str, bad: list[str]) -> None:
        if bad:
            self.n_bad += 1
            self.log.warning("prompt %r: NaN/Inf in %s node(s) %s (recorded as is)", prompt_id, self.label, bad[:5])
        self.done += 1
        if self.done % self.every == 0:
            self.log.info("%s: %d/%d prompts (%.1f prompts/s)", self.label, self.done, self.total, self.rate)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    @property
    def rate(self) -> float:
        return self.done / max(self.seconds, 1e-9)
