"""Sides: everything that produces activations over token ids, behind one protocol.

A side is the reference (HuggingFace/PyTorch), our engine (C kernels), llama.cpp, ONNX Runtime, an imported
dump, or the next engine. Each implements :class:`actdiff.sides.base.Side` (its graph, its provenance attributes, a
forward over token ids; optionally a replay of one node on given inputs and a forced-routing MoE forward),
and :func:`actdiff.sides.dump.dump_shard` writes any of them to the HDF5 layout. The comparison reads dumps
and asks :func:`open_replay` for a side's replay; it never imports a concrete engine. :class:`actdiff.api.Model`
(``actdiff.load``) wraps a side for Python use, and the pipeline's dump stage opens its side through it.

This registry is the one place that maps a side's name to the module implementing it.
"""

from __future__ import annotations

import importlib

from ..errors import ConfigError
from .base import Replay, Side

# side name -> "module:factory"; a factory takes (record, variant, **options) and returns a Side
SIDES = {
    "reference": "actdiff.sides.reference:ReferenceSide",
    "actdiff": "actdiff.sides.engine:EngineSide",
    "llamacpp": "actdiff.llamacpp.side:LlamaCppSide",
    # options: model_file (a variant's ONNX file, actdiff.onnxrt.variants), level, threads, batch_size
    "onnxruntime": "actdiff.onnxrt.side:OnnxRuntimeSide",
}


def _factory(name: str):
    if name not in SIDES:
        raise ConfigError(f"unknown side {name!r}; sides that run here: {', '.join(SIDES)} (others are imported)")
    module, attr = SIDES[name].split(":")
    return getattr(importlib.import_module(module), attr)


def open_side(name: str, record, variant, **options) -> Side:
    """The side ``name`` ready to run ``variant`` on ``record``'s model."""
    return _factory(name)(record, variant, **options)


def open_replay(name: str, model_dir, variant, provenance: dict | None = None) -> Replay | None:
    """The side's replay of single nodes (teacher forcing), or None for a side that cannot replay (an external
    engine, an imported dump): the comparison then judges its output against the spec op on its own inputs.
    ``provenance``: the dump's attributes (the side's own settings, e.g. the model file and options it ran
    with), so the replay runs what the dump ran."""
    factory = _factory(name) if name in SIDES else None
    replay = getattr(factory, "replay", None)
    return replay(model_dir, variant, provenance or {}) if replay is not None else None


__all__ = ["SIDES", "Replay", "Side", "open_replay", "open_side"]
