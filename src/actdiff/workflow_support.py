"""Glue for the Snakemake ``script:`` adapters: logging to the rule's log file, thread pinning, and
turning an ActdiffError into a clear one-paragraph message (no traceback) and exit status 1."""

from __future__ import annotations

import logging
import os
import resource
import sys
import time

from .errors import ActdiffError


def setup_logging(log_path: str | None = None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w", encoding="utf-8"))
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers, force=True
    )


def pin_threads(n: int) -> None:
    """Pin BLAS/OpenMP/torch threads and our C kernels' pool for this process to the rule's thread count. The
    environment variables reach libraries loaded later; numpy's BLAS is loaded already (the adapter imported
    actdiff), so it is limited through threadpoolctl: otherwise its idle threads spin against the other jobs'
    (a stats job ran 10x slower beside two busy cores). Our kernels' pool defaults to every online CPU: a
    statistics job's replays handed each small matmul to a second thread that the loaded machine had
    descheduled (ak_matmul 2.8 ms a call against 0.11 ms in one thread, tiny model under `make report`).
    Results do not depend on the thread count (kernels_c/README.md)."""
    from threadpoolctl import threadpool_limits

    n = max(1, int(n))
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "ACTDIFF_NUM_THREADS"):
        os.environ[var] = str(n)
    threadpool_limits(limits=n)
    if "actdiff.kernels" in sys.modules:  # loaded already: its pool may have read the default; else the variable
        sys.modules["actdiff.kernels"].set_num_threads(min(n, 64))
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(n)
        torch.set_num_interop_threads(1) if torch.get_num_interop_threads() != 1 else None


def run(snakemake, func, **kwargs):
    """Call ``func(**kwargs)`` for a rule; log to the rule's log; clean error and exit 1 on ActdiffError."""
    log_path = str(snakemake.log[0]) if len(snakemake.log) else None
    setup_logging(log_path)
    pin_threads(snakemake.threads)
    log = logging.getLogger(f"actdiff.rule.{snakemake.rule}")
    log.info("rule %s: wildcards %s, threads %d", snakemake.rule, dict(snakemake.wildcards), snakemake.threads)
    try:
        result = func(**kwargs)
    except ActdiffError as e:
        log.error("%s", e)
        print(f"\nactdiff error in rule {snakemake.rule}: {e}\n", file=sys.stderr)
        sys.exit(1)
    log.info("%s", job_cost_line(snakemake.rule))
    return result


JOB_COST_PREFIX = "job cost:"


def job_cost_line(rule: str) -> str:
    """One parseable line of what this job cost (bench/report_time.py sums them per rule family): wall seconds
    since the process started (imports included), CPU seconds of this process and of the children it waited
    for (a report's Jupyter kernel, pandoc), and its peak RSS. Snakemake's own benchmark samples CPU time every
    few seconds and misses most of a short job's."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
    return (
        f"{JOB_COST_PREFIX} rule={rule} wall_s={_process_age_s():.2f} cpu_s={cpu:.2f} "
        f"max_rss_mb={own.ru_maxrss / 1024:.0f} children_max_rss_mb={kids.ru_maxrss / 1024:.0f}"
    )


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
