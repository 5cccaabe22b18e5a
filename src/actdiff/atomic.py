"""Atomic outputs: write to a temporary file beside the target, then rename.

A run killed mid-write leaves only a ``.<name>.tmp-<pid>`` file, never a partial output that a rerun
would take as complete; the next writer of the same output removes such leftovers of dead processes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path

from .errors import DiskFullError


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_path_for(path: str | Path) -> Path:
    """This process's temporary path for ``path``, after removing temporaries of ``path`` left by dead
    processes (a SIGKILLed run cannot clean up after itself)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for old in path.parent.glob(f".{path.name}.tmp-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            old.unlink(missing_ok=True)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


# errno values and the text HDF5 and Arrow put in their messages when a write hits a full disk or quota: h5py
# raises a RuntimeError whose only trace of the cause is this text, Arrow an OSError without errno set
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXT = ("no space left on device", "disk quota exceeded")


def is_disk_full(exc: BaseException) -> bool:
    """Did this write fail because the disk (or the user's quota) is full?"""
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
        return True
    return isinstance(exc, (OSError, RuntimeError)) and any(t in str(exc).lower() for t in _DISK_FULL_TEXT)


def disk_full_error(path: str | Path, written: int | None = None) -> DiskFullError:
    """The message for a write to ``path`` that filled its disk: where, how much, what to do."""
    path = Path(path)
    try:
        free = shutil.disk_usage(path.parent).free
        free_s = f"{free / 2**20:.1f} MiB free"
    except OSError:
        free_s = "free space unknown"
    size = f" after writing {written / 2**20:.1f} MiB of it" if written else ""
    return DiskFullError(
        f"{path}: the disk is full (no space left on device){size}. The partial file was removed ({free_s} on "
        f"{path.parent} now). Free space there (or point the config's `results` at a larger disk) and rerun."
    )


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path; on success it is renamed to ``path``, on error it is removed (a full disk
    becomes a DiskFullError naming ``path``)."""
    path = Path(path)
    tmp = temp_path_for(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if not is_disk_full(e):
            raise
        written = tmp.stat().st_size if tmp.exists() else None
        tmp.unlink(missing_ok=True)
        raise disk_full_error(path, written) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(path: str | Path, obj) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)
