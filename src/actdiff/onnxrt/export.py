"""The fp32 reference exported to ONNX with ``torch.onnx``, every canonical node a named value of the graph.

The export wraps the reference model (actdiff.models.loading.load_reference_model) with the same taps the
reference dump uses (actdiff.reference.ReferenceRunner): forward hooks collect every node's value, the
wrapper returns them all, and each graph output is named after its canonical node. The written model then
keeps only the final output (``embedding``) as a graph output; every other node stays a value of that name
inside the graph, so ORT's optimiser is free to fuse it away and :mod:`.capture` can expose it again
("mark all"). The node list and the formulation are stored in the model's ``metadata_props``.

MoE (NomicBERT-MoE): the reference groups tokens per expert with ``bincount(...).tolist()`` and Python
slicing, a data-dependent dispatch neither exporter takes (measured, torch 2.13): torch.export (dynamo=True)
refuses the data-dependent ``tolist()``; the TorchScript exporter stops at the stable argsort ("ONNX export
of operator Sort, Out parameter is not supported"), and a trace would anyway freeze the example prompt's
per-expert counts. The export uses the
formulation :data:`MOE_DENSE_GATHER`, mathematically the same per (token, slot): every expert's fc1 on every
token (one MatMul with all experts' rows), the top-k slots gathered by the router's indices; GELU on the
gathered slots; every expert's fc2 on every slot (one MatMul), the slot's own expert gathered; then the
reference's weighted sum and shared bias. Only the summation order inside the matmuls differs. The cost is
E times the fc1 and k*E times the fc2 work of the sparse dispatch (8x and 16x for the released model's 8
experts, top-2): fine for a diff, not a serving graph. The provenance records the formulation.
"""

from __future__ import annotations

import contextlib
import json
import logging
import types
import warnings
from pathlib import Path

from ..atomic import atomic_path
from ..errors import ModelError
from ..nodes import ARCH_BERT, EMBEDDING, INPUT_IDS, Graph

log = logging.getLogger(__name__)

OPSET = 17  # LayerNormalization is a single op from opset 17 (one value per canonical LAYERNORM node)
INPUT_MASK = "attention_mask"
FINAL_OUTPUTS = (EMBEDDING,)
MOE_DENSE_GATHER = "dense-gather"  # every expert on every token/slot, the top-k slots gathered by index
META_NODES = "actdiff.nodes"  # metadata_props key: JSON list of canonical node names (value name = node name)
META_FORMULATION = "actdiff.moe_formulation"
META_EXPORTER = "actdiff.exporter"
EXPORTERS = ("torchscript", "dynamo")  # torch.onnx.export(dynamo=False / True); see export_model
EXPORTER = "torchscript"
# bumped when the exported graph changes for the same checkpoint (caches of exported files key on it);
# 2: the experts' fc2 weight stored in its dense (F, E*H) layout (an initializer the quantisers see as a weight)
EXPORT_REVISION = 2


def _dense_experts_forward(self, x, weights, indices):
    """Experts.forward without data-dependent dispatch (MOE_DENSE_GATHER); same taps, same node shapes."""
    import torch

    from ..models.nomic_moe import _gelu

    N, H = x.shape
    k = indices.shape[1]
    E, Fi = self.num_experts, self.n_inner
    # fc1: x @ w1[e].T for every e at once: w1 is (E*F, H), so x @ w1.T is (N, E*F) = per expert (N, E, F)
    h_all = (x @ self.mlp.w1.T).view(N, E, Fi)
    fc1 = torch.gather(h_all, 1, indices.unsqueeze(-1).expand(N, k, Fi))  # (N, k, F): the slot's expert
    act = _gelu(fc1, self.activation)
    # fc2: act @ w2[e] for every e, one matmul reducing over F as the reference: w2 in the (F, E*H) layout
    # _dense_moe stored (a weight of the graph, so the int8 quantisers quantise it like every other MatMul's)
    o_all = (act.reshape(N * k, Fi) @ self._w2_dense).view(N, k, E, H)
    out = torch.gather(o_all, 2, indices.view(N, k, 1, 1).expand(N, k, 1, H)).squeeze(2)  # (N, k, H)
    self.fc1(fc1)
    self.act(act)
    out = self.out(out)
    ws = self.weighted_sum((out * weights.unsqueeze(-1)).sum(dim=1))
    return self.bias_add(ws + self.bias)


@contextlib.contextmanager
def _dense_moe(model):
    """Swap every Experts module's forward for the dense-gather formulation while exporting."""
    import torch

    from ..models.nomic_moe import Experts

    swapped = [m for m in model.modules() if isinstance(m, Experts)]
    for m in swapped:
        m.forward = types.MethodType(_dense_experts_forward, m)
        E, Fi, H = m.num_experts, m.n_inner, m.mlp.w2.shape[1]
        # w2 (E*F, H) viewed (E, F, H) -> (F, E, H) -> (F, E*H): the same numbers, laid out once here and not
        # by Reshape/Transpose nodes on every forward (which the quantisers would take for an activation)
        dense = m.mlp.w2.detach().view(E, Fi, H).permute(1, 0, 2).reshape(Fi, E * H).contiguous()
        m._w2_dense = torch.nn.Parameter(dense, requires_grad=False)
    try:
        yield len(swapped)
    finally:
        for m in swapped:
            del m.forward
            del m._w2_dense


class TappedModel:
    """Builds the torch module that returns every canonical node (graph order) for (input_ids, mask)."""

    @staticmethod
    def build(model, graph: Graph):
        import torch

        from ..reference import ReferenceRunner

        class _Tapped(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model
                # the reference dump's own hooks: the exported values are the reference's taps
                self.runner = ReferenceRunner(model, graph)

            def forward(self, input_ids, attention_mask):
                self.runner._captured.clear()
                if graph.dims.arch == ARCH_BERT:
                    hidden = self.model(
                        input_ids=input_ids, attention_mask=attention_mask, token_type_ids=torch.zeros_like(input_ids)
                    )[0]
                    self.runner.pooling(hidden, attention_mask)
                else:
                    _nomic_forward(self.model, input_ids, attention_mask)
                return tuple(self.runner._captured[n] for n in graph.names())

        return _Tapped().eval()


def _nomic_forward(model, input_ids, attention_mask):
    """NomicBertMoeModel.forward without ``attention_mask.sum().tolist()``: the per-sequence lengths only
    select a dynamic-NTK rotary base, which export_model refuses (rotary_scaling_factor set)."""
    import torch

    x = model.emb_ln(model.embeddings(input_ids))
    additive = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
    for layer in model.encoder.layers:
        x = layer(x, additive, None)
    return model.pool(x, attention_mask)


def _example_inputs(graph: Graph):
    """Two right-padded sequences (lengths 7 and 4): the trace sees a mask with padding; axes are dynamic."""
    import torch

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, graph.dims.vocab, (2, 7), generator=gen, dtype=torch.long)
    mask = torch.ones((2, 7), dtype=torch.long)
    mask[1, 4:] = 0
    ids[1, 4:] = graph.dims.pad_token_id
    return ids, mask


def _dynamic_axes(graph: Graph) -> dict:
    """TorchScript exporter axes; the MoE block's own nodes are tapped on the flattened (B*S, ...) rows."""
    axes = {INPUT_IDS: {0: "batch", 1: "sequence"}, INPUT_MASK: {0: "batch", 1: "sequence"}}
    flat = {name for b in graph.moe_blocks() for name in b.nodes()}
    for n in graph:
        if n.axis == "prompt":
            axes[n.name] = {0: "batch"}
        elif n.name in flat:
            axes[n.name] = {0: "batch_x_sequence"}
        else:
            axes[n.name] = {0: "batch", 1: "sequence"}
    return axes


def _trace_to_onnx(model, graph: Graph, path: Path, exporter: str) -> None:
    """torch.onnx.export of the tapped model: one graph output per canonical node, named after it."""
    import torch

    tapped = TappedModel.build(model, graph)
    if exporter == "dynamo":
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
        how = {"dynamo": True, "dynamic_shapes": ({0: batch, 1: seq}, {0: batch, 1: seq}), "opset_version": 18}
    else:
        how = {"dynamo": False, "dynamic_axes": _dynamic_axes(graph), "opset_version": OPSET}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TracerWarnings about shape-derived Python ints: axes stay dynamic
            torch.onnx.export(
                tapped,
                _example_inputs(graph),
                str(path),
                input_names=[INPUT_IDS, INPUT_MASK],
                output_names=graph.names(),
                **how,
            )
    finally:
        tapped.runner.close()


def _make_ssa(proto, graph: Graph) -> None:
    """Rename internal values that reuse a canonical node's name (the dynamo exporter names the word-embedding
    Gather's output ``embedding`` after its aten op while the graph output is also ``embedding``). Nodes are
    topologically sorted, so a reader refers to the latest earlier producer of the name; the canonical value
    is the last producer, and earlier ones get a suffix."""
    canonical = set(graph.names())
    producers: dict[str, list[int]] = {}
    for i, node in enumerate(proto.graph.node):
        for o in node.output:
            producers.setdefault(o, []).append(i)
    for name, idx in producers.items():
        if len(idx) < 2 or name not in canonical:
            continue
        for k, start in enumerate(idx[:-1]):
            renamed = f"{name}__internal{k}"
            first = proto.graph.node[start]
            first.output[:] = [renamed if o == name else o for o in first.output]
            for node in proto.graph.node[start + 1 : idx[k + 1] + 1]:  # its readers, up to the next producer
                node.input[:] = [renamed if i == name else i for i in node.input]


def _keep_final_outputs(proto, graph: Graph, formulation: str, exporter: str) -> None:
    """Graph outputs -> FINAL_OUTPUTS only; every node stays a named value; record the node list."""
    import onnx

    produced = {o for node in proto.graph.node for o in node.output}
    lost = [n for n in graph.names() if n not in produced]
    if lost:
        raise ModelError(f"ONNX export: canonical node(s) {lost[:5]} are not values of the exported graph")
    keep = [o for o in proto.graph.output if o.name in FINAL_OUTPUTS]
    del proto.graph.output[:]
    proto.graph.output.extend(keep)
    del proto.graph.value_info[:]  # shapes of the traced example; ORT infers its own
    meta = {META_NODES: json.dumps(graph.names()), META_FORMULATION: formulation, META_EXPORTER: exporter}
    for key, value in meta.items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    onnx.checker.check_model(proto)


def export_model(model_dir: str | Path, out_path: str | Path, exporter: str = EXPORTER) -> dict:
    """Export the fp32 reference of ``model_dir`` to ``out_path`` (written atomically). Returns provenance:
    exporter, opset, MoE formulation, torch/onnx versions.

    ``exporter``: "torchscript" (the default: torch.onnx.export(dynamo=False)) traces the same Python forward
    the reference dump runs, hooks included, in a few seconds; "dynamo" (torch.export, then ONNX) gives the
    same named values and parity, 4x slower, and is where torch.onnx is heading (dynamo=True is its default;
    the TorchScript exporter is deprecated). Neither exports the reference's data-dependent MoE dispatch
    (module docstring), hence MOE_DENSE_GATHER with both."""
    import tempfile

    import onnx
    import torch

    from ..models.loading import load_reference_model
    from ..nodes import graph_for_model_dir

    if exporter not in EXPORTERS:
        raise ModelError(f"ONNX exporter {exporter!r}: use one of {', '.join(EXPORTERS)}")
    model, cfg, _arch = load_reference_model(model_dir)
    graph = graph_for_model_dir(model_dir)
    if cfg.get("rotary_scaling_factor"):
        raise ModelError(
            f"{Path(model_dir) / 'config.json'}: rotary_scaling_factor (dynamic NTK) picks the rotary base from "
            "each sequence's length, which the ONNX export does not trace; export a model without it"
        )
    with _dense_moe(model) as n_moe, tempfile.TemporaryDirectory() as td:
        raw = Path(td) / "traced.onnx"
        _trace_to_onnx(model, graph, raw, exporter)
        proto = onnx.load(str(raw))
    _make_ssa(proto, graph)
    formulation = MOE_DENSE_GATHER if n_moe else "none (dense model)"
    _keep_final_outputs(proto, graph, formulation, exporter)
    with atomic_path(out_path) as tmp:
        onnx.save(proto, str(tmp))
    return {
        "exporter": exporter,
        "opset": OPSET if exporter == "torchscript" else 18,
        "moe_formulation": formulation,
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "model_dir": str(Path(model_dir).resolve()),
    }


def exported_nodes(proto) -> list[str]:
    """The canonical node names an exported model records (metadata_props), in graph order."""
    meta = {p.key: p.value for p in proto.metadata_props}
    if META_NODES not in meta:
        raise ModelError(f"ONNX model has no {META_NODES!r} metadata: not written by actdiff.onnxrt.export")
    return json.loads(meta[META_NODES])
