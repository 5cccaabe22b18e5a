"""Minimal GGUF header reader: metadata key/values and tensor infos, no tensor data.

Written here (about 100 lines) rather than importing ``gguf`` so that checking a converted file does not
depend on which ``gguf`` package is importable in this process (the converter runs with its own vendored
gguf-py in a subprocess). Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (little endian,
version 2 and 3).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import ModelError

MAGIC = b"GGUF"

# GGUFValueType
_SCALARS = {
    0: "<B",  # uint8
    1: "<b",  # int8
    2: "<H",  # uint16
    3: "<h",  # int16
    4: "<I",  # uint32
    5: "<i",  # int32
    6: "<f",  # float32
    7: "<?",  # bool
    10: "<Q",  # uint64
    11: "<q",  # int64
    12: "<d",  # float64
}
_STRING, _ARRAY = 8, 9

# ggml_type ids of the tensor types the converter writes for our outtypes
GGML_TYPE_NAMES = {0: "F32", 1: "F16", 8: "Q8_0", 30: "BF16"}
# llama_ftype (general.file_type)
FILE_TYPES = {0: "f32", 1: "f16", 7: "q8_0", 32: "bf16"}
# llama_pooling_type
POOLING_TYPES = {-1: "unspecified", 0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}


@dataclass
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: ne[0] (fastest) first
    ggml_type: int

    @property
    def type_name(self) -> str:
        return GGML_TYPE_NAMES.get(self.ggml_type, str(self.ggml_type))


@dataclass
class GGUFHeader:
    path: str
    version: int
    metadata: dict[str, Any]
    tensors: list[GGUFTensorInfo] = field(default_factory=list)

    @property
    def arch(self) -> str | None:
        return self.metadata.get("general.architecture")

    def get(self, key: str, default: Any = None) -> Any:
        """Value of ``key``; a key starting with ``.`` is relative to the architecture prefix."""
        if key.startswith("."):
            key = f"{self.arch}{key}"
        return self.metadata.get(key, default)

    def tensor_types(self) -> dict[str, int]:
        """Count of tensors per ggml type name."""
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.type_name] = out.get(t.type_name, 0) + 1
        return out


def _read(f: BinaryIO, fmt: str) -> Any:
    n = struct.calcsize(fmt)
    b = f.read(n)
    if len(b) != n:
        raise EOFError("truncated file")
    return struct.unpack(fmt, b)[0]


def _string(f: BinaryIO) -> str:
    n = _read(f, "<Q")
    b = f.read(n)
    if len(b) != n:
        raise EOFError("truncated string")
    return b.decode("utf-8", errors="replace")


def _value(f: BinaryIO, vtype: int, skip_arrays: bool) -> Any:
    if vtype in _SCALARS:
        return _read(f, _SCALARS[vtype])
    if vtype == _STRING:
        return _string(f)
    if vtype == _ARRAY:
        etype, count = _read(f, "<I"), _read(f, "<Q")
        if skip_arrays and etype in _SCALARS:  # e.g. token scores: skip the bytes, keep the length
            f.seek(struct.calcsize(_SCALARS[etype]) * count, 1)
            return _ArrayStub(count)
        if skip_arrays and etype == _STRING:
            for _ in range(count):
                f.seek(_read(f, "<Q"), 1)
            return _ArrayStub(count)
        return [_value(f, etype, skip_arrays) for _ in range(count)]
    raise ValueError(f"unknown GGUF value type {vtype}")


@dataclass(frozen=True)
class _ArrayStub:
    """A skipped metadata array (vocabulary lists): only its length is kept."""

    length: int


def read_gguf_header(path: str | Path, skip_arrays: bool = True) -> GGUFHeader:
    """Metadata and tensor infos of a GGUF file; arrays (vocabulary) are skipped unless asked for."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            if f.read(4) != MAGIC:
                raise ModelError(f"{p}: not a GGUF file (bad magic); delete it and convert again")
            version = _read(f, "<I")
            if version not in (2, 3):
                raise ModelError(f"{p}: GGUF version {version} is not supported (2 or 3)")
            n_tensors, n_kv = _read(f, "<Q"), _read(f, "<Q")
            meta: dict[str, Any] = {}
            for _ in range(n_kv):
                key = _string(f)
                meta[key] = _value(f, _read(f, "<I"), skip_arrays)
            tensors = []
            for _ in range(n_tensors):
                name = _string(f)
                nd = _read(f, "<I")
                shape = tuple(_read(f, "<Q") for _ in range(nd))
                gtype = _read(f, "<I")
                _read(f, "<Q")  # data offset
                tensors.append(GGUFTensorInfo(name, shape, gtype))
    except (EOFError, ValueError, UnicodeDecodeError, struct.error) as e:
        raise ModelError(f"{p}: corrupted or truncated GGUF header ({e}); delete it and convert again") from None
    except OSError as e:
        raise ModelError(f"{p}: cannot read GGUF file ({e})") from None
    return GGUFHeader(str(p), version, meta, tensors)
