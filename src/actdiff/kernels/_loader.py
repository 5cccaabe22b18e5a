"""Locate and load the compiled cffi module, and check its version.

By default the in-package extension ``actdiff.kernels._kernels`` (built by
``pip install -e .``) is used.  Setting ``ACTDIFF_KERNELS_MODULE_DIR`` to a directory
holding a standalone ``_kernels*.so`` (see ``_build.build_module``) loads that one
instead -- used to run the Python suite against an AddressSanitizer build.
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import os


class KernelVersionError(ImportError):
    """The compiled kernel library does not match the Python package version."""


def _load_module():
    override = os.environ.get("ACTDIFF_KERNELS_MODULE_DIR")
    if override:
        cands = sorted(glob.glob(os.path.join(override, "_kernels*.so")))
        if not cands:
            raise ImportError(f"ACTDIFF_KERNELS_MODULE_DIR={override!r} holds no _kernels*.so")
        spec = importlib.util.spec_from_file_location("_kernels", cands[0])
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    try:
        return importlib.import_module("actdiff.kernels._kernels")
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            "actdiff.kernels._kernels is not built; run "
            "`pip install -e . --no-deps --no-build-isolation` in the repository root"
        ) from exc


def check_version(lib_version: str, py_version: str) -> None:
    if lib_version != py_version:
        raise KernelVersionError(
            f"kernel library version {lib_version!r} does not match actdiff version {py_version!r}; "
            "rebuild with `pip install -e . --no-deps --no-build-isolation`"
        )


_mod = _load_module()
ffi = _mod.ffi
lib = _mod.lib
LIB_PATH = getattr(_mod, "__file__", None)
LIB_VERSION = ffi.string(lib.ak_version()).decode()

from actdiff._version import __version__ as _PY_VERSION  # noqa: E402

check_version(LIB_VERSION, _PY_VERSION)
