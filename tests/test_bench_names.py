"""The bench scripts import each other by bare name (a script's own directory is first on sys.path), and the bench
tests put bench/ first on sys.path as well, so a bench script named like an installed module shadows that module
for everything imported after it. transformers 5.25 imports the PyPI package ``kernels`` (a dependency since
5.25) when it loads its models: bench/kernels.py, as the kernel benchmark was named, made every later test that
imports transformers fail to collect. No bench script may be named like a module the environment can import."""

from __future__ import annotations

import importlib.machinery
import sys
from pathlib import Path

from helpers import REPO


def _outside_the_repo_checkouts() -> list[str]:
    """sys.path without the entries the tests or scripts add: the repository root, bench/ and tests/."""
    ours = (REPO / "bench", REPO / "tests")
    kept = []
    for entry in sys.path:
        path = Path(entry or ".").resolve()
        if path == REPO or any(path == d or d in path.parents for d in ours):
            continue
        kept.append(entry)
    return kept


def test_no_bench_script_shadows_an_importable_module():
    path = _outside_the_repo_checkouts()
    scripts = sorted(p.stem for p in (REPO / "bench").glob("*.py"))
    assert "peak" in scripts, "bench/ moved: this test reads its scripts"
    shadowed = {}
    for name in scripts:
        if name in sys.stdlib_module_names or name in sys.builtin_module_names:
            shadowed[name] = "the standard library"
            continue
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None:
            shadowed[name] = spec.origin or "a namespace package"
    assert not shadowed, f"rename these bench scripts, they shadow installed modules: {shadowed}"
