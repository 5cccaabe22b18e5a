"""ORT CPU sessions that capture every canonical node, at optimisation level disable, basic or all.

Capturing changes what ORT fuses: a value that is a graph output cannot disappear inside a fused kernel. So
the capture is done in two steps (Polygraphy's "mark all", applied after the optimiser rather than before):

1. the model as exported (only the final output) is optimised by ORT at the requested level, and the
   optimised graph saved (``SessionOptions.optimized_model_filepath``): the kernels a production session runs;
2. every canonical node still produced in that graph is added as a graph output, and the result is run with
   optimisation disabled, so the session executes exactly the optimised graph's kernels.

Nodes no longer produced after step 1 were fused away; :func:`fused_away` names the fused op that absorbed
each (the producer of the first value downstream of it that survived). ``tests/test_onnxrt.py`` shows that
marking does not change the final output against an unmarked session at the same level.
"""

from __future__ import annotations

import logging
from collections import deque
from pathlib import Path

import numpy as np

from ..errors import ActdiffError, ModelError
from ..nodes import INPUT_IDS
from .export import INPUT_MASK

log = logging.getLogger(__name__)

LEVELS = ("disable", "basic", "all")


def session_options(level: str, threads: int = 1, optimized_path: str | Path | None = None):
    """SessionOptions for ``level`` (disable/basic/all), fixed thread count (reproducible reductions)."""
    import onnxruntime as ort

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if level not in levels:
        raise ActdiffError(f"onnxruntime optimisation level {level!r} is not one of {', '.join(LEVELS)}")
    so = ort.SessionOptions()
    so.graph_optimization_level = levels[level]
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # errors only: the optimiser's warnings about contrib ops are expected
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return so


def cpu_session(model, level: str = "disable", threads: int = 1, optimized_path=None):
    """An InferenceSession on the CPU execution provider (``model``: a path or serialized bytes)."""
    import onnxruntime as ort

    src = str(model) if isinstance(model, Path) else model
    so = session_options(level, threads, optimized_path)
    return ort.InferenceSession(src, sess_options=so, providers=["CPUExecutionProvider"])


def optimize(model_path: str | Path, level: str, out_path: str | Path) -> Path:
    """Let ORT optimise ``model_path`` at ``level`` and save the optimised graph to ``out_path``."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    cpu_session(Path(model_path), level, optimized_path=out_path)  # the session writes the file at creation
    if not out_path.is_file():
        raise ActdiffError(f"onnxruntime did not write the optimised model {out_path} (level {level})")
    return out_path


def value_types(proto, names: list[str]) -> dict[str, int]:
    """ONNX element type of each named value, by ONNX shape inference on a model of standard ops."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(proto)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.value_info, *g.output, *g.input)}
    missing = [n for n in names if not types.get(n)]
    if missing:
        raise ModelError(f"ONNX model: no element type inferred for node value(s) {missing[:5]}")
    return {n: types[n] for n in names}


def _producers(graph) -> dict[str, object]:
    return {o: node for node in graph.node for o in node.output}


def fused_away(original, optimized, nodes: list[str]) -> dict[str, str]:
    """{node: reason} for each canonical node ``original`` produces and ``optimized`` no longer does.

    The reason names the optimised op that now computes what the node fed: the producer of the first value
    downstream of the node (breadth first through the original graph) that the optimised graph still has."""
    kept = _producers(optimized.graph)
    orig = _producers(original.graph)
    consumers: dict[str, list] = {}
    for node in original.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    reasons = {}
    for name in nodes:
        if name in kept or name not in orig:
            continue
        absorber = _first_surviving_consumer(name, consumers, kept)
        was = orig[name].op_type
        if absorber is None:
            reasons[name] = f"{was} output removed by the optimiser (no surviving consumer found)"
        else:
            op = absorber.op_type if not absorber.domain else f"{absorber.domain}.{absorber.op_type}"
            reasons[name] = f"fused into {op} ({absorber.name}); was the output of {was}"
    return reasons


def _first_surviving_consumer(value: str, consumers: dict, kept: dict):
    seen, todo = {value}, deque([value])
    while todo:
        for node in consumers.get(todo.popleft(), []):
            for out in node.output:
                if out in kept:
                    return kept[out]
                if out not in seen:
                    seen.add(out)
                    todo.append(out)
    return None


def mark_outputs(proto, names: list[str], types: dict[str, int]):
    """A copy of ``proto`` with each of ``names`` added as a graph output (element type given, shape free)."""
    import onnx

    marked = onnx.ModelProto()
    marked.CopyFrom(proto)
    have = {o.name for o in marked.graph.output}
    for n in names:
        if n not in have:
            marked.graph.output.append(onnx.helper.make_tensor_value_info(n, types[n], None))
    return marked


class OrtCapture:
    """Every canonical node ORT still computes at ``level``, for padded (B, S) batches.

    ``fused``: {node: reason} for the nodes the optimiser removed (not captured); ``captured``: the rest."""

    def __init__(self, model_path: str | Path, nodes: list[str], level: str, workdir: str | Path, threads: int = 1):
        import onnx

        model_path = Path(model_path)
        self.level, self.threads = level, int(threads)
        original = onnx.load(str(model_path))
        types = value_types(original, nodes)
        opt_path = optimize(model_path, level, Path(workdir) / f"{model_path.stem}.opt-{level}.onnx")
        optimized = onnx.load(str(opt_path))
        self.optimized_path = opt_path
        self.fused = fused_away(original, optimized, nodes)
        self.captured = [n for n in nodes if n not in self.fused]
        marked = mark_outputs(optimized, self.captured, types)
        # the optimised graph's kernels, run as they are: no second optimisation pass over the marked graph
        self.session = cpu_session(marked.SerializeToString(), "disable", threads)

    def run(self, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        """Every captured node's raw value (ORT's shapes: (B, S, ...), (B*S, ...) for MoE, (B, ...))."""
        feeds = {INPUT_IDS: ids.astype(np.int64), INPUT_MASK: mask.astype(np.int64)}
        values = self.session.run(self.captured, feeds)
        return dict(zip(self.captured, values, strict=True))


def pad_batch(batch_ids: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded (ids, mask), as the reference runner pads a batch."""
    S = max(len(x) for x in batch_ids)
    ids = np.full((len(batch_ids), S), pad_id, dtype=np.int64)
    mask = np.zeros((len(batch_ids), S), dtype=np.int64)
    for b, seq in enumerate(batch_ids):
        ids[b, : len(seq)] = seq
        mask[b, : len(seq)] = 1
    return ids, mask


def run_unmarked(model_path: str | Path, level: str, ids: np.ndarray, mask: np.ndarray, threads: int = 1):
    """The model's own outputs from a plain session at ``level`` (nothing marked): {output name: value}."""
    sess = cpu_session(Path(model_path), level, threads)
    names = [o.name for o in sess.get_outputs()]
    out = sess.run(names, {INPUT_IDS: ids.astype(np.int64), INPUT_MASK: mask.astype(np.int64)})
    return dict(zip(names, out, strict=True))
