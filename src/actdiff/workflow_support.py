"""Glue for the Snakemake ``script:`` adapters: logging to the rule's log file, thread pinning, the heap policy
(actdiff.heap), and turning an ActdiffError into a clear one-paragraph message (no traceback) and exit status 1."""

from __future__ import annotations

import logging
import os
import re
import resource
import sys
import threading
import time

from .errors import ActdiffError
from .heap import reuse_freed_memory_for_job
from .warm import flush_streams, in_child


def setup_logging(log_path: str | None = None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w", encoding="utf-8"))
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers, force=True
    )


# what a job's libraries read their thread counts from: BLAS, OpenMP (torch), MKL, our kernels' pool
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "ACTDIFF_NUM_THREADS")


def set_thread_environment(env, n: int) -> None:
    """Set in ``env`` (a process's environment, or one to start a process with) what libraries loaded after it read
    their threads from: THREAD_VARS to ``n``, and OpenMP's idle workers passive unless ``env`` says otherwise
    (:func:`pin_threads`)."""
    for var in THREAD_VARS:
        env[var] = str(n)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def pin_threads(n: int) -> None:
    """Pin BLAS/OpenMP/torch threads and our C kernels' pool for this process to the rule's thread count. The
    environment variables reach libraries loaded later; numpy's BLAS is loaded already (the adapter imported
    actdiff), so it is limited through threadpoolctl: otherwise its idle threads spin against the other jobs'
    (a stats job ran 10x slower beside two busy cores). Our kernels' pool defaults to every online CPU: a
    statistics job's replays handed each small matmul to a second thread that the loaded machine had
    descheduled (ak_matmul 2.8 ms a call against 0.11 ms in one thread, tiny model under `make report`).
    Results do not depend on the thread count (kernels_c/README.md).

    OpenMP's idle workers (torch's and MKL's, GNU libgomp) sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``,
    unless the environment sets it; libgomp reads it when torch loads it, which no adapter has done by now): at
    each of a forward's many barriers a default worker spins up to 300k iterations for a partner that a loaded
    machine has descheduled. The reference dump of a MiniLM shard at 2 threads beside 3 busy processes on 2 cores
    (Zen 4): 10.0-10.2 CPU-s and 16.0-16.5 s spinning, 7.0-7.3 CPU-s and 13.2-14.2 s passive, 6.2-6.3 and 12.6-13.0 s
    at 1 thread; on the quiet machine 5.0-5.8 s spinning, 5.5-6.5 s passive, 6.0-7.1 s at 1 thread."""
    from threadpoolctl import threadpool_limits

    n = max(1, int(n))
    set_thread_environment(os.environ, n)
    threadpool_limits(limits=n)
    if "actdiff.kernels" in sys.modules:  # loaded already: its pool may have read the default; else the variable
        sys.modules["actdiff.kernels"].set_num_threads(min(n, 64))
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(n)
        torch.set_num_interop_threads(1) if torch.get_num_interop_threads() != 1 else None


def run(snakemake, func, **kwargs):
    """Call ``func(**kwargs)`` for a rule; log to the rule's log; clean error and exit 1 on ActdiffError. In a
    Snakemake script job (the adapter's last statement) the process then ends at once: :func:`end_script_job`."""
    log_path = str(snakemake.log[0]) if len(snakemake.log) else None
    setup_logging(log_path)
    pin_threads(snakemake.threads)
    reuse_freed_memory_for_job()  # freed blocks reused, none mapped afresh (actdiff.heap)
    log = logging.getLogger(f"actdiff.rule.{snakemake.rule}")
    where = " (in a fork of the run's warm process, actdiff.warm)" if in_child() else ""
    log.info("rule %s: wildcards %s, threads %d%s", snakemake.rule, dict(snakemake.wildcards), snakemake.threads, where)
    try:
        result = func(**kwargs)
    except ActdiffError as e:
        log.error("%s", e)
        print(f"\nactdiff error in rule {snakemake.rule}: {e}\n", file=sys.stderr)
        sys.exit(1)
    log.info("%s", job_cost_line(snakemake.rule))
    end_script_job()
    return result


def end_script_job() -> None:
    """End a finished Snakemake script job's process without the interpreter's teardown, when it is one.

    After its last statement a job's interpreter still deallocates every object and module and hands back every
    page it mapped: 60-80 ms a job on a gigabyte heap (compute_stats of the tiny model, Intel Xeon 6/207), between
    its outputs being written and Snakemake starting the next job on its core; over `make report`'s 163 jobs the
    cores stood idle for 11 s of the run's wall time (bench/README.md, "A job's process ends at its last
    write"). Everything the job promises is done by then: its outputs written and renamed into place by their
    context managers (actdiff.atomic), files closed. What the exit would still run is run here: the atexit
    handlers (logging.shutdown flushes and closes the rule's log; weakref.finalize removes temporary
    directories), every object frozen first (``gc.freeze``: the full collection IPython's exit handler asks for
    in a report, 0.08 s, then skips what the process's end frees anyway), then stdout and stderr are flushed.
    Only in a script job (Snakemake's preamble sets ``__real_file__`` in ``__main__``) whose threads have all
    finished; anywhere else (a test calling an adapter's ``run``, a worker thread still running) the process ends
    as usual."""
    import atexit
    import gc

    main = sys.modules.get("__main__")
    if main is None or not hasattr(main, "__real_file__"):
        return
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        return
    gc.freeze()  # an exit function's full collection (IPython's, in a report) need not visit what the exit frees
    atexit._run_exitfuncs()
    flush_streams()
    os._exit(0)


JOB_COST_PREFIX = "job cost:"


def job_cost_line(rule: str) -> str:
    """One parseable line of what this job cost (bench/report_time.py sums them per rule family): wall seconds
    since the process started (imports included; in a fork of the run's warm process, actdiff.warm: since the
    fork, the imports done there once and the job's own waiting process not counted), CPU seconds of this process
    and of the children it waited for (a report's Jupyter kernel, pandoc), and its peak RSS; then how much of that
    CPU was the kernel's (``sys_s``) and the minor page faults (``minflt``): pages the job touched for the first
    time, which on a guest that hands freed memory back to its host cost far more system time than anywhere else
    (bench/README.md, "Where a report's CPU and system time go on this guest"). Snakemake's own benchmark samples
    CPU time every few seconds and misses most of a short job's."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
    return (
        f"{JOB_COST_PREFIX} rule={rule} wall_s={_process_age_s():.2f} cpu_s={cpu:.2f} "
        f"max_rss_mb={own.ru_maxrss / 1024:.0f} children_max_rss_mb={kids.ru_maxrss / 1024:.0f} "
        f"sys_s={own.ru_stime + kids.ru_stime:.2f} minflt={own.ru_minflt + kids.ru_minflt}"
    )


_JOB_COST_RE = re.compile(
    re.escape(JOB_COST_PREFIX) + r" rule=(\S+) wall_s=([0-9.]+) cpu_s=([0-9.]+) max_rss_mb=([0-9]+)"
    r"(?: children_max_rss_mb=([0-9]+))?(?: sys_s=([0-9.]+) minflt=([0-9]+))?"
)


def parse_job_cost(text: str) -> dict | None:
    """The last :func:`job_cost_line` in a log's ``text`` as {rule, wall_s, cpu_s, max_rss_mb,
    children_max_rss_mb, sys_s, minflt} (the last two None in a line from before they were logged), or None when
    the log has none (the job failed, or ran before the line existed).
    Benchmarks read a job's cost here: Snakemake's ``benchmark:`` directive, which sampled every job's processes
    from the scheduler every 0.5 s, was dropped (it cost the scheduler's
    process about 0.2 CPU-s a job: 142 -> 96 CPU-s over `make report`, bench/README.md)."""
    hits = list(_JOB_COST_RE.finditer(text))
    if not hits:
        return None
    m = hits[-1]
    kids = int(m[5]) if m[5] is not None else 0
    return {"rule": m[1], "wall_s": float(m[2]), "cpu_s": float(m[3]), "max_rss_mb": int(m[4]),
            "children_max_rss_mb": kids, "sys_s": float(m[6]) if m[6] is not None else None,
            "minflt": int(m[7]) if m[7] is not None else None}  # fmt: skip


def _process_age_s() -> float:
    """Seconds since this process started (/proc/self/stat's start time; the monotonic clock since the module
    import elsewhere)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED_AT


_IMPORTED_AT = time.monotonic()


def coalesce_scheduler_wakeups() -> bool:
    """Make Snakemake's local scheduler keep at most one pending rate-limit wakeup; returns whether it patched.

    Snakemake (8.17 to at least 9.27) ends every pass of its scheduling loop with a 1-second ``threading.Timer``
    that wakes the loop again (so that jobs its ``--max-jobs-per-timespan`` limiter held back are reconsidered),
    whatever woke the loop. A pass woken by a job's end therefore starts a chain of timers that lasts the whole
    run, and the chains add up: after N job events N timers each wake the loop every second, a new thread and a
    pass over every ready job's inputs each time. Over `make report` (163 jobs) the scheduler's own process
    used 72 CPU-s, growing from 0.02 to 0.25 CPU-s per second of run, which the jobs on 2 cores lose
    (bench/README.md, "Snakemake's scheduler woke once per second per finished job"). With one pending wakeup
    the loop still runs at least once per timespan while it waits, which is all the limiter needs. The timer is
    a daemon: a run no longer waits for the last one at exit. A Snakemake without the method, or whose
    scheduler lacks the semaphore the timer releases, is left as it is."""
    try:
        from snakemake.scheduling.job_scheduler import JobScheduler
    except ImportError:
        return False
    original = getattr(JobScheduler, "_schedule_reevalutation", None)
    if original is None or getattr(original, "coalesced", False):
        return False

    def schedule_reevaluation(self, delay) -> None:
        if not hasattr(self, "_open_jobs"):
            return original(self, delay)
        if getattr(self, "_wakeup_pending", False):  # the pending wakeup re-runs the loop within ``delay``
            return None

        def wake() -> None:
            self._wakeup_pending = False  # first: the pass this release starts schedules the next one
            self._open_jobs.release()

        self._wakeup_pending = True
        timer = threading.Timer(delay, wake)
        timer.daemon = True
        timer.start()
        return None

    schedule_reevaluation.coalesced = True
    JobScheduler._schedule_reevalutation = schedule_reevaluation
    return True
