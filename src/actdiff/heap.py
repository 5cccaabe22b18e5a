"""How a process reuses freed memory (glibc malloc): the engine's, and every workflow job's.

A forward returns every node's value: at full size about 700 MB of fresh arrays per 512-token prompt, freed when
the caller drops them. glibc serves blocks above its mmap threshold (dynamic, 128 KiB to 32 MiB) with fresh
mappings and returns a freed heap top above its trim threshold to the kernel, so every forward page-faulted its
outputs in again: 91k minor faults and 0.27-0.36 s of system time per full-size 512-token forward (1.8-2.2 s),
and worse at 2 threads, where the faults of both threads serialise on the process's memory map. With blocks up
to 32 MiB taken from the heap and the heap never trimmed, the next forward reuses the same pages: 1.3-3.7k
faults and 0.01 s of system time per forward (bench/README.md). The cost: the process keeps its peak heap until
it exits, which is what its memory budget allows for anyway (the peak itself does not change).

The statistics hit the same: their float64 temporaries of a few hundred KiB (one MiniLM fc1 output of 40 tokens is
0.5 MB) and the read windows of the dumps (64 MiB shared by a dump's nodes) were mapped afresh, so the relative L2
of a propagated 40 x 1536 value took 464 us instead of 80 (208 page faults a call). Every workflow job therefore
applies the policy at its start (actdiff.workflow_support.run): a llama.cpp side's statistics job of the tiny model
went from 337k to 109k page faults and 1.42 to 0.64 s of system time (bench/README.md).

Blocks above 32 MiB (glibc's largest mmap threshold) were still mapped afresh on every allocation, and a
workflow job can make many: the aggregation of MiniLM's int8 ORT run faulted 4.0 million pages in, 13 of its 49
CPU-s in the kernel, most of it where the search's candidates work on the embeddings (MiniLM's 30522 x 384 word
table is 94 MB in float64; the search there took 9.4 CPU-s, 2.8 with every block from the heap). A workflow job is
a process of our own that runs one rule and exits, so there every block comes from the heap
(:func:`reuse_freed_memory_for_job`: glibc's mmap count set to 0); that job then faulted 72k pages, 1.3 s of
system time, its peak RSS 753 -> 822 MB. The engine, which runs in a caller's process too, keeps the 32 MiB
limit: mapping no block at all is a process-wide choice a library should not make for its caller.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # <malloc.h>
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest: HEAP_MAX_SIZE / 2 on 64-bit
TRIM_THRESHOLD_BYTES = (1 << 31) - 1  # an int: never trim

_applied: bool | None = None
_applied_for_job: bool | None = None


def reuse_freed_memory() -> bool:
    """Apply the policy above once per process; True where it holds (glibc), False elsewhere (another libc:
    nothing changes)."""
    global _applied
    if _applied is None:
        _applied = _mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and _mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    return _applied


def reuse_freed_memory_for_job() -> bool:
    """:func:`reuse_freed_memory`, and no block mapped on its own: every block, however large, from the heap
    (for a workflow job's process only; the module docstring). True where both hold (glibc)."""
    global _applied_for_job
    if _applied_for_job is None:
        _applied_for_job = reuse_freed_memory() and _mallopt(M_MMAP_MAX, 0)
    return _applied_for_job


def _mallopt(param: int, value: int) -> bool:
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        fn = None
    return bool(fn is not None and fn(param, value) == 1)
