"""Resumption after SIGKILL: kill the whole Snakemake process group while one shard is done and another is
running, rerun, and check that finished shards are not recomputed, that no partial file survives, and that
the final statistics equal an uninterrupted run's.

The workflow is the tiny model at fp32 over the 47 CI prompts in 4 shards, with temp() dumps (the default
keep_activations: false), so the test also covers temp() files of killed and finished shards.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import yaml
from helpers import BIN, DATA, REPO, ensure_tiny_model, snakemake

SHARDS = 4
MODEL = "tiny-nomic-moe"


def _config(tmp_path: Path, name: str) -> tuple[Path, Path]:
    results = tmp_path / name
    cfg = {
        "prompts": str(DATA / "ci_prompts.tsv"),
        "results": str(results),
        "shards": SHARDS,
        "models": {MODEL: {"source": {"generate": MODEL, "seed": 0}, "max_length": 512, "batch_size": 4}},
        "reference": {"impl": "actdiff", "threads": 1},
        "variants": ["fp32"],
        "engines": ["actdiff"],
        "engine_threads": 1,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, results


def _targets(results: Path) -> list[str]:
    # statistics and their aggregate: the reports are not what this test is about
    return [str(results / MODEL / "actdiff/fp32/summary/verdict.json")]


def _finished_stats_shards(log_text: str) -> list[int]:
    """Shards whose compute_stats job Snakemake reports finished. Files on disk are not enough: a job that
    has renamed its outputs but not yet exited is still incomplete to Snakemake, and rightly rerun."""
    shard_of_job = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", log_text):
        m = re.match(r"(?:local)?rule compute_stats:", block)
        job = re.search(r"jobid: (\d+)", block)
        wc = re.search(r"wildcards: [^\n]*shard=(\d+)", block)
        if m and job and wc:
            shard_of_job[job.group(1)] = int(wc.group(1))
    return sorted({shard_of_job[j] for j in re.findall(r"Finished jobid: (\d+)", log_text) if j in shard_of_job})


def _running_python_jobs(pid: int) -> list[str] | None:
    """Command lines of the live python jobs under ``pid``; None once ``pid`` itself is gone.

    Jobs start and exit while we look: a child that exits, turns zombie or becomes unreadable between
    ``children()`` and ``cmdline()`` is simply not running any more, so it is left out, never an error."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    running = []
    for c in children:
        try:
            if c.status() == psutil.STATUS_ZOMBIE or "python" not in c.name():
                continue
            running.append(" ".join(c.cmdline())[-120:])
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
    return running


def _tables(results: Path) -> dict[str, pd.DataFrame]:
    out = {}
    for p in sorted((results / MODEL / "actdiff/fp32").glob("**/*.parquet")):
        out[str(p.relative_to(results))] = pd.read_parquet(p)
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    ensure_tiny_model()
    tmp = tmp_path_factory.mktemp("resume")
    cfg, results = _config(tmp, "whole")
    p = snakemake(*_targets(results), "--cores", "2", "--configfile", str(cfg))
    assert p.returncode == 0, p.stderr[-4000:]
    return results


def test_sigkill_then_rerun_recomputes_only_unfinished_shards(tmp_path, uninterrupted):
    cfg, results = _config(tmp_path, "killed")
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}")
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "snakemake"), *_targets(results), "--cores", "2", "--configfile", str(cfg)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, so killpg reaches every job it started
    )
    deadline = time.monotonic() + 600
    killed_while = None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            done = _finished_stats_shards((tmp_path / "killed.log").read_text())
            jobs = _running_python_jobs(proc.pid)
            if jobs is None:
                break
            if done and len(done) < SHARDS and jobs:
                killed_while = (done, jobs)
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None and killed_while is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    assert killed_while is not None, "the run finished or stalled before a shard was done: nothing was killed"
    done, running = killed_while
    assert proc.returncode == -signal.SIGKILL
    # nothing half-written under a final name: every .h5 and .parquet present opens
    for p in list(results.rglob("*.h5")) + list(results.rglob("*.parquet")):
        if p.name.endswith(".parquet"):
            pd.read_parquet(p)
        else:
            import h5py

            with h5py.File(p, "r") as f:
                assert "token_offsets" in f, p
    mtimes = {
        p: p.stat().st_mtime_ns
        for s in done
        for p in [
            *(results / MODEL / "actdiff/fp32/stats" / f"shard-{s}").glob("*.parquet"),
            results / MODEL / "tokens" / f"shard-{s}.parquet",
        ]
    }
    # a SIGKILLed Snakemake leaves its lock behind; --unlock is the documented first step (README)
    assert snakemake("--configfile", str(cfg), "--unlock").returncode == 0
    p = snakemake(*_targets(results), "--cores", "2", "--configfile", str(cfg))
    assert p.returncode == 0, p.stderr[-4000:]
    changed = [str(k) for k, v in mtimes.items() if k.stat().st_mtime_ns != v]
    assert not changed, f"finished shards {done} were recomputed: {changed} (jobs running at the kill: {running})"
    rerun = {int(m) for m in re.findall(r"wildcards: [^\n]*shard=(\d+)", p.stdout + p.stderr)}
    assert rerun and not rerun & set(done), f"the rerun ran jobs of shards {sorted(rerun)}; {done} were finished"
    # no leftover temporaries of the killed jobs
    assert not [str(x) for x in results.rglob(".*.tmp-*")]
    # temp() dumps: Snakemake removes them after their last consumer finishes, in the main process. A kill in
    # between (more likely on a loaded machine) leaves the dumps of a shard whose statistics are complete, which
    # no rerun reads again; only such shards may keep them, and --delete-temp-output (README) removes them
    kept = {int(re.search(r"shard-(\d+)", x.name).group(1)) for x in results.rglob("*.h5")}
    assert not kept & rerun, f"shards {sorted(kept & rerun)} were recomputed yet kept their temp() dumps"
    if kept:
        q = snakemake(*_targets(results), "--cores", "1", "--configfile", str(cfg), "--delete-temp-output")
        assert q.returncode == 0 and not list(results.rglob("*.h5")), q.stderr[-2000:]
        q = snakemake(*_targets(results), "--cores", "1", "--configfile", str(cfg), "--dry-run")
        assert "Nothing to be done" in q.stdout + q.stderr, "deleting leftover dumps must not trigger a rerun"
    whole, resumed = _tables(uninterrupted), _tables(results)
    assert sorted(whole) == sorted(resumed)
    for name, df in whole.items():
        pd.testing.assert_frame_equal(resumed[name], df, check_exact=True, obj=name)
