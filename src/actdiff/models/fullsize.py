"""A full-size NomicBERT-MoE with random weights, for benchmarks at the released model's shapes.

``build_fullsize_random(out_dir)`` writes a model directory with the released config.json of
nomic-embed-text-v2-moe (768 hidden, 12 layers, 8 experts top-2 in every other layer, vocab 250048:
475,292,928 parameters), a ``model.safetensors`` with random fp32 weights under the released tensor
names and shapes, and the tiny model's tokenizer files (benchmarks feed token ids directly, so the
tokenizer only has to exist). The weights come from :func:`actdiff.models.tiny.tiny_weights`, whose
scales are set relative to the sizes (1/sqrt(fan-in) and so on), so activations and routing look like a
trained model's at full size too.

Memory: the weights are generated into one dict (1.9 GB of fp32) and streamed to disk one tensor at a
time, each tensor dropped once written, so the peak is about one copy of the weights (plus a transient
float64 buffer while the embedding table is drawn). The directory is built under a temporary name beside
``out_dir`` and renamed into place at the end, so a killed build never looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np

from .tiny import tiny_weights

WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
DEFAULT_TOKENIZER_DIR = Path("resources/models/tiny-nomic-moe")
_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int64): "I64"}


def _config_text(cfg: dict) -> str:
    return json.dumps(cfg, indent=2, sort_keys=True) + "\n"


def write_safetensors_streaming(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> int:
    """Write ``tensors`` in the safetensors format, one tensor at a time, removing each from the dict.

    The layout is the one ``safetensors.numpy.save`` produces (metadata first, tensors sorted by name,
    compact JSON header padded with spaces to 8 bytes), so the bytes are identical; unlike ``save`` it
    never builds the whole file in memory. ``tensors`` is emptied. Returns the number of bytes written.
    """
    names = sorted(tensors)
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for n in names:
        a = tensors[n]
        if a.dtype not in _DTYPES:
            raise TypeError(f"tensor {n!r}: unsupported dtype {a.dtype}")
        header[n] = {"dtype": _DTYPES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for n in names:
            a = np.ascontiguousarray(tensors.pop(n))
            if a.dtype.byteorder == ">":
                a = a.astype(a.dtype.newbyteorder("<"))
            f.write(memoryview(a.reshape(-1)).cast("B"))
            del a
        f.flush()
        os.fsync(f.fileno())
    return 8 + len(hb) + offset


def is_complete(out_dir: str | Path, cfg: dict) -> bool:
    """True if ``out_dir`` holds config.json equal to ``cfg`` and a model.safetensors of the right size."""
    d = Path(out_dir)
    try:
        if json.loads((d / "config.json").read_text(encoding="utf-8")) != cfg:
            return False
        if not (d / WEIGHTS_FILE).is_file():
            return False
        with open(d / WEIGHTS_FILE, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
        end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
        return (d / WEIGHTS_FILE).stat().st_size == 8 + n + end and all((d / t).is_file() for t in TOKENIZER_FILES)
    except (OSError, ValueError, KeyError, struct.error):
        return False


def build_fullsize_random(
    out_dir: str | Path, seed: int = 0, tokenizer_dir: str | Path | None = None, config: dict | None = None
) -> Path:
    """Write (or reuse) a released-size NomicBERT-MoE directory with random fp32 weights; return its path.

    ``config`` defaults to the released config.json (``actdiff.models.released.released_config()``);
    ``tokenizer_dir`` (default: the generated tiny model) supplies tokenizer.json and
    tokenizer_config.json. An existing directory is reused when its config.json equals the config and its
    model.safetensors is complete; the seed is not checked (it is recorded in the safetensors metadata).
    """
    if config is None:
        from .released import released_config

        config = released_config()
    cfg = dict(config)
    out = Path(out_dir)
    if is_complete(out, cfg):
        return out
    tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else DEFAULT_TOKENIZER_DIR
    missing = [t for t in TOKENIZER_FILES if not (tok_dir / t).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{tok_dir}: {missing} not found; generate the tiny model first "
            "(snakemake --cores 2 resources/models/tiny-nomic-moe/config.json)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for t in TOKENIZER_FILES:
            shutil.copyfile(tok_dir / t, tmp / t)
        weights = tiny_weights(cfg, seed)
        write_safetensors_streaming(tmp / WEIGHTS_FILE, weights, metadata={"format": "pt", "seed": seed})
        del weights
        (tmp / "config.json").write_text(_config_text(cfg), encoding="utf-8")
        if out.exists():  # stale or incomplete: replace it
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
