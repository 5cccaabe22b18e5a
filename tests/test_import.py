"""Import of another engine's dumps (actdiff.sides.imported) through a name mapping (actdiff.sides.mapping).

The "external" engine is our own engine with its outputs re-laid-out the way llama.cpp-like engines
dump them: renamed tensors, a batch axis on every tensor, only the fused QKV (q/k/v come from a split in
the mapping), a transposed [H, T] tensor, attention context in two halves (N:1 concat), 1-based expert
ids (index_offset), a tensor stored x2 (scale 0.5) and merged head / expert axes. The import must give
back the native dump bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from helpers import ensure_tiny_model
from safetensors.numpy import save_file

from actdiff.engine.core import Engine
from actdiff.errors import DumpError
from actdiff.h5io import ActivationReader, ActivationWriter
from actdiff.sides.imported import import_dump, main
from actdiff.sides.mapping import Mapping, MappingError, load_mapping, normalize

PROMPTS = {"alpha": 6, "b-2": 1, "c.3": 11, "d_4": 17}  # prompt id -> number of tokens

MAPPING = """
version: 1
engine: llama.cpp-like
nodes:
  embeddings: inp_embd
  emb_ln: {from: inp_norm, transforms: [{squeeze: 0}, {transpose: [1, 0]}]}
  encoder.layers.{i}.attn.qkv: blk.{i}.attn_qkv
  encoder.layers.{i}.attn.q:
    from: blk.{i}.attn_qkv
    transforms: [{split: {axis: -1, parts: 3, index: 0}}, {reshape: [T, nh, hd]}]
  encoder.layers.{i}.attn.k:
    from: blk.{i}.attn_qkv
    transforms: [{split: {axis: -1, sizes: [H, H, H], index: 1}}, {reshape: [T, nh, hd]}]
  encoder.layers.{i}.attn.v:
    from: blk.{i}.attn_qkv
    transforms: [{split: {axis: 2, parts: 3, index: 2}}]
  encoder.layers.{i}.attn.q_rot: blk.{i}.q_rope
  encoder.layers.{i}.attn.k_rot: blk.{i}.k_rope
  encoder.layers.{i}.attn.context:
    from: ["blk.{i}.kqv_out.0", "blk.{i}.kqv_out.1"]
    combine: concat
    axis: -1
  encoder.layers.{i}.attn.out_proj: blk.{i}.kq_out
  encoder.layers.{i}.resid_attn: blk.{i}.ffn_inp
  encoder.layers.{i}.norm1: blk.{i}.attn_out_norm
  encoder.layers.{i}.mlp.fc1: blk.{i}.ffn_up
  encoder.layers.{i}.mlp.act: blk.{i}.ffn_gelu
  encoder.layers.{i}.mlp.fc2: blk.{i}.ffn_down
  encoder.layers.{i}.mlp.router.logits: blk.{i}.ffn_moe_logits
  encoder.layers.{i}.mlp.router.probs: blk.{i}.ffn_moe_probs
  encoder.layers.{i}.mlp.router.topk_weights: blk.{i}.ffn_moe_weights
  encoder.layers.{i}.mlp.router.topk_indices:
    from: blk.{i}.ffn_moe_argsort
    transforms: [{index_offset: -1}, {cast: int64}]
  encoder.layers.{i}.mlp.experts.fc1: blk.{i}.ffn_moe_up
  encoder.layers.{i}.mlp.experts.act: blk.{i}.ffn_moe_gelu
  encoder.layers.{i}.mlp.experts.out: blk.{i}.ffn_moe_down
  encoder.layers.{i}.mlp.experts.weighted_sum: {from: "blk.{i}.ffn_moe_weighted_x2", transforms: [{scale: 0.5}]}
  encoder.layers.{i}.mlp.experts.bias_add: blk.{i}.ffn_moe_out
  encoder.layers.{i}.resid_mlp: blk.{i}.ffn_out
  encoder.layers.{i}.norm2: blk.{i}.l_out
  pooled: result_pooled
  embedding: result_embd
"""

# canonical suffix -> external name, for the plain renames (batch axis added, otherwise as is)
RENAMES = {
    "attn.qkv": "attn_qkv",
    "attn.out_proj": "kq_out",
    "resid_attn": "ffn_inp",
    "norm1": "attn_out_norm",
    "mlp.fc1": "ffn_up",
    "mlp.act": "ffn_gelu",
    "mlp.fc2": "ffn_down",
    "mlp.router.logits": "ffn_moe_logits",
    "mlp.router.probs": "ffn_moe_probs",
    "mlp.router.topk_weights": "ffn_moe_weights",
    "mlp.experts.fc1": "ffn_moe_up",
    "mlp.experts.out": "ffn_moe_down",
    "mlp.experts.bias_add": "ffn_moe_out",
    "resid_mlp": "ffn_out",
    "norm2": "l_out",
}


def external_layout(vals: dict[str, np.ndarray], graph) -> dict[str, np.ndarray]:
    """Our engine's node values, dumped the way a llama.cpp-like engine would."""
    H = graph.dims.hidden
    out = {
        "inp_embd": vals["embeddings"][None],
        "inp_norm": np.ascontiguousarray(vals["emb_ln"].T)[None],  # [1, H, T]
        "result_pooled": vals["pooled"],  # [1, H]: batch of one prompt
        "result_embd": vals["embedding"][None],  # [1, 1, H]
    }
    for i in range(graph.dims.layers):
        p, b = f"encoder.layers.{i}.", f"blk.{i}."
        for suffix, ext in RENAMES.items():
            if p + suffix in vals:
                out[b + ext] = vals[p + suffix][None]
        T = vals[p + "attn.qkv"].shape[0]
        out[b + "q_rope"] = vals[p + "attn.q_rot"][None]  # [1, T, nh, hd]
        out[b + "k_rope"] = vals[p + "attn.k_rot"].reshape(1, T, H)  # heads merged
        ctx = vals[p + "attn.context"]
        out[b + "kqv_out.0"] = np.ascontiguousarray(ctx[:, : H // 2])[None]
        out[b + "kqv_out.1"] = np.ascontiguousarray(ctx[:, H // 2 :])[None]
        if p + "mlp.router.topk_indices" in vals:
            out[b + "ffn_moe_argsort"] = (vals[p + "mlp.router.topk_indices"] + 1).astype(np.int32)[None]
            out[b + "ffn_moe_gelu"] = vals[p + "mlp.experts.act"].reshape(1, T, -1)  # [1, T, k*F]
            out[b + "ffn_moe_weighted_x2"] = (vals[p + "mlp.experts.weighted_sum"] * np.float32(2))[None]
    return out


def write_external(src: Path, per_prompt: dict[str, dict[str, np.ndarray]]) -> None:
    """Alternate the two layouts: a folder of .npy per prompt, or one safetensors file per prompt."""
    for k, (pid, tensors) in enumerate(per_prompt.items()):
        if k % 2 == 0:
            d = src / pid
            d.mkdir(parents=True)
            for name, a in tensors.items():
                np.save(d / f"{name}.npy", a)
        else:
            src.mkdir(parents=True, exist_ok=True)
            save_file({n: np.ascontiguousarray(a) for n, a in tensors.items()}, str(src / f"{pid}.safetensors"))


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return ensure_tiny_model()


@pytest.fixture(scope="module")
def setup(model_dir, tmp_path_factory):
    """Native dump, external-looking dumps, tokens Parquet and mapping file (built once)."""
    root = tmp_path_factory.mktemp("import")
    engine = Engine(model_dir)
    graph = engine.graph
    rng = np.random.default_rng(0)
    ids = {pid: rng.integers(5, graph.dims.vocab, size=T).astype(np.int32).tolist() for pid, T in PROMPTS.items()}
    tokens = root / "tokens.parquet"
    pq.write_table(
        pa.table({
            "prompt_id": pa.array(list(ids), pa.string()),
            "reference_ids": pa.array(list(ids.values()), pa.list_(pa.int32())),
        }),
        tokens,
    )
    native = root / "native.h5"
    vals = {pid: engine.forward(x, "fp32") for pid, x in ids.items()}
    with ActivationWriter(native, graph, {"model": "tiny-nomic-moe", "side": "actdiff", "variant": "fp32"}) as w:
        for pid, v in vals.items():
            w.append(pid, v)
    ext = {pid: external_layout(v, graph) for pid, v in vals.items()}
    src = root / "external"
    write_external(src, ext)
    mapping = root / "llamacpp.yaml"
    mapping.write_text(MAPPING)
    return {"root": root, "graph": graph, "tokens": tokens, "native": native, "vals": vals, "ext": ext,
            "src": src, "mapping": mapping, "model_dir": model_dir}


def assert_same_dump(a: Path, b: Path, skip: tuple[str, ...] = ()) -> None:
    with ActivationReader(a) as ra, ActivationReader(b) as rb:
        assert ra.prompt_ids == rb.prompt_ids
        assert np.array_equal(ra.offsets, rb.offsets)
        assert sorted(ra.node_names) == sorted(rb.node_names)
        for n in ra.node_names:
            if n in skip:
                continue
            x, y = ra.node_all(n), rb.node_all(n)
            assert x.dtype == y.dtype and x.shape == y.shape, n
            assert x.tobytes() == y.tobytes(), f"node {n} differs"


def edited_mapping(tmp_path: Path, drop=(), replace=None) -> Path:
    doc = yaml.safe_load(MAPPING)
    for k in drop:
        del doc["nodes"][k]
    doc["nodes"].update(replace or {})
    p = tmp_path / "edited.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


# ------------------------------------------------------------------------------------------ import
def test_import_equals_native_bitwise(setup, tmp_path):
    s = setup
    out, rep_json = tmp_path / "imported.h5", tmp_path / "report.json"
    rep = import_dump(s["src"], s["mapping"], s["model_dir"], s["tokens"], out, side="llamacpp",
                      variant="q8", shard=3, report_json=rep_json)
    assert_same_dump(out, s["native"])
    assert rep["alignment"]["unmatched_canonical"] == [] and rep["alignment"]["unused_external"] == []
    assert rep["missing_nodes"] == [] and rep["layouts"] == {"npy": 2, "safetensors": 2}
    assert len(rep["alignment"]["matched"]) == len(s["graph"])
    assert json.loads(rep_json.read_text())["alignment"] == rep["alignment"]
    with h5py.File(out) as f:
        assert f.attrs["side"] == "llamacpp" and f.attrs["variant"] == "q8" and int(f.attrs["shard"]) == 3
        assert json.loads(f.attrs["missing_nodes"]) == []
        al = json.loads(f.attrs["alignment"])
        assert al["matched"]["encoder.layers.0.attn.context"]["from"] == ["blk.0.kqv_out.0", "blk.0.kqv_out.1"]
        assert al["matched"]["encoder.layers.2.attn.q"]["from"] == ["blk.2.attn_qkv"]


def test_identity_alignment_without_mapping(setup, tmp_path):
    """No mapping file: tensors named by canonical node name (batch axis and merged heads still fine)."""
    s = setup
    src = tmp_path / "canonical"
    write_external(src, {pid: {n: a[None] if a.ndim == 2 else a.reshape(a.shape[0], -1) for n, a in v.items()}
                         for pid, v in s["vals"].items()})
    out = tmp_path / "imported.h5"
    rep = import_dump(src, None, s["model_dir"], s["tokens"], out)
    assert_same_dump(out, s["native"])
    assert rep["mapping"] is None and rep["alignment"]["unmatched_canonical"] == []


def test_unmapped_node_and_unused_external(setup, tmp_path):
    s = setup
    m = edited_mapping(tmp_path, drop=["pooled", "encoder.layers.{i}.mlp.act"])
    mapping = load_mapping(m, s["graph"])
    names = [*s["ext"]["alpha"], "blk.0.debug_extra"]
    al = mapping.resolve(names)
    unmapped = ["encoder.layers.0.mlp.act", "encoder.layers.2.mlp.act", "pooled"]
    assert al.unmatched_canonical == unmapped
    assert al.unused_external == ["blk.0.debug_extra", "blk.0.ffn_gelu", "blk.2.ffn_gelu", "result_pooled"]
    assert "pooled" not in mapping.apply(s["ext"]["alpha"], PROMPTS["alpha"])
    # a mapped node whose tensor is absent is unmatched too, with the absent name recorded
    al2 = load_mapping(s["mapping"], s["graph"]).resolve([n for n in names if n != "blk.1.ffn_moe_probs"])
    assert al2.unmatched_canonical == ["encoder.layers.1.mlp.router.probs"]
    assert al2.missing_sources == {"encoder.layers.1.mlp.router.probs": ["blk.1.ffn_moe_probs"]}

    with pytest.raises(DumpError) as e:  # every missing node is listed
        import_dump(s["src"], m, s["model_dir"], s["tokens"], tmp_path / "x.h5")
    assert all(n in str(e.value) for n in unmapped) and "allow-missing" in str(e.value)
    assert not (tmp_path / "x.h5").exists()

    out = tmp_path / "partial.h5"
    rep = import_dump(s["src"], m, s["model_dir"], s["tokens"], out, allow_missing=True)
    assert rep["missing_nodes"] == unmapped
    assert_same_dump(out, s["native"], skip=tuple(unmapped))
    with ActivationReader(out) as r:
        assert json.loads(r.attrs["missing_nodes"]) == unmapped
        assert np.isnan(r.node_all("pooled")).all() and np.isnan(r.node_all("encoder.layers.0.mlp.act")).all()


def test_shape_mismatch_names_node_and_prompt(setup, tmp_path):
    s = setup
    m = edited_mapping(tmp_path, replace={"emb_ln": "inp_norm"})  # transposed [1, H, T], undeclared
    with pytest.raises(DumpError, match=r"prompt 'alpha'.*node 'emb_ln'.*\[1, 128, 6\].*\[6, 128\]"):
        import_dump(s["src"], m, s["model_dir"], s["tokens"], tmp_path / "x.h5")
    m = edited_mapping(tmp_path, replace={"encoder.layers.{i}.attn.q": {
        "from": "blk.{i}.attn_qkv", "transforms": [{"split": {"axis": -1, "parts": 5, "index": 0}}]}})
    with pytest.raises(DumpError, match=r"node 'encoder.layers.0.attn.q'.*transform 0 \(split.*5 equal parts"):
        import_dump(s["src"], m, s["model_dir"], s["tokens"], tmp_path / "x.h5")


def test_missing_prompt_and_bad_tokens(setup, tmp_path):
    s = setup
    tok = tmp_path / "t.parquet"
    pq.write_table(pa.table({"prompt_id": ["alpha", "zeta"], "reference_ids": [[1] * 6, [1, 2]]}), tok)
    with pytest.raises(DumpError, match=r"no dump for 1 prompt\(s\) of .*t\.parquet: 'zeta'.*zeta\.safetensors"):
        import_dump(s["src"], s["mapping"], s["model_dir"], tok, tmp_path / "x.h5")
    pq.write_table(pa.table({"prompt_id": ["alpha"]}), tok)
    with pytest.raises(DumpError, match="reference_ids"):
        import_dump(s["src"], s["mapping"], s["model_dir"], tok, tmp_path / "x.h5")
    pq.write_table(pa.table({"prompt_id": ["alpha"], "reference_ids": [[1] * 7]}), tok)  # T disagrees with dump
    with pytest.raises(DumpError, match=r"prompt 'alpha'.*node 'embeddings'"):
        import_dump(s["src"], s["mapping"], s["model_dir"], tok, tmp_path / "x.h5")


def test_cli_prints_summary(setup, tmp_path, capsys):
    s = setup
    m = edited_mapping(tmp_path, drop=["embedding"])
    args = [str(s["src"]), "--mapping", str(m), "--model-dir", str(s["model_dir"]), "--tokens", str(s["tokens"]),
            "--out", str(tmp_path / "o.h5")]
    assert main(args) == 1
    assert "embedding" in capsys.readouterr().err
    assert main([*args, "--allow-missing", "--side", "llamacpp"]) == 0
    out = capsys.readouterr().out
    assert "matched 75/76" in out and "unmatched canonical nodes (1): embedding" in out
    assert "unused external tensors (1): result_embd" in out


# ------------------------------------------------------------------------------------------ align
@pytest.mark.parametrize(
    "shape, node, ok",
    [
        ((1, 5, 128), "emb_ln", True),  # batch axis
        ((5, 128), "encoder.layers.0.attn.q", True),  # heads merged
        ((1, 5, 4, 32), "encoder.layers.0.attn.k_rot", True),
        ((5, 4, 32), "encoder.layers.0.attn.context", True),  # heads split
        ((1, 5, 1024), "encoder.layers.1.mlp.experts.act", True),  # [T, k*F]
        ((128,), "pooled", True),  # prompt-level row axis
        ((1, 1, 128), "embedding", True),
        ((128, 5), "emb_ln", False),  # transposed: must be declared
        ((5, 32, 4), "encoder.layers.0.attn.q", False),  # [T, hd, nh]: head axes swapped
        ((20, 32), "encoder.layers.0.attn.q", False),  # [T*nh, hd]
        ((2, 5, 128), "emb_ln", False),  # batch of two
        ((5, 127), "emb_ln", False),
    ],
)
def test_normalize(setup, shape, node, ok):
    g = setup["graph"]
    a = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    if ok:
        out = normalize(a, g, node, 5)
        assert out.shape == g.shape(node, 5) and out.dtype == np.float32
        assert np.array_equal(out.ravel(), a.ravel())
    else:
        with pytest.raises(DumpError, match=rf"node '{node}'.*{list(shape)}".replace("[", r"\[").replace("]", r"\]")):
            normalize(a, g, node, 5)


def test_normalize_index_dtype(setup):
    g, n = setup["graph"], "encoder.layers.1.mlp.router.topk_indices"
    assert normalize(np.array([[1.0, 3.0]]), g, n, 1).dtype == np.int64
    with pytest.raises(DumpError, match="non-integral"):
        normalize(np.array([[1.5, 3.0]]), g, n, 1)


@pytest.mark.parametrize(
    "text, match",
    [
        ("nodes: [unclosed", "not valid YAML"),
        ("nodes: {emb_ln: {from: x, transforms: [{flip: 0}]}}", r"nodes\.emb_ln\.transforms\[0\]: unknown transform"),
        ("nodes:\n  encoder.layers.{i}.attn.qq: x", r"nodes\.encoder\.layers\.\{i\}\.attn\.qq: .* names no node"),
        ("nodes: {emb_ln: {from: [a, b]}}", r"nodes\.emb_ln: 2 sources need 'combine'"),
        ("nodes: {emb_ln: {from: x, transforms: [{reshape: [T, Q]}]}}", r"nodes\.emb_ln\.transforms\[0\]\.reshape"),
        ("nodes: {emb_ln: {from: x, transforms: [{split: {parts: 3, index: 3}}]}}", r"split\.index"),
        ("nodes:\n  emb_ln: blk.{i}.x", r"nodes\.emb_ln: .*uses \{i\}"),
        ("nodes: {emb_ln: x}\nextra: 1", r"unknown top-level key\(s\) \['extra'\]"),
        ("nodes: {emb_ln: {from: x, transforms: [{cast: bfloat99}]}}", r"nodes\.emb_ln\.transforms\[0\]\.cast"),
    ],
)
def test_mapping_errors_name_file_and_key(setup, tmp_path, text, match):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(MappingError, match=match) as e:
        load_mapping(p, setup["graph"])
    assert str(e.value).startswith(str(p))


def test_explicit_key_overrides_layer_template(setup, tmp_path):
    s = setup
    p = tmp_path / "m.yaml"
    p.write_text("identity: true\nnodes:\n  encoder.layers.{i}.norm1: blk.{i}.n1\n  encoder.layers.3.norm1: special\n")
    m = load_mapping(p, s["graph"])
    assert m.spec_for("encoder.layers.3.norm1").external_names == ["special"]
    assert m.spec_for("encoder.layers.1.norm1").external_names == ["blk.1.n1"]
    assert m.spec_for("emb_ln").external_names == ["emb_ln"]  # identity fallback
    assert Mapping.identity(s["graph"]).resolve(["emb_ln"]).matched.keys() == {"emb_ln"}


# ------------------------------------------------------------------------- shards, prompts, names
def test_every_tokens_shard_in_one_call(setup, tmp_path):
    """--tokens a folder: one dump per shard under the Layout, the shard number taken from the file name."""
    s = setup
    toks = tmp_path / "results/tiny-nomic-moe/tokens"
    toks.mkdir(parents=True)
    table = pq.read_table(s["tokens"])
    pq.write_table(table.slice(0, 2), toks / "shard-0.parquet")
    pq.write_table(table.slice(2), toks / "shard-3.parquet")
    argv = [str(s["src"]), "--mapping", str(s["mapping"]), "--model-dir", str(s["model_dir"]), "--tokens", str(toks),
            "--side", "mine"]  # fmt: skip
    assert main(argv) == 0
    for shard, n in ((0, 2), (3, len(PROMPTS) - 2)):
        out = tmp_path / f"results/tiny-nomic-moe/mine/fp32/activations/shard-{shard}.h5"
        with h5py.File(out) as f:
            assert int(f.attrs["shard"]) == shard and len(f["prompt_ids"]) == n


def test_out_naming_another_shard_is_refused(setup, tmp_path):
    s = setup
    tok = tmp_path / "shard-1.parquet"
    pq.write_table(pq.read_table(s["tokens"]), tok)
    with pytest.raises(DumpError, match=r"names shard 2 but the tokens file .*shard-1\.parquet is shard 1"):
        import_dump(s["src"], s["mapping"], s["model_dir"], tok, tmp_path / "x/shard-2.h5")


def test_folder_of_one_shard_must_hold_exactly_its_prompts(setup, tmp_path):
    s = setup
    tok = tmp_path / "t.parquet"
    pq.write_table(pq.read_table(s["tokens"]).slice(0, 2), tok)
    with pytest.raises(DumpError, match=r"2 prompt\(s\) not in .*t\.parquet: 'c\.3', 'd_4'"):
        import_dump(s["src"], s["mapping"], s["model_dir"], tok, tmp_path / "o.h5", exact_prompts=True)


def test_token_count_mismatch_names_prompt_and_tokens_file(setup, tmp_path):
    s = setup
    tok = tmp_path / "t.parquet"
    pq.write_table(pa.table({"prompt_id": ["alpha"], "reference_ids": [[1] * (PROMPTS["alpha"] + 1)]}), tok)
    with pytest.raises(DumpError, match=r"prompt 'alpha'.*t\.parquet gives this prompt T=7 tokens"):
        import_dump(s["src"], s["mapping"], s["model_dir"], tok, tmp_path / "o.h5")


def test_did_you_mean_for_tensor_and_node_names(setup, tmp_path):
    s = setup
    m = edited_mapping(tmp_path, replace={"encoder.layers.{i}.norm1": "blk.{i}.attn_out_nrom"})
    with pytest.raises(DumpError, match=r"blk\.0\.attn_out_nrom \(did you mean 'blk\.0\.attn_out_norm'\?\)"):
        import_dump(s["src"], m, s["model_dir"], s["tokens"], tmp_path / "o.h5")
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes:\n  encoder.layers.{i}.attn.q_rto: blk.{i}.q_rope\n")
    with pytest.raises(MappingError, match=r"did you mean 'encoder\.layers\.\{i\}\.attn\.q_rot'\?"):
        load_mapping(bad, s["graph"])


@pytest.mark.parametrize(
    "entry, match",
    [
        ({"name": "actdiff", "kind": "import", "source": "d"}, r"engines\.0\.name"),
        ({"name": "x", "kind": "import"}, r"exactly one of 'source'"),
        ({"name": "x", "kind": "import", "command": "run {tokens}"}, r"must use \{tokens\} and \{out\}"),
        ({"name": "x", "kind": "import", "source": "d/{shrad}"}, r"unknown placeholder\(s\) \{shrad\}"),
        ({"name": "x", "kind": "import", "source": "d", "mapping": "nope.yaml"}, r"mapping file nope\.yaml not found"),
        ("onnx", r"unknown engine 'onnx'"),
    ],
)
def test_engine_entries_errors_name_the_key(entry, match):
    from actdiff.errors import ConfigError
    from actdiff.sides.configured import engine_specs

    with pytest.raises(ConfigError, match=match):
        engine_specs([entry])


def test_engine_entries():
    from actdiff.sides.configured import engine_specs

    specs = engine_specs(["actdiff", {"name": "mine", "kind": "import", "source": "d/shard-{shard}"}])
    assert [(s.name, s.kind) for s in specs.values()] == [("actdiff", "actdiff"), ("mine", "import")]
    assert specs["mine"].variants == ("fp32",) and str(specs["mine"].source_dir("m", 3, "fp32")) == "d/shard-3"
