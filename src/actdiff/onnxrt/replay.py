"""ORT's own kernels on given inputs (teacher forcing): one node, or one MoE block with its routing forced.

Every canonical node is a named value of the exported graph, so the part of the graph that computes a node
from its canonical inputs is a subgraph: walk back from the node's value, stop at its inputs and at the
weights, make the inputs the subgraph's graph inputs, run it in its own session (cached per node). The walk
is done in the graph the dump ran (:class:`.capture.OrtCapture`'s optimised graph at the dump's level, run
with optimisation disabled as the capture runs it), so a replay executes the very kernels of the dump.

Three kinds of values outside the node's inputs are fed instead of recomputed:

- ``Shape``/``Size`` outputs: the export computes reshape targets, positions and masks from the shapes of
  upstream values (a ``Shape`` of ``embeddings`` inside layer 3). Shapes depend on the prompt's length only, so
  they are read once per length from a probe session (the same graph, every ``Shape``/``Size`` output marked)
  run on padding ids of that length;
- the graph inputs: ``attention_mask`` is all ones (one prompt, no padding), ``input_ids`` only where the node
  reads it as a canonical input (the embedding gathers);
- what the graph computes from weights alone (an int8 weight's DequantizeLinear): computed once when the replay
  opens, by the same kernels (:func:`fold_constants`).

A node whose optimised graph computes it from values other than its inputs (a fused kernel that reads across
the node's inputs, e.g. a normalisation fused with the residual add before it) cannot be cut there; it is
replayed from the ONNX file as exported, run at the dump's level, and is a :meth:`OrtReplay.fused_nodes`
member (another code path: its replay is checked against the dump within budget, not bit for bit). A node
that neither graph can compute from its inputs alone raises :class:`~actdiff.errors.ModelError` naming it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..batching import split_rows, stack_rows
from ..errors import ModelError
from ..nodes import INPUT_IDS, LAYOUT_OPS, TOKEN_SUM_OPS, Graph
from ..sides.base import same_bits
from .capture import SHAPE_OPS, cpu_session, mark_outputs
from .export import INPUT_MASK

log = logging.getLogger(__name__)

# ops whose output shape depends on their input's values: a Shape of anything downstream, probed on padding
# ids, would not be the prompt's own; a graph holding one is refused (the export has none: dense-gather MoE)
VALUE_SHAPED_OPS = ("NonZero", "Unique", "Compress")
ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


class NotReplayable(Exception):
    """The walk back from a value reached a canonical value that is not one of the given inputs."""


@dataclass
class Cut:
    """The subgraph computing ``outputs`` from ``stops``: its ONNX nodes (graph order), the shape values and
    graph inputs it is fed."""

    nodes: list
    stops: list[str]  # value names fed from the caller's inputs
    shapes: list[str]  # Shape/Size outputs fed from the probe
    graph_inputs: list[str]  # input_ids / attention_mask / values folded from weights (Source.folded)


class Source:
    """One ONNX graph to cut subgraphs from, the level its sessions run at, and its probe per prompt length.

    ``value``: {canonical node: its value's name in this graph}."""

    def __init__(self, proto, value: dict[str, str], level: str, threads: int, pad_id: int):
        self.folded: dict[str, np.ndarray] = {}
        if level == "disable":  # ORT computes what reads only weights at every run at this level (fold_constants)
            proto, self.folded = fold_constants(proto, set(value.values()), threads)
        self.proto, self.value, self.level, self.threads, self.pad_id = proto, value, level, threads, pad_id
        self.producer = {o: n for n in proto.graph.node for o in n.output}
        self.consts = {i.name for i in proto.graph.initializer}
        self.graph_inputs = {i.name for i in proto.graph.input}
        self.canonical = {v: k for k, v in value.items()}  # value name -> node
        for k in value:  # a node read under another name (an alias) is still that node under its own name
            self.canonical.setdefault(k, k)
        self._probe = None
        self._probed: dict[int, tuple[dict[str, np.ndarray], dict[str, tuple]]] = {}
        self._extrapolated: tuple[int, tuple] | None = None  # shapes_at's last length and what it gave

    def cut(self, outputs: list[str], stops: list[str], through: tuple[str, ...] = ()) -> Cut:
        """The nodes computing ``outputs`` (value names) from ``stops``; raises NotReplayable when the walk
        reaches a canonical value other than ``through`` (the graph computes the output from something else)."""
        keep, shapes, gins, seen, todo = set(), set(), set(), set(stops), list(outputs)
        while todo:
            v = todo.pop()
            if v in seen or v in self.consts or v == "":
                continue
            seen.add(v)
            if v in self.canonical and v not in outputs and v not in through:
                raise NotReplayable(self.canonical[v])
            if v in self.graph_inputs:
                gins.add(v)
                continue
            node = self.producer[v]
            if node.op_type in SHAPE_OPS:
                shapes.add(v)
                continue
            keep.add(id(node))
            todo.extend([*node.input, *_outer_names(node)])
        nodes = [n for n in self.proto.graph.node if id(n) in keep]
        return Cut(nodes, list(stops), sorted(shapes), sorted(gins))

    def session(self, cut: Cut, outputs: list[str]):
        """An ORT session over the cut; its fed values are graph inputs typed (element type, rank) as in the
        probe, the weights it reads its initializers."""
        import onnx

        declared = {i.name: i for i in self.proto.graph.input}
        used = {i for n in cut.nodes for i in (*n.input, *_outer_names(n))}
        sub = onnx.helper.make_graph(
            cut.nodes,
            "actdiff-replay",
            [declared[v] if v in declared else self._typed(v) for v in (*cut.stops, *cut.shapes, *cut.graph_inputs)],
            [onnx.helper.make_empty_tensor_value_info(v) for v in outputs],
            [t for t in self.proto.graph.initializer if t.name in used],
        )
        model = onnx.helper.make_model(sub, opset_imports=self.proto.opset_import, ir_version=self.proto.ir_version)
        return cpu_session(model.SerializeToString(), self.level, self.threads)

    def _typed(self, v: str):
        """A graph input for value ``v``: its element type and rank as in the probe (any length will do)."""
        import onnx
        from onnx.helper import np_dtype_to_tensor_dtype

        shape, dtype = self.probe(2)[1][v]
        return onnx.helper.make_tensor_value_info(v, np_dtype_to_tensor_dtype(dtype), [None] * len(shape))

    def probe(self, tokens: int) -> tuple[dict[str, np.ndarray], dict[str, tuple]]:
        """({Shape/Size output: value}, {value: (shape, dtype)} for those and every canonical value) of this
        graph on one prompt of ``tokens`` padding ids, cached per length: the shape values a cut is fed, and
        the raw shape a node's value has in ORT (the dump stores it reshaped, :func:`.side.to_prompts`)."""
        if tokens not in self._probed:
            if self._probe is None:
                self._shape_values = [o for n in self.proto.graph.node if n.op_type in SHAPE_OPS for o in n.output]
                names = [*self._shape_values, *dict.fromkeys(self.value.values())]
                self._probe = (cpu_session(mark_outputs(self.proto, names).SerializeToString(), "disable", 1), names)
            sess, names = self._probe
            ids = np.full((1, tokens), self.pad_id, np.int64)
            feeds = {INPUT_IDS: ids, INPUT_MASK: np.ones_like(ids), **self.folded}
            out = dict(zip(names, sess.run(names, feeds), strict=True))
            shapes = {v: out[v] for v in self._shape_values}
            self._probed[tokens] = (shapes, {k: (a.shape, a.dtype) for k, a in out.items()})
        return self._probed[tokens]

    def shapes_at(self, tokens: int) -> tuple[dict[str, np.ndarray], dict[str, tuple]]:
        """:meth:`probe` at ``tokens`` without running the probe at that length (a forward of the whole model):
        every shape value and every axis taken as linear in the length, from the probes at 2 and 3 tokens. Right
        for what depends on the length as the shape of a token-wise value does; OrtReplay.replay_many, its only
        user, checks what it gives bit for bit before relying on it. The last length's result is kept: a group's
        every node is replayed at one stacked length, and extrapolating every value took 0.1-0.25 ms a call."""
        if self._extrapolated is None or self._extrapolated[0] != tokens:
            (v2, s2), (v3, s3) = self.probe(2), self.probe(3)
            values = {v: a + (v3[v] - a) * (tokens - 2) for v, a in v2.items()}
            shapes = {v: (tuple(a + (b - a) * (tokens - 2) for a, b in zip(sh, s3[v][0], strict=True)), dt)
                      for v, (sh, dt) in s2.items()}  # fmt: skip
            self._extrapolated = (tokens, (values, shapes))
        return self._extrapolated[1]


@dataclass
class Plan:
    """How one node (or one MoE block) is replayed: its graph, the cut, the value names fed and read."""

    source: Source
    cut: Cut
    feeds: dict[str, str]  # canonical node -> its value name in the source
    output: str
    session: object = None


class OrtReplay:
    """:class:`actdiff.sides.Replay` for ONNX Runtime: ``model_file`` the variant's ONNX file, ``level``,
    ``threads`` and ``batch_size`` the dump's (its provenance). Every node's plan is made at construction
    (graph walks only); sessions are built on first use and cached."""

    def __init__(self, graph: Graph, variant: str, model_file: str | Path, level: str, threads: int, workdir,
                 batch_size: int = 1):  # fmt: skip
        import onnx

        from .capture import Resolution, optimize

        self.graph, self.variant, self.level = graph, variant, level
        model_file = Path(model_file)
        opt = optimize(model_file, level, Path(workdir) / f"{model_file.stem}.opt-{level}.onnx")
        original, optimized = onnx.load(str(model_file)), onnx.load(str(opt))
        res = Resolution(original, optimized, graph.names())
        shaped = sorted({n.op_type for n in original.graph.node if n.op_type in VALUE_SHAPED_OPS})
        if shaped:
            raise ModelError(f"{model_file}: ops {shaped} give value-dependent shapes: the shapes a replay is "
                             "fed (probed per prompt length) would be wrong: the model cannot be replayed")  # fmt: skip
        pad = graph.dims.pad_token_id
        # the dump's graph, run as the capture runs it; the export as written, at the dump's level
        self.dumped = Source(optimized, res.value, "disable", threads, pad)
        self.exported = Source(original, {n: n for n in graph.names()}, level, threads, pad)
        self.seconds = 0.0  # spent replaying (sessions built, subgraphs run): the cost of teacher forcing
        self.plans: dict[str, Plan] = {}
        self.unreplayable: dict[str, str] = {}
        self.stacks: dict[str, bool] = {}  # node -> passed replay_many's trial (stacked prompts replayed at once)
        for n in graph:
            self._plan_node(n.name, n.name, list(n.inputs))
        for block in graph.moe_blocks():
            stops = [block.input, block.topk_indices, block.topk_weights]
            through = (block.fc1, block.act, block.expert_out, block.weighted_sum)
            self._plan_node(_moe_key(block), block.output, stops, through)
        self._fused = frozenset(k for k, p in self.plans.items() if p.source is self.exported and k in graph.by_name)
        if batch_size > 1:  # the dump reduced over the padded batch's length, the replay over the prompt's
            self._fused |= _sequence_reductions(graph)
        if self._fused:
            log.info("onnxruntime replay at level %s: %d node(s) on another code path than the dump (checked "
                     "within budget): %s", level, len(self._fused), ", ".join(sorted(self._fused)))  # fmt: skip

    def _plan_node(self, key: str, output: str, inputs: list[str], through: tuple[str, ...] = ()) -> None:
        """The dump's graph if it computes ``output`` from ``inputs`` alone, else the export at the level."""
        why = ""
        for src in (self.dumped, self.exported):
            names = [output, *inputs, *through]
            if any(n not in src.value for n in names if n != INPUT_IDS):
                why = f"{[n for n in names if n not in src.value and n != INPUT_IDS]} not in the graph"
                continue
            feeds = {i: (i if i == INPUT_IDS else src.value[i]) for i in inputs}
            try:
                cut = src.cut([src.value[output]], list(feeds.values()), tuple(src.value[t] for t in through))
            except NotReplayable as e:
                why = f"computed from {e.args[0]}, not only from its inputs"
                continue
            if INPUT_IDS in cut.graph_inputs and INPUT_IDS not in inputs:
                why = f"reads {INPUT_IDS} values, not an input of the node"
                continue
            self.plans[key] = Plan(src, cut, feeds, src.value[output])
            return
        self.unreplayable[key] = why

    def fused_nodes(self) -> frozenset[str]:
        return self._fused

    def replay_node(self, name: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self._run(name, name, inputs)

    def replay_many(self, name: str, inputs: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
        """replay_node for several prompts, in one session call over their stacked rows where that gives each
        prompt's replay_node bit for bit: a call per prompt and node was most of the replay's cost on short
        prompts (ORT's per-call overhead; 0.3-0.7x the time for 8 prompts stacked, Zen 4). ORT makes no promise
        that a kernel computes rows independently (a dynamic quantisation's per-tensor scale reads every row),
        so it is tried per node on the first prompts asked for (:meth:`_rows_independent`); a node that fails
        the trial is replayed prompt by prompt for the rest of the run. Only a token-wise node outside
        actdiff.nodes.LAYOUT_OPS is tried, and only on more than 3 stacked rows: its cut's Shape values are
        extrapolated from the probes at 2 and 3 tokens (:meth:`Source.shapes_at`; a probe per stacked length
        would be a forward of the whole model), which only another length puts to the test."""
        node = self.graph[name]
        if len(inputs) < 2 or not self._stackable(node) or self.stacks.get(name) is False:
            return [self.replay_node(name, x) for x in inputs]
        rows = [len(x[node.inputs[0]]) for x in inputs]
        stacked = {i: stack_rows([x[i] for x in inputs]) for i in node.inputs}  # a view of a dump's window, if it can
        if name in self.stacks:
            return split_rows(self._run(name, name, stacked, stacked=True), rows)
        if _tokens(self.graph, stacked) <= 3:
            return [self.replay_node(name, x) for x in inputs]
        alone = [self.replay_node(name, x) for x in inputs]
        self.stacks[name] = self._rows_independent(name, inputs, alone, stacked, rows)
        if not self.stacks[name]:
            log.info("onnxruntime replay of %s: stacked prompts change each other's values; replayed prompt by "
                     "prompt", name)  # fmt: skip
        return alone

    def _rows_independent(self, name: str, inputs: list[dict], alone: list[np.ndarray], stacked: dict, rows) -> bool:
        """replay_many's trial of a node: the stacked call gives each prompt's ``alone`` bit for bit, and the
        first prompt's rows stay its own with the second prompt's float inputs scaled by 2^10 beside them. The
        second check is needed: rows coupled through a statistic of the whole tensor (a dynamic quantisation's
        range) can still come out equal on ordinary prompts, whose extremes sit in rows all prompts share (a
        [CLS] token's), which MiniLM's int8-dynamic matmuls did; a far larger row moves any such statistic."""
        node = self.graph[name]
        loud = {i: np.concatenate([inputs[0][i], _scaled_floats(inputs[1][i], 1024.0)]) for i in node.inputs}
        try:
            together = split_rows(self._run(name, name, stacked, stacked=True), rows)
            first = self._run(name, name, loud, stacked=True)[: rows[0]]
        except Exception as e:  # noqa: BLE001 - a trial that fails only means: not stackable
            log.debug("onnxruntime replay of %s: stacked prompts fail (%s)", name, e)
            return False
        return all(map(same_bits, together, alone)) and same_bits(np.ascontiguousarray(first), alone[0])

    def _stackable(self, node) -> bool:
        plan = self.plans.get(node.name)
        rowwise = node.axis == "token" and node.op not in LAYOUT_OPS
        token_inputs = all(i == INPUT_IDS or self.graph[i].axis == "token" for i in node.inputs)
        return bool(plan and rowwise and token_inputs)

    def forced_moe(self, block, h: np.ndarray, indices: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """The block's output from ``h`` (its input) with ORT's expert kernels on the given expert choice."""
        values = {block.input: h, block.topk_indices: indices, block.topk_weights: weights}
        return self._run(_moe_key(block), block.output, values)

    def _run(self, key: str, output: str, inputs: dict[str, np.ndarray], stacked: bool = False) -> np.ndarray:
        t0 = time.perf_counter()
        try:
            return self._run_plan(key, output, inputs, stacked)
        finally:
            self.seconds += time.perf_counter() - t0

    def _run_plan(self, key: str, output: str, inputs: dict[str, np.ndarray], stacked: bool = False) -> np.ndarray:
        """``stacked``: the inputs are several prompts' rows (replay_many; Shape values from Source.shapes_at)."""
        from .. import kernels
        from .side import to_prompts

        plan = self.plans.get(key)
        if plan is None:
            raise ModelError(f"onnxruntime replay of {key} ({self.variant}, level {self.level}): "
                             f"{self.unreplayable.get(key, 'unknown node')}; it cannot be replayed")  # fmt: skip
        tokens = _tokens(self.graph, inputs)
        shape_values, raw = (plan.source.shapes_at if stacked else plan.source.probe)(tokens)
        if plan.session is None:
            plan.session = plan.source.session(plan.cut, [plan.output])
        types = {i.name: ORT_TYPES.get(i.type, np.float32) for i in plan.session.get_inputs()}
        feeds = {v: shape_values[v] for v in plan.cut.shapes}
        for node, v in plan.feeds.items():
            shape = (1, tokens) if node == INPUT_IDS else raw[v][0]
            feeds[v] = kernels.cast(np.asarray(inputs[node]).reshape(shape), types[v])  # float16 in C
        if INPUT_MASK in plan.cut.graph_inputs:
            feeds[INPUT_MASK] = np.ones((1, tokens), np.int64)  # one prompt, no padding
        feeds.update({v: plan.source.folded[v] for v in plan.cut.graph_inputs if v in plan.source.folded})
        out = plan.session.run([plan.output], feeds)[0]
        return to_prompts(self.graph, {output: out}, [[0] * tokens])[0][output]


# ops whose value on constant inputs is not a constant
UNFOLDABLE_OPS = (*SHAPE_OPS, "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                  "Bernoulli", "Dropout")  # fmt: skip


def fold_constants(proto, keep: set[str], threads: int) -> tuple[object, dict[str, np.ndarray]]:
    """(``proto``, changed in place: without the nodes it computes from weights alone; their values): a
    quantised weight's DequantizeLinear and what reads only weights and Constants. At level disable, the level of
    the graph the dump ran, ORT recomputes them at every run: each replay of an int8-static MiniLM matmul
    dequantised its weight again (0.5-2.2 ms a call against 0.14-0.5 with the value given), and so did the probe's
    whole forward per prompt length (Intel Xeon model 207). The values are computed once here by ORT's own kernels
    at that level and become graph inputs, fed at every run (Source.folded): a runtime tensor, as the kernel's
    output was in the dump. Not weights: ORT pre-packs a MatMul's constant operand, whose products then differ from
    the dump's in the last bits on some rows (MiniLM int8-static: 413 of 26512 node replays). Values in ``keep``
    (the canonical nodes) and the graph's outputs stay computed; nodes with subgraphs are left alone."""
    import onnx

    consts = {t.name for t in proto.graph.initializer}
    consts |= {o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}  # weights to ORT as well
    kept_values = set(keep) | {o.name for o in proto.graph.output}
    gone: set[int] = set()  # indices in proto.graph.node
    for k, node in enumerate(proto.graph.node):
        if (node.op_type not in (*UNFOLDABLE_OPS, "Constant") and node.input
                and all(i in consts or i == "" for i in node.input)
                and not _outer_names(node) and not kept_values & set(node.output)):  # fmt: skip
            gone.add(k)
            consts.update(node.output)
    if not gone:
        return proto, {}
    folded = [n for k, n in enumerate(proto.graph.node) if k in gone]
    rest = [n for k, n in enumerate(proto.graph.node) if k not in gone]
    read = {i for n in rest for i in (*n.input, *_outer_names(n))} | kept_values
    names = [o for n in folded for o in n.output if o in read]
    outputs = [onnx.helper.make_empty_tensor_value_info(v) for v in names]
    read_by_folded = {i for n in folded for i in n.input}
    constants = [n for n in proto.graph.node if n.op_type == "Constant" and read_by_folded & set(n.output)]
    weights = [t for t in proto.graph.initializer if t.name in read_by_folded]
    sub = onnx.helper.make_graph([*constants, *folded], "actdiff-fold", [], outputs, weights)
    model = onnx.helper.make_model(sub, opset_imports=proto.opset_import, ir_version=proto.ir_version)
    values = dict(zip(names, cpu_session(model.SerializeToString(), "disable", threads).run(names, {}), strict=True))
    _delete(proto.graph.node, gone)  # in place: a copy of the model's weights took 0.1-0.2 s
    _delete(proto.graph.initializer, {k for k, t in enumerate(proto.graph.initializer) if t.name not in read})
    unread = {k for k, i in enumerate(proto.graph.input) if i.name in consts and i.name not in read}
    _delete(proto.graph.input, unread)  # an old IR lists its weights as inputs
    proto.graph.input.extend([_value_info(v, a) for v, a in values.items()])
    log.info("onnxruntime replay: %d node(s) computed from weights alone, run once", len(folded))
    return proto, values


def _delete(field, indices: set[int]) -> None:
    """Delete these items of a repeated protobuf field (the others are not copied)."""
    for k in sorted(indices, reverse=True):
        del field[k]


def _value_info(name: str, value: np.ndarray):
    import onnx
    from onnx.helper import np_dtype_to_tensor_dtype

    return onnx.helper.make_tensor_value_info(name, np_dtype_to_tensor_dtype(value.dtype), list(value.shape))


def _outer_names(node) -> list[str]:
    """Values an If/Loop/Scan body reads from the enclosing graph (implicit inputs of ``node``)."""
    import onnx

    names = []
    for attr in node.attribute:
        bodies = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for body in bodies:
            local = {i.name for i in body.input} | {t.name for t in body.initializer}
            for inner in body.node:
                names += [i for i in (*inner.input, *_outer_names(inner)) if i not in local]
                local |= set(inner.output)
    return names


def _sequence_reductions(graph: Graph) -> frozenset[str]:
    """The nodes that sum over the prompt's tokens (actdiff.nodes.TOKEN_SUM_OPS: attention over its keys,
    pooling) and any per-prompt node computed from per-token ones: in a padded batch the dump's sum runs over
    the batch's longest length (masked keys and rows add zeros, in another order and blocking), a one-prompt
    replay over the prompt's own: another code path, equal within the node's budget. (Measured: 4.8e-7 abs on
    ``pooled`` at batch 4; attention's contexts bitwise equal at fp32 but not in the fp16 model: up to 3.9e-5
    relative on 141-153 of 357 prompts per layer on MiniLM, 1.0e-7 on 276 on the tiny model, batch 16.)"""
    token = {n.name for n in graph if n.axis == "token"}
    return frozenset(n.name for n in graph if n.op in TOKEN_SUM_OPS or (n.axis == "prompt" and token & set(n.inputs)))


def _scaled_floats(x: np.ndarray, factor: float) -> np.ndarray:
    """``x`` times ``factor`` if it holds floats (exact for a power of two), else ``x`` (token and expert ids)."""
    x = np.asarray(x)
    return x * x.dtype.type(factor) if np.issubdtype(x.dtype, np.floating) else x


def _moe_key(block) -> str:
    return f"moe-block-{block.layer}"


def _tokens(graph: Graph, inputs: dict[str, np.ndarray]) -> int:
    """The prompt's length: the leading axis of any token-axis input (1 when every input is per prompt: the
    shapes of such a node's subgraph do not depend on it)."""
    for name, value in inputs.items():
        if name == INPUT_IDS or graph[name].axis == "token":
            return int(np.asarray(value).shape[0])
    return 1
