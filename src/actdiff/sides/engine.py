"""Our engine (actdiff.engine on the C kernels) as a side: a forward, and the replay of single nodes."""

from __future__ import annotations

import json
from pathlib import Path

from ..batching import MAX_BATCH_TOKENS, batched_in_order, stream_batches, window_tokens_for
from ..engine.core import Engine

ENGINE = "actdiff"


class EngineReplay:
    """The engine's own per-node code on given inputs, under the variant's activation policy."""

    def __init__(self, engine: Engine, variant):
        self.engine, self.variant = engine, variant
        self.prepared = engine.prepare(variant)  # once: the weights and settings every call then uses

    def replay_node(self, name, inputs):
        return self.engine.replay_node(name, inputs, self.prepared)

    def replay_many(self, name, inputs):
        return self.engine.replay_nodes(name, inputs, self.prepared)

    def forced_moe(self, block, h, indices, weights):
        return self.engine.forced_moe(block, h, indices, weights, self.prepared)

    def fused_nodes(self) -> frozenset[str]:
        return self.engine.fused_nodes(self.prepared)


class EngineSide(EngineReplay):
    name = ENGINE
    records_input_ids = True
    missing_nodes: tuple[str, ...] = ()

    def __init__(self, record, variant, threads: int = 1, engine_ids: str = "reference", batch_size: int = 1):
        from .dump import ids_column

        super().__init__(Engine(record.dir, threads=threads), variant)
        self.graph = self.engine.graph
        self.engine_ids, self.ids_column = engine_ids, ids_column(engine_ids)
        self.batch_size = int(batch_size)  # the model's config batch_size, as the reference runs it

    @classmethod
    def replay(cls, model_dir: str | Path, variant, provenance: dict | None = None) -> EngineReplay:
        """``provenance`` (the dump's attributes) is not needed: the engine's settings are the variant's."""
        return EngineReplay(Engine(model_dir), variant)

    def provenance(self) -> dict:
        from .. import kernels

        return {
            "engine": ENGINE,
            "engine_ids": self.engine_ids,
            "kernel_isa": kernels.get_isa(),
            "batch_size": self.batch_size,  # the C kernels' instruction-set path (ACTDIFF_KERNELS_ISA forces one)
            "understood_config": json.dumps(self.engine.understood_config(self.prepared)),
            "dtypes": json.dumps({"activations": "float32", "indices": "int64", "precision": str(self.variant)}),
        }

    def export_weights(self) -> dict:
        """Every tensor the engine uses, after its layout and quantisation (weight parity)."""
        return self.engine.export_weights(self.prepared)

    def understood_config(self) -> dict:
        return self.engine.understood_config(self.prepared)

    def forward(self, items):
        """Padded, length-sorted batches of batch_size prompts (actdiff.batching, as the reference), each
        prompt's values yielded in the input order: a padding-only fault (mask_query_axis) shows here."""
        run = lambda batch: self.engine.forward_batch(batch, self.prepared)  # noqa: E731
        yield from batched_in_order(items, run, self.batch_size, MAX_BATCH_TOKENS, window_tokens_for(self.graph))

    def stream(self, items, sink) -> None:
        """forward's batches, each node's values handed to ``sink`` as the engine computes them
        (actdiff.sides.base.RowSink)."""
        run_into = lambda batch, put: self.engine.forward_batch_into(batch, put, self.prepared)  # noqa: E731
        stream_batches(items, sink, run_into, self.batch_size, self.graph)

    def close(self) -> None:
        pass
