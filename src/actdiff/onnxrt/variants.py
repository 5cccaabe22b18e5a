"""The ONNX model files of each ORT variant, made from the fp32 export, each written atomically.

- ``fp32``: the export itself;
- ``fp16``: onnxruntime.transformers.float16 (the float16 conversion ORT ships), inputs and outputs kept
  fp32 (``keep_io_types``): every internal value, weights included, becomes float16;
- ``int8-dynamic``: onnxruntime.quantization.quantize_dynamic, int8 weights per output channel; activations
  quantised per tensor at run time (DynamicQuantizeLinear before each MatMulInteger);
- ``int8-static``: quantize_static in QDQ format, int8 weights per channel, activation ranges calibrated
  (MinMax) on a slice of prompts the caller gives and then must exclude from the comparison.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ..atomic import atomic_path
from ..errors import ActdiffError
from ..nodes import INPUT_IDS
from . import VARIANTS
from .export import INPUT_MASK

log = logging.getLogger(__name__)

META_CALIBRATION = "actdiff.calibration"  # int8-static: the prompts its activation ranges were calibrated on
STATIC_OPS = ("MatMul",)  # the ops int8-static quantises (activations and weights)


def check_variant(variant: str) -> str:
    if str(variant) not in VARIANTS:
        raise ActdiffError(f"variant {variant!r} is not available for onnxruntime: use one of {', '.join(VARIANTS)}")
    return str(variant)


def variant_path(out_dir: str | Path, variant: str) -> Path:
    return Path(out_dir) / f"model-{check_variant(variant)}.onnx"


def make_fp16(fp32_path: Path, out_path: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    with atomic_path(out_path) as tmp:
        onnx.save(model, str(tmp))


def make_int8_dynamic(fp32_path: Path, out_path: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with atomic_path(out_path) as tmp:
        quantize_dynamic(str(fp32_path), str(tmp), per_channel=True, weight_type=QuantType.QInt8)


class PromptReader:
    """CalibrationDataReader over token id lists: one prompt per batch (no padding in the ranges)."""

    def __init__(self, prompts: Sequence[Sequence[int]]):
        import numpy as np

        self._feeds = iter(
            {INPUT_IDS: np.asarray([ids], dtype=np.int64), INPUT_MASK: np.ones((1, len(ids)), dtype=np.int64)}
            for ids in prompts
        )

    def get_next(self):
        return next(self._feeds, None)


def activation_matmuls(model_path: Path) -> list[str]:
    """MatMul nodes with no weight (both inputs computed: attention scores and context), kept in float: a
    per-tensor 8-bit range over a whole score or probability tensor is what quantisation tools exclude."""
    import onnx

    g = onnx.load(str(model_path)).graph
    consts = {i.name for i in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in g.node if n.op_type == "MatMul" and not any(i in consts for i in n.input)]


def _add_metadata(path: Path, items: dict[str, str]) -> None:
    import onnx

    proto = onnx.load(str(path))
    for key, value in items.items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    onnx.save(proto, str(path))


def make_int8_static(fp32_path: Path, out_path: Path, calibration: Sequence[Sequence[int]],
                     calibration_ids: Sequence[str] = ()) -> None:  # fmt: skip
    """``calibration_ids``: the prompt ids of ``calibration``, recorded in the model (META_CALIBRATION)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    if not calibration:
        raise ActdiffError("int8-static needs calibration prompts (token id lists); none were given")
    reader = type("Reader", (PromptReader, CalibrationDataReader), {})(calibration)
    with atomic_path(out_path) as tmp:
        quantize_static(
            str(fp32_path),
            str(tmp),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            # MatMuls only: QDQ on every op (the default) also quantises the embedding gathers, residual adds
            # and the additive attention mask to 8 bits, which cost MiniLM's embedding a cosine of 0.72
            op_types_to_quantize=list(STATIC_OPS),
            nodes_to_exclude=activation_matmuls(fp32_path),
            activation_type=QuantType.QUInt8,  # asymmetric u8 activations, s8 weights: ORT's x86 CPU format
            weight_type=QuantType.QInt8,
        )
        _add_metadata(tmp, {META_CALIBRATION: json.dumps({"prompts": list(calibration_ids), "n": len(calibration)})})


def write_variant(fp32_path: str | Path, out: str | Path, variant: str, calibration=(), calibration_ids=()) -> Path:
    """The model file of ``variant`` at ``out`` (made from the fp32 export ``fp32_path``; int8-static calibrated
    on the token id lists ``calibration``, whose prompt ids ``calibration_ids`` it records)."""
    fp32_path, out = Path(fp32_path), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if check_variant(variant) == "fp32":
        with atomic_path(out) as tmp:
            shutil.copyfile(fp32_path, tmp)
    elif variant == "fp16":
        make_fp16(fp32_path, out)
    else:
        # ORT's quantisers write "<input>-inferred.onnx" beside their input and delete it: two variants made at
        # once from one export raced on that file (FileNotFoundError under `make report`). Each quantises its own
        # link of the export, in a folder of its own
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as private:
            src = Path(private) / fp32_path.name
            try:
                os.link(fp32_path, src)
            except OSError:  # another file system, or no hard links there
                shutil.copyfile(fp32_path, src)
            if variant == "int8-dynamic":
                make_int8_dynamic(src, out)
            else:
                make_int8_static(src, out, calibration, calibration_ids)
    log.info("onnxruntime: wrote %s (%s)", out, variant)
    return out


def make_variant(fp32_path: str | Path, out_dir: str | Path, variant: str, calibration=()) -> Path:
    """The model file of ``variant`` under ``out_dir`` (made from the fp32 export ``fp32_path``)."""
    return write_variant(fp32_path, variant_path(out_dir, variant), variant, calibration)
