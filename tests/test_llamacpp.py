"""llama.cpp as a second engine (actdiff.llamacpp): conversion guard, ggml struct guard, node capture, and
the diagnosis the statistics reach on their own for llama.cpp at f32 on the tiny model.

Skipped when llama-cpp-python (and the converter files) are not installed, unless ACTDIFF_REQUIRE_LLAMACPP=1
(then those tests fail). The GELU reference-op test needs neither. One module-scoped setup converts the
tiny model (a few seconds), dumps the reference and llama.cpp over 8 prompts and computes the statistics
with hypotheses ranked at every failing node; the whole file runs in about 30 s.
"""

from __future__ import annotations

import ctypes
import json
import math
import os

import numpy as np
import pandas as pd
import pytest
from helpers import DATA, ensure_tiny_model, summary_outputs

from actdiff.compare.refops import gelu_tanh_fp16_table, run_op, spec_params
from actdiff.errors import ActdiffError, ModelError

# short and medium prompts, empty included; all below ~140 tokens, where llama.cpp's fp32 RoPE angles stay
# inside the fp32 ROPE budget (docs/llamacpp.md, "Known differences")
PROMPT_IDS = ("en-0001", "doc-0002", "code-0002", "short-empty", "emoji-0003", "de-0001", "mixed-0001", "num-0001")
REQUIRE = os.environ.get("ACTDIFF_REQUIRE_LLAMACPP") == "1"


def _need_llamacpp() -> None:
    from actdiff.llamacpp import available

    ok, why = available()
    if not ok:
        if REQUIRE:
            pytest.fail(f"ACTDIFF_REQUIRE_LLAMACPP=1 but llama.cpp is not usable: {why}")
        pytest.skip(why)


# ------------------------------------------------------------------------- reference op (no llama.cpp needed)
def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def test_gelu_tanh_fp16_table_reference_op():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 3, 20000).astype(np.float32)
    y = gelu_tanh_fp16_table(x)
    assert y.dtype == np.float64
    # the clipped branches of ggml_vec_gelu_f32, and NaN passing through
    edge = gelu_tanh_fp16_table(np.array([-12.0, -10.0, 10.0, 11.5, np.nan], np.float32))
    assert edge[:4].tolist() == [0.0, 0.0, 10.0, 11.5] and np.isnan(edge[4])
    mid = np.abs(x) < 10
    h = x[mid].astype(np.float16).astype(np.float64)
    # every table value is an fp16 number: the tanh GELU of the fp16-rounded input, rounded to fp16
    np.testing.assert_array_equal(y[mid], _gelu_tanh(h).astype(np.float16).astype(np.float64))
    # so it is the tanh GELU within fp16 input and output rounding (2^-11 relative each, plus slope ~1.13)
    err = np.abs(y[mid] - _gelu_tanh(x[mid].astype(np.float64)))
    assert np.all(err <= 2.0**-10 * (np.abs(x[mid]) + 1e-3) * 1.2 + 2**-24)
    # and differs from the plain tanh form by about 3e-4 relative L2 on N(0, 3) inputs: what makes the
    # gelu_tanh_approximation hypothesis unable to explain ggml's output
    rel = np.linalg.norm(y[mid] - _gelu_tanh(x[mid].astype(np.float64))) / np.linalg.norm(y[mid])
    assert 1e-4 < rel < 1e-3


def test_gelu_form_is_a_spec_parameter():
    from actdiff.nodes import graph_for_model_dir

    graph = graph_for_model_dir(ensure_tiny_model())
    node = graph["encoder.layers.0.mlp.act"]
    x = np.linspace(-4, 4, 2 * 512, dtype=np.float32).reshape(2, 512)
    params = {**spec_params(graph, node), "form": "tanh_fp16_table"}
    out = run_op(graph, node, {"encoder.layers.0.mlp.fc1": x}, {}, params)
    np.testing.assert_array_equal(out, gelu_tanh_fp16_table(x))


# ----------------------------------------------------------------------------------------------- setup
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    _need_llamacpp()
    from actdiff import pipeline
    from actdiff.compare.stats import StatsConfig, compute_shard_stats
    from actdiff.llamacpp.gguf_export import convert_to_gguf
    from actdiff.models.loading import model_summary
    from actdiff.tables import SHARD_TABLES

    root = tmp_path_factory.mktemp("llamacpp")
    model_dir = ensure_tiny_model()
    lines = (DATA / "ci_prompts.tsv").read_text(encoding="utf-8").splitlines()
    kept = [ln for ln in lines[1:] if ln.split("\t", 1)[0] in PROMPT_IDS]
    assert len(kept) == len(PROMPT_IDS)
    (root / "prompts.tsv").write_text("\n".join([lines[0], *kept]) + "\n", encoding="utf-8")
    mj = root / "model.json"
    mj.write_text(json.dumps(model_summary("tiny-nomic-moe", model_dir)))
    pipeline.split_prompts(str(root / "prompts.tsv"), 1, [str(root / "prompts.parquet")])
    tokens = root / "tokens.parquet"
    pipeline.tokenize(str(mj), str(root / "prompts.parquet"), 512, str(tokens), engine_side=False)
    ref = root / "ref.h5"
    pipeline.dump(str(mj), str(tokens), str(ref), "reference", "fp32", 0, impl="actdiff", batch_size=1)
    gguf = root / "tiny-f32.gguf"
    meta = convert_to_gguf(str(model_dir), str(gguf), "f32")
    eng = root / "llamacpp.h5"
    pipeline.dump(str(mj), str(tokens), str(eng), "llamacpp", "fp32", 0, gguf=str(gguf), threads=1)
    outs = {k: str(root / "stats" / f"{k}.parquet") for k in SHARD_TABLES}
    # ranked at every failing node (not only the first divergence), so both llama.cpp differences get a name
    compute_shard_stats(model_dir, ref, eng, "llamacpp", "fp32", 0, outs, StatsConfig(diagnose_all_failing=True))
    tables = {k: pd.read_parquet(v) for k, v in outs.items() if k != "embeddings"}
    return {
        "root": root,
        "model_dir": model_dir,
        "model_json": mj,
        "tokens": tokens,
        "ref": ref,
        "gguf": gguf,
        "eng": eng,
        "meta": meta,
        "stats": tables,
    }


@pytest.fixture(scope="module")
def runner(setup):
    from actdiff.llamacpp.capture import LlamaCppRunner

    with LlamaCppRunner(setup["gguf"], threads=1) as r:
        yield r


@pytest.fixture(scope="module")
def token_ids(setup) -> dict[str, list[int]]:
    t = pd.read_parquet(setup["tokens"])
    return {p: [int(i) for i in ids] for p, ids in zip(t["prompt_id"], t["reference_ids"], strict=True)}


# ----------------------------------------------------------------------------------------- conversion
def test_gguf_metadata_matches_config(setup):
    from actdiff.nodes import load_config_json

    cfg = load_config_json(setup["model_dir"])
    m = setup["meta"]
    assert m["architecture"] == "nomic-bert-moe" and m["file_type"] == "f32" and m["outtype"] == "f32"
    assert m["embedding_length"] == cfg["n_embd"] and m["attention.head_count"] == cfg["n_head"]
    assert m["feed_forward_length"] == cfg["n_inner"] and m["block_count"] == cfg["n_layer"]
    assert m["expert_count"] == cfg["num_experts"] and m["expert_used_count"] == cfg["moe_top_k"]
    assert m["moe_every_n_layers"] == cfg["moe_every_n_layers"]
    assert m["rope.freq_base"] == cfg["rotary_emb_base"]
    assert np.float32(m["attention.layer_norm_epsilon"]) == np.float32(cfg["layer_norm_epsilon"])
    assert m["context_length"] == 512  # the converter's rule for n_positions = max_trained_positions = 2048
    assert m["tensor_types"] == {"F32": m["n_tensors"]}
    assert m["expert_bias"] is False  # the converter drops mlp.experts.bias
    assert len(m["sha256"]) == 64 and not list(setup["gguf"].parent.glob(".*tmp*"))


@pytest.mark.parametrize(
    ("key", "value", "gguf_key"),
    [
        ("n_embd", 768, "embedding_length"),  # what transformers 5's nomic_bert config class would hand over
        ("n_head", 8, "attention.head_count"),
        ("rotary_emb_base", 1000, "rope.freq_base"),
        ("layer_norm_epsilon", 1e-12, "attention.layer_norm_epsilon"),
        ("moe_top_k", 1, "expert_used_count"),
        ("moe_every_n_layers", 3, "moe_every_n_layers"),
    ],
)
def test_config_mismatch_is_caught(setup, key, value, gguf_key):
    from actdiff.llamacpp.gguf_export import GGUFConfigMismatch, verify_gguf
    from actdiff.llamacpp.gguf_meta import read_gguf_header
    from actdiff.nodes import load_config_json

    cfg = dict(load_config_json(setup["model_dir"]), **{key: value})
    with pytest.raises(GGUFConfigMismatch, match=rf"'nomic-bert-moe\.{gguf_key}' = .* but config.json '{key}'"):
        verify_gguf(read_gguf_header(setup["gguf"]), cfg, "f32")
    with pytest.raises(GGUFConfigMismatch, match="general.file_type is 'f32', expected 'f16'"):
        verify_gguf(read_gguf_header(setup["gguf"]), load_config_json(setup["model_dir"]), "f16")


def test_conversion_refuses_wrong_architecture_and_outtype(setup, tmp_path):
    from actdiff.llamacpp.gguf_export import convert_to_gguf

    with pytest.raises(ModelError, match="outtype 'q4_0'"):
        convert_to_gguf(str(setup["model_dir"]), str(tmp_path / "x.gguf"), "q4_0")
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({
        "architectures": ["BertModel"], "model_type": "bert", "hidden_size": 32, "num_attention_heads": 2,
        "num_hidden_layers": 1, "intermediate_size": 64, "vocab_size": 100, "layer_norm_eps": 1e-12,
        "max_position_embeddings": 64,
    }))  # fmt: skip
    with pytest.raises(ModelError, match=r"config.json: llama.cpp's 'nomic-bert-moe' needs a NomicBERT-MoE config"):
        convert_to_gguf(str(bert), str(tmp_path / "y.gguf"), "f32")
    ntk = tmp_path / "ntk"
    ntk.mkdir()
    cfg = json.loads((setup["model_dir"] / "config.json").read_text())
    (ntk / "config.json").write_text(json.dumps(cfg | {"rotary_scaling_factor": 2.0}))
    with pytest.raises(ModelError, match=r"rotary_scaling_factor=2.0 \(dynamic NTK rotary scaling\) has no"):
        convert_to_gguf(str(ntk), str(tmp_path / "z.gguf"), "f32")
    assert not any((tmp_path / f"{n}.gguf").exists() for n in "xyz")


# ------------------------------------------------------------------------------------ ctypes guard
def test_ggml_struct_layout_guard(setup):
    from actdiff.llamacpp.capture import GgmlTensor, LlamaCppError, check_layout, load_libraries

    _, g = load_libraries()
    info = check_layout(g)
    assert info["tensor_size"] == ctypes.sizeof(GgmlTensor) == 336  # 64-bit ggml.h of llama-cpp-python 0.3.36
    assert info["tensor_overhead"] == int(g.ggml_tensor_overhead())

    # a struct from another ggml version (a field gone) must be refused, naming what differs
    class Drifted(ctypes.Structure):
        _fields_ = [f for f in GgmlTensor._fields_ if f[0] != "view_offs"]

    with pytest.raises(LlamaCppError, match=r"ggml_tensor_overhead\(\).*name offset"):
        check_layout(g, Drifted)


# ----------------------------------------------------------------------------------------------- capture
def test_capture_every_mapped_node(setup, runner, token_ids):
    from actdiff.llamacpp import mapping_path
    from actdiff.nodes import graph_for_model_dir
    from actdiff.sides.mapping import load_mapping

    graph = graph_for_model_dir(setup["model_dir"])
    mapping = load_mapping(mapping_path(), graph)
    al = mapping.resolve(runner.node_names)
    assert al.unmatched_canonical == [] and len(al.matched) == len(graph) == 76
    # names llama.cpp gives twice are split structurally: context vs projection, pre/post RoPE, the two norms
    for i in range(graph.dims.layers):
        assert {f"kqv_out-{i}", f"attn_out-{i}", f"Qcur-{i}", f"Qcur-{i}#view", f"l_out-{i}"} <= set(runner.node_names)
        assert {f"norm-{i}#attn_output_norm", f"norm-{i}#layer_output_norm"} <= set(runner.node_names)
    for pid, ids in token_ids.items():
        T = len(ids)
        ext = runner.forward(ids)
        vals = mapping.apply(ext, T)
        assert set(vals) == set(graph.names())
        for n in graph:
            assert vals[n.name].shape == graph.shape(n.name, T if n.axis == "token" else 1), (pid, n.name)
            assert np.all(np.isfinite(vals[n.name])), (pid, n.name)
        L = graph.dims.layers
        np.testing.assert_array_equal(ext[f"l_out-{L - 1}"], ext["result_embd"])
        assert not np.array_equal(ext["kqv_out-0"], ext["attn_out-0"])
        # llama.cpp's mean pooling is the mean of the last layer's rows; embd_normalized has unit norm
        np.testing.assert_allclose(ext["result_embd_pooled"], ext["result_embd"].mean(0), rtol=0, atol=2e-6)
        assert abs(float(np.linalg.norm(ext["embd_normalized"].astype(np.float64))) - 1.0) < 1e-6
        ids_moe = ext["ffn_moe_topk-1"]  # 0-based expert ids, descending router probability
        assert ids_moe.dtype == np.int32 and ids_moe.min() >= 0 and ids_moe.max() < graph.dims.experts
        p = ext["ffn_moe_probs-1"]
        top = np.take_along_axis(p, ids_moe.astype(np.int64), 1)
        np.testing.assert_array_equal(top, np.sort(p, 1)[:, ::-1][:, :2])


def test_forward_subset_equals_full_and_is_repeatable(runner, token_ids):
    ids = token_ids["en-0001"]
    full = runner.forward(ids)
    part = runner.forward(ids, ["l_out-3", "ffn_moe_topk-3", "embd_normalized"])
    assert set(part) == {"l_out-3", "ffn_moe_topk-3", "embd_normalized"}
    for k, v in part.items():
        np.testing.assert_array_equal(v, full[k])  # capturing fewer nodes changes no value (fp32, 1 thread)


def test_runner_errors(setup, runner, monkeypatch):
    from actdiff.llamacpp.capture import LlamaCppRunner

    with pytest.raises(ActdiffError, match="outside the vocabulary"):
        runner.forward([0, 10**6, 2])
    with pytest.raises(ActdiffError, match="exceed the context of 512"):
        runner.forward([0] * 513)
    with pytest.raises(ActdiffError, match="empty token list"):
        runner.forward([])
    with pytest.raises(ModelError, match="GGUF file not found"):
        LlamaCppRunner(setup["root"] / "missing.gguf")

    # an exception inside the C callback is recorded, the graph stops, and it is re-raised after llama_encode
    def boom(addr):
        raise RuntimeError("boom in callback")

    monkeypatch.setattr(runner, "_read", boom)
    with pytest.raises(RuntimeError, match="boom in callback"):
        runner.forward([0, 5, 2])
    monkeypatch.undo()
    assert "l_out-3" in runner.forward([0, 5, 2])  # still usable

    r = LlamaCppRunner(setup["gguf"])
    r.close()
    r.close()  # idempotent
    with pytest.raises(ActdiffError, match="closed"):
        r.forward([0, 2])


# --------------------------------------------------------------------------------------------------- dump
def test_dump_attributes_and_config_parity_vocabulary(setup):
    import h5py

    from actdiff.engine.core import Engine

    with h5py.File(setup["eng"], "r") as f:
        a = dict(f.attrs)
    assert a["side"] == "llamacpp" and a["engine"] == "llamacpp" and a["variant"] == "fp32"
    assert a["llama_cpp_version"] == "0.3.36" and a["gguf_outtype"] == "f32" and len(a["gguf_sha256"]) == 64
    assert json.loads(a["missing_nodes"]) == []
    understood = json.loads(a["understood_config"])
    ours = Engine(setup["model_dir"]).understood_config("fp32")
    assert set(ours) <= set(understood)  # same key vocabulary, so config parity can compare them
    same = {k for k in ours if ours[k] == understood[k]}
    # llama.cpp differs from the spec exactly where the statistics find it: tanh GELU, no expert bias
    assert set(ours) - same == {"activation", "expert_bias"}
    assert understood["activation"] == "gelu_tanh" and understood["expert_bias"] is False


def _dump_without(setup, tmp_path, node_key: str):
    """A llama.cpp dump whose mapping points ``node_key`` at a tensor llama.cpp does not have."""
    import yaml

    from actdiff import pipeline
    from actdiff.llamacpp import mapping_path

    doc = yaml.safe_load(mapping_path().read_text())
    doc["nodes"][node_key] = "no_such_tensor-{i}"
    edited = tmp_path / "m.yaml"
    edited.write_text(yaml.safe_dump(doc))
    out = tmp_path / "d.h5"
    pipeline.dump(str(setup["model_json"]), str(setup["tokens"]), str(out), "llamacpp", "fp32", 0,
                  gguf=str(setup["gguf"]), mapping=str(edited))  # fmt: skip
    return out


def test_unmapped_node_is_written_as_placeholder(setup, tmp_path):
    import h5py

    from actdiff.h5io import ActivationReader

    out = _dump_without(setup, tmp_path, "encoder.layers.{i}.attn.k")
    with h5py.File(out, "r") as f:
        missing = json.loads(f.attrs["missing_nodes"])
    assert missing == [f"encoder.layers.{i}.attn.k" for i in range(4)]
    r = ActivationReader(out)
    pid = r.prompt_ids[0]
    assert np.all(np.isnan(r.node("encoder.layers.0.attn.k", pid)))
    assert np.all(np.isfinite(r.node("encoder.layers.0.attn.v", pid)))


def test_variant_grammar(setup, tmp_path):
    from actdiff import pipeline
    from actdiff.errors import ConfigError
    from actdiff.llamacpp.side import outtype_for_variant

    assert [outtype_for_variant(v) for v in ("fp32", "fp16", "q8_0")] == ["f32", "f16", "q8_0"]
    with pytest.raises(ConfigError, match="faults exist only"):
        outtype_for_variant("fp32+fault=gelu_tanh")
    with pytest.raises(ModelError, match="general.file_type is 'f32', expected 'f16'"):  # stale GGUF for the variant
        pipeline.dump(str(setup["model_json"]), str(setup["tokens"]), str(tmp_path / "x.h5"), "llamacpp", "fp16", 0,
                      gguf=str(setup["gguf"]))  # fmt: skip


# --------------------------------------------------------------------------- what the statistics find
def _per_node(nodes: pd.DataFrame) -> pd.DataFrame:
    """Per node: worst errors, and how many prompts' local error is over that prompt's budget (budgets follow
    each prompt's fp32 noise, so they are compared row by row)."""
    nodes = nodes.assign(over=nodes["local_rel_l2"] > nodes["budget"])
    return nodes.groupby(["node_index", "node", "op"], as_index=False).agg(
        rel=("rel_l2", "max"), local=("local_rel_l2", "max"), budget=("budget", "median"),
        over=("over", "sum"), fail=("status", lambda s: int((s == "fail").sum())),
    )  # fmt: skip


def test_f32_matches_reference_before_the_first_gelu(setup):
    n = _per_node(setup["stats"]["nodes"])
    first_gelu = int(n[n.op == "GELU"].node_index.min())
    first_moe = int(n[n.op == "ROUTER"].node_index.min())
    assert first_gelu < first_moe
    before = n[n.node_index < first_gelu]
    assert len(before) == 13 and (before.fail == 0).all()
    # Propagated error before any approximation: both sides compute in fp32; each op adds ~2^-24*sqrt(K) relative
    # (K <= 128 + T here) and the chain embed -> LN -> Wqkv -> RoPE -> attention -> out_proj -> add -> LN -> fc1
    # stacks at most ~10 of them, i.e. <= 10 * 2^-24 * sqrt(256) ~ 1e-5; observed <= 7e-7 (tiny model, 8 prompts).
    assert before.rel.max() < 1e-5, before.sort_values("rel").tail(3).to_string()
    # local errors stay within the fp32 budgets (6.3 x the node's fp32 noise on each prompt)
    assert (before.over == 0).all(), before[before.over > 0].to_string()


def test_failing_nodes_are_exactly_gelu_and_expert_bias(setup):
    n = _per_node(setup["stats"]["nodes"])
    failing = set(n[n.fail > 0].node)
    expected = set(n[n.op.isin(["GELU", "BIAS_ADD"])].node)
    assert failing == expected
    gelu = n[n.op == "GELU"]
    assert gelu.local.between(1e-4, 1e-3).all()  # ~3.7e-4: fp16 table rounding + tanh form
    bias = n[n.op == "BIAS_ADD"]
    assert (bias.local > 0.1).all()  # the missing shared expert bias is a large local error (~0.4)
    # everything else inherits error (warn) but computes its own op within budget
    others = n[~n.op.isin(["GELU", "BIAS_ADD"])]
    assert (others.over == 0).all(), others[others.over > 0].to_string()


def test_diagnosis_names_both_llamacpp_differences(setup):
    h = setup["stats"]["hypotheses"]
    top = h[h["rank"] == 1]
    assert set(top.verdict) == {"explained"}
    by_op = {}
    for node, g in top.groupby("node"):
        by_op.setdefault(node.rsplit(".", 1)[-1], set()).update(g.explained_by)
    assert by_op["bias_add"] == {"expert_bias_missing"}
    assert by_op["act"] == {"gelu_tanh_fp16_table"}
    # every GELU node, dense and expert, on every prompt; both MoE layers on every prompt
    n_prompts = len(PROMPT_IDS)
    counts = top.groupby("explained_by").prompt_id.count()
    assert counts["gelu_tanh_fp16_table"] == 4 * n_prompts and counts["expert_bias_missing"] == 2 * n_prompts
    # the plain tanh form is considered but does not explain: it leaves most of the fp16 rounding
    tanh = h[(h.candidate == "gelu_tanh_approximation")]
    assert (tanh.error > 0.5 * tanh.baseline_error).all()
    # first divergence of every prompt: the first GELU (layer 0), as llama.cpp's GELU is its first difference
    first = setup["stats"]["nodes"].groupby("prompt_id").first_divergence.first()
    assert set(first) == {"encoder.layers.0.mlp.act"}


def test_routing_agreement_per_layer(setup):
    r = setup["stats"]["routing"]
    per_layer = r.groupby("layer").agg(agree=("agree", "mean"), flips=("agree", lambda a: int((~a).sum())))
    assert list(per_layer.index) == [1, 3]
    # layer 1 sees only the GELU rounding upstream (~1e-4): the routers agree except at near-ties. The ids come
    # straight from ffn_moe_topk; an off-by-one id convention would make agreement ~0 here.
    assert per_layer.loc[1, "agree"] >= 0.97
    assert r[(r.layer == 1) & ~r.agree].near_tie.all()
    # layer 3 runs after the missing expert bias of layer 1 (~10% propagated error): agreement is lower,
    # reported per layer; it must still be far above chance (2 of 8 experts: ~4% exact-set agreement)
    assert 0.5 < per_layer.loc[3, "agree"] <= 1.0


def test_not_captured_nodes_are_reported_not_failed(setup, tmp_path):
    """A node the mapping cannot fill is "not_captured" (NaN metrics), its consumers are judged on their
    propagated error only, and the verdict keeps the same causes as with the complete mapping."""
    from actdiff.compare.aggregate import aggregate
    from actdiff.compare.search_run import RunSearch
    from actdiff.compare.stats import StatsConfig, compute_shard_stats
    from actdiff.tables import SHARD_TABLES

    eng = _dump_without(setup, tmp_path, "encoder.layers.{i}.attn.context")
    outs = {k: str(tmp_path / f"{k}.parquet") for k in SHARD_TABLES}
    compute_shard_stats(setup["model_dir"], setup["ref"], eng, "llamacpp", "fp32", 0, outs, StatsConfig())
    nodes = pd.read_parquet(outs["nodes"])
    ctx = nodes[nodes.node.str.endswith("attn.context")]
    assert (ctx.status == "not_captured").all() and ctx.rel_l2.isna().all()
    # out_proj reads the missing context: no replay possible, so never "fail", and its local error is NaN
    proj = nodes[nodes.node.str.endswith("attn.out_proj")]
    assert proj.status.isin(["pass", "warn"]).all() and proj.local_rel_l2.isna().all()
    summ = summary_outputs(tmp_path)
    meta = {"model": "tiny", "side": "llamacpp", "experts": 8}
    v = aggregate({t: [outs[t]] for t in SHARD_TABLES}, summ, meta, search=RunSearch.of(setup["model_dir"]))
    assert v["not_captured_nodes"] == [f"encoder.layers.{i}.attn.context" for i in range(4)]
    assert {c["hypothesis"] for c in v["causes"]} == {"gelu_tanh_fp16_table", "expert_bias_missing"}
    assert "not captured" in v["plain"]


def test_runner_without_capture_gives_the_same_embedding(setup, runner, token_ids):
    """capture_nodes=False (bench/engine.py times llama.cpp this way): no eval callback, same pooled output."""
    from actdiff.llamacpp.capture import LlamaCppRunner

    ids = next(iter(token_ids.values()))
    with LlamaCppRunner(setup["gguf"], threads=1, capture_nodes=False) as bare:
        got = bare.forward(ids)
        with pytest.raises(Exception, match="capture_nodes=False"):
            bare.forward(ids, ["ffn_moe_topk-1"])
    full = runner.forward(ids)
    np.testing.assert_array_equal(got["result_embd_pooled"], full["result_embd_pooled"])


def test_packed_batch_equals_one_by_one(setup, token_ids):
    """encode_batch (bench/engine.py's batched llama.cpp rows) packs prompts into one llama_batch, each with its
    own seq_id: each prompt's pooled embedding equals its own forward up to summation order. Bound: a dot
    product of length K summed in another order moves by <= K * eps32 relative in the worst case and about
    sqrt(K) * eps32 typically; over n_layer layers of K <= n_inner that is n_layer * sqrt(n_inner) * eps32
    typically, and the test allows 10x that (still far below any real error: a wrong seq_id mixes prompts,
    an O(1) change)."""
    from actdiff.errors import ActdiffError
    from actdiff.llamacpp.capture import LlamaCppRunner
    from actdiff.nodes import load_config_json

    cfg = load_config_json(setup["model_dir"])
    seqs = list(token_ids.values())[:4]
    tol = 10 * cfg["n_layer"] * np.sqrt(cfg["n_inner"]) * np.finfo(np.float32).eps
    with (
        LlamaCppRunner(setup["gguf"], threads=1, capture_nodes=False) as one,
        LlamaCppRunner(setup["gguf"], threads=1, capture_nodes=False, n_seq_max=4, n_ctx=2048) as packed,
    ):
        got = packed.encode_batch(seqs)
        for b, ids in enumerate(seqs):
            want = one.forward(ids)["result_embd_pooled"]
            assert np.linalg.norm(got[b] - want) / np.linalg.norm(want) <= tol, (b, tol)
        with pytest.raises(ActdiffError, match="n_seq_max 4"):
            packed.encode_batch(seqs + seqs[:1])
    with pytest.raises(ActdiffError, match="capture_nodes=False"):
        LlamaCppRunner(setup["gguf"], n_seq_max=2)
