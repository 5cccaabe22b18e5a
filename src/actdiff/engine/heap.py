"""How the engine's process reuses freed memory (glibc malloc).

A forward returns every node's value: at full size about 700 MB of fresh arrays per 512-token prompt, freed when
the caller drops them. glibc serves blocks above its mmap threshold (dynamic, 128 KiB to 32 MiB) with fresh
mappings and returns a freed heap top above its trim threshold to the kernel, so every forward page-faulted its
outputs in again: 91k minor faults and 0.27-0.36 s of system time per full-size 512-token forward (1.8-2.2 s),
and worse at 2 threads, where the faults of both threads serialise on the process's memory map. With blocks up
to 32 MiB taken from the heap and the heap never trimmed, the next forward reuses the same pages: 1.3-3.7k
faults and 0.01 s of system time per forward (bench/README.md). The cost: the process keeps its peak heap until
it exits, which is what its memory budget allows for anyway (the peak itself does not change).
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest: HEAP_MAX_SIZE / 2 on 64-bit
TRIM_THRESHOLD_BYTES = (1 << 31) - 1  # an int: never trim

_applied: bool | None = None


def reuse_freed_memory() -> bool:
    """Apply the policy above once per process; True where it holds (glibc), False elsewhere (another libc:
    nothing changes)."""
    global _applied
    if _applied is None:
        _applied = _mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and _mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    return _applied


def _mallopt(param: int, value: int) -> bool:
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        fn = None
    return bool(fn is not None and fn(param, value) == 1)
