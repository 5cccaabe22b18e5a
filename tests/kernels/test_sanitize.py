"""Run the Python op suite once against an AddressSanitizer/UBSan build of the kernels.

Opt-in (it compiles the library again and runs slowly): `pytest tests/kernels/test_sanitize.py
--run-sanitize`, `ACTDIFF_RUN_SANITIZE=1`, or `make -C kernels_c test-python-sanitize`.
The standalone cffi module is built with -fsanitize=address,undefined into a temp dir and the
suite runs in a subprocess with ACTDIFF_KERNELS_MODULE_DIR pointing at it, libasan preloaded
(python itself is not instrumented) and detect_leaks=0 (CPython leaks by design)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _enabled(config) -> bool:
    return config.getoption("--run-sanitize") or os.environ.get("ACTDIFF_RUN_SANITIZE") == "1"


def test_python_suite_under_asan(request, tmp_path):
    if not _enabled(request.config):
        pytest.skip("sanitizer run is opt-in: --run-sanitize or ACTDIFF_RUN_SANITIZE=1")
    if os.environ.get("ACTDIFF_KERNELS_MODULE_DIR"):
        pytest.skip("already running against an override build")
    from actdiff.kernels import _build

    so = _build.build_module(str(tmp_path), sanitize=True)
    libasan = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    libubsan = subprocess.run(["gcc", "-print-file-name=libubsan.so"], capture_output=True, text=True).stdout.strip()
    assert os.path.exists(libasan), libasan
    env = dict(os.environ)
    env.update(
        ACTDIFF_KERNELS_MODULE_DIR=os.path.dirname(so),
        LD_PRELOAD=":".join(p for p in (libasan, libubsan) if os.path.exists(p)),
        ASAN_OPTIONS="detect_leaks=0:abort_on_error=1",
        UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1",
    )
    probe = subprocess.run(
        [sys.executable, "-c", "import actdiff.kernels as K; print(K.LIB_PATH)"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.strip().startswith(str(tmp_path)), probe.stdout  # the sanitizer build is in use
    here = os.path.dirname(os.path.abspath(__file__))
    tests = [os.path.join(here, f) for f in ("test_ops.py", "test_moe.py", "test_determinism.py")]
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    tail = r.stdout[-4000:] + "\n" + r.stderr[-4000:]
    assert r.returncode == 0, tail
    assert "passed" in r.stdout, tail
    assert "ERROR: AddressSanitizer" not in r.stderr and "runtime error" not in r.stderr, tail
