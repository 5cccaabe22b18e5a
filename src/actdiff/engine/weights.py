"""Engine weights: read the checkpoint with safetensors' numpy loader and convert each tensor into the
engine's own layout and precision.

Precision policy (the ``precision`` part of a variant):

| precision | matmul + expert weights | router, embeddings | LayerNorm params, biases | activations |
|---|---|---|---|---|
| fp32 | float32 | float32 | float32 | float32 |
| fp16 | float16 storage, fp32 accumulation in C | values rounded to fp16, stored fp32 | float32 | float32 |
| bf16 | bf16 storage (uint16, round-to-nearest-even) | values rounded to bf16, stored fp32 | float32 | float32 |
| int8 | int8, symmetric per output channel (fp32 scales) | float32 | float32 | float32 |
| fp16-act | float32 | float32 | float32 | rounded to fp16 after every node |

Routers and embedding gathers need fp32 arrays in the C library, so reduced precision there is applied to
the values (bitwise what a reduced-storage kernel would read) rather than the storage. Norm parameters and
biases stay fp32, as engines usually keep them.

Layout: the fused Wqkv stays fused (the SPLIT nodes split its output); experts are stored per expert,
``w1`` and ``w2`` as (E, F, H) as released (``w2_transposed`` fault: the buffer read as (E, H, F) and
transposed). fp32 matrix and expert weights are then packed once into the matmul core's 32-column panels
(:class:`actdiff.kernels.PackedF32`, replacing the array, so resident memory stays one fp32 copy): kernels
read them in place instead of re-packing per call, with bit-identical results; ``as_float32`` unpacks.
Each engine tensor records the checkpoint tensor it came from and the transform applied, so
the comparison stage can check weight parity (``Engine.export_weights``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ModelError
from ..kernels import PackedF32
from ..nodes import Graph


@dataclass
class EngineTensor:
    name: str  # the engine's name for it
    source: str  # checkpoint tensor it came from
    transform: str  # what the engine did to it
    data: np.ndarray | PackedF32  # storage as the C kernels read it (fp32 matrix weights: packed at load)
    scales: np.ndarray | None = None  # int8 per-output-channel scales
    storage: str = "float32"  # float32 | float16 | bf16 | int8
    int8_axis: int | None = None  # the reduced (input) axis the int8 scales were taken over

    def as_float32(self) -> np.ndarray:
        """The values the engine computes with, in float32, in the storage layout."""
        from .. import kernels

        if self.storage == "bf16":
            return kernels.bf16_to_f32(self.data)
        if self.storage == "int8":
            return (self.data.astype(np.float32) * np.expand_dims(self.scales, self.int8_axis)).astype(np.float32)
        if isinstance(self.data, PackedF32):  # unpacked on demand: the engine keeps only the packed copy
            return self.data.unpack()
        return self.data.astype(np.float32, copy=False)


def round_to(x: np.ndarray, storage: str) -> np.ndarray:
    from .. import kernels

    if storage == "float16":
        return kernels.f16_to_f32(kernels.cast(x, np.float16))  # numpy's bits, in C
    if storage == "bf16":
        return kernels.bf16_to_f32(kernels.f32_to_bf16(x))
    return x


_ST_DTYPES = {
    "F32": np.float32,
    "F16": np.float16,
    "F64": np.float64,
    "BF16": np.uint16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


class Checkpoint:
    """Reader of model.safetensors that checks names, shapes and dtypes as tensors are read.

    Tensors are read with plain file reads at the offsets the safetensors header gives, not through a
    memory map: a mapping keeps the pages it touched resident, so loading would hold the checkpoint twice
    (mapped pages plus the engine's converted copy). This way the engine's peak is about one fp32 copy.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError(f"{self.path}: model.safetensors not found")
        self.header, self.data_start = self._read_header()
        self.keys = {k for k in self.header if k != "__metadata__"}

    def _read_header(self) -> tuple[dict, int]:
        import json
        import struct

        size = self.path.stat().st_size
        try:
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n <= 0 or 8 + n > size:
                    raise ValueError(f"header length {n} does not fit a {size}-byte file")
                header = json.loads(f.read(n))
        except (ValueError, struct.error, UnicodeDecodeError) as e:
            raise ModelError(
                f"{self.path}: cannot read safetensors file ({e}); is it truncated or corrupted?"
            ) from None
        for k, v in header.items():
            if k == "__metadata__":
                continue
            lo, hi = v["data_offsets"]
            if 8 + n + hi > size:
                raise ModelError(f"{self.path}: tensor {k!r} ends past the end of the file; the file is truncated")
        return header, 8 + n

    def close(self) -> None:
        """Nothing stays open between reads; kept so callers can say they are done."""

    def get(self, key: str, shape: tuple[int, ...], mapped: bool = False) -> np.ndarray:
        """The tensor as float32. ``mapped``: an fp32 tensor as a read-only memory map of the file, so only the
        pages read become resident (the embedding tables: a prompt gathers a few rows of the released word
        table's 250k, which read whole is 0.77 GB of every engine job's memory)."""
        if key not in self.keys:
            raise ModelError(f"{self.path}: missing tensor {key!r} (expected shape {list(shape)})")
        info = self.header[key]
        got = tuple(info["shape"])
        if got != tuple(shape):
            raise ModelError(f"{self.path}: tensor {key!r} has shape {list(got)}, config.json implies {list(shape)}")
        dt = info["dtype"]
        if dt not in ("F32", "F16", "BF16", "F64"):
            name = np.dtype(_ST_DTYPES[dt]).name if dt in _ST_DTYPES else dt
            raise ModelError(f"{self.path}: tensor {key!r} has dtype {name}, expected a floating-point dtype")
        lo, hi = info["data_offsets"]
        count = int(np.prod(got)) if got else 1
        if (hi - lo) != count * np.dtype(_ST_DTYPES[dt]).itemsize:
            raise ModelError(f"{self.path}: tensor {key!r}: {hi - lo} bytes do not hold {list(got)} {dt}")
        if mapped and dt == "F32" and count:
            return np.memmap(self.path, dtype="<f4", mode="r", offset=self.data_start + lo, shape=got)
        a = np.fromfile(self.path, dtype=_ST_DTYPES[dt], count=count, offset=self.data_start + lo).reshape(got)
        if dt == "BF16":
            a = (a.astype(np.uint32) << 16).view(np.float32)
        return np.ascontiguousarray(a, dtype=np.float32)


def expected_shapes(graph: Graph) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor the engine reads, with the shape config.json implies."""
    d = graph.dims
    H, F, E = d.hidden, d.inner, d.experts
    rules = [  # first matching suffix wins
        ("word_embeddings.weight", (d.vocab, H)),
        ("position_embeddings.weight", (d.max_positions, H)),
        ("token_type_embeddings.weight", (d.type_vocab, H)),
        ("Wqkv.weight", (3 * H, H)),
        ("Wqkv.bias", (3 * H,)),
        ("router.layer.weight", (E, H)),
        ("experts.mlp.w1", (E * F, H)),
        ("experts.mlp.w2", (E * F, H)),
        ("fc1.weight", (F, H)),
        ("fc1.bias", (F,)),
        ("fc2.weight", (H, F)),
        ("intermediate.dense.weight", (F, H)),
        ("intermediate.dense.bias", (F,)),
        ("attention.output.dense.weight", (H, H)),
        ("output.dense.weight", (H, F)),  # BERT's FFN down projection
        ("query.weight", (H, H)),
        ("key.weight", (H, H)),
        ("value.weight", (H, H)),
        ("out_proj.weight", (H, H)),
        ("", (H,)),  # biases and LayerNorm parameters
    ]
    out: dict[str, tuple[int, ...]] = {}
    for n in graph:
        for w in n.weights:
            out[w] = next(shape for suffix, shape in rules if w.endswith(suffix))
    return out


def convert(graph: Graph, ckpt: Checkpoint, precision: str, w2_orientation: str = "FH") -> dict[str, EngineTensor]:
    """Read every tensor once and convert it to the engine layout for ``precision``. ``w2_orientation`` "HF"
    reads the expert w2 buffer as (E, H, F) (the catalogue's expert_w2_transposed, run as a fault)."""
    d = graph.dims
    shapes = expected_shapes(graph)
    matmul_storage = {"fp32": "float32", "fp16": "float16", "bf16": "bf16", "int8": "int8", "fp16-act": "float32"}
    value_storage = {"fp16": "float16", "bf16": "bf16"}.get(precision, "float32")
    st = matmul_storage[precision]
    out: dict[str, EngineTensor] = {}
    for key, shape in shapes.items():
        table = key.endswith("embeddings.weight") and value_storage == "float32"  # gathered by rows, never written
        a = ckpt.get(key, shape, mapped=table)
        is_matrix_weight = len(shape) == 2 and not key.endswith(("embeddings.weight", "router.layer.weight"))
        if key.endswith(("experts.mlp.w1", "experts.mlp.w2")):
            E, F, H = d.experts, d.inner, d.hidden
            if key.endswith("w2") and w2_orientation == "HF":
                a3 = np.ascontiguousarray(a.reshape(E, H, F).transpose(0, 2, 1))
                layout = "viewed as (E, H, F) and transposed to (E, F, H) [fault w2_transposed]"
            else:
                a3 = a.reshape(E, F, H)
                layout = "viewed as (E, F, H), one (F, H) block per expert"
            is_w1 = key.endswith("w1")
            out[key] = _store(key, a3, st, layout, int8_axis=2 if is_w1 else 1, trans=is_w1)
            del a3
        elif is_matrix_weight:
            out[key] = _store(key, a, st, "as is (OC, IC)", int8_axis=1, trans=True)
        elif len(shape) == 2:  # router and embedding tables: fp32 storage, reduced values
            v = round_to(a, value_storage)
            t = "as is" if value_storage == "float32" else f"values rounded to {value_storage}, stored float32"
            out[key] = EngineTensor(key, key, t, v)
        else:
            out[key] = EngineTensor(key, key, "as is (float32)", a)
        del a
    return out


def _store(key: str, a: np.ndarray, storage: str, layout: str, int8_axis: int, trans: bool) -> EngineTensor:
    """``trans``: the kernels read the weight transposed (x @ w^T: linear weights, expert w1) or not (w2)."""
    from .. import kernels

    if storage == "float32":  # packed once here; the caller drops ``a``, so only the packed copy stays
        return EngineTensor(key, key, f"{layout}; float32", kernels.pack_f32(np.ascontiguousarray(a), trans=trans))
    if storage == "float16":
        return EngineTensor(key, key, f"{layout}; float16 storage", kernels.cast(a, np.float16), storage="float16")
    if storage == "bf16":
        return EngineTensor(key, key, f"{layout}; bf16 storage (RNE)", kernels.f32_to_bf16(a), storage="bf16")
    q, s = kernels.quantize_int8(a, axis=int8_axis)
    return EngineTensor(
        key,
        key,
        f"{layout}; int8 symmetric per output channel",
        np.ascontiguousarray(q),
        np.ascontiguousarray(s, dtype=np.float32),
        storage="int8",
        int8_axis=int8_axis,
    )
