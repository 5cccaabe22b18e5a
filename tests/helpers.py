"""Paths and subprocess helpers shared by the tests (imported as `helpers`; tests/ is on sys.path)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
BIN = Path(sys.executable).parent


def run_cmd(args: list[str], cwd: Path = REPO, timeout: float = 1200, env: dict | None = None):
    e = dict(os.environ)
    e["PATH"] = f"{BIN}:{e.get('PATH', '')}"
    if env:
        e.update(env)
    return subprocess.run(args, cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)


def snakemake(*args: str, timeout: float = 1800):
    return run_cmd([str(BIN / "snakemake"), *args], timeout=timeout)
