"""ONNX Runtime as a side: one variant's ONNX model on the CPU execution provider, every canonical node captured.

Nodes ORT's optimiser fused away at the chosen level are ``missing_nodes`` (written as placeholders, judged
not_captured, their consumers on propagated error), the fused op that absorbed each in the provenance, as the
llama.cpp side does for nodes its mapping cannot fill.

Replay (teacher forcing, :mod:`.replay`): each node is the subgraph of the graph the dump ran that computes it
from its canonical inputs, run by ORT's own kernels in a session of its own; a MoE block likewise from its
input and a given expert choice (forced routing). :meth:`OnnxRuntimeSide.replay` opens it from a dump's
provenance (its model file, optimisation level and threads).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from ..batching import MAX_BATCH_TOKENS, batched_in_order, stream_batches, window_tokens_for
from ..errors import ModelError
from ..nodes import Graph
from .capture import LEVELS, OrtCapture, pad_batch
from .export import META_EXPORTER, META_FORMULATION, exported_nodes
from .variants import META_CALIBRATION, check_variant

log = logging.getLogger(__name__)

ENGINE = "onnxruntime"


def check_model_file(path: Path, graph: Graph) -> dict:
    """The export's metadata; refuses a file written for another graph (a stale model of another config)."""
    import onnx

    if not path.is_file():
        raise ModelError(f"{path}: ONNX model file not found; make it with actdiff.onnxrt.variants.make_variant")
    proto = onnx.load(str(path), load_external_data=False)
    nodes = exported_nodes(proto)
    if nodes != graph.names():
        extra, lost = set(nodes) - set(graph.names()), set(graph.names()) - set(nodes)
        raise ModelError(
            f"{path}: its actdiff.nodes metadata does not match the model's graph (not in the graph: "
            f"{sorted(extra)[:3]}, missing: {sorted(lost)[:3]}); re-export it from this model directory"
        )
    return {p.key: p.value for p in proto.metadata_props}


def to_prompts(graph: Graph, raw: dict[str, np.ndarray], batch_ids: list[list[int]]) -> list[dict[str, np.ndarray]]:
    """ORT's batch values -> one dict per prompt without padding, shaped and typed as the reference dump's
    (actdiff.reference.ReferenceRunner.run_batch: MoE nodes come flat as (B*S, ...))."""
    from .. import kernels

    B, S = len(batch_ids), max(len(x) for x in batch_ids)
    out: list[dict[str, np.ndarray]] = [{} for _ in range(B)]
    for name, value in raw.items():
        n = graph[name]
        lead = (B, 1) if n.axis == "prompt" else (B, S)
        arr = value.reshape(*lead, *graph.trailing_shape(name))
        arr = kernels.cast(arr, np.int64 if n.kind == "index" else np.float32)  # float16 in C
        for b, seq in enumerate(batch_ids):
            out[b][name] = arr[b] if n.axis == "prompt" else arr[b, : len(seq)]
    return out


class OnnxRuntimeSide:
    """``model_file``: the variant's ONNX model (actdiff.onnxrt.variants); ``level``: ORT's graph optimisation
    level (disable, basic, all). Batches are right-padded with an attention mask, as the reference's."""

    name = ENGINE
    records_input_ids = True

    def __init__(self, record, variant, model_file: str | Path, level: str = "disable", threads: int = 1,
                 batch_size: int = 1, engine_ids: str = "reference"):  # fmt: skip
        from ..sides.dump import ids_column

        if level not in LEVELS:
            raise ModelError(f"onnxruntime level {level!r}: use one of {', '.join(LEVELS)}")
        self.variant, self.level = check_variant(variant), level
        self.threads, self.batch_size = int(threads), int(batch_size)
        self.engine_ids, self.ids_column = engine_ids, ids_column(engine_ids)
        self.record, self.graph = record, record.graph()
        self.model_file = Path(model_file)
        self.meta = check_model_file(self.model_file, self.graph)
        self._workdir = tempfile.TemporaryDirectory(prefix="actdiff-ort-")  # ORT's optimised graph, read once
        self.capture = OrtCapture(self.model_file, self.graph.names(), level, self._workdir.name, self.threads)
        self.missing_nodes = tuple(n for n in self.graph.names() if n in self.capture.fused)
        if self.missing_nodes:
            log.info("onnxruntime %s at level %s: %d node(s) fused away, not captured: %s", variant, level,
                     len(self.missing_nodes), ", ".join(self.missing_nodes))  # fmt: skip
        self.forward_seconds = 0.0

    @classmethod
    def replay(cls, model_dir: str | Path, variant, provenance: dict):
        """ORT's replay (:class:`.replay.OrtReplay`) of the dump whose attributes are ``provenance``: the same
        model file (checked by its sha256), optimisation level and thread count."""
        from ..models.loading import sha256_file
        from ..nodes import build_graph, load_config_json
        from .replay import OrtReplay

        lost = [k for k in ("onnx_path", "onnx_sha256", "optimization_level", "threads") if k not in provenance]
        if lost:
            raise ModelError(f"onnxruntime dump attributes lack {lost}: rerun the dump_onnxruntime rule to replay it")
        path = Path(provenance["onnx_path"])
        if not path.is_file() or sha256_file(path) != provenance["onnx_sha256"]:
            raise ModelError(f"{path}: not the ONNX model the dump ran (missing or another sha256); rebuild the "
                             "variant's model and rerun the dump_onnxruntime rule")  # fmt: skip
        model_dir = Path(model_dir)
        graph = build_graph(load_config_json(model_dir), str(model_dir / "config.json"))
        with tempfile.TemporaryDirectory(prefix="actdiff-ort-replay-") as tmp:
            return OrtReplay(graph, check_variant(variant), path, provenance["optimization_level"],
                             int(provenance["threads"]), tmp, int(provenance.get("batch_size", 1)))  # fmt: skip

    def provenance(self) -> dict:
        import onnxruntime

        from ..models.loading import sha256_file

        return {
            "impl": "onnxruntime",
            "engine": ENGINE,
            "engine_ids": self.engine_ids,
            "batch_size": self.batch_size,
            "threads": self.threads,
            "execution_provider": "CPUExecutionProvider",
            "optimization_level": self.level,
            "dtypes": json.dumps({"activations": "float32", "indices": "int64", "precision": self.variant}),
            "onnxruntime_version": onnxruntime.__version__,
            "onnx_path": str(self.model_file.resolve()),
            "onnx_sha256": sha256_file(self.model_file),
            "exporter": self.meta.get(META_EXPORTER, "?"),
            "moe_formulation": self.meta.get(META_FORMULATION, "?"),
            "fused_away": json.dumps(self.capture.fused),
            "aliases": json.dumps(self.capture.aliases),
            "missing_nodes": json.dumps(list(self.missing_nodes)),
            "calibration": self.meta.get(META_CALIBRATION, "none"),
        }

    def _run_batch(self, batch_ids: list[list[int]]) -> list[dict[str, np.ndarray]]:
        ids, mask = pad_batch(batch_ids, self.graph.dims.pad_token_id)
        t0 = time.perf_counter()
        raw = self.capture.run(ids, mask)
        self.forward_seconds += time.perf_counter() - t0
        return to_prompts(self.graph, raw, batch_ids)

    def forward(self, items):
        yield from batched_in_order(
            items, self._run_batch, self.batch_size, MAX_BATCH_TOKENS, window_tokens_for(self.graph)
        )

    def stream(self, items, sink) -> None:
        """forward's batches, each prompt's values handed to ``sink`` (actdiff.sides.base.RowSink) once its batch
        has run (the session returns a batch's outputs at once): no window of batches is held."""

        def run_into(batch_ids, put):
            for b, vals in enumerate(self._run_batch(batch_ids)):
                for name, value in vals.items():
                    put(b, name, value)

        stream_batches(items, sink, run_into, self.batch_size, self.graph)

    def close(self) -> None:
        self.capture.session = None
        self._workdir.cleanup()
