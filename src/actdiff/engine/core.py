"""The actdiff inference engine: NomicBERT-MoE and BERT on the C kernels (actdiff.kernels) and numpy.

No torch anywhere on this path: weights come from safetensors' numpy loader, every compute node runs in
C (the kernels library counts calls per op), numpy only moves data (splits, reshapes, gathers of expert
rows, fp16 rounding of activations for ``fp16-act``).

The graph is the canonical one from actdiff.nodes: the engine executes its nodes in order, each through
:meth:`Engine.run_node`, so any node can be tapped, and any node can be replayed on other inputs (the
comparison stage replays every node on the reference's inputs: teacher forcing). For speed the forward
pass runs a whole MoE block as one fused C kernel (router, top-k, grouped experts, weighted sum, bias)
that returns every intermediate node; with ``fp16-act`` the block runs node by node so activations are
rounded between ops.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import kernels
from ..batching import split_rows, stack_rows
from ..errors import ActdiffError
from ..heap import reuse_freed_memory
from ..nodes import ARCH_NOMIC_MOE, INPUT_IDS, LAYOUT_OPS, Graph, MoeBlock, build_graph, load_config_json
from ..variants import Variant, parse_variant
from .faults import Fault, get_fault
from .weights import Checkpoint, EngineTensor, convert

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """Weights and settings of one variant."""

    variant: Variant
    weights: dict[str, EngineTensor]
    fault: Fault | None  # a catalogue entry run on purpose (actdiff.engine.faults)

    def w(self, key: str) -> EngineTensor:
        return self.weights[key]


@dataclass(frozen=True)
class Batch:
    """The layout a forward runs in: ``len(lengths)`` sequences right-padded to ``S`` tokens and flattened to
    ``B*S`` rows, sequence-major. Per-token ops (matmul, layernorm, gelu, MoE, ...) run on all ``B*S`` rows:
    every kernel computes a row independently of the others (matmul's contract: one fma chain per element,
    whatever the row count), so a real row is bitwise the same with or without pad rows beside it, and no
    gather/scatter is needed around attention; pad rows cost compute, which length-sorted batches keep small.
    Only position ids (EMBED, ROPE), attention (key mask) and pooling (token mask) see the layout."""

    lengths: tuple[int, ...]
    S: int

    @classmethod
    def single(cls, tokens: int) -> Batch:
        return cls((tokens,), tokens)

    @property
    def B(self) -> int:
        return len(self.lengths)

    @property
    def padded(self) -> bool:
        return any(n != self.S for n in self.lengths)

    def mask(self) -> np.ndarray:
        """[B, S] bool: True on real tokens."""
        return np.arange(self.S)[None, :] < np.asarray(self.lengths)[:, None]

    def positions(self) -> np.ndarray:
        """[B*S] int64: 0..S-1 in every sequence (positions restart at 0 per sequence; pad rows keep
        counting, as HF's default position ids do: they are never read by a real row)."""
        return np.tile(np.arange(self.S, dtype=np.int64), self.B)

    def rows(self, b: int) -> slice:
        return slice(b * self.S, (b + 1) * self.S)


class Engine:
    def __init__(self, model_dir: str | Path, threads: int | None = None):
        self.model_dir = Path(model_dir)
        self.config = load_config_json(self.model_dir)
        self.graph: Graph = build_graph(self.config, str(self.model_dir / "config.json"))
        self.dims = self.graph.dims
        self.checkpoint = Checkpoint(self.model_dir / "model.safetensors")
        self._prepared: dict[str, Prepared] = {}
        self._batch: Batch | None = None  # the layout of the forward_batch in progress (None: one sequence)
        reuse_freed_memory()  # each forward's outputs reuse the last one's pages (actdiff.heap)
        if threads is not None:
            kernels.set_num_threads(int(threads))

    # ------------------------------------------------------------------ graph
    def describe(self) -> str:
        """The graph, one line per node: ``node 17 LAYERNORM encoder.layers.0.norm1 [T, 768]``."""
        return self.graph.describe()

    # ---------------------------------------------------------------- weights
    def prepare(self, variant: str | Variant | Prepared = "fp32") -> Prepared:
        """The weights and settings of a variant, converted once (a Prepared passes through: a stage resolves
        its variant once and hands the prepared object to every call)."""
        if isinstance(variant, Prepared):
            return variant
        key = str(variant)
        if key not in self._prepared:
            v = parse_variant(key) if isinstance(variant, str) else variant
            fault = get_fault(v.fault, v.fault_param, self.graph)
            self._prepared = {}  # one variant's weights at a time: release the previous ones first
            w2 = self._param(fault, self._first("EXPERT_FC2"), "w2_orientation", "FH")
            weights = convert(self.graph, self.checkpoint, v.precision, w2_orientation=w2)
            self.checkpoint.close()
            self._prepared = {key: Prepared(v, weights, fault)}
        return self._prepared[key]

    def export_weights(self, variant: str = "fp32") -> dict[str, EngineTensor]:
        """Every tensor the engine uses, after its layout and quantisation, with source and transform."""
        return self.prepare(variant).weights

    def understood_config(self, variant: str = "fp32") -> dict:
        """Config values as the engine applies them (for config parity checks)."""
        p = self.prepare(variant)
        d = self.dims
        f = p.fault
        return {
            "arch": d.arch,
            "hidden": d.hidden,
            "heads": d.heads,
            "head_dim": d.head_dim,
            "layers": d.layers,
            "inner": d.inner,
            "experts": d.experts,
            "top_k": d.top_k,
            "moe_every_n_layers": d.moe_every_n_layers,
            "layer_norm_eps": self._param(f, self._first("LAYERNORM"), "eps", d.eps),
            "rotary_base": d.rotary_base if d.arch == ARCH_NOMIC_MOE else None,
            "rotary_interleaved": self._rope_interleaved(f, self._first("ROPE")) if d.arch == ARCH_NOMIC_MOE else None,
            "activation": "gelu_tanh" if self._gelu_kind(p, self._first("GELU")) == "tanh" else "gelu_erf",
            "attention": self._param(f, self._first("ATTENTION"), "mask", "bidirectional"),
            "topk_renormalize": self._renormalize(p),
            "expert_bias": self._param(f, self._first("BIAS_ADD"), "bias", "once") != "none",
            "precision": p.variant.precision,
            "rotary_scaling": [d.rotary_scaling_factor, d.max_trained_positions] if d.rotary_scaling_factor else None,
            "linear_biases": {"qkv_proj_bias": d.qkv_bias, "mlp_fc1_bias": d.fc1_bias, "mlp_fc2_bias": d.fc2_bias},
        }

    # ------------------------------------------------------------- one node
    def _first(self, op: str):
        """The first node of an op type (None when the model has none): settings are per op type."""
        return next((n for n in self.graph if n.op == op), None)

    def _param(self, fault: Fault | None, node, key: str, spec):
        """A spec parameter of ``node`` as the engine runs it: the spec's value unless a fault overrides it."""
        if fault is None or node is None:
            return spec
        return fault.overrides(node, self.dims.arch).get(key, spec)

    def _rope_interleaved(self, fault: Fault | None, node) -> bool:
        spec = "gptj" if self.dims.rotary_interleaved else "neox"
        return self._param(fault, node, "layout", spec) == "gptj"

    def _bias_dropped(self, p: Prepared, node) -> bool:
        return self._param(p.fault, node, "bias", "once") == "none"

    def _layout(self, tokens: int) -> Batch:
        """The layout of the rows an op sees: forward_batch's padded batch, else one unpadded sequence
        (run_node / replay_node on one prompt's values)."""
        return self._batch if self._batch is not None else Batch.single(tokens)

    def run_node(self, name: str, inputs: dict[str, np.ndarray], variant: str = "fp32") -> np.ndarray:
        """Run one node on the given input arrays (its graph inputs by name, shaped as the graph says)."""
        p = self.prepare(variant)
        node = self.graph[name]
        missing = [i for i in node.inputs if i not in inputs]
        if missing:
            raise ActdiffError(f"node {name}: missing input(s) {missing}")
        x = [inputs[i] for i in node.inputs]
        if node.op != "EMBED":
            x = [np.ascontiguousarray(a, dtype=np.int64 if a.dtype.kind in "iu" else np.float32) for a in x]
        op = getattr(self, f"_op_{node.op.lower()}")
        return op(node, x, p)

    def replay_node(self, name: str, inputs: dict[str, np.ndarray], variant: str = "fp32") -> np.ndarray:
        """run_node under the variant's activation policy, as the node runs inside forward(): with
        ``fp16-act`` the inputs and the output are rounded to fp16 (teacher forcing uses this)."""
        if self.prepare(variant).variant.precision != "fp16-act":
            return self.run_node(name, inputs, variant)
        rounded = {k: v if v.dtype.kind in "iu" else _fp16(v) for k, v in inputs.items()}
        out = self.run_node(name, rounded, variant)
        return out if self.graph[name].kind == "index" else _fp16(out)

    def replay_nodes(self, name: str, inputs: list[dict[str, np.ndarray]], variant: str = "fp32") -> list[np.ndarray]:
        """replay_node on several prompts' inputs, bitwise the same per prompt, in one call where the op does not
        read the layout (actdiff.nodes.LAYOUT_OPS; the kernels compute every row on its own, Batch): the prompts'
        rows are stacked and each result is a view of its prompt's rows. The statistics replay each node for a
        group of short prompts so (a call per prompt and node was most of the replay's cost on small models)."""
        node = self.graph[name]
        if len(inputs) < 2 or node.op in LAYOUT_OPS:
            return [self.replay_node(name, x, variant) for x in inputs]
        rows = [len(x[node.inputs[0]]) for x in inputs]
        out = self.replay_node(name, {i: stack_rows([x[i] for x in inputs]) for i in node.inputs}, variant)
        return split_rows(out, rows)

    def _moe_block(self, node: str | MoeBlock) -> MoeBlock:
        """The MoE block of a block node (e.g. its router's name), or the block itself."""
        if isinstance(node, MoeBlock):
            return node
        block = self.graph.moe_block_of(node)
        if block is None:
            raise ActdiffError(f"node {node} is not part of a mixture-of-experts block")
        return block

    def _expert_weights(self, block: MoeBlock, p: Prepared) -> tuple[EngineTensor, EngineTensor, np.ndarray | None]:
        """w1, w2 and the shared bias (None under the fault that drops it) of one block."""
        g = self.graph
        bias_node = g[block.output]
        bias = None if self._bias_dropped(p, bias_node) else p.w(bias_node.weights[0]).data
        return p.w(g[block.fc1].weights[0]), p.w(g[block.expert_out].weights[0]), bias

    def forced_moe(
        self,
        router_name: str | MoeBlock,
        h: np.ndarray,
        indices: np.ndarray,
        weights: np.ndarray,
        variant: str = "fp32",
    ) -> np.ndarray:
        """The MoE block's output (after the shared bias) with the expert choice given (e.g. the
        reference's), so expert-kernel error is separated from routing flips. ``router_name``: the block
        (:meth:`Graph.moe_blocks`) or the name of one of its nodes (its router's, as the statistics pass)."""
        p = self.prepare(variant)
        block = self._moe_block(router_name)
        w1, w2, bias = self._expert_weights(block, p)
        return kernels.moe(
            np.ascontiguousarray(h, dtype=np.float32),
            None,
            w1.data,
            w2.data,
            bias,
            top_k=self.dims.top_k,
            gelu_approximate=self._gelu_kind(p, self.graph[block.act]),
            w1_scales=w1.scales,
            w2_scales=w2.scales,
            forced_indices=np.ascontiguousarray(indices),
            forced_weights=np.ascontiguousarray(weights, dtype=np.float32),
        )

    # ops: each takes (node, input arrays, prepared variant) and returns the node value
    def _op_embed(self, node, x, p):
        ids = np.asarray(x[0], dtype=np.int64)
        T = ids.shape[0]
        if T and (ids.min() < 0 or ids.max() >= self.dims.vocab):
            raise ActdiffError(f"token id out of range [0, {self.dims.vocab}) in input_ids")
        w = [p.w(k).data for k in node.weights]
        out = kernels.embedding(ids, w[0])
        if self.dims.arch != ARCH_NOMIC_MOE:  # BERT: absolute positions, from 0 in every sequence
            lay = self._layout(T)
            if lay.S > self.dims.max_positions:
                raise ActdiffError(f"{lay.S} tokens exceed max_position_embeddings={self.dims.max_positions}")
            kernels.add(out, kernels.embedding(lay.positions(), w[1]), out=out)
        kernels.add(out, kernels.embedding(np.zeros(T, dtype=np.int64), w[-1]), out=out)  # token type 0
        return out

    def _op_layernorm(self, node, x, p):
        eps = self._param(p.fault, node, "eps", self.dims.eps)
        return kernels.layernorm(x[0], p.w(node.weights[0]).data, p.w(node.weights[1]).data, eps=eps)

    def _matmul(self, inp, wt: EngineTensor, bias: EngineTensor | None):
        return kernels.matmul(inp, wt.data, None if bias is None else bias.data, scales=wt.scales)

    def _op_matmul(self, node, x, p):
        inp = x[0].reshape(x[0].shape[0], -1)
        out = self._matmul(inp, p.w(node.weights[0]), p.w(node.weights[1]) if len(node.weights) > 1 else None)
        return out.reshape(self.graph.shape(node.name, inp.shape[0]))

    def _op_split(self, node, x, p):
        T = x[0].shape[0]
        nh, hd = self.dims.heads, self.dims.head_dim
        part = node.attrs["part"]
        if self._param(p.fault, node, "order", "qkv_major") == "head_major":  # rows read as (nh, 3, hd)
            return np.ascontiguousarray(x[0].reshape(T, nh, 3, hd)[:, :, part, :])
        return np.ascontiguousarray(x[0].reshape(T, 3, nh, hd)[:, part])

    def _op_rope(self, node, x, p):
        lay = self._layout(x[0].shape[0])
        pos = lay.positions()  # rotary positions restart at 0 in every sequence
        interleaved = self._rope_interleaved(p.fault, node)
        # under dynamic NTK scaling (config rotary_scaling_factor) the base follows each sequence's own length,
        # as the reference's does per prompt: one kernel call per distinct base
        bases = [self.dims.rotary_base_for(n) for n in lay.lengths]
        if len(set(bases)) == 1:
            return kernels.rotary(x[0], pos, base=bases[0], interleaved=interleaved)
        out = np.empty_like(x[0])
        for b, base in enumerate(bases):
            r = lay.rows(b)
            out[r] = kernels.rotary(x[0][r], pos[r], base=base, interleaved=interleaved)
        return out

    def _op_attention(self, node, x, p):
        """One attention kernel call per sequence of the batch (its S rows, zero-copy slices), with the
        sequence's key-padding mask; each call is already parallel over (head, query block) units.
        ``mask: query_padding`` (fault mask_query_axis) applies the padding mask on the query axis instead:
        every key is visible (real queries attend the pad keys) and pad query rows are zeroed. Without padding
        (batch 1) it is the spec."""
        q, k, v = x
        mode = self._param(p.fault, node, "mask", "bidirectional")
        lay = self._layout(q.shape[0])
        mask, scale = lay.mask(), 1.0 / math.sqrt(self.dims.head_dim)
        out = np.empty((q.shape[0], q.shape[1] * q.shape[2]), np.float32)
        for b, n in enumerate(lay.lengths):
            r = lay.rows(b)
            key_mask = mask[b] if n != lay.S and mode != "query_padding" else None
            kernels.attention(q[r], k[r], v[r], key_mask, scale=scale, causal=mode == "causal", out=out[r])
            if mode == "query_padding":
                out[r][n:] = 0.0
        return out

    def _op_add(self, node, x, p):
        return kernels.add(x[0], x[1])

    def _gelu_kind(self, p: Prepared, node) -> str:
        spec = "erf" if self.dims.activation == "gelu" else "tanh"
        return "tanh" if self._param(p.fault, node, "form", spec) == "tanh" else "none"

    def _op_gelu(self, node, x, p):
        return kernels.gelu(x[0], approximate=self._gelu_kind(p, node))

    def _op_router(self, node, x, p):
        return kernels.matmul(x[0], p.w(node.weights[0]).data)

    def _op_softmax(self, node, x, p):
        return kernels.softmax(x[0])

    def _renormalize(self, p: Prepared) -> bool:
        return bool(self._param(p.fault, self._first("TOPK"), "renormalize", self.dims.normalize_expert_weights))

    def _op_topk(self, node, x, p):
        w, idx = kernels.topk(x[0], self.dims.top_k, renormalize=self._renormalize(p))
        return w if node.attrs["part"] == "weights" else idx

    def _op_expert_fc1(self, node, x, p):
        w1 = p.w(node.weights[0])
        return kernels.expert_up(x[0], x[1], w1.data, scales=w1.scales)

    def _op_expert_fc2(self, node, x, p):
        w2 = p.w(node.weights[0])
        return kernels.expert_down(x[0], x[1], w2.data, scales=w2.scales)

    def _op_moe_sum(self, node, x, p):
        return kernels.moe_combine(x[0], x[1])

    def _op_bias_add(self, node, x, p):
        if self._bias_dropped(p, node):
            return x[0].copy()
        bias = p.w(node.weights[0]).data
        return kernels.add(x[0], np.ascontiguousarray(np.broadcast_to(bias, x[0].shape)))

    def _op_pool(self, node, x, p):
        lay = self._layout(x[0].shape[0])
        h = x[0].reshape(lay.B, lay.S, -1)
        return kernels.mean_pool(h, lay.mask() if lay.padded else None)  # [B, H]: pad tokens not counted

    def _op_l2norm(self, node, x, p):
        return kernels.l2_normalize(x[0], eps=1e-12)

    def fused_nodes(self, variant: str | Variant | Prepared = "fp32") -> frozenset[str]:
        """Nodes whose value forward() computes on another code path than run_node (the fused MoE kernel):
        their per-node replay may legitimately differ from the forward by rounding order, within the node's
        budget; every other node's replay must reproduce the forward bit for bit."""
        if self.prepare(variant).variant.precision == "fp16-act":
            return frozenset()  # fp16-act runs the block node by node
        return frozenset(n for block in self.graph.moe_blocks() for n in block.nodes())

    # --------------------------------------------------------------- forward
    def forward(self, ids, variant: str = "fp32", fused_moe: bool = True) -> dict[str, np.ndarray]:
        """Run the whole graph on one prompt's token ids; return every node's value (a batch of one)."""
        return self.forward_batch([ids], variant, fused_moe)[0]

    def forward_batch(self, batch_ids, variant: str = "fp32", fused_moe: bool = True) -> list[dict[str, np.ndarray]]:
        """Run prompts (token id lists) as one right-padded batch with an attention mask, as the reference
        does; return each prompt's node values without its padding (the same shapes as :meth:`forward`)."""
        lay, flat = self._padded(batch_ids)
        if lay is None:
            return []
        vals = self._run_batch(flat, lay, self.prepare(variant), fused_moe)
        return [{node.name: self._rows_of(node, vals[node.name], lay, b) for node in self.graph} for b in range(lay.B)]

    def forward_batch_into(self, batch_ids, put, variant: str = "fp32", fused_moe: bool = True) -> None:
        """:meth:`forward_batch`'s values handed to ``put(b, name, value)`` (``b`` the prompt's place in the batch)
        as each node is computed; a node's values are dropped once the last node reading them has run, so a batch
        holds only what later nodes still read (a full-size batch held every node: 1.06 MB per token)."""
        lay, flat = self._padded(batch_ids)
        if lay is None:
            return

        def emit(node, a):
            for b in range(lay.B):
                put(b, node.name, self._rows_of(node, a, lay, b))

        self._run_batch(flat, lay, self.prepare(variant), fused_moe, emit)

    def _padded(self, batch_ids) -> tuple[Batch | None, np.ndarray]:
        """The batch's layout and its flattened, right-padded ids (None for no prompts)."""
        seqs = [np.asarray(ids, dtype=np.int64) for ids in batch_ids]
        for ids in seqs:
            if ids.ndim != 1 or ids.shape[0] == 0:
                raise ActdiffError(f"input_ids must be a non-empty 1-D sequence, got shape {ids.shape}")
        if not seqs:
            return None, np.zeros(0, dtype=np.int64)
        lay = Batch(tuple(len(ids) for ids in seqs), max(len(ids) for ids in seqs))
        flat = np.full(lay.B * lay.S, self.dims.pad_token_id, dtype=np.int64)
        for b, ids in enumerate(seqs):
            flat[lay.rows(b)][: len(ids)] = ids
        return lay, flat

    def _run_batch(self, flat, lay: Batch, p: Prepared, fused_moe: bool, emit=None) -> dict[str, np.ndarray]:
        self._batch = lay
        try:
            return self._run_graph(flat, p, fused_moe, emit)
        finally:
            self._batch = None

    def _run_graph(self, ids: np.ndarray, p: Prepared, fused_moe: bool, emit=None) -> dict[str, np.ndarray]:
        """Every node in graph order on the (flattened) ids; the node values, rows as the ids. With ``emit``,
        each value goes to ``emit(node, value)`` when computed and is dropped after its last reader."""
        round_act = p.variant.precision == "fp16-act"
        vals: dict[str, np.ndarray] = {INPUT_IDS: ids}
        dying = self._last_reads() if emit is not None else {}
        skip: set[str] = set()
        for k, node in enumerate(self.graph):
            if node.name not in skip:
                if node.op == "ROUTER" and fused_moe and not round_act:
                    new = self._fused_moe(node, vals[node.inputs[0]], p)
                    skip.update(new)
                else:
                    out = self.run_node(node.name, {i: vals[i] for i in node.inputs}, p)
                    new = {node.name: _fp16(out) if round_act and node.kind != "index" else out}
                vals.update(new)
                for name, a in new.items() if emit is not None else ():
                    emit(self.graph[name], a)
            for name in dying.get(k, ()):
                del vals[name]
        vals.pop(INPUT_IDS, None)
        return vals

    def _last_reads(self) -> dict[int, list[str]]:
        """Graph position -> the values no node after it reads (the ids, and every node: its own position when
        nothing reads it)."""
        last = {INPUT_IDS: 0}
        for k, node in enumerate(self.graph):
            last[node.name] = k
            for i in node.inputs:
                last[i] = k
        dying: dict[int, list[str]] = {}
        for name, k in last.items():
            dying.setdefault(k, []).append(name)
        return dying

    @staticmethod
    def _rows_of(node, a: np.ndarray, lay: Batch, b: int) -> np.ndarray:
        """Sequence b's values of a node: its real rows of a token node, its row of a prompt node, as views. Copies
        were a third of a full-size 512-token forward (0.79 of 2.4 s, mostly page faults of ~700 MB of fresh
        memory) and doubled a batch's memory while they were made; a view keeps its batch's arrays alive until
        every prompt of the batch is dropped, which batched_in_order's window of batches does anyway. Nothing
        downstream writes into a value."""
        return a[b : b + 1] if node.axis == "prompt" else a[lay.rows(b)][: lay.lengths[b]]

    def _fused_moe(self, router_node, h, p: Prepared) -> dict[str, np.ndarray]:
        block = self._moe_block(router_node.name)
        w1, w2, bias = self._expert_weights(block, p)
        r = kernels.moe(
            h,
            p.w(router_node.weights[0]).data,
            w1.data,
            w2.data,
            bias,
            top_k=self.dims.top_k,
            renormalize=self._renormalize(p),
            gelu_approximate=self._gelu_kind(p, self.graph[block.act]),
            w1_scales=w1.scales,
            w2_scales=w2.scales,
            return_intermediates=True,
        )
        return {
            block.logits: r.router_logits,
            block.probs: r.probs,
            block.topk_weights: r.topk_weights,
            block.topk_indices: r.topk_indices,
            block.fc1: r.fc1,
            block.act: r.act,
            block.expert_out: r.expert_out,
            block.weighted_sum: r.weighted,
            block.output: r.out,
        }


def _fp16(a: np.ndarray) -> np.ndarray:
    """Round float32 values to fp16 precision (fp16-act); kept in float32 for the C kernels (kernels.round_f16:
    numpy's float16 round trip, 2.8 ns a value, was half of the fp16-act statistics job's replays)."""
    return kernels.round_f16(a) if a.dtype == np.float32 else a.astype(np.float16).astype(np.float32)
