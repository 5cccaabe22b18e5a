"""pytest fixtures for the kernel tests (helpers live in kernel_helpers.py)."""

from __future__ import annotations

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
    K.set_isa("auto")


def pytest_addoption(parser):
    parser.addoption(
        "--run-sanitize",
        action="store_true",
        default=False,
        help="build an ASan/UBSan copy of the kernels and run the op suite against it",
    )
