"""Weight and config parity: every tensor an engine uses against the checkpoint, and the config values an
engine applies next to config.json's. Not statistics: these compare a side's setup, not its activations."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..nodes import build_graph, load_config_json
from .metrics import nonfinite_match


def weight_parity(model_dir: str | Path, side) -> tuple[list[dict], dict]:
    """Every tensor a side uses (after its layout and quantisation: ``side.export_weights()``, tensors with
    ``as_float32``, ``source``, ``transform``, ``storage``) against the checkpoint, and the config values as
    the side understood them (``side.understood_config()``) next to config.json's."""
    from .stats import CheckpointTensors

    rows = []
    # one checkpoint tensor at a time, compared in one float32 pass (double sums): peak memory is the engine's
    # weights plus one block of the checkpoint's values, not the whole checkpoint twice in float64 (8.5 GB at
    # full size before), nor a map of it: the pages a map has read stay resident with it, and the released word
    # table's (0.77 GB) beside the engine's own map of it made the job's peak 2.94 GB, 1.55x the weights
    ck = CheckpointTensors(Path(model_dir) / "model.safetensors")
    for name, t in side.export_weights().items():
        got = np.ascontiguousarray(t.as_float32())
        s, same, diverged = _compared(name, got, ck, t.source)
        num, den = math.sqrt(s["sum_sq_err"]), math.sqrt(s["sum_sq_ref"])
        nf_ref, nf_got = int(s["nan_ref"] + s["inf_ref"]), int(s["nan_eng"] + s["inf_eng"])
        rows.append(
            {
                "tensor": name,
                "source": t.source,
                "transform": t.transform,
                "storage": t.storage,
                "shape": json.dumps(list(got.shape)),
                "max_abs": float(s["max_abs"]) if got.size else 0.0,
                # NaN/Inf at other positions than the checkpoint's: the engine's tensor is wrong there
                "rel_l2": math.inf if diverged else num / den if den > 0 else (0.0 if num == 0 else math.inf),
                # NaN/Inf in the checkpoint and in the engine's tensor (rel_l2 covers the finite values only)
                "nonfinite_checkpoint": nf_ref,
                "nonfinite_engine": nf_got,
            }
        )
        del got
    return rows, config_parity(model_dir, side.understood_config())


# values of the checkpoint's side of a tensor read at a time (64 MB in float32)
BLOCK_VALUES = 1 << 24


def _compared(name: str, got: np.ndarray, ck, source: str) -> tuple[dict, int, int]:
    """The engine's tensor against the checkpoint's, read in blocks (in the checkpoint's C order, the layout the
    spec reads it in): the error sums weight_parity reports, and the NaN/Inf positions alike and diverging."""
    from ..kernels import compare_sums

    flat = got.reshape(-1)
    if flat.size != int(np.prod(ck.shape_of(source), dtype=np.int64)):
        raise ValueError(f"weight parity: {name} has {flat.size} values, its checkpoint tensor {source} "
                         f"{ck.shape_of(source)}")  # fmt: skip
    sums = dict.fromkeys(("sum_sq_err", "sum_sq_ref", "max_abs", "nan_ref", "inf_ref", "nan_eng", "inf_eng"), 0)
    same = diverged = 0
    for lo, ref in ck.flat_blocks(source, BLOCK_VALUES):
        part = flat[lo : lo + ref.size]
        s = compare_sums(part, ref)
        for k in sums:
            sums[k] = max(sums[k], s[k]) if k == "max_abs" else sums[k] + s[k]
        if s["nan_ref"] + s["inf_ref"] + s["nan_eng"] + s["inf_eng"]:
            a, b = nonfinite_match(part, ref)
            same, diverged = same + a, diverged + b
    return sums, same, diverged


def config_parity(model_dir: str | Path, understood: dict) -> dict:
    """Config values as an engine understood them (``understood``, Engine.understood_config's keys) next to
    config.json's; "match" per key. Keys an engine does not report (None) are compared as None."""
    model_dir = Path(model_dir)
    cfg = load_config_json(model_dir)
    dims = build_graph(cfg, str(model_dir / "config.json")).dims
    expected = {
        "hidden": dims.hidden,
        "heads": dims.heads,
        "layers": dims.layers,
        "inner": dims.inner,
        "experts": dims.experts,
        "top_k": dims.top_k,
        "layer_norm_eps": dims.eps,
        "rotary_base": dims.rotary_base if understood.get("rotary_base") is not None else None,
        "rotary_interleaved": dims.rotary_interleaved if understood.get("rotary_interleaved") is not None else None,
        "activation": "gelu_erf" if dims.activation == "gelu" else "gelu_tanh",
        "attention": "causal" if cfg.get("causal") else "bidirectional",
        "topk_renormalize": dims.normalize_expert_weights,
        "expert_bias": True,
        # dynamic NTK rotary scaling: the factor (None: off) and the length above which it scales
        "rotary_scaling": [dims.rotary_scaling_factor, dims.max_trained_positions]
        if dims.rotary_scaling_factor
        else None,
        "linear_biases": {"qkv_proj_bias": dims.qkv_bias, "mlp_fc1_bias": dims.fc1_bias, "mlp_fc2_bias": dims.fc2_bias},
    }
    return {
        k: {"config": expected[k], "engine": understood.get(k), "match": expected[k] == understood.get(k)}
        for k in expected
    }
