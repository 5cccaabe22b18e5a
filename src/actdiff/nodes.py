"""The canonical node graph: the contract every stage of actdiff shares.

For each supported architecture, :func:`build_graph` derives from a model's ``config.json`` a DAG of
named nodes in execution order. The reference dump, the engine, the statistics tables and the reports
all use exactly these names. A node records:

- ``name``: canonical name, e.g. ``encoder.layers.0.norm1`` (module-path style, architecture-neutral:
  MiniLM's ``encoder.layer.0.attention.output.LayerNorm`` is also ``encoder.layers.0.norm1``);
- ``op``: the op type (EMBED, LAYERNORM, MATMUL, SPLIT, ROPE, ATTENTION, ADD, GELU, ROUTER, SOFTMAX,
  TOPK, EXPERT_FC1, EXPERT_FC2, MOE_SUM, BIAS_ADD, POOL, L2NORM);
- ``inputs``: names of the nodes it reads (``input_ids`` is the graph input);
- ``shape``: template such as ``("T", "H")``; :meth:`Graph.shape` resolves it for T tokens;
- ``kind``: ``float``, ``prob`` (a probability) or ``index`` (integer expert ids);
- ``axis``: ``token`` (one row per real token) or ``prompt`` (one row per prompt);
- ``tap``: where the reference observes it: ``(module_path, "output" | "input")``; ``"input"`` means the
  first positional input of that module (a forward pre-hook);
- ``weights``: the checkpoint tensors the op uses.

See docs/nodes.md for the full table with the HuggingFace module path of every node.

Other modules find nodes by asking the :class:`Graph` (by op, layer, role: :meth:`Graph.moe_blocks`,
:meth:`Graph.producers`, :meth:`Graph.key_nodes`, ...) rather than by editing names; the few graph-level
names they legitimately need are the constants below (``INPUT_IDS``, ``POOLED``, ``EMBEDDING``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import ModelError
from .models.config_keys import check_nomic_config, config_value

ARCH_NOMIC_MOE = "nomic_bert_moe"
ARCH_BERT = "bert"
INPUT_IDS = "input_ids"  # the graph input (token ids), not a node
POOLED = "pooled"  # mean-pooled last hidden state, one row per prompt
EMBEDDING = "embedding"  # the L2-normalised sentence embedding: the model's final output
# The ops whose rows depend on where the prompt starts and ends: position ids (EMBED's absolute positions, ROPE),
# attention over the prompt's keys, pooling over its tokens. Every other op computes each row of its output from
# the same row of its inputs, so the rows of several prompts stacked together are computed as each alone.
LAYOUT_OPS = frozenset({"EMBED", "ROPE", "ATTENTION", "POOL"})
# The ops that sum over the prompt's tokens (attention over its keys, pooling over its rows): their reduction
# length is the prompt's length (Graph.reduction_length), a padded batch's longest in a batched forward.
TOKEN_SUM_OPS = frozenset({"ATTENTION", "POOL"})


@dataclass(frozen=True)
class ModelDims:
    """Architecture sizes read from config.json (released key names for NomicBERT, BERT names for BERT)."""

    arch: str
    hidden: int
    heads: int
    layers: int
    inner: int
    vocab: int
    eps: float
    max_positions: int
    type_vocab: int = 1
    experts: int = 0
    top_k: int = 0
    moe_every_n_layers: int = 0
    rotary_base: float = 10000.0
    rotary_fraction: float = 1.0
    rotary_interleaved: bool = False
    # dynamic NTK rotary scaling (config rotary_scaling_factor; None: off): see rotary_base_for
    rotary_scaling_factor: float | None = None
    max_trained_positions: int = 2048
    qkv_bias: bool = True  # NomicBERT qkv_proj_bias: Wqkv.bias and out_proj.bias
    fc1_bias: bool = True  # NomicBERT mlp_fc1_bias (dense MLP layers)
    fc2_bias: bool = True  # NomicBERT mlp_fc2_bias (dense MLP layers)
    normalize_expert_weights: bool = False
    activation: str = "gelu"
    pad_token_id: int = 1

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def rotary_base_for(self, seqlen: int) -> float:
        """The rotary base a sequence of ``seqlen`` tokens is rotated with (see :func:`ntk_rotary_base`)."""
        return ntk_rotary_base(
            self.rotary_base, seqlen, self.rotary_scaling_factor, self.max_trained_positions, self.head_dim
        )

    def is_moe_layer(self, i: int) -> bool:
        # released model: MoE where layer_index % moe_every_n_layers == 1 (layers 1, 3, 5, ...)
        n = self.moe_every_n_layers
        return self.arch == ARCH_NOMIC_MOE and self.experts > 0 and n > 0 and i % n == 1

    def symbols(self) -> dict[str, int]:
        return {
            "H": self.hidden,
            "3H": 3 * self.hidden,
            "nh": self.heads,
            "hd": self.head_dim,
            "F": self.inner,
            "E": self.experts,
            "k": self.top_k,
            "1": 1,
        }


def ntk_rotary_base(base: float, seqlen: int, factor: float | None, max_trained: int, dim: int) -> float:
    """Dynamic NTK rotary scaling, as the original NomicBertDynamicNTKRotaryEmbedding._update_cos_sin_cache
    (nomic-ai/contrastors, src/contrastors/models/huggingface/modeling_hf_nomic_bert.py; the same formula in
    src/contrastors/layers/embedding.py DynamicNTKRotaryEmbedding): when seqlen > max_trained_positions,
    ``base * ((factor * seqlen / max_trained) - (factor - 1)) ** (dim / (dim - 2))``, in Python floats (float64);
    inv_freq is then recomputed from it in float32. ``dim`` is the rotary dim (head_dim * rotary_emb_fraction).

    The original only builds that class when the factor is truthy (``if config.rotary_scaling_factor:``).
    It also keeps the scaled inv_freq and its cos/sin cache across calls, so a prompt processed after a
    longer one reuses the longer one's base; actdiff computes the base from each sequence's own length
    (what the original computes for a fresh model or the longest sequence so far)."""
    if not factor or seqlen <= max_trained:
        return float(base)
    return float(base) * ((factor * seqlen / max_trained) - (factor - 1)) ** (dim / (dim - 2))


def _req(cfg: dict, key: str, source: str, typ):
    if key not in cfg:
        raise ModelError(f"{source}: required key {key!r} is missing from config.json")
    val = cfg[key]
    if typ is float and isinstance(val, int) and not isinstance(val, bool):
        val = float(val)
    if not isinstance(val, typ) or isinstance(val, bool) and typ is not bool:
        raise ModelError(
            f"{source}: key {key!r} must be {typ.__name__}, got {val!r} ({type(val).__name__}); fix config.json"
        )
    return val


def detect_arch(cfg: dict, source: str = "config.json") -> str:
    mt = cfg.get("model_type")
    if mt in ("nomic_bert", "actdiff_nomic_bert_moe"):
        return ARCH_NOMIC_MOE
    if mt == "bert":
        return ARCH_BERT
    raise ModelError(
        f"{source}: model_type {mt!r} is not supported (supported: 'nomic_bert' for NomicBERT(-MoE), "
        "'bert' for BERT such as all-MiniLM-L6-v2)"
    )


def dims_from_config(cfg: dict, source: str = "config.json") -> ModelDims:
    """Read architecture sizes from a raw config.json dict; errors name the key and file."""
    arch = detect_arch(cfg, source)
    if arch == ARCH_NOMIC_MOE:
        # every key the original reads besides the sizes: one registry, one refusal (actdiff.models.config_keys)
        check_nomic_config(cfg, source)
        d = ModelDims(
            arch=arch,
            hidden=_req(cfg, "n_embd", source, int),
            heads=_req(cfg, "n_head", source, int),
            layers=_req(cfg, "n_layer", source, int),
            inner=_req(cfg, "n_inner", source, int),
            vocab=_req(cfg, "vocab_size", source, int),
            eps=_req(cfg, "layer_norm_epsilon", source, float),
            max_positions=_req(cfg, "n_positions", source, int),
            type_vocab=int(config_value(cfg, "type_vocab_size")),
            experts=int(cfg.get("num_experts", 0) or 0),
            top_k=int(cfg.get("moe_top_k", 0) or 0),
            moe_every_n_layers=int(cfg.get("moe_every_n_layers", 0) or 0),
            rotary_base=float(_req(cfg, "rotary_emb_base", source, float)),
            rotary_fraction=float(cfg.get("rotary_emb_fraction", 1.0)),
            rotary_interleaved=bool(config_value(cfg, "rotary_emb_interleaved")),
            rotary_scaling_factor=float(cfg["rotary_scaling_factor"]) if cfg.get("rotary_scaling_factor") else None,
            max_trained_positions=int(config_value(cfg, "max_trained_positions")),
            qkv_bias=bool(config_value(cfg, "qkv_proj_bias")),
            fc1_bias=bool(config_value(cfg, "mlp_fc1_bias")),
            fc2_bias=bool(config_value(cfg, "mlp_fc2_bias")),
            normalize_expert_weights=bool(config_value(cfg, "moe_normalize_expert_weights")),
            activation=str(config_value(cfg, "activation_function")),
            pad_token_id=int(cfg.get("pad_token_id", 1)),
        )
        if d.experts and not (0 < d.top_k <= d.experts):
            raise ModelError(f"{source}: moe_top_k={d.top_k} must be between 1 and num_experts={d.experts}")
    else:
        d = ModelDims(
            arch=arch,
            hidden=_req(cfg, "hidden_size", source, int),
            heads=_req(cfg, "num_attention_heads", source, int),
            layers=_req(cfg, "num_hidden_layers", source, int),
            inner=_req(cfg, "intermediate_size", source, int),
            vocab=_req(cfg, "vocab_size", source, int),
            eps=_req(cfg, "layer_norm_eps", source, float),
            max_positions=_req(cfg, "max_position_embeddings", source, int),
            type_vocab=int(cfg.get("type_vocab_size", 2)),
            activation=str(cfg.get("hidden_act", "gelu")),
            pad_token_id=int(cfg.get("pad_token_id", 0)),
        )
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ModelError(f"{source}: only position_embedding_type='absolute' is supported")
    for key, val in (("hidden", d.hidden), ("heads", d.heads), ("layers", d.layers), ("inner", d.inner)):
        if val <= 0:
            raise ModelError(f"{source}: {key} must be positive, got {val}")
    if d.hidden % d.heads:
        raise ModelError(f"{source}: hidden size {d.hidden} is not divisible by the number of heads {d.heads}")
    return d


@dataclass(frozen=True)
class Node:
    index: int
    name: str
    op: str
    inputs: tuple[str, ...]
    shape: tuple[str, ...]
    kind: str = "float"
    axis: str = "token"
    tap: tuple[str, str] = ("", "output")
    weights: tuple[str, ...] = ()
    layer: int | None = None
    attrs: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def shape_template(self) -> str:
        return "[" + ", ".join(self.shape) + "]"

    @property
    def dtype(self) -> str:
        return "int64" if self.kind == "index" else "float32"


@dataclass(frozen=True)
class MoeBlock:
    """The node names of one mixture-of-experts block (see :meth:`Graph.moe_blocks`).

    ``input`` is the node the router and the experts both read (the layer's ``norm1``); it belongs to the
    layer, not to the block. ``output`` is the block's value after the shared expert bias (BIAS_ADD)."""

    layer: int
    input: str
    logits: str  # ROUTER
    probs: str  # SOFTMAX over all experts
    topk_weights: str  # TOPK part "weights"
    topk_indices: str  # TOPK part "indices"
    fc1: str  # EXPERT_FC1
    act: str  # GELU
    expert_out: str  # EXPERT_FC2
    weighted_sum: str  # MOE_SUM
    output: str  # BIAS_ADD

    def nodes(self) -> tuple[str, ...]:
        """The block's own nodes in graph order (``input`` excluded)."""
        return (
            self.logits,
            self.probs,
            self.topk_weights,
            self.topk_indices,
            self.fc1,
            self.act,
            self.expert_out,
            self.weighted_sum,
            self.output,
        )


# Ops that reduce over their first input's row (see Graph.reduction_length): MATMUL and ROUTER flatten a
# token's row (everything after T) as the engine does; the per-slot expert matmuls and the normalisations
# reduce over the last dim only (one row per top-k slot, or per token).
_ROW_REDUCING = ("MATMUL", "ROUTER")
_LAST_DIM_REDUCING = ("EXPERT_FC1", "EXPERT_FC2", "LAYERNORM", "L2NORM", "SOFTMAX")


# FLOPs per output element of the elementwise and row-normalising ops (the convention of Graph.node_flops)
_FLOPS_PER_ELEMENT = {"LAYERNORM": 8, "SOFTMAX": 4, "GELU": 5, "ROPE": 3, "ADD": 1, "BIAS_ADD": 1, "L2NORM": 3}


class Graph:
    """Ordered canonical nodes of one model; node order is execution (topological) order."""

    def __init__(self, dims: ModelDims, nodes: list[Node]):
        self.dims = dims
        self.nodes = nodes
        self.by_name = {n.name: n for n in nodes}
        if len(self.by_name) != len(nodes):
            raise AssertionError("duplicate node names in graph")
        seen = {INPUT_IDS}
        self._consumers: dict[str, list[Node]] = {INPUT_IDS: []}
        for n in nodes:  # topological by construction; check it so later stages can rely on it
            missing = [i for i in n.inputs if i not in seen]
            if missing:
                raise AssertionError(f"node {n.name} reads {missing} before they are computed")
            seen.add(n.name)
            self._consumers[n.name] = []
            for i in dict.fromkeys(n.inputs):
                self._consumers[i].append(n)
        # derived here, so a graph whose MoE wiring is not the expected one fails when it is built
        self._moe = [self._moe_block(n) for n in nodes if n.op == "ROUTER"]
        self._block_of = {name: b for b in self._moe for name in b.nodes()}

    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self):
        return iter(self.nodes)

    def __getitem__(self, name: str) -> Node:
        return self.by_name[name]

    def names(self) -> list[str]:
        return [n.name for n in self.nodes]

    # ---------------------------------------------------------------- queries
    def producers(self, name: str) -> list[Node]:
        """The nodes ``name`` reads, in its input order (the graph input ``input_ids`` is not a node)."""
        return [self.by_name[i] for i in self.by_name[name].inputs if i != INPUT_IDS]

    def consumers(self, name: str) -> list[Node]:
        """The nodes that read ``name`` (a node or ``input_ids``), in graph order."""
        return list(self._consumers[name])

    def _only_consumer(self, name: str, op: str, part: str | None = None) -> Node:
        found = [c for c in self._consumers[name] if c.op == op and (part is None or c.attrs.get("part") == part)]
        if len(found) != 1:
            raise AssertionError(f"node {name}: expected one {op} consumer, found {[c.name for c in found]}")
        return found[0]

    def _moe_block(self, router: Node) -> MoeBlock:
        # follow the data flow from the router, so the block is found by ops, not by how nodes are named
        probs = self._only_consumer(router.name, "SOFTMAX")
        tw = self._only_consumer(probs.name, "TOPK", "weights")
        ti = self._only_consumer(probs.name, "TOPK", "indices")
        fc1 = self._only_consumer(ti.name, "EXPERT_FC1")
        act = self._only_consumer(fc1.name, "GELU")
        out = self._only_consumer(act.name, "EXPERT_FC2")
        ws = self._only_consumer(out.name, "MOE_SUM")
        if fc1.inputs[0] != router.inputs[0] or tw.name not in ws.inputs:
            raise AssertionError(f"MoE block of {router.name}: experts and router read different nodes")
        bias = self._only_consumer(ws.name, "BIAS_ADD")
        return MoeBlock(
            layer=router.layer,
            input=router.inputs[0],
            logits=router.name,
            probs=probs.name,
            topk_weights=tw.name,
            topk_indices=ti.name,
            fc1=fc1.name,
            act=act.name,
            expert_out=out.name,
            weighted_sum=ws.name,
            output=bias.name,
        )

    def moe_blocks(self) -> list[MoeBlock]:
        """Every mixture-of-experts block, in graph order (empty for dense models)."""
        return list(self._moe)

    def moe_block_of(self, name: str) -> MoeBlock | None:
        """The MoE block ``name`` belongs to (router, top-k, expert and sum nodes; not its input), else None."""
        return self._block_of.get(name)

    def reduction_length(self, node: Node | str, tokens: int | None = None) -> int:
        """Length of the sum the op performs per output element, from the graph's shape templates.

        MATMUL, ROUTER: the width of one row of the input (a token's row is flattened, as the engine does);
        EXPERT_FC1/EXPERT_FC2: the input's last dim (each top-k slot is one row times an expert matrix);
        LAYERNORM, L2NORM, SOFTMAX: the normalised row (the input's last dim); MOE_SUM: k (top-k slots);
        ATTENTION and POOL sum over tokens, whose number is dynamic: pass ``tokens`` (else ValueError).
        Every other op is elementwise or a copy: 1."""
        n = self.by_name[node] if isinstance(node, str) else node
        if n.op in TOKEN_SUM_OPS:
            if tokens is None:
                raise ValueError(f"node {n.name}: {n.op} sums over tokens; pass tokens=")
            return int(tokens)
        if n.op == "MOE_SUM":
            return self.dims.top_k
        if n.op in _ROW_REDUCING or n.op in _LAST_DIM_REDUCING:
            row = self.trailing_shape(n.inputs[0])
            return math.prod(row) if n.op in _ROW_REDUCING else row[-1]
        return 1

    # ---------------------------------------------------------------- cost (bench/pipeline.py's floor)
    def node_flops(self, node: Node | str, tokens: int) -> int:
        """Floating-point operations of one node over one sequence of ``tokens`` real tokens.

        Convention (what bench/pipeline.py divides by the measured peak): a multiply-add is 2 FLOPs, a
        transcendental (exp, erf, tanh, sqrt) 1, comparisons (softmax's max, top-k) 0, copies and splits 0.
        MATMUL, ROUTER: 2*T*K*N (+ T*N for a bias), K = :meth:`reduction_length`; EXPERT_FC1/EXPERT_FC2: the
        same for the top-k experts each token uses (output [T, k, .], k from the config), never all E;
        ATTENTION: 4*T^2*H (QK^T and PV) + 5*nh*T^2 (the 1/sqrt(hd) scaling and a 4-FLOP softmax per score);
        LAYERNORM 8 per element (mean, centre, square, variance, normalise, affine); SOFTMAX 4 per element;
        GELU 5 per element (exact form; counted the same for the tanh forms); ROPE 3 per element; ADD and
        BIAS_ADD 1; EMBED 1 per element for each table summed after the first; MOE_SUM 2k-1 per output
        element; POOL T per output element (T-1 adds and the division); L2NORM 3 per element; TOPK 2 per
        selected weight when ``moe_normalize_expert_weights`` renormalises them, else 0. Padding is not
        counted: the count is the work a prompt needs, whatever a batch pads it to."""
        n = self.by_name[node] if isinstance(node, str) else node
        T = int(tokens)
        out = math.prod(self.shape(n.name, T))
        op = n.op
        if op in ("MATMUL", "ROUTER"):
            bias = out if any(w.endswith(".bias") for w in n.weights) else 0
            return 2 * out * self.reduction_length(n) + bias
        if op in ("EXPERT_FC1", "EXPERT_FC2"):
            return 2 * out * self.reduction_length(n)
        if op == "ATTENTION":
            return 4 * T * out + 5 * self.dims.heads * T * T
        if op == "MOE_SUM":
            return (2 * self.dims.top_k - 1) * out
        if op == "POOL":
            return out * T
        if op == "EMBED":
            return (len(n.weights) - 1) * out
        if op == "TOPK":
            return 2 * out if n.attrs.get("part") == "weights" and self.dims.normalize_expert_weights else 0
        return _FLOPS_PER_ELEMENT.get(op, 0) * out

    def flops(self, tokens: int) -> int:
        """FLOPs of one forward over one sequence of ``tokens`` real tokens (:meth:`node_flops`, summed)."""
        return sum(self.node_flops(n, tokens) for n in self.nodes)

    def weight_elements(self, node: Node | str, tokens: int) -> int:
        """Checkpoint elements a forward over ``tokens`` tokens (one sequence, or a batch's tokens together)
        reads for this node: the whole matrix and bias of MATMUL/ROUTER/LAYERNORM/BIAS_ADD; one row per token
        of each embedding table (at most the table); the matrices of the experts the tokens can reach, at most
        min(E, T*k) of them (an upper bound: it assumes the T*k routed slots pick distinct experts)."""
        n = self.by_name[node] if isinstance(node, str) else node
        d, T = self.dims, int(tokens)
        if n.op == "EMBED":
            rows = {"word": d.vocab, "position": d.max_positions, "token_type": d.type_vocab}
            return sum(min(T, next(v for k, v in rows.items() if k + "_embeddings" in w)) * d.hidden for w in n.weights)
        if n.op in ("EXPERT_FC1", "EXPERT_FC2"):
            return min(d.experts, T * d.top_k) * d.hidden * d.inner
        if n.op in ("MATMUL", "ROUTER"):
            k, out = self.reduction_length(n), math.prod(self.trailing_shape(n.name))
            return k * out + (out if len(n.weights) > 1 else 0)
        if n.op == "LAYERNORM":
            return 2 * d.hidden
        if n.op == "BIAS_ADD":
            return d.hidden
        return 0

    def bytes_moved(self, tokens: int, weight_itemsize: int = 4) -> dict[str, int]:
        """Estimated memory traffic of one forward over ``tokens`` tokens: every weight it uses read once
        (:meth:`weight_elements` x ``weight_itemsize``; 4 for fp32 weights) and every node's output written
        once (float32, int64 for expert ids). Inputs re-read from cache and the attention scores an engine
        keeps in scratch are not counted: this is the floor traffic, what a perfectly fused forward moves.
        For a padded batch pass the batch's real tokens together: its weights are read once for all of them."""
        weights = sum(self.weight_elements(n, tokens) for n in self.nodes) * weight_itemsize
        acts = sum(math.prod(self.shape(n.name, tokens)) * (8 if n.kind == "index" else 4) for n in self.nodes)
        return {"weights": weights, "activations": acts, "total": weights + acts}

    def key_nodes(self) -> list[str]:
        """The nodes kept for the drill-down, in graph order: the graph-level nodes (embeddings, their
        LayerNorm, pooling), every LayerNorm, the output of each residual branch (attention output projection,
        the MLP's or MoE block's output: the ADD input that is not the residual stream, i.e. not a LayerNorm)
        and each router's logits and probabilities (where routing decisions are made)."""
        branch = {i for n in self if n.op == "ADD" for i in n.inputs if self.by_name[i].op != "LAYERNORM"}
        router = {name for b in self._moe for name in (b.logits, b.probs)}
        keep = branch | router
        return [n.name for n in self if n.layer is None or n.op == "LAYERNORM" or n.name in keep]

    def trailing_shape(self, name: str) -> tuple[int, ...]:
        """Shape of one row (one token, or one prompt) of the node, i.e. the template without T/1."""
        sym = self.dims.symbols()
        return tuple(sym[s] for s in self.by_name[name].shape[1:])

    def shape(self, name: str, tokens: int) -> tuple[int, ...]:
        n = self.by_name[name]
        lead = tokens if n.axis == "token" else 1
        return (lead, *self.trailing_shape(name))

    def describe(self) -> str:
        lines = []
        sym = self.dims.symbols()
        for n in self.nodes:
            dims = ", ".join(s if s in ("T", "1") else str(sym[s]) for s in n.shape)
            lines.append(f"node {n.index:3d} {n.op:<10} {n.name} [{dims}]")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps({"dims": asdict(self.dims), "nodes": [asdict(n) for n in self.nodes]}, separators=(",", ":"))


class _Builder:
    def __init__(self):
        self.nodes: list[Node] = []

    def add(self, name, op, inputs, shape, *, kind="float", axis="token", tap, weights=(), layer=None, **attrs):
        self.nodes.append(
            Node(len(self.nodes), name, op, tuple(inputs), tuple(shape), kind, axis, tap, tuple(weights), layer, attrs)
        )
        return name


def _with_bias(module: str, bias: bool) -> tuple[str, ...]:
    # a MATMUL without a bias lists only its weight: the engine, the spec (MATMUL bias "none") and the
    # weight export all follow the graph's list, so a checkpoint without the bias is read consistently
    return (module + ".weight", module + ".bias") if bias else (module + ".weight",)


def _nomic_nodes(d: ModelDims) -> list[Node]:
    b = _Builder()
    x = b.add(
        "embeddings",
        "EMBED",
        [INPUT_IDS],
        ("T", "H"),
        tap=("embeddings", "output"),
        weights=("embeddings.word_embeddings.weight", "embeddings.token_type_embeddings.weight"),
    )
    x = b.add(
        "emb_ln", "LAYERNORM", [x], ("T", "H"), tap=("emb_ln", "output"), weights=("emb_ln.weight", "emb_ln.bias")
    )
    for i in range(d.layers):
        p = f"encoder.layers.{i}."
        qkv = b.add(
            p + "attn.qkv",
            "MATMUL",
            [x],
            ("T", "3H"),
            tap=(p + "attn.Wqkv", "output"),
            layer=i,
            weights=_with_bias(p + "attn.Wqkv", d.qkv_bias),
        )
        q = b.add(p + "attn.q", "SPLIT", [qkv], ("T", "nh", "hd"), tap=(p + "attn.q", "output"), layer=i, part=0)
        k = b.add(p + "attn.k", "SPLIT", [qkv], ("T", "nh", "hd"), tap=(p + "attn.k", "output"), layer=i, part=1)
        v = b.add(p + "attn.v", "SPLIT", [qkv], ("T", "nh", "hd"), tap=(p + "attn.v", "output"), layer=i, part=2)
        qr = b.add(p + "attn.q_rot", "ROPE", [q], ("T", "nh", "hd"), tap=(p + "attn.q_rot", "output"), layer=i)
        kr = b.add(p + "attn.k_rot", "ROPE", [k], ("T", "nh", "hd"), tap=(p + "attn.k_rot", "output"), layer=i)
        ctx = b.add(
            p + "attn.context", "ATTENTION", [qr, kr, v], ("T", "H"), tap=(p + "attn.context", "output"), layer=i
        )
        o = b.add(
            p + "attn.out_proj",
            "MATMUL",
            [ctx],
            ("T", "H"),
            tap=(p + "attn.out_proj", "output"),
            layer=i,
            weights=_with_bias(p + "attn.out_proj", d.qkv_bias),
        )
        r1 = b.add(p + "resid_attn", "ADD", [x, o], ("T", "H"), tap=(p + "resid_attn", "output"), layer=i)
        h = b.add(
            p + "norm1",
            "LAYERNORM",
            [r1],
            ("T", "H"),
            tap=(p + "norm1", "output"),
            layer=i,
            weights=(p + "norm1.weight", p + "norm1.bias"),
        )
        if d.is_moe_layer(i):
            m = p + "mlp."
            lg = b.add(
                m + "router.logits",
                "ROUTER",
                [h],
                ("T", "E"),
                tap=(m + "router.layer", "output"),
                layer=i,
                weights=(m + "router.layer.weight",),
            )
            pr = b.add(
                m + "router.probs",
                "SOFTMAX",
                [lg],
                ("T", "E"),
                kind="prob",
                tap=(m + "router.probs", "output"),
                layer=i,
            )
            tw = b.add(
                m + "router.topk_weights",
                "TOPK",
                [pr],
                ("T", "k"),
                kind="prob",
                tap=(m + "router.topk_weights", "output"),
                layer=i,
                part="weights",
            )
            ti = b.add(
                m + "router.topk_indices",
                "TOPK",
                [pr],
                ("T", "k"),
                kind="index",
                tap=(m + "router.topk_indices", "output"),
                layer=i,
                part="indices",
            )
            f1 = b.add(
                m + "experts.fc1",
                "EXPERT_FC1",
                [h, ti],
                ("T", "k", "F"),
                tap=(m + "experts.fc1", "output"),
                layer=i,
                weights=(m + "experts.mlp.w1",),
            )
            ac = b.add(m + "experts.act", "GELU", [f1], ("T", "k", "F"), tap=(m + "experts.act", "output"), layer=i)
            eo = b.add(
                m + "experts.out",
                "EXPERT_FC2",
                [ac, ti],
                ("T", "k", "H"),
                tap=(m + "experts.out", "output"),
                layer=i,
                weights=(m + "experts.mlp.w2",),
            )
            ws = b.add(
                m + "experts.weighted_sum",
                "MOE_SUM",
                [eo, tw],
                ("T", "H"),
                tap=(m + "experts.weighted_sum", "output"),
                layer=i,
            )
            mo = b.add(
                m + "experts.bias_add",
                "BIAS_ADD",
                [ws],
                ("T", "H"),
                tap=(m + "experts.bias_add", "output"),
                layer=i,
                weights=(m + "experts.bias",),
            )
        else:
            m = p + "mlp."
            f1 = b.add(
                m + "fc1",
                "MATMUL",
                [h],
                ("T", "F"),
                tap=(m + "fc1", "output"),
                layer=i,
                weights=_with_bias(m + "fc1", d.fc1_bias),
            )
            ac = b.add(m + "act", "GELU", [f1], ("T", "F"), tap=(m + "act", "output"), layer=i)
            mo = b.add(
                m + "fc2",
                "MATMUL",
                [ac],
                ("T", "H"),
                tap=(m + "fc2", "output"),
                layer=i,
                weights=_with_bias(m + "fc2", d.fc2_bias),
            )
        r2 = b.add(p + "resid_mlp", "ADD", [h, mo], ("T", "H"), tap=(p + "resid_mlp", "output"), layer=i)
        x = b.add(
            p + "norm2",
            "LAYERNORM",
            [r2],
            ("T", "H"),
            tap=(p + "norm2", "output"),
            layer=i,
            weights=(p + "norm2.weight", p + "norm2.bias"),
        )
    _pool_nodes(b, x)
    return b.nodes


def _bert_nodes(d: ModelDims) -> list[Node]:
    b = _Builder()
    x = b.add(
        "embeddings",
        "EMBED",
        [INPUT_IDS],
        ("T", "H"),
        tap=("embeddings.LayerNorm", "input"),
        weights=(
            "embeddings.word_embeddings.weight",
            "embeddings.position_embeddings.weight",
            "embeddings.token_type_embeddings.weight",
        ),
    )
    x = b.add(
        "emb_ln",
        "LAYERNORM",
        [x],
        ("T", "H"),
        tap=("embeddings.LayerNorm", "output"),
        weights=("embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"),
    )
    for i in range(d.layers):
        p = f"encoder.layers.{i}."
        hf = f"encoder.layer.{i}."
        qkv = []
        for short, mod in (("q", "query"), ("k", "key"), ("v", "value")):
            qkv.append(
                b.add(
                    p + f"attn.{short}",
                    "MATMUL",
                    [x],
                    ("T", "nh", "hd"),
                    tap=(hf + f"attention.self.{mod}", "output"),
                    layer=i,
                    weights=(hf + f"attention.self.{mod}.weight", hf + f"attention.self.{mod}.bias"),
                )
            )
        ctx = b.add(
            p + "attn.context", "ATTENTION", qkv, ("T", "H"), tap=(hf + "attention.output.dense", "input"), layer=i
        )
        o = b.add(
            p + "attn.out_proj",
            "MATMUL",
            [ctx],
            ("T", "H"),
            tap=(hf + "attention.output.dense", "output"),
            layer=i,
            weights=(hf + "attention.output.dense.weight", hf + "attention.output.dense.bias"),
        )
        r1 = b.add(
            p + "resid_attn", "ADD", [x, o], ("T", "H"), tap=(hf + "attention.output.LayerNorm", "input"), layer=i
        )
        h = b.add(
            p + "norm1",
            "LAYERNORM",
            [r1],
            ("T", "H"),
            tap=(hf + "attention.output.LayerNorm", "output"),
            layer=i,
            weights=(hf + "attention.output.LayerNorm.weight", hf + "attention.output.LayerNorm.bias"),
        )
        f1 = b.add(
            p + "mlp.fc1",
            "MATMUL",
            [h],
            ("T", "F"),
            tap=(hf + "intermediate.dense", "output"),
            layer=i,
            weights=(hf + "intermediate.dense.weight", hf + "intermediate.dense.bias"),
        )
        ac = b.add(
            p + "mlp.act", "GELU", [f1], ("T", "F"), tap=(hf + "intermediate.intermediate_act_fn", "output"), layer=i
        )
        f2 = b.add(
            p + "mlp.fc2",
            "MATMUL",
            [ac],
            ("T", "H"),
            tap=(hf + "output.dense", "output"),
            layer=i,
            weights=(hf + "output.dense.weight", hf + "output.dense.bias"),
        )
        r2 = b.add(p + "resid_mlp", "ADD", [h, f2], ("T", "H"), tap=(hf + "output.LayerNorm", "input"), layer=i)
        x = b.add(
            p + "norm2",
            "LAYERNORM",
            [r2],
            ("T", "H"),
            tap=(hf + "output.LayerNorm", "output"),
            layer=i,
            weights=(hf + "output.LayerNorm.weight", hf + "output.LayerNorm.bias"),
        )
    _pool_nodes(b, x)
    return b.nodes


def _pool_nodes(b: _Builder, x: str) -> None:
    # Pooling (sentence-transformers' Pooling + Normalize) is actdiff.models.pooling.MeanPoolNormalize, whose
    # taps live under "pooling.": NomicBertMoeModel holds it (its forward's pooler_output); for a plain HF
    # encoder (BertModel) the reference runner applies its own after the forward.
    p = b.add(POOLED, "POOL", [x], ("1", "H"), axis="prompt", tap=("pooling.pooled", "output"))
    b.add(EMBEDDING, "L2NORM", [p], ("1", "H"), axis="prompt", tap=("pooling.embedding", "output"))


def build_graph(config: dict | ModelDims, source: str = "config.json") -> Graph:
    """Build the canonical graph from a raw config.json dict (or already parsed dims)."""
    dims = config if isinstance(config, ModelDims) else dims_from_config(config, source)
    nodes = _nomic_nodes(dims) if dims.arch == ARCH_NOMIC_MOE else _bert_nodes(dims)
    return Graph(dims, nodes)


def load_config_json(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelError(f"{path}: config.json not found; is {model_dir} a model directory?")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}: not valid JSON ({e}); fix or re-download the file") from None


def graph_for_model_dir(model_dir: str | Path) -> Graph:
    return build_graph(load_config_json(model_dir), source=str(Path(model_dir) / "config.json"))
