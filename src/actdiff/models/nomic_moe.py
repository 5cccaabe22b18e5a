"""PyTorch reference of NomicBERT with Mixture-of-Experts (nomic-embed-text-v2-moe).

Written from ../shared/spec/nomic-embed-text-v2-moe.md (copied to docs/spec.md), including what looks
odd: bidirectional attention; rotary "rotate half" on all head dims; post-norm; exact-erf GELU; router
softmax over all experts in fp32 and top-k WITHOUT renormalisation; expert weights w1 and w2 both viewed
as (E, F, H) with expert e computing gelu(x @ w1[e].T) @ w2[e]; one shared expert bias added once after
the weighted sum. State-dict keys and shapes equal the released checkpoint's.

Every intermediate the canonical graph (actdiff.nodes) names is the output of a module, so the
reference dump observes it with a plain forward hook: parameter-free ``Tap`` modules mark the values that
are not already a module's output (q/k/v, rotary outputs, attention context, residual sums, router
probabilities and top-k, per-slot expert values).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..nodes import ntk_rotary_base

MODEL_TYPE = "actdiff_nomic_bert_moe"


class NomicBertMoeConfig(PretrainedConfig):
    """Configuration with the released config.json key names (n_embd, n_layer, n_inner, ...)."""

    model_type = MODEL_TYPE

    def __init__(
        self,
        vocab_size: int = 250048,
        n_embd: int = 768,
        n_head: int = 12,
        n_layer: int = 12,
        n_inner: int = 3072,
        n_positions: int = 2048,
        max_trained_positions: int = 2048,
        type_vocab_size: int = 1,
        layer_norm_epsilon: float = 1e-5,
        rotary_emb_base: float = 10000.0,
        rotary_emb_fraction: float = 1.0,
        rotary_emb_interleaved: bool = False,
        rotary_scaling_factor: float | None = None,
        num_experts: int = 8,
        moe_top_k: int = 2,
        moe_every_n_layers: int = 2,
        moe_normalize_expert_weights: bool = False,
        num_shared_experts: int = 0,
        activation_function: str = "gelu",
        qkv_proj_bias: bool = True,
        mlp_fc1_bias: bool = True,
        mlp_fc2_bias: bool = True,
        causal: bool = False,
        prenorm: bool = False,
        pad_token_id: int = 1,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.n_embd = n_embd
        self.n_head = n_head
        self.n_layer = n_layer
        self.n_inner = n_inner
        self.n_positions = n_positions
        self.max_trained_positions = max_trained_positions
        self.type_vocab_size = type_vocab_size
        self.layer_norm_epsilon = layer_norm_epsilon
        self.rotary_emb_base = rotary_emb_base
        self.rotary_emb_fraction = rotary_emb_fraction
        self.rotary_emb_interleaved = rotary_emb_interleaved
        self.rotary_scaling_factor = rotary_scaling_factor
        self.num_experts = num_experts
        self.moe_top_k = moe_top_k
        self.moe_every_n_layers = moe_every_n_layers
        self.moe_normalize_expert_weights = moe_normalize_expert_weights
        self.num_shared_experts = num_shared_experts
        self.activation_function = activation_function
        self.qkv_proj_bias = qkv_proj_bias
        self.mlp_fc1_bias = mlp_fc1_bias
        self.mlp_fc2_bias = mlp_fc2_bias
        self.causal = causal
        self.prenorm = prenorm
        super().__init__(pad_token_id=pad_token_id, **kwargs)

    # transformers' generic names, for code that expects them
    @property
    def hidden_size(self) -> int:
        return self.n_embd

    @property
    def num_attention_heads(self) -> int:
        return self.n_head

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layer

    def is_moe_layer(self, i: int) -> bool:
        n = self.moe_every_n_layers
        return self.num_experts > 0 and n > 0 and i % n == 1


class Tap(nn.Module):
    """Identity with a module path, so a forward hook can observe an intermediate value."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _gelu(x: torch.Tensor, kind: str) -> torch.Tensor:
    # "gelu" is the exact erf form (the released model); tanh forms only if a config asks for them.
    return F.gelu(x, approximate="tanh" if kind in ("gelu_new", "gelu_pytorch_tanh") else "none")


class NomicEmbeddings(nn.Module):
    def __init__(self, cfg: NomicBertMoeConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.n_embd, padding_idx=None)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.n_embd) if cfg.type_vocab_size > 0 else None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(input_ids)
        if self.token_type_embeddings is not None:
            # token type is always 0: row 0 is added to every token
            x = x + self.token_type_embeddings.weight[0]
        return x


class RotaryEmbedding(nn.Module):
    """NeoX "rotate half" rotary over all head dims: inv_freq[j] = base^(-2j/hd).

    Angles are computed in the activation dtype: fp32 for the reference (as the released remote code
    does, so fp32 rounding of position * inv_freq is part of the reference), fp64 when the model is run
    in double precision against the float64 oracle.

    With ``scaling_factor`` (config rotary_scaling_factor) a sequence longer than ``max_trained`` tokens is
    rotated with the dynamic-NTK base of its length (actdiff.nodes.ntk_rotary_base, the original's
    NomicBertDynamicNTKRotaryEmbedding), inv_freq recomputed from that base in the activation dtype; in a
    padded batch, each sequence's own length (see :meth:`cos_sin`).
    """

    def __init__(self, head_dim: int, base: float, interleaved: bool, scaling_factor=None, max_trained: int = 2048):
        super().__init__()
        self.head_dim = head_dim
        self.base = float(base)
        self.interleaved = interleaved
        self.scaling_factor = scaling_factor
        self.max_trained = int(max_trained)
        self.register_buffer("inv_freq", self._inv_freq(torch.float32), persistent=False)

    def _inv_freq(self, dtype: torch.dtype, device=None, base: float | None = None) -> torch.Tensor:
        base = self.base if base is None else base
        return 1.0 / (base ** (torch.arange(0, self.head_dim, 2, dtype=dtype, device=device) / self.head_dim))

    def _table(self, seqlen: int, device, dtype, base: float) -> tuple[torch.Tensor, torch.Tensor]:
        if base == self.base and dtype == torch.float32:
            inv_freq = self.inv_freq
        else:  # another dtype, or a base scaled for this length: inv_freq from it (the buffer keeps the base's)
            inv_freq = self._inv_freq(dtype, device, base)
        t = torch.arange(seqlen, device=device, dtype=dtype)
        freqs = torch.outer(t, inv_freq.to(device=device, dtype=dtype))  # [S, hd/2]
        return torch.cos(freqs), torch.sin(freqs)

    def cos_sin(self, seqlen: int, device, dtype=torch.float32, lengths=None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (R, seqlen, hd/2): R = 1, or one table per sequence when dynamic NTK scaling gives
        the sequences of a padded batch (real ``lengths``) different bases. The original scales by the padded
        batch length, so a prompt's values would depend on its batch; the reference uses each prompt's own
        length: the original's values for the prompt run alone, what the engine and the spec compute."""
        lens = [seqlen] if lengths is None else [int(n) for n in lengths]
        bases = [ntk_rotary_base(self.base, n, self.scaling_factor, self.max_trained, self.head_dim) for n in lens]
        tables = [self._table(seqlen, device, dtype, b) for b in (bases[:1] if len(set(bases)) == 1 else bases)]
        return torch.stack([c for c, _ in tables]), torch.stack([s for _, s in tables])

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x is (B, S, nh, hd); cos/sin are (1 or B, S, hd/2)
        cos = cos[:, :, None, :]
        sin = sin[:, :, None, :]
        if self.interleaved:  # GPT-J pairs (x0,x1),(x2,x3)...; only if a config asks for it
            x1, x2 = x[..., 0::2], x[..., 1::2]
            return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
        half = self.head_dim // 2
        x1, x2 = x[..., :half], x[..., half:]
        cos2 = torch.cat((cos, cos), dim=-1)
        sin2 = torch.cat((sin, sin), dim=-1)
        return x * cos2 + torch.cat((-x2, x1), dim=-1) * sin2


class NomicAttention(nn.Module):
    def __init__(self, cfg: NomicBertMoeConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.causal = cfg.causal
        self.Wqkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.qkv_proj_bias)
        # qkv_proj_bias removes both attention biases, as in the original NomicBertAttention
        self.out_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.qkv_proj_bias)
        self.rotary_emb = RotaryEmbedding(
            self.head_dim,
            cfg.rotary_emb_base,
            cfg.rotary_emb_interleaved,
            cfg.rotary_scaling_factor,
            cfg.max_trained_positions,
        )
        self.q, self.k, self.v = Tap(), Tap(), Tap()
        self.q_rot, self.k_rot = Tap(), Tap()
        self.context = Tap()

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor, lengths=None) -> torch.Tensor:
        B, S, H = x.shape
        qkv = self.Wqkv(x).view(B, S, 3, self.n_head, self.head_dim)  # rows q | k | v, heads contiguous
        q = self.q(qkv[:, :, 0])
        k = self.k(qkv[:, :, 1])
        v = self.v(qkv[:, :, 2])
        cos, sin = self.rotary_emb.cos_sin(S, x.device, x.dtype, lengths)
        q = self.q_rot(self.rotary_emb(q, cos, sin))
        k = self.k_rot(self.rotary_emb(k, cos, sin))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(self.head_dim)
        scores = scores + additive_mask  # (B,1,1,S): padding keys only; bidirectional
        if self.causal:
            causal = torch.ones(S, S, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(causal, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1)
        ctx = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(B, S, H)
        return self.out_proj(self.context(ctx))


class NomicMLP(nn.Module):
    def __init__(self, cfg: NomicBertMoeConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.n_embd, cfg.n_inner, bias=cfg.mlp_fc1_bias)
        self.fc2 = nn.Linear(cfg.n_inner, cfg.n_embd, bias=cfg.mlp_fc2_bias)
        self.act = Tap()
        self.activation = cfg.activation_function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(_gelu(self.fc1(x), self.activation)))


class Router(nn.Module):
    def __init__(self, cfg: NomicBertMoeConfig):
        super().__init__()
        self.layer = nn.Linear(cfg.n_embd, cfg.num_experts, bias=False)
        self.top_k = cfg.moe_top_k
        self.normalize = cfg.moe_normalize_expert_weights
        self.probs, self.topk_weights, self.topk_indices = Tap(), Tap(), Tap()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.layer(x)
        probs = self.probs(torch.softmax(logits.float(), dim=-1))  # over all experts, fp32
        w, idx = torch.topk(probs, self.top_k, dim=-1)  # descending; see docs/nodes.md for ties
        if self.normalize:  # off in the released model
            w = w / w.sum(dim=-1, keepdim=True)
        return self.topk_weights(w.to(x.dtype)), self.topk_indices(idx)


class ExpertWeights(nn.Module):
    """Holds w1 and w2 with the released names and shapes: both [E*F, H], viewed as (E, F, H)."""

    def __init__(self, cfg: NomicBertMoeConfig):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(cfg.num_experts * cfg.n_inner, cfg.n_embd))
        self.w2 = nn.Parameter(torch.empty(cfg.num_experts * cfg.n_inner, cfg.n_embd))


class Experts(nn.Module):
    def __init__(self, cfg: NomicBertMoeConfig):
        super().__init__()
        self.num_experts = cfg.num_experts
        self.n_inner = cfg.n_inner
        self.activation = cfg.activation_function
        self.mlp = ExpertWeights(cfg)
        self.bias = nn.Parameter(torch.zeros(cfg.n_embd))
        self.fc1, self.act, self.out = Tap(), Tap(), Tap()
        self.weighted_sum, self.bias_add = Tap(), Tap()

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        # x is (N, H); weights/indices are (N, k). Tokens are grouped per expert (as megablocks does): the
        # (token, slot) pairs are sorted by expert once, each expert multiplies one contiguous slice, and the
        # results are put back into per-slot order with one permutation (no per-expert scatter).
        N, H = x.shape
        k = indices.shape[1]
        E, Fi = self.num_experts, self.n_inner
        w1 = self.mlp.w1.view(E, Fi, H)
        w2 = self.mlp.w2.view(E, Fi, H)  # (E, F, H): used as act @ w2[e], NOT transposed
        flat_idx = indices.reshape(-1)
        order = torch.argsort(flat_idx, stable=True)  # (N*k,) pair positions grouped by expert
        counts = torch.bincount(flat_idx, minlength=E).tolist()
        xs = x[order // k]  # (N*k, H) token rows in expert order
        bounds = [0, *torch.cumsum(torch.tensor(counts), 0).tolist()]
        used = [e for e in range(E) if counts[e]]
        h1 = torch.cat([xs[bounds[e] : bounds[e + 1]] @ w1[e].T for e in used])
        a = _gelu(h1, self.activation)
        o = torch.cat([a[bounds[e] : bounds[e + 1]] @ w2[e] for e in used])
        fc1, act, out = (t.new_empty(t.shape) for t in (h1, a, o))
        for dst, src in ((fc1, h1), (act, a), (out, o)):
            dst[order] = src  # back to (token, slot) order
        fc1, act, out = fc1.view(N, k, Fi), act.view(N, k, Fi), out.view(N, k, H)
        self.fc1(fc1)
        self.act(act)
        out = self.out(out)
        ws = self.weighted_sum((out * weights.unsqueeze(-1)).sum(dim=1))
        return self.bias_add(ws + self.bias)  # shared bias, once


class NomicMoE(nn.Module):
    def __init__(self, cfg: NomicBertMoeConfig):
        super().__init__()
        self.router = Router(cfg)
        self.experts = Experts(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # padding tokens are routed too: the mask is ignored inside the MoE
        B, S, H = x.shape
        flat = x.reshape(B * S, H)
        w, idx = self.router(flat)
        return self.experts(flat, w, idx).view(B, S, H)


class NomicBlock(nn.Module):
    def __init__(self, cfg: NomicBertMoeConfig, layer_idx: int):
        super().__init__()
        self.attn = NomicAttention(cfg)
        self.mlp = NomicMoE(cfg) if cfg.is_moe_layer(layer_idx) else NomicMLP(cfg)
        self.norm1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.norm2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.resid_attn, self.resid_mlp = Tap(), Tap()

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor, lengths=None) -> torch.Tensor:
        h = self.norm1(self.resid_attn(x + self.attn(x, additive_mask, lengths)))  # post-norm
        return self.norm2(self.resid_mlp(h + self.mlp(h)))


class NomicEncoder(nn.Module):
    def __init__(self, cfg: NomicBertMoeConfig):
        super().__init__()
        self.layers = nn.ModuleList([NomicBlock(cfg, i) for i in range(cfg.n_layer)])


class NomicBertMoeModel(PreTrainedModel):
    """NomicBertModel (MoE) with the released checkpoint's state-dict layout (no prefix)."""

    config_class = NomicBertMoeConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    _no_split_modules = ["NomicBlock"]

    def __init__(self, config: NomicBertMoeConfig):
        super().__init__(config)
        self.embeddings = NomicEmbeddings(config)
        self.emb_ln = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.encoder = NomicEncoder(config)
        # no parameters: the checkpoint's state dict is unchanged. Imported here: pooling.py imports Tap from
        # this module.
        from .pooling import MeanPoolNormalize

        self.pooling = MeanPoolNormalize()
        self.post_init()

    def _init_weights(self, module):  # only used when building without a checkpoint
        std = 0.02
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, ExpertWeights):
            nn.init.normal_(module.w1, std=std)
            nn.init.normal_(module.w2, std=std)
        elif isinstance(module, Experts):
            nn.init.zeros_(module.bias)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, return_dict: bool | None = None, **_
    ) -> BaseModelOutputWithPooling | tuple[torch.Tensor, torch.Tensor]:
        """A transformers ModelOutput, like every HF encoder: ``out[0]`` / ``last_hidden_state`` (B, S, H), and
        ``pooler_output`` (B, H): the model's sentence embedding (:meth:`pool`). ``return_dict=False``: the
        tuple (last_hidden_state, pooler_output)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        x = self.emb_ln(self.embeddings(input_ids))
        dtype = x.dtype
        # additive key-padding mask (B,1,1,S); attention is bidirectional
        additive = (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
        lengths = attention_mask.sum(dim=1).tolist()  # real tokens per sequence (right padding)
        for layer in self.encoder.layers:
            x = layer(x, additive, lengths)
        pooled = self.pool(x, attention_mask)
        if return_dict is False:
            return x, pooled
        return BaseModelOutputWithPooling(last_hidden_state=x, pooler_output=pooled)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The sentence embedding the released model is used with (sentence-transformers' modules.json: mean
        pooling over real tokens, then L2 normalisation), through the tapped ``pooling`` module, so hooks
        record the ``pooled`` and ``embedding`` nodes in the same forward."""
        return self.pooling(hidden, attention_mask)


def register_auto_classes() -> None:
    """Register the config/model with transformers' Auto classes under our own model_type."""
    from transformers import AutoConfig, AutoModel

    try:
        AutoConfig.register(MODEL_TYPE, NomicBertMoeConfig)
        AutoModel.register(NomicBertMoeConfig, NomicBertMoeModel)
    except ValueError:
        pass  # already registered in this process


register_auto_classes()
