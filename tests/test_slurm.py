"""The workflow through a real single-node SLURM cluster (tools/slurm-local.sh, workflow/profiles/slurm) gives
the same statistics as a plain local run (docs/cluster.md).

Needs root and apt-get (or SLURM and munge already installed): otherwise the test is skipped, unless
ACTDIFF_REQUIRE_SLURM=1 makes that a failure. Runs config/slurm-test.yaml (the generated tiny model, fp32 and
fp32+fault=causal_mask, 40 prompts, two shards) up to the summaries (summary/verdict.json and
summary/weights.parquet of both variants: every rule but render_report and render_index), once through SLURM
and once with `snakemake --cores 2`, each into its own temporary results directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import BIN, DATA, REPO, ensure_tiny_model, run_cmd, snakemake

SCRIPT = REPO / "tools/slurm-local.sh"
PROFILE = REPO / "workflow/profiles/slurm"
CONFIG = "config/slurm-test.yaml"
MODEL = "tiny-nomic-moe"
VARIANTS = ("fp32", "fp32+fault=causal_mask")
N_PROMPTS = 40
MARKER = "# written by actdiff tools/slurm-local.sh"

pytestmark = pytest.mark.slow

# Provenance that legitimately differs between two runs of the same inputs. Measured: every Parquet table and
# JSON summary of the two runs is byte-identical (they record no host, time, path or duration), so nothing is
# excluded there; the only difference is the creation time that every HDF5 dump carries as a root attribute.
PARQUET_PROVENANCE_COLUMNS: frozenset[str] = frozenset()
JSON_PROVENANCE_KEYS: frozenset[str] = frozenset()
H5_PROVENANCE_ATTRS = frozenset({"created_unix"})


def _unavailable(reason: str):
    if os.environ.get("ACTDIFF_REQUIRE_SLURM") == "1":
        pytest.fail(f"ACTDIFF_REQUIRE_SLURM=1 but {reason}")
    pytest.skip(reason)


def _script(cmd: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), cmd], capture_output=True, text=True, timeout=timeout)


def _pids() -> dict[str, str]:
    return {f: Path(f).read_text().strip() for f in ("/run/slurmctld.pid", "/run/slurmd.pid") if Path(f).exists()}


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running single-node SLURM; stopped at the end only if this fixture started it."""
    import importlib.util

    # a missing plugin is a broken install (a pyproject dependency), not a machine without SLURM: fail
    assert importlib.util.find_spec("snakemake_executor_plugin_slurm"), (
        "snakemake-executor-plugin-slurm is not installed: pip install -e '.[test]'"
    )
    if os.geteuid() != 0:
        _unavailable("starting a local SLURM needs root")
    installed = all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged"))
    if not installed and not shutil.which("apt-get"):
        _unavailable("SLURM is not installed and apt-get is not available to install it")
    conf = Path("/etc/slurm/slurm.conf")
    if conf.exists() and MARKER not in conf.read_text():
        _unavailable(f"{conf} belongs to another SLURM setup (not written by tools/slurm-local.sh)")
    was_running = _script("status").returncode == 0
    p = _script("start")
    assert p.returncode == 0, f"tools/slurm-local.sh start failed:\n{p.stdout}\n{p.stderr}"
    # starting again is a no-op: same daemons, still up
    pids = _pids()
    p = _script("start")
    assert p.returncode == 0 and _pids() == pids, f"second start was not idempotent:\n{p.stdout}\n{p.stderr}"
    yield
    if not was_running:
        p = _script("stop")
        assert p.returncode == 0, p.stderr


def _targets(results: Path) -> list[str]:
    return [
        str(results / MODEL / "actdiff" / v / "summary" / f)
        for v in VARIANTS
        for f in ("verdict.json", "weights.parquet")
    ]


def _run(results: Path, prompts: Path, *extra: str) -> subprocess.CompletedProcess:
    p = snakemake(
        *extra,
        "--configfile",
        CONFIG,
        "--config",
        f"prompts={prompts}",
        f"results={results}",
        "--",
        *_targets(results),
        timeout=1200,
    )
    assert p.returncode == 0, f"snakemake failed:\n{p.stdout[-4000:]}\n{p.stderr[-8000:]}"
    return p


@pytest.fixture(scope="session")
def two_runs(slurm_cluster, tmp_path_factory):
    """(slurm results, local results, slurm run, slurm log dir) of the same config."""
    ensure_tiny_model()
    tmp = tmp_path_factory.mktemp("slurm")
    lines = (DATA / "ci_prompts.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    prompts = tmp / "prompts.tsv"
    prompts.write_text("".join(lines[: N_PROMPTS + 1]), encoding="utf-8")  # header + 40 prompts
    slurm_logs = tmp / "slurm_logs"
    slurm_res, local_res = tmp / "results-slurm", tmp / "results-local"
    # the local run goes on beside the SLURM run, which waits on status queries most of its time (measured: the
    # SLURM run 110 s of which its jobs 45 s, the local run 30 s; this fixture 138 s -> 122 s); their outputs
    # do not overlap, so Snakemake's locks let both run in this working directory
    with ThreadPoolExecutor(1) as pool:
        local = pool.submit(_run, local_res, prompts, "--cores", "2")
        p_slurm = _slurm_run(slurm_res, prompts, slurm_logs)
        local.result()
    return slurm_res, local_res, p_slurm, slurm_logs


def _slurm_run(slurm_res: Path, prompts: Path, slurm_logs: Path) -> subprocess.CompletedProcess:
    return _run(
        slurm_res,
        prompts,
        "--workflow-profile",
        str(PROFILE.relative_to(REPO)),
        # no slurmdbd here: sacct cannot answer and the default status polling would wait forever
        "--slurm-status-command",
        "squeue",
        "--slurm-no-account",
        "--jobs",
        "4",
        "--latency-wait",
        "10",
        # poll every few seconds instead of 40 s (the test's jobs last seconds)
        "--slurm-init-seconds-before-status-checks",
        "3",
        "--slurm-logdir",
        str(slurm_logs),
        "--slurm-keep-successful-logs",
        "--retries",
        "0",
    )


def test_profile_names():
    """profile.yaml is the file; config.yaml (read by Snakemake 8 and 9) is the same file; Snakemake 9.x picks
    one of them for --workflow-profile workflow/profiles/slurm."""
    from snakemake.cli import get_profile_dir

    assert (PROFILE / "profile.yaml").is_file() and not (PROFILE / "profile.yaml").is_symlink()
    assert (PROFILE / "config.yaml").samefile(PROFILE / "profile.yaml")
    d, f = get_profile_dir(str(PROFILE))
    assert f.name in ("profile.yaml", "config.yaml") and f.samefile(PROFILE / "profile.yaml")


def test_jobs_went_through_slurm(two_runs):
    _, _, p, slurm_logs = two_runs
    out = p.stdout + p.stderr
    assert "Using workflow specific profile workflow/profiles/slurm" in out
    ids = re.findall(r"has been submitted with SLURM jobid (\d+)", out)
    # resolve_model, split_prompts, 2 tokenize, 2 dump_reference, 2 reference_noise, 4 dump_engine,
    # 4 compute_stats, 2 aggregate_stats, 2 parity
    assert len(ids) == 20, out[-3000:]
    # finished jobs stay in squeue for MinJobAge (600 s in the local cluster's slurm.conf)
    q = run_cmd(["squeue", "--states=all", "--noheader", "--format=%i|%T", "--jobs", ",".join(ids)])
    states = dict(line.split("|") for line in q.stdout.split())
    assert states == dict.fromkeys(ids, "COMPLETED"), q.stdout + q.stderr
    rules = {d.name for d in slurm_logs.iterdir()}
    assert rules == {
        f"rule_{r}"
        for r in (
            "resolve_model",
            "split_prompts",
            "tokenize",
            "dump_reference",
            "dump_engine",
            "reference_noise",
            "compute_stats",
            "aggregate_stats",
            "parity",
        )
    }
    # every job ran the venv's Python: the batch script is `<sys.executable of snakemake> -m snakemake ...`
    for i in ids:
        script = run_cmd(["scontrol", "write", "batch_script", i, "-"]).stdout
        assert f"\n{BIN}/python" in script, script[:1000]
    log = next(slurm_logs.glob("rule_tokenize/*/*.log")).read_text()
    assert "1 of 1 steps (100%) done" in log, log[-2000:]


def _relpaths(root: Path, patterns: tuple[str, ...]) -> list[Path]:
    return sorted(p.relative_to(root) for pat in patterns for p in root.glob(pat))


def test_statistics_equal_local(two_runs):
    import pandas as pd
    import pyarrow.parquet as pq

    from actdiff.tables import SHARD_TABLES, SUMMARY_TABLES

    slurm_res, local_res, _, _ = two_runs
    pats = (f"{MODEL}/actdiff/*/stats/shard-*/*.parquet", f"{MODEL}/actdiff/*/summary/*.parquet")
    files = _relpaths(local_res, pats)
    assert files == _relpaths(slurm_res, pats)
    # 2 variants x (2 shards x every shard table + every summary table, weight parity included)
    assert len(files) == 2 * (2 * len(SHARD_TABLES) + len(SUMMARY_TABLES)), files
    for rel in files:
        a, b = pq.read_table(local_res / rel), pq.read_table(slurm_res / rel)
        assert a.schema.equals(b.schema, check_metadata=True), rel
        da = a.to_pandas().drop(columns=list(PARQUET_PROVENANCE_COLUMNS & set(a.column_names)))
        db = b.to_pandas().drop(columns=list(PARQUET_PROVENANCE_COLUMNS & set(b.column_names)))
        pd.testing.assert_frame_equal(da, db, check_exact=True, obj=str(rel))
    for rel in _relpaths(local_res, (f"{MODEL}/actdiff/*/summary/*.json",)):
        ja, jb = (json.loads((r / rel).read_text()) for r in (local_res, slurm_res))
        for k in JSON_PROVENANCE_KEYS:
            ja.pop(k, None), jb.pop(k, None)
        assert ja == jb, rel
    verdict = json.loads((slurm_res / MODEL / "actdiff/fp32/summary/verdict.json").read_text())
    assert verdict["prompts"] == N_PROMPTS and verdict["status"] == "pass"


def test_dumps_equal_local(two_runs):
    """The HDF5 dumps hold the same values; only their creation time differs."""
    import h5py
    import numpy as np

    slurm_res, local_res, _, _ = two_runs
    files = _relpaths(local_res, (f"{MODEL}/*/*/activations/shard-*.h5",))
    assert len(files) == 2 + 2 * 2, files  # reference fp32 + both engine variants, two shards each
    for rel in files:
        with h5py.File(local_res / rel) as a, h5py.File(slurm_res / rel) as b:
            attrs_a = {k: str(v) for k, v in a.attrs.items() if k not in H5_PROVENANCE_ATTRS}
            attrs_b = {k: str(v) for k, v in b.attrs.items() if k not in H5_PROVENANCE_ATTRS}
            assert attrs_a == attrs_b, rel
            names: list[str] = []
            a.visit(names.append)
            names = [n for n in names if isinstance(a[n], h5py.Dataset)]
            assert names, rel
            for n in names:
                assert n in b, (rel, n)
                assert np.array_equal(a[n][()], b[n][()], equal_nan=a[n].dtype.kind == "f"), (rel, n)
