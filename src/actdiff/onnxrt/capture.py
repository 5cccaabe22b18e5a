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

from ..errors import ActdiffError
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


def value_types(proto) -> dict[str, int]:
    """ONNX element type of every value ONNX shape inference can type (standard ops; {} if it fails)."""
    import onnx

    try:
        g = onnx.shape_inference.infer_shapes(proto).graph
    except Exception as e:  # an op ONNX cannot infer: no-op casts are then not recognised as aliases
        log.warning("onnxruntime: ONNX shape inference failed (%s); no-op Cast aliases not resolved", e)
        return {}
    return {v.name: v.type.tensor_type.elem_type for v in (*g.value_info, *g.output, *g.input)}


def _producers(graph) -> dict[str, object]:
    return {o: node for node in graph.node for o in node.output}


# ORT's CPU execution provider runs an op without a float16 kernel in float32 between inserted Casts; the
# float32 copy of value V is named with this prefix (onnxruntime/core/optimizer/insert_cast_transformer.cc)
ORT_FP32_COPY = "InsertedPrecisionFreeCast_"
SHAPE_OPS = ("Shape", "Size")  # ops that read only their input's shape (the replay feeds their outputs from a probe)


class Resolution:
    """Where each canonical node's value is in an ORT-optimised graph.

    ``value``: {node: ORT value name} for captured nodes; ``aliases``: {node: why the value has another name};
    ``fused``: {node: reason} for nodes the optimiser removed (not captured)."""

    def __init__(self, original, optimized, nodes: list[str]):
        self.kept = _producers(optimized.graph)
        # values whose numbers some optimised op reads (a Shape or Size reads only the shape)
        self.read = {i for n in optimized.graph.node if n.op_type not in SHAPE_OPS for i in n.input}
        self.orig = _producers(original.graph)
        self.types = value_types(original)
        self.consumers: dict[str, list] = {}
        for node in original.graph.node:
            for i in node.input:
                self.consumers.setdefault(i, []).append(node)
        self.value, self.aliases, self.fused = {}, {}, {}
        for name in nodes:
            self._resolve(name)

    def _resolve(self, name: str) -> None:
        if name in self.kept and not self._rounds_fp32_copy(name):
            self.value[name] = name
        elif ORT_FP32_COPY + name in self.kept:
            self.value[name] = ORT_FP32_COPY + name
            self.aliases[name] = "computed in float32: ORT's CPU provider has no float16 kernel for its op"
        elif (src := self._noop_source(name)) is not None:
            self.value[name] = src
            self.aliases[name] = f"no-op {self.orig[name].op_type} removed by the optimiser: the value of {src}"
        else:
            self.fused[name] = self._fused_reason(name)

    def _rounds_fp32_copy(self, name: str) -> bool:
        """True when the value is only ORT's float32 result cast to float16 (its producer a Cast of the float32
        copy) and no op reads it (e.g. `pooled` of an fp16 model, whose L2 norm reads the copy): the capture
        then reads the copy, the value consumed (reading the rounding made `embedding` irreproducible from the
        dumped `pooled`). A rounding that float16 ops read stays the node's value: it is what they consumed."""
        node = self.kept[name]
        return node.op_type == "Cast" and node.input[0] == ORT_FP32_COPY + name and name not in self.read

    def _noop_source(self, name: str) -> str | None:
        """The surviving input of an Identity, or of a Cast to the type its input already has."""
        node = self.orig.get(name)
        if node is None or node.op_type not in ("Identity", "Cast") or node.input[0] not in self.kept:
            return None
        src = node.input[0]
        if node.op_type == "Cast" and not (self.types.get(src) and self.types.get(src) == self.types.get(name)):
            return None
        return src

    def _fused_reason(self, name: str) -> str:
        """Names the optimised op that now computes what the node fed: the producer of the first value
        downstream of the node (breadth first through the original graph) that the optimised graph has."""
        was = self.orig[name].op_type if name in self.orig else "?"
        seen, todo = {name}, deque([name])
        while todo:
            for node in self.consumers.get(todo.popleft(), []):
                for out in node.output:
                    hit = self.kept.get(out) or self.kept.get(ORT_FP32_COPY + out)
                    if hit is not None:
                        return f"fused into {self._absorber(hit)}; was the output of {was}"
                    if out not in seen:
                        seen.add(out)
                        todo.append(out)
        return f"{was} output removed by the optimiser (no surviving consumer found)"

    def _absorber(self, hit) -> str:
        """``op (node)``; for a DequantizeLinear, the op that produced its quantised input (a QLinear* kernel
        of QDQ fusion) is the one that computed the value, so it is named with it."""
        desc = f"{hit.domain}.{hit.op_type}" if hit.domain else hit.op_type
        src = self.kept.get(hit.input[0]) if hit.op_type == "DequantizeLinear" else None
        if src is not None:
            inner = f"{src.domain}.{src.op_type}" if src.domain else src.op_type
            return f"{inner} ({src.name}), int8 output dequantised by {hit.name}"
        return f"{desc} ({hit.name})"


def fused_away(original, optimized, nodes: list[str]) -> dict[str, str]:
    """{node: reason} for each canonical node the optimised graph no longer computes under any name."""
    return Resolution(original, optimized, nodes).fused


def mark_outputs(proto, names: list[str]):
    """A copy of ``proto`` with each of ``names`` added as a graph output (untyped: ORT infers the type)."""
    import onnx

    marked = onnx.ModelProto()
    marked.CopyFrom(proto)
    have = {o.name for o in marked.graph.output}
    for n in dict.fromkeys(names):
        if n not in have:
            marked.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    return marked


class OrtCapture:
    """Every canonical node ORT still computes at ``level``, for padded (B, S) batches.

    ``fused``: {node: reason} for the nodes the optimiser removed (not captured); ``aliases``: {node: why its
    value is read under another name}; ``captured``: every other node, in graph order."""

    def __init__(self, model_path: str | Path, nodes: list[str], level: str, workdir: str | Path, threads: int = 1):
        import onnx

        model_path = Path(model_path)
        self.level, self.threads = level, int(threads)
        opt_path = optimize(model_path, level, Path(workdir) / f"{model_path.stem}.opt-{level}.onnx")
        res = Resolution(onnx.load(str(model_path)), onnx.load(str(opt_path)), nodes)
        self.optimized_path = opt_path
        self.fused, self.aliases, self._value = res.fused, res.aliases, res.value
        self.captured = [n for n in nodes if n in res.value]
        marked = mark_outputs(onnx.load(str(opt_path)), [res.value[n] for n in self.captured])
        # the optimised graph's kernels, run as they are: no second optimisation pass over the marked graph
        self.session = cpu_session(marked.SerializeToString(), "disable", threads)

    def run(self, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        """Every captured node's raw value (ORT's shapes: (B, S, ...), (B*S, ...) for MoE, (B, ...))."""
        feeds = {INPUT_IDS: ids.astype(np.int64), INPUT_MASK: mask.astype(np.int64)}
        values = self.session.run([self._value[n] for n in self.captured], feeds)
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
