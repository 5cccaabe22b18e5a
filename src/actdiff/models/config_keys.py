"""Every NomicBERT config.json key the original code reads, and how actdiff handles it: the one registry.

The original code read for this list (nomic-ai/contrastors at 613ddfd, the code the released remote code
``nomic-ai/nomic-bert-2048--modeling_hf_nomic_bert`` was published from):

- ``src/contrastors/models/huggingface/configuration_hf_nomic_bert.py`` (NomicBertConfig, a GPT2Config: it also
  carries GPT-2's keys, e.g. ``summary_*``, ``scale_attn_*``, ``use_cache``);
- ``src/contrastors/models/huggingface/modeling_hf_nomic_bert.py`` (NomicBertEmbeddings, NomicBertAttention,
  NomicBertRotaryEmbedding, NomicBertDynamicNTKRotaryEmbedding, NomicBertBlock, NomicBertModel,
  NomicBertPreTrainedModel.from_pretrained);
- ``src/contrastors/models/encoder/modeling_nomic_bert.py`` and ``src/contrastors/layers/{attention,block,
  moe}.py`` for the mixture-of-experts keys (num_experts, moe_*, expert_choice_router, ffn_div, ...).

Each key is one of:

- ``implemented``: honoured by the reference (actdiff.models.nomic_moe), the graph (actdiff.nodes), the engine
  and the float64 spec (actdiff.compare.refops); ``accepts`` may still refuse values nobody implements;
- ``no_effect``: read by the original only for training, for kernel choices with the same math, or for heads
  an embedding model does not run; any value gives the same embeddings;
- ``refused``: only the value the released model uses is supported; any other value is refused.

:func:`check_nomic_config` applies ``accepts`` and is called by :func:`actdiff.nodes.dims_from_config`, which
every loader goes through (reference, engine, graph, spec), so a config is refused once, with one message
naming the file and the key.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ModelError

IMPLEMENTED, NO_EFFECT, REFUSED = "implemented", "no_effect", "refused"
_MISSING = object()


@dataclass(frozen=True)
class KeyRule:
    how: str  # IMPLEMENTED | NO_EFFECT | REFUSED
    why: str  # what the key does in the original and why actdiff handles it so
    default: object = None  # NomicBertConfig's (or GPT2Config's) value when config.json omits the key
    accepts: Callable[[object, dict], bool] | None = None  # None: every value is honoured
    supported: str = ""  # the accepted values in words, for the error message


def _falsy(v, cfg) -> bool:
    return not v


def _is_none(v, cfg) -> bool:
    return v is None


def _bool(v, cfg) -> bool:
    return isinstance(v, bool)


def _positive_int(v, cfg) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _scaling(v, cfg) -> bool:
    # the original builds the dynamic-NTK rotary only when the factor is truthy; a factor must be a number
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0)


def _vocab_multiple(v, cfg) -> bool:
    # the original rounds vocab_size up to this multiple when it builds the model; the checkpoint then has the
    # rounded row count, which actdiff reads only if config.json already states it
    m, vocab = v or 1, cfg.get("vocab_size")
    if not isinstance(vocab, int):
        return True  # a malformed vocab_size is reported by the size checks, with its own message
    return isinstance(m, int) and m > 0 and vocab % m == 0


def _heads_kv(v, cfg) -> bool:
    return v is None or v == cfg.get("n_head")


def _one_of(*values) -> Callable[[object, dict], bool]:
    return lambda v, cfg: v in values


_TRAINING = "training only (dropout is off in eval mode)"
_KERNEL = "kernel choice of the original (flash-attn / fused ops computing the same function)"
_GPT2 = "inherited from GPT2Config; the NomicBert code never reads it"
_HEAD = "used only by heads an embedding model does not run (MLM / classification / GPT-2 double heads)"

NOMIC_KEYS: dict[str, KeyRule] = {
    # ------------------------------------------------------------------ sizes and architecture
    "n_embd": KeyRule(IMPLEMENTED, "hidden size"),
    "n_head": KeyRule(IMPLEMENTED, "attention heads"),
    "n_layer": KeyRule(IMPLEMENTED, "transformer blocks"),
    "n_inner": KeyRule(IMPLEMENTED, "MLP and expert inner size"),
    "vocab_size": KeyRule(IMPLEMENTED, "word-embedding rows"),
    "type_vocab_size": KeyRule(IMPLEMENTED, "token-type rows; row 0 is added to every token", 2, _positive_int, ">= 1"),
    "layer_norm_epsilon": KeyRule(IMPLEMENTED, "LayerNorm eps"),
    "activation_function": KeyRule(
        IMPLEMENTED,
        "MLP/expert activation; the gated forms (swiglu, geglu, glu) and gelu_fast are not implemented",
        "gelu_new",
        _one_of("gelu", "gelu_new", "gelu_pytorch_tanh"),
        "gelu, gelu_new, gelu_pytorch_tanh",
    ),
    "qkv_proj_bias": KeyRule(
        IMPLEMENTED,
        "false drops both attention biases (Wqkv.bias and out_proj.bias), as the original",
        True,
        _bool,
        "true or false",
    ),
    "mlp_fc1_bias": KeyRule(
        IMPLEMENTED, "dense MLP fc1 bias (the MoE experts have none)", True, _bool, "true or false"
    ),
    "mlp_fc2_bias": KeyRule(
        IMPLEMENTED, "dense MLP fc2 bias (the MoE experts have none)", True, _bool, "true or false"
    ),
    # ------------------------------------------------------------------ rotary
    "rotary_emb_base": KeyRule(IMPLEMENTED, "rotary base"),
    "rotary_emb_interleaved": KeyRule(
        IMPLEMENTED, "GPT-J interleaved pairs instead of NeoX halves", False, _bool, "bool"
    ),
    "rotary_emb_fraction": KeyRule(
        REFUSED,
        "fraction of head dims rotated; 0 (NomicBertConfig's default) means absolute position embeddings instead",
        0.0,
        lambda v, c: v == 1.0,
        "1.0 (rotary over all head dims)",
    ),
    "rotary_scaling_factor": KeyRule(
        IMPLEMENTED,
        "dynamic NTK rotary scaling (NomicBertDynamicNTKRotaryEmbedding): above max_trained_positions tokens the "
        "base grows with the sequence length",
        None,
        _scaling,
        "null or a number >= 0",
    ),
    "max_trained_positions": KeyRule(
        IMPLEMENTED, "length above which rotary_scaling_factor scales the base", 2048, _positive_int, "a positive int"
    ),
    "rotary_emb_scale_base": KeyRule(REFUSED, "xPos-style rotary scaling (scale_base)", None, _is_none, "null"),
    "rotary_head_dim": KeyRule(
        REFUSED, "rotary applied over the head axis (an xformers bug workaround)", False, _falsy, "false"
    ),
    "n_positions": KeyRule(
        NO_EFFECT, "length of absolute position embeddings, which exist only when rotary_emb_fraction <= 0"
    ),
    # ------------------------------------------------------------------ block structure
    "prenorm": KeyRule(REFUSED, "pre-norm blocks (the released model is post-norm)", False, _falsy, "false"),
    "parallel_block": KeyRule(REFUSED, "parallel attention/MLP blocks", False, _falsy, "false"),
    "parallel_block_tied_norm": KeyRule(REFUSED, "one norm shared by parallel blocks", False, _falsy, "false"),
    "use_rms_norm": KeyRule(REFUSED, "RMSNorm instead of LayerNorm", False, _falsy, "false or null"),
    "norm_mlp": KeyRule(REFUSED, "a LayerNorm inside the MLP", False, _falsy, "false"),
    "causal": KeyRule(REFUSED, "causal attention mask (the released model is bidirectional)", False, _falsy, "false"),
    "num_heads_kv": KeyRule(REFUSED, "grouped/multi-query attention", None, _heads_kv, "null or n_head"),
    "add_pooling_layer": KeyRule(
        REFUSED,
        "a tanh pooler over the first token (its weights are not part of the embedding model)",
        False,
        _falsy,
        "false",
    ),
    "pad_vocab_size_multiple": KeyRule(
        REFUSED,
        "vocab_size rounded up to this multiple when the model is built",
        1,
        _vocab_multiple,
        "a divisor of vocab_size (set vocab_size to the rounded row count)",
    ),
    "scale_attn_weights": KeyRule(
        REFUSED, _GPT2 + " (NomicBert always scales by 1/sqrt(head_dim))", True, lambda v, c: v is True, "true"
    ),
    "scale_attn_by_inverse_layer_idx": KeyRule(
        REFUSED, _GPT2 + " (would scale attention per layer)", False, _falsy, "false"
    ),
    "reorder_and_upcast_attn": KeyRule(REFUSED, _GPT2 + " (would upcast attention)", False, _falsy, "false"),
    # ------------------------------------------------------------------ mixture of experts
    "num_experts": KeyRule(IMPLEMENTED, "experts per MoE layer (0: dense model)"),
    "moe_top_k": KeyRule(IMPLEMENTED, "experts per token"),
    "moe_every_n_layers": KeyRule(IMPLEMENTED, "MoE where layer_index % n == 1"),
    "moe_normalize_expert_weights": KeyRule(IMPLEMENTED, "renormalise the top-k weights", False),
    "moe_impl": KeyRule(
        REFUSED,
        "MoE implementation; megablocks' dMoE is what actdiff implements",
        "megablocks",
        _one_of("megablocks"),
        "megablocks",
    ),
    "expert_choice_router": KeyRule(
        REFUSED, "experts choose tokens instead of tokens choosing experts", False, _falsy, "false"
    ),
    "num_shared_experts": KeyRule(REFUSED, "always-on shared experts", 0, lambda v, c: not v, "0"),
    "ffn_div": KeyRule(REFUSED, "expert inner size n_inner // ffn_div", 1, _one_of(1), "1"),
    "router_aux_loss_coef": KeyRule(NO_EFFECT, "load-balancing loss weight: " + _TRAINING),
    "moe_resid_pdrop": KeyRule(NO_EFFECT, _TRAINING),
    # ------------------------------------------------------------------ no effect at inference
    "attn_pdrop": KeyRule(NO_EFFECT, _TRAINING),
    "embd_pdrop": KeyRule(NO_EFFECT, _TRAINING),
    "resid_pdrop": KeyRule(NO_EFFECT, _TRAINING),
    "summary_first_dropout": KeyRule(NO_EFFECT, _HEAD),
    "summary_activation": KeyRule(NO_EFFECT, _HEAD),
    "summary_proj_to_labels": KeyRule(NO_EFFECT, _HEAD),
    "summary_type": KeyRule(NO_EFFECT, _HEAD),
    "summary_use_proj": KeyRule(NO_EFFECT, _HEAD),
    "dense_seq_output": KeyRule(NO_EFFECT, "MLM head output subset: " + _HEAD),
    "tie_word_embeddings": KeyRule(NO_EFFECT, "MLM decoder tied to the word embeddings: " + _HEAD),
    "classifier_dropout": KeyRule(NO_EFFECT, _HEAD),
    "num_labels": KeyRule(NO_EFFECT, _HEAD),
    "problem_type": KeyRule(NO_EFFECT, _HEAD),
    "last_layer_subset": KeyRule(NO_EFFECT, "MLM pretraining computes the last layer for masked tokens only"),
    "use_flash_attn": KeyRule(NO_EFFECT, _KERNEL),
    "fused_bias_fc": KeyRule(NO_EFFECT, _KERNEL),
    "fused_dropout_add_ln": KeyRule(NO_EFFECT, _KERNEL),
    "residual_in_fp32": KeyRule(NO_EFFECT, "residual stream kept in fp32 under mixed precision; actdiff runs fp32"),
    "use_xentropy": KeyRule(NO_EFFECT, "fused cross-entropy loss: training only"),
    "initializer_range": KeyRule(NO_EFFECT, "weight initialisation: the checkpoint's weights replace it"),
    "use_cache": KeyRule(NO_EFFECT, "decoder KV cache: " + _GPT2),
    "pad_token_id": KeyRule(
        NO_EFFECT, "padding_idx of the word embeddings (zeroes that row's gradient); padding is masked at inference"
    ),
    "bos_token_id": KeyRule(NO_EFFECT, "special tokens come from tokenizer.json's post-processor"),
    "eos_token_id": KeyRule(NO_EFFECT, "special tokens come from tokenizer.json's post-processor"),
    "torch_dtype": KeyRule(NO_EFFECT, "storage dtype; the reference runs in float32 and upcasts the checkpoint"),
    # ------------------------------------------------------------------ which code to load
    "model_type": KeyRule(IMPLEMENTED, "selects the architecture (actdiff.nodes.detect_arch)"),
    "architectures": KeyRule(NO_EFFECT, "transformers' class names; actdiff builds its own NomicBertMoeModel"),
    "auto_map": KeyRule(NO_EFFECT, "remote-code class paths, used only with reference impl remote_code"),
    "_name_or_path": KeyRule(NO_EFFECT, "where the config came from"),
    "transformers_version": KeyRule(NO_EFFECT, "the saving library's version"),
}


def check_nomic_config(cfg: dict, source: str) -> None:
    """Refuse the first key whose value actdiff cannot honour, naming the file, the key and what is supported.
    Keys config.json omits take the original config class's default (so a config without
    ``rotary_emb_fraction`` is refused: NomicBertConfig's 0.0 means no rotary at all)."""
    for key, rule in NOMIC_KEYS.items():
        if rule.accepts is None:
            continue
        val = cfg.get(key, _MISSING)
        given = val is not _MISSING
        if rule.accepts(val if given else rule.default, cfg):
            continue
        shown = f"{key}={json.dumps(val)}" if given else f"{key} (absent: the original's default {rule.default!r})"
        raise ModelError(f"{source}: config key {shown} is not supported: {rule.why}; supported: {rule.supported}")


def config_value(cfg: dict, key: str):
    """``cfg[key]``, or the original config class's default when config.json omits the key, so the graph, the
    engine and the reference read an absent key as the original would."""
    return cfg[key] if key in cfg else NOMIC_KEYS[key].default


def original_defaults(cfg: dict) -> dict:
    """The implemented keys config.json omits, with the original's defaults (for the reference's config)."""
    return {
        k: r.default for k, r in NOMIC_KEYS.items() if r.how == IMPLEMENTED and k not in cfg and r.default is not None
    }


def handled_keys() -> list[str]:
    return sorted(k for k, r in NOMIC_KEYS.items() if r.how in (IMPLEMENTED, NO_EFFECT))


def refused_keys() -> list[str]:
    return sorted(k for k, r in NOMIC_KEYS.items() if r.how == REFUSED)
