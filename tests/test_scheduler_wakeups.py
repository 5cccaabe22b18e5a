"""Snakemake's scheduler keeps one pending rate-limit wakeup (actdiff.workflow_support.coalesce_scheduler_wakeups),
not one per job event: the chains of 1-second timers cost `make report`'s scheduler 72 CPU-s (bench/README.md)."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
from helpers import snakemake

from actdiff.workflow_support import coalesce_scheduler_wakeups

pytest.importorskip("snakemake.scheduling.job_scheduler")


def _patched_method():
    from snakemake.scheduling.job_scheduler import JobScheduler

    coalesce_scheduler_wakeups()
    method = JobScheduler._schedule_reevalutation
    assert getattr(method, "coalesced", False), "the scheduler's wakeup method was not replaced"
    assert coalesce_scheduler_wakeups() is False, "a second call must not wrap the patched method again"
    return method


def _released(sem: threading.Semaphore, within: float = 20.0) -> int:
    """How often ``sem`` was released once the first release came (waited for up to ``within`` seconds: a loaded
    machine may start a timer's thread late), counting what else arrives in the 0.3 s after it."""
    end = time.monotonic() + within
    while not sem.acquire(timeout=max(0.0, end - time.monotonic())):
        if time.monotonic() >= end:
            return 0
    time.sleep(0.3)
    n = 1
    while sem.acquire(blocking=False):
        n += 1
    return n


def test_many_requests_make_one_wakeup_and_the_next_pass_schedules_again():
    method = _patched_method()
    sched = SimpleNamespace(_open_jobs=threading.Semaphore(0))
    for _ in range(50):  # fifty passes of the loop within one timespan: the unpatched method starts fifty timers
        method(sched, 0.05)
    timers = [t for t in threading.enumerate() if isinstance(t, threading.Timer) and t.daemon]
    assert len(timers) == 1, f"{len(timers)} wakeup timers pending, expected 1"
    assert _released(sched._open_jobs) == 1, "the pending wakeup must release the loop exactly once"
    method(sched, 0.05)  # the pass that wakeup started schedules the next one
    assert _released(sched._open_jobs) == 1, "after a wakeup fired, the next request must schedule a new one"


_SNAKEFILE = """
import threading
{patch}
rule all:
    input: "timers.txt"
rule one:
    output: "out/{{i}}.txt"
    shell: "sleep 0.1; touch {{output}}"
rule count:  # run: executes in a thread of the scheduler's process (--force-use-threads), beside its timers
    input: expand("out/{{i}}.txt", i=range(40))
    output: "timers.txt"
    run:
        n = sum(isinstance(t, threading.Timer) for t in threading.enumerate())
        open(output[0], "w").write(str(n))
"""


def _timers_at_the_end(tmp_path, patched: bool) -> int:
    d = tmp_path / ("patched" if patched else "plain")
    d.mkdir()
    patch = "from actdiff.workflow_support import coalesce_scheduler_wakeups\ncoalesce_scheduler_wakeups()"
    (d / "Snakefile").write_text(_SNAKEFILE.format(patch=patch if patched else ""))
    p = snakemake(
        "--cores", "2", "--force-use-threads", "--directory", str(d), "--snakefile", str(d / "Snakefile"), timeout=300
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return int((d / "timers.txt").read_text())


def test_a_workflow_ends_with_at_most_one_pending_wakeup(tmp_path):
    """40 jobs on 2 cores: unpatched, each job event leaves a perpetual 1-second timer chain (tens pending at
    the end); patched, at most the one pending wakeup."""
    patched = _timers_at_the_end(tmp_path, patched=True)
    assert patched <= 1, f"{patched} wakeup timers pending in the scheduler's process, expected at most 1"
    plain = _timers_at_the_end(tmp_path, patched=False)
    if plain <= 1:
        pytest.skip(f"this Snakemake leaves {plain} timer(s) pending unpatched: it no longer multiplies wakeups")
    assert plain > 10, f"unpatched, {plain} timers pending after 40 jobs; the patch's premise is many"
