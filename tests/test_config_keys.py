"""Every config.json key the original NomicBERT code reads is implemented on both sides or refused by name.

Tolerance (fp32 parity, the same derivation as tests/test_engine.py and tests/test_reference_model.py): the
fp32 reference and the engine each compute the float64 spec's function with fp32 rounding; a length-K dot
product has relative error ~ sqrt(K) * 2^-24 (~1.3e-6 at K = 512), compounded a few times through the
layers, so every node's relative L2 error must stay below REL_L2_FP32 = 1e-5. A key that is ignored changes
the rotary nodes by far more than that (DIFFERS, 1e-3, is 100x the budget).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import spec_numpy
from helpers import REPO, model_copy

from actdiff.compare.parity import weight_parity
from actdiff.compare.refops import run_op, spec_params
from actdiff.engine.core import Engine
from actdiff.errors import ModelError
from actdiff.models.config_keys import (
    IMPLEMENTED,
    NO_EFFECT,
    NOMIC_KEYS,
    REFUSED,
    check_nomic_config,
    handled_keys,
    refused_keys,
)
from actdiff.models.loading import load_reference_model
from actdiff.nodes import INPUT_IDS, build_graph, ntk_rotary_base
from actdiff.reference import ReferenceRunner

REL_L2_FP32 = 1e-5
DIFFERS = 1e-3
SPEC_AGREE = 1e-12  # two float64 implementations of one function: rounding only (~1e-16 per op)
NEAR_TIE = 1e-5  # a top-k flip is legitimate only where the reference's k-th/(k+1)-th gap is within fp32 noise

# The keys the original code reads (nomic-ai/contrastors at 613ddfd): the NomicBertConfig constructor
# (src/contrastors/models/huggingface/configuration_hf_nomic_bert.py) ...
ORIGINAL_CONFIG_KEYS = [
    "prenorm", "parallel_block", "parallel_block_tied_norm", "rotary_emb_fraction", "fused_dropout_add_ln",
    "fused_bias_fc", "use_flash_attn", "use_xentropy", "qkv_proj_bias", "rotary_emb_base", "rotary_emb_scale_base",
    "rotary_emb_interleaved", "mlp_fc1_bias", "mlp_fc2_bias", "use_rms_norm", "causal", "type_vocab_size",
    "dense_seq_output", "pad_vocab_size_multiple", "tie_word_embeddings", "rotary_scaling_factor",
    "max_trained_positions",
]  # fmt: skip
# ... and every `config.<key>` / `getattr(config, "<key>")` of the text model in
# src/contrastors/models/huggingface/modeling_hf_nomic_bert.py, src/contrastors/models/encoder/modeling_nomic_bert.py
# and src/contrastors/layers/{attention,block,moe}.py (GPT2Config's aliases hidden_size, num_hidden_layers,
# max_position_embeddings map onto n_embd, n_layer, n_positions; vision-only keys are left out)
ORIGINAL_MODEL_KEYS = [
    "activation_function", "add_pooling_layer", "attn_pdrop", "causal", "classifier_dropout", "dense_seq_output",
    "embd_pdrop", "expert_choice_router", "ffn_div", "fused_bias_fc", "fused_dropout_add_ln", "initializer_range",
    "last_layer_subset", "layer_norm_epsilon", "max_trained_positions", "mlp_fc1_bias", "mlp_fc2_bias",
    "moe_every_n_layers", "moe_impl", "moe_normalize_expert_weights", "moe_resid_pdrop", "moe_top_k", "n_embd",
    "n_head", "n_inner", "n_layer", "n_positions", "norm_mlp", "num_experts", "num_heads_kv", "num_labels",
    "num_shared_experts", "pad_token_id", "pad_vocab_size_multiple", "prenorm", "problem_type", "qkv_proj_bias",
    "resid_pdrop", "residual_in_fp32", "rotary_emb_base", "rotary_emb_fraction", "rotary_emb_interleaved",
    "rotary_emb_scale_base", "rotary_head_dim", "rotary_scaling_factor", "router_aux_loss_coef", "type_vocab_size",
    "use_flash_attn", "use_rms_norm", "use_xentropy", "vocab_size",
]  # fmt: skip
RELEASED_CONFIGS = [
    REPO / "src/actdiff/data/nomic-embed-text-v2-moe.config.json",  # the packaged copy
    REPO / "tests/data/nomic-embed-text-v2-moe.config.json",
    REPO.parent / "shared/spec/nomic-embed-text-v2-moe.config.json",  # the spec's copy, where it is checked out
]
# a value each refused key cannot take, with the text the message must show
BAD_VALUES = {
    "rotary_emb_fraction": 0.5,
    "rotary_emb_scale_base": 512,
    "rotary_head_dim": True,
    "prenorm": True,
    "parallel_block": True,
    "parallel_block_tied_norm": True,
    "use_rms_norm": True,
    "norm_mlp": True,
    "causal": True,
    "num_heads_kv": 1,
    "add_pooling_layer": True,
    "pad_vocab_size_multiple": 100,
    "scale_attn_weights": False,
    "scale_attn_by_inverse_layer_idx": True,
    "reorder_and_upcast_attn": True,
    "moe_impl": "vanilla",
    "expert_choice_router": True,
    "num_shared_experts": 1,
    "ffn_div": 2,
}


# ------------------------------------------------------------------------------------------ the registry
def test_every_key_is_handled_or_refused():
    released = set()
    for path in RELEASED_CONFIGS:
        if path.is_file():  # the shared spec copy exists on the development machines only
            cfg = json.loads(path.read_text())
            released |= set(cfg)
            check_nomic_config(cfg, str(path))  # the released values are all supported
    assert RELEASED_CONFIGS[0].is_file()
    keys = released | set(ORIGINAL_CONFIG_KEYS) | set(ORIGINAL_MODEL_KEYS)
    unknown = sorted(keys - set(NOMIC_KEYS))
    assert not unknown, f"keys neither handled nor refused (add them to actdiff.models.config_keys): {unknown}"
    for key, rule in NOMIC_KEYS.items():
        assert rule.how in (IMPLEMENTED, NO_EFFECT, REFUSED) and rule.why, key
        if rule.how == REFUSED:
            assert rule.accepts is not None and rule.supported, key
    assert set(handled_keys()) | set(refused_keys()) == set(NOMIC_KEYS)
    assert set(refused_keys()) == set(BAD_VALUES)  # every refused key is exercised below
    print("handled:", handled_keys())
    print("refused:", refused_keys())


@pytest.fixture(scope="module")
def bad_dir(tiny_model_dir, tmp_path_factory):
    return model_copy(tiny_model_dir, tmp_path_factory.mktemp("bad") / "m")


def _set_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return cfg


@pytest.mark.parametrize("key", sorted(BAD_VALUES))
def test_refused_key_is_named_by_both_loaders(key, bad_dir, tiny_model_dir):
    original = json.loads((tiny_model_dir / "config.json").read_text())
    (bad_dir / "config.json").write_text(json.dumps({**original, key: BAD_VALUES[key]}))
    message = rf"{bad_dir / 'config.json'}: config key {key}=.* is not supported: .*; supported: "
    with pytest.raises(ModelError, match=message):
        load_reference_model(bad_dir)
    with pytest.raises(ModelError, match=message):
        Engine(bad_dir)


def test_absent_key_takes_the_original_default(bad_dir, tiny_model_dir):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    del cfg["rotary_emb_fraction"]  # NomicBertConfig's default 0.0: absolute positions, not rotary
    (bad_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=r"config key rotary_emb_fraction \(absent: the original's default 0.0\)"):
        Engine(bad_dir)


def test_absent_implemented_key_reads_as_the_original_on_both_sides(tiny_model_dir):
    from actdiff.models.loading import nomic_config_from_dict
    from actdiff.nodes import dims_from_config

    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    for key in ("activation_function", "type_vocab_size", "qkv_proj_bias"):
        del cfg[key]
    d, ref = dims_from_config(cfg), nomic_config_from_dict(cfg)
    # GPT2Config's gelu_new (tanh form), NomicBertConfig's type_vocab_size 2 and qkv_proj_bias true
    assert d.activation == ref.activation_function == "gelu_new"
    assert d.type_vocab == ref.type_vocab_size == 2
    assert d.qkv_bias is ref.qkv_proj_bias is True


# --------------------------------------------------------------------------------------- helpers
def _ids(vocab: int, T: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([[0], rng.integers(5, vocab - 1, T - 2), [2]]).astype(np.int64)


def _spec_forward(graph, weights, ids) -> dict:
    """The float64 spec (actdiff.compare.refops) run on its own values, node by node."""
    v = {INPUT_IDS: ids}
    for node in graph:
        v[node.name] = run_op(graph, node, v, weights, spec_params(graph, node))
    return v


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _assert_close(graph, got: dict, want: dict, what: str) -> float:
    """Every float node within REL_L2_FP32; top-k indices equal except at a near-tie of ``want``'s probs
    (nodes after such a flip are then not compared). Returns the worst relative L2."""
    worst, flipped = 0.0, False
    for n in graph:
        if flipped:
            break
        if n.kind == "index":
            if not np.array_equal(got[n.name], want[n.name]):
                p = -np.sort(-np.asarray(want[graph.moe_block_of(n.name).probs], np.float64), axis=1)
                k = graph.dims.top_k
                bad = np.nonzero(np.any(got[n.name] != want[n.name], axis=1))[0]
                assert np.all(p[bad, k - 1] - p[bad, k] < NEAR_TIE), (what, n.name)
                flipped = True
            continue
        err = _rel(got[n.name], want[n.name])
        assert err < REL_L2_FP32, (what, n.name, err)
        worst = max(worst, err)
    return worst


def _three_sides(model_dir, ids):
    """(graph, reference fp32 values, engine fp32 values, float64 spec values) on one prompt."""
    from safetensors.numpy import load_file

    model, cfg, _ = load_reference_model(model_dir)
    graph = build_graph(cfg)
    runner = ReferenceRunner(model, graph)
    try:
        ref = runner.run_batch([ids.tolist()])[0]
    finally:
        runner.close()
    eng = Engine(model_dir, threads=1).forward(ids, "fp32")
    weights = load_file(str(model_dir / "model.safetensors"))
    spec = _spec_forward(graph, weights, ids)
    # the two float64 specs (refops' per-op spec and the independent tests/spec_numpy.py) agree
    oracle = spec_numpy.forward_nomic_moe(cfg, weights, ids)
    for n in graph:
        if n.kind == "index":
            assert np.array_equal(spec[n.name], oracle[n.name]), n.name
        else:
            assert _rel(spec[n.name], oracle[n.name]) < SPEC_AGREE, n.name
    return graph, ref, eng, spec


# ------------------------------------------------------------------------------------ dynamic NTK
NTK = {"rotary_scaling_factor": 2.0, "max_trained_positions": 16}
T_LONG = 40  # > max_trained_positions: the base is scaled


def test_ntk_base_formula():
    # by hand: 10000 * ((2 * 40 / 16) - (2 - 1)) ** (32 / 30)
    assert ntk_rotary_base(10000.0, 40, 2.0, 16, 32) == pytest.approx(10000 * 4.0 ** (32 / 30), rel=1e-15)
    assert ntk_rotary_base(10000.0, 16, 2.0, 16, 32) == 10000.0  # up to max_trained_positions: unscaled
    assert ntk_rotary_base(10000.0, 40, None, 16, 32) == 10000.0


@pytest.fixture(scope="module")
def ntk_dir(tiny_model_dir, tmp_path_factory):
    d = model_copy(tiny_model_dir, tmp_path_factory.mktemp("ntk") / "m")
    _set_config(d, **NTK)
    return d


def test_ntk_scaling_reference_engine_spec(ntk_dir, tiny_model_dir):
    ids = _ids(4032, T_LONG)
    graph, ref, eng, spec = _three_sides(ntk_dir, ids)
    assert graph.dims.rotary_base_for(T_LONG) > graph.dims.rotary_base
    ref_err = _assert_close(graph, ref, spec, "reference vs float64 spec")
    eng_err = _assert_close(graph, eng, ref, "engine vs reference")
    # the key is not ignored: the unscaled model's rotary output differs by far more than the budget
    _, plain_ref, plain_eng, _ = _three_sides(tiny_model_dir, ids)
    q = "encoder.layers.0.attn.q_rot"
    assert _rel(ref[q], plain_ref[q]) > DIFFERS and _rel(eng[q], plain_eng[q]) > DIFFERS
    assert _rel(ref["embedding"], plain_ref["embedding"]) > DIFFERS
    print(
        f"NTK T={T_LONG}: worst rel L2 reference/spec {ref_err:.2e}, engine/reference {eng_err:.2e}; "
        f"q_rot vs unscaled {_rel(ref[q], plain_ref[q]):.2e}"
    )


def test_ntk_scaling_per_prompt_in_a_padded_batch(ntk_dir):
    """A prompt's reference values do not depend on its batch: each sequence is scaled by its own length, not
    the padded one (tolerance as tests/test_reference_model.py's batch-padding test: 1e-6 of the node's scale,
    the same fp32 function summed in another blocking order)."""
    model, cfg, _ = load_reference_model(ntk_dir)
    graph = build_graph(cfg)
    runner = ReferenceRunner(model, graph)
    try:
        short = _ids(4032, 24, seed=1)  # > max_trained_positions, < the batch's padded 40
        alone = runner.run_batch([short.tolist()])[0]
        batched = runner.run_batch([_ids(4032, T_LONG).tolist(), short.tolist()])[1]
    finally:
        runner.close()
    for n in graph:
        a, b = np.asarray(batched[n.name], np.float64), np.asarray(alone[n.name], np.float64)
        assert np.max(np.abs(a - b)) <= 1e-6 * max(1.0, float(np.max(np.abs(b)))), n.name


def test_ntk_scaling_per_sequence_in_an_engine_batch(ntk_dir):
    """The engine's padded batch scales each sequence's rotary base by that sequence's own length: every node
    equals the prompt run alone, bit for bit (the batched kernels compute each row, and each sequence's
    attention, with the same arithmetic as batch 1; tests/test_engine.py)."""
    engine = Engine(ntk_dir, threads=1)
    prompts = [_ids(4032, T_LONG).tolist(), _ids(4032, 24, seed=1).tolist(), _ids(4032, 12, seed=2).tolist()]
    batched = engine.forward_batch(prompts, "fp32")
    for ids, got in zip(prompts, batched, strict=True):
        for name, value in engine.forward(ids, "fp32").items():
            np.testing.assert_array_equal(got[name], value, err_msg=f"{name} at T={len(ids)}")


def test_ntk_scaling_off_up_to_max_trained(ntk_dir, tiny_model_dir):
    ids = _ids(4032, NTK["max_trained_positions"])
    scaled = Engine(ntk_dir, threads=1).forward(ids, "fp32")
    plain = Engine(tiny_model_dir, threads=1).forward(ids, "fp32")
    for name, value in plain.items():
        np.testing.assert_array_equal(scaled[name], value, err_msg=name)


# ------------------------------------------------------------------------------------- missing biases
BIAS_FLAGS = {
    # flag -> the checkpoint tensors it removes (the original: NomicBertAttention builds Wqkv and out_proj with
    # bias=config.qkv_proj_bias; NomicBertMLP fc1/fc2 with bias1/bias2 = mlp_fc1_bias/mlp_fc2_bias)
    "qkv_proj_bias": ("attn.Wqkv.bias", "attn.out_proj.bias"),
    "mlp_fc1_bias": ("mlp.fc1.bias",),
    "mlp_fc2_bias": ("mlp.fc2.bias",),
}


@pytest.mark.parametrize("flag", sorted(BIAS_FLAGS))
def test_bias_flag_false(flag, tiny_model_dir, tmp_path):
    def drop(w):
        for k in [k for k in w if k.endswith(BIAS_FLAGS[flag])]:
            del w[k]

    d = model_copy(tiny_model_dir, tmp_path / "m", drop)
    _set_config(d, **{flag: False})
    graph, ref, eng, spec = _three_sides(d, _ids(4032, 24))
    used = {w for n in graph for w in n.weights}
    assert not any(w.endswith(BIAS_FLAGS[flag]) for w in used)
    _assert_close(graph, ref, spec, "reference vs float64 spec")
    _assert_close(graph, eng, ref, "engine vs reference")
    rows, config = weight_parity(d, Engine(d))
    assert {r["tensor"] for r in rows} == used and all(r["rel_l2"] == 0.0 for r in rows)
    biases = config["linear_biases"]  # config parity lists the flag, and the engine applies it
    assert biases["match"] and biases["engine"][flag] is False, biases


def test_config_parity_lists_ntk_scaling(ntk_dir, tiny_model_dir):
    """Config parity names dynamic NTK scaling: the engine applies the factor config.json sets, and a side that
    understood none (reporting None, as llama.cpp would) is a mismatch on that key."""
    from actdiff.compare.parity import config_parity

    ours = Engine(ntk_dir).understood_config()
    got = config_parity(ntk_dir, ours)["rotary_scaling"]
    assert got["match"] and got["config"] == [NTK["rotary_scaling_factor"], NTK["max_trained_positions"]], got
    assert not config_parity(ntk_dir, ours | {"rotary_scaling": None})["rotary_scaling"]["match"]
    assert config_parity(tiny_model_dir, Engine(tiny_model_dir).understood_config())["rotary_scaling"]["config"] is None
