"""cffi out-of-line API-mode build of ``actdiff.kernels._kernels``.

The cdef text is extracted from ``kernels_c/include/actdiff_kernels.h`` between the
``/* CFFI_BEGIN */`` and ``/* CFFI_END */`` markers, so the header stays the single
source of the binding.  Used by setup.py (``cffi_modules``) and, with sanitizer flags,
by the sanitizer test (``build_module(tmpdir, sanitize=True)``).
"""

from __future__ import annotations

import glob
import os
import re

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(_HERE, "..", "..", ".."))
KERNELS_DIR = os.path.join(ROOT, "kernels_c")
INCLUDE_DIR = os.path.join(KERNELS_DIR, "include")
HEADER = os.path.join(INCLUDE_DIR, "actdiff_kernels.h")

# never -ffast-math / -Ofast / -funsafe-math-optimizations: NaN/Inf and fma chains matter
EXTRA_COMPILE_ARGS = ["-O3", "-std=c11", "-fPIC", "-pthread", "-Wall"]
SANITIZE_COMPILE_ARGS = [
    "-O1",
    "-g",
    "-std=c11",
    "-fPIC",
    "-pthread",
    "-fsanitize=address,undefined",
    "-fno-omit-frame-pointer",
    "-fno-sanitize-recover=undefined",
]


def extract_cdef(header_path: str = HEADER) -> str:
    with open(header_path, encoding="utf-8") as f:
        text = f.read()
    m = re.search(r"/\* CFFI_BEGIN \*/(.*?)/\* CFFI_END \*/", text, re.S)
    if not m:
        raise RuntimeError(f"{header_path}: CFFI_BEGIN/CFFI_END markers not found")
    return m.group(1)


def sources(absolute: bool = False) -> list[str]:
    # relative paths (from the repo root, where setup.py runs) keep setuptools' object paths tidy;
    # ffi.compile(tmpdir=...) changes directory, so standalone builds use absolute paths
    srcs = sorted(glob.glob(os.path.join(KERNELS_DIR, "src", "*.c")))
    if not srcs:
        raise RuntimeError(f"no C sources under {KERNELS_DIR}/src")
    return [os.path.relpath(s, ROOT) if (not absolute and os.getcwd() == ROOT) else s for s in srcs]


def make_builder(module_name: str = "actdiff.kernels._kernels", sanitize: bool = False) -> FFI:
    ffi = FFI()
    ffi.cdef(extract_cdef())
    args = SANITIZE_COMPILE_ARGS if sanitize else EXTRA_COMPILE_ARGS
    ffi.set_source(
        module_name,
        '#include "actdiff_kernels.h"',
        sources=sources(absolute=module_name == "_kernels"),
        include_dirs=[INCLUDE_DIR],
        extra_compile_args=args,
        extra_link_args=(["-fsanitize=address,undefined"] if sanitize else []) + ["-lm", "-ldl"],
        depends=[HEADER] + glob.glob(os.path.join(KERNELS_DIR, "src", "*.h")),
    )
    return ffi


def build_module(tmpdir: str, sanitize: bool = False) -> str:
    """Compile a standalone copy of the extension into tmpdir; returns the .so path."""
    ffi = make_builder("_kernels", sanitize=sanitize)
    return ffi.compile(tmpdir=tmpdir, verbose=False)


ffibuilder = make_builder()

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
