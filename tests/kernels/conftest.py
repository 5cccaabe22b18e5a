"""pytest fixtures for the kernel tests (helpers live in kernel_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def _restore_threads():
    import actdiff.kernels as K

    n = K.get_num_threads()
    yield
    K.set_num_threads(n)
    K.set_isa("auto")  # the path ACTDIFF_KERNELS_ISA forces, if any: a forced run stays on its path


def pytest_collection_modifyitems(config, items):
    """The op suite and the determinism tests run again under every ISA path (make test-isa); the sanitizer
    build has its own target."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents and Path(item.fspath).name != "test_sanitize.py":
            item.add_marker(pytest.mark.isa_paths)


def pytest_addoption(parser):
    parser.addoption(
        "--run-sanitize",
        action="store_true",
        default=False,
        help="build an ASan/UBSan copy of the kernels and run the op suite against it",
    )
