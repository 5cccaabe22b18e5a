"""ONNX Runtime as a third engine (actdiff.onnxrt): export parity per node, "mark all" capture, the nodes
ORT's fusions remove per optimisation level, and the fp32/fp16/int8 variants' embeddings against the
reference. Both default models. Then the onnxruntime engine through the workflow (config onnxruntime block):
the tiny model's fp32 export passes and int8-dynamic fails with its first divergence at the quantised word
embedding, as ``actdiff check`` says by its exit code. Skipped when onnxruntime is not installed (the optional
extra), a failure instead under ACTDIFF_REQUIRE_ONNXRUNTIME=1 (make test installs the extra)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from actdiff.onnxrt import available  # noqa: E402  (imports no onnxruntime)

_OK, _WHY = available()
if not _OK:
    if os.environ.get("ACTDIFF_REQUIRE_ONNXRUNTIME") == "1":
        pytest.fail(f"ACTDIFF_REQUIRE_ONNXRUNTIME=1 but onnxruntime is not usable: {_WHY}", pytrace=False)
    pytest.skip(_WHY, allow_module_level=True)

from helpers import BIN, DATA, REPO, run_cmd, snakemake  # noqa: E402

from actdiff.compare.budgets import SAFETY, U32  # noqa: E402
from actdiff.errors import ActdiffError, ModelError  # noqa: E402
from actdiff.nodes import EMBEDDING, Graph  # noqa: E402

MODELS = ("tiny-nomic-moe", "minilm-l6")
CALIBRATION = slice(0, 8)  # int8-static's calibration prompts: excluded from every comparison below
EVALUATION = slice(8, 20)
MAX_LENGTH = 128  # keeps the file's run time low on 2 cores; the ops do not change with length

# Minimum embedding cosine against the reference over the evaluation prompts, per variant, and why:
# - fp32: the same ops in other kernels; the embedding's own rel error is ~1e-6 (export parity below), so
#   1 - cos ~ err^2 / 2 is far below 1e-9: the floor is a fp32 comparison's, not a tolerance of the port;
# - fp16: weights and most values rounded to float16 (u = 2^-11 ~ 4.9e-4 relative), so the embedding's
#   relative error is a few u and 1 - cos ~ (few u)^2 / 2 ~ 1e-6; the MoE model can also flip a routing
#   decision on a near tie (measured min 0.999995): floor 1 - 1e-4;
# - int8-dynamic: int8 weights per channel and each MatMul's input quantised per tensor at run time (u ~
#   2^-7 per matmul, compounding over 4-6 layers, plus routing flips on the MoE model; measured min 0.975 on
#   MiniLM): floor 0.95;
# - int8-static: as int8-dynamic, but the activation ranges are fixed from 8 calibration prompts (MinMax),
#   so BERT's outlier hidden dimensions are clipped or coarsely stepped on unseen prompts (measured min 0.89
#   on MiniLM, 0.999 on the tiny model): floor 0.85. Naming those causes is the diagnosis issue's work.
COSINE_FLOOR = {"fp32": 1 - 1e-9, "fp16": 1 - 1e-4, "int8-dynamic": 0.95, "int8-static": 0.85}


def _prompts(model_dir: Path) -> list[list[int]]:
    from actdiff.token_shards import load_reference_tokenizer, tokenize_texts

    lines = (DATA / "ci_prompts.tsv").read_text(encoding="utf-8").splitlines()[1:]
    texts = [ln.split("\t")[3] for ln in lines]
    return [list(r["ids"]) for r in tokenize_texts(load_reference_tokenizer(model_dir), texts, MAX_LENGTH)]


@pytest.fixture(scope="module", params=MODELS)
def case(request, tmp_path_factory, tiny_model_dir, minilm_model_dir):
    """One model exported once: its graph, the ONNX file, prompts and the reference's values on them. The tiny
    model's export is the workflow run's (rule export_onnx calls the same export_model): one export per file."""
    from actdiff.models.loading import load_reference_model
    from actdiff.models.record import ModelRecord
    from actdiff.onnxrt.export import export_model
    from actdiff.reference import ReferenceRunner

    name = request.param
    model_dir = tiny_model_dir if name == "tiny-nomic-moe" else minilm_model_dir
    root = tmp_path_factory.mktemp(f"ort-{name}")
    record = ModelRecord.from_dir(model_dir, name)
    graph = record.graph()
    if name == PIPELINE_MODEL:
        onnx_path, provenance = _pipeline_export(request.getfixturevalue("ort_run")[0])
    else:
        onnx_path = root / "model-fp32-export.onnx"
        provenance = export_model(model_dir, onnx_path)
    ids = _prompts(model_dir)
    model, _, _ = load_reference_model(model_dir)
    runner = ReferenceRunner(model, graph)
    ref = [runner.run_batch([x])[0] for x in ids[EVALUATION]]
    runner.close()
    return {"name": name, "dir": model_dir, "record": record, "graph": graph, "onnx": onnx_path, "root": root,
            "provenance": provenance, "ids": ids, "eval": ids[EVALUATION], "ref": ref}  # fmt: skip


def _pipeline_export(L) -> tuple[Path, dict]:
    """The workflow run's fp32 export and its provenance as export_model returns it (from the model's metadata)."""
    import onnx

    from actdiff.onnxrt.export import META_EXPORTER, META_FORMULATION

    path = Path(L.onnx_model(PIPELINE_MODEL, "fp32"))
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return path, {"exporter": meta[META_EXPORTER], "moe_formulation": meta[META_FORMULATION]}


def _capture(case, level: str):
    """The model's OrtCapture at ``level``, built once per model (ORT's optimiser runs once per level)."""
    from actdiff.onnxrt.capture import OrtCapture

    captures = case.setdefault("captures", {})
    if level not in captures:
        captures[level] = OrtCapture(case["onnx"], case["graph"].names(), level, case["root"] / level)
    return captures[level]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).reshape(b.shape), np.asarray(b, np.float64)
    den = float(np.linalg.norm(b))
    return float(np.linalg.norm(a - b)) / den if den > 0 else float(np.linalg.norm(a))


def parity_tolerances(graph: Graph, tokens: int) -> dict[str, float]:
    """The fp32 budget of the export's end-to-end error at each node, from fp32 eps and reduction lengths.

    A sum of K fp32 terms rounds to a relative error of about u * sqrt(K) (u = 2^-24); a node's error in an
    end-to-end run is propagated from everything upstream, dominated by the widest sum on its path (K_path =
    the largest reduction length among the node and its ancestors), and grows with each encoder layer crossed
    (independent per-layer roundings: sqrt(depth + 1)). Times budgets.SAFETY (~6.3: two implementations'
    roundings, concentration of a relative L2)."""
    k_path: dict[str, int] = {}
    depth: dict[str, int] = {}
    for n in graph:
        ups = graph.producers(n.name)
        k_path[n.name] = max([graph.reduction_length(n, tokens), *(k_path[p.name] for p in ups)])
        depth[n.name] = n.layer + 1 if n.layer is not None else max([0, *(depth[p.name] for p in ups)])
    return {n: SAFETY * U32 * math.sqrt(k_path[n]) * math.sqrt(depth[n] + 1) for n in graph.names()}


def _embedding_cosines(values: list[dict], ref: list[dict]) -> np.ndarray:
    cos = []
    for v, r in zip(values, ref, strict=True):
        a, b = np.asarray(v[EMBEDDING], np.float64).ravel(), np.asarray(r[EMBEDDING], np.float64).ravel()
        cos.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
    return np.asarray(cos)


def _side(case, variant: str, model_file: Path, level: str = "disable", batch_size: int = 1):
    from actdiff.onnxrt.side import OnnxRuntimeSide

    return OnnxRuntimeSide(case["record"], variant, model_file, level=level, batch_size=batch_size)


def _forward(side, ids: list[list[int]]) -> list[dict]:
    return [v for _, v in side.forward([(f"p{i}", x) for i, x in enumerate(ids)])]


# ------------------------------------------------------------------------------------------------ export
def test_export_names_every_node_and_records_the_formulation(case):
    import onnx

    from actdiff.onnxrt.export import MOE_DENSE_GATHER, exported_nodes

    proto = onnx.load(str(case["onnx"]))
    graph = case["graph"]
    assert exported_nodes(proto) == graph.names()
    assert [o.name for o in proto.graph.output] == [EMBEDDING]  # the rest are values inside the graph
    produced = {o for node in proto.graph.node for o in node.output}
    assert set(graph.names()) <= produced
    expected = MOE_DENSE_GATHER if graph.moe_blocks() else "none (dense model)"
    assert case["provenance"]["moe_formulation"] == expected
    assert case["provenance"]["exporter"] == "torchscript"


def test_export_parity_per_node(case):
    """The ONNX model in ORT with optimisation disabled equals the reference within the fp32 budget at every
    node, on every evaluation prompt; expert choices are identical."""
    side = _side(case, "fp32", case["onnx"], "disable")
    assert side.missing_nodes == () and side.capture.aliases == {}
    graph, worst, ratio = case["graph"], {}, {}
    for ids, got, ref in zip(case["eval"], _forward(side, case["eval"]), case["ref"], strict=True):
        tol = parity_tolerances(graph, len(ids))
        for n in graph:
            if n.kind == "index":
                assert np.array_equal(got[n.name], ref[n.name]), f"{n.name}: expert choice differs"
                continue
            err = _rel(got[n.name], ref[n.name])
            worst[n.name] = max(worst.get(n.name, 0.0), err)
            ratio[n.name] = max(ratio.get(n.name, 0.0), err / tol[n.name])
    side.close()
    top = sorted(worst.items(), key=lambda kv: -kv[1])[:5]
    print(f"\n{case['name']}: export vs reference, max rel L2 per node (worst 5): {top}")
    print(f"{case['name']}: largest error / tolerance ratio: {max(ratio.values()):.3f}")
    bad = {n: (worst[n], r) for n, r in ratio.items() if r > 1}
    assert not bad, f"nodes over the fp32 budget (rel error, error/tolerance): {bad}"


def test_dynamo_exporter_gives_the_same_nodes_and_parity(case, tmp_path):
    """torch.onnx's dynamo exporter (torch.export) also names every node and meets the same budget; ORT then
    fuses nothing at level all (its GELU decomposition does not match ORT's Gelu/BiasGelu pattern). Tiny model
    only, and only with ACTDIFF_ORT_DYNAMO=1: the dynamo export takes 25-55 s on 2 cores, over this file's time
    budget; the default exporter is torchscript."""
    if os.environ.get("ACTDIFF_ORT_DYNAMO") != "1":
        pytest.skip("the dynamo exporter's parity runs with ACTDIFF_ORT_DYNAMO=1 (25-55 s export)")
    if case["graph"].moe_blocks() == []:
        pytest.skip("run on the MoE model only (export time); MiniLM measured identical parity by hand")
    from actdiff.onnxrt.capture import OrtCapture, pad_batch
    from actdiff.onnxrt.export import export_model

    path = tmp_path / "dynamo.onnx"
    assert export_model(case["dir"], path, exporter="dynamo")["moe_formulation"] == "dense-gather"
    graph = case["graph"]
    cap = OrtCapture(path, graph.names(), "disable", tmp_path)
    assert cap.fused == {}
    for ids, ref in zip(case["eval"], case["ref"], strict=True):
        got = cap.run(*pad_batch([ids], graph.dims.pad_token_id))
        tol = parity_tolerances(graph, len(ids))
        over = {n: _rel(got[n], ref[n]) for n in graph.names() if graph[n].kind != "index"}
        assert all(err <= tol[n] for n, err in over.items()), {n: e for n, e in over.items() if e > tol[n]}
    print(f"\ndynamo export, level all, fused away: {OrtCapture(path, graph.names(), 'all', tmp_path).fused}")


# ------------------------------------------------------------------------------------------------ capture
@pytest.mark.parametrize("level", ["disable", "basic", "all"])
def test_marking_outputs_does_not_change_the_final_output(case, level, tmp_path):
    """The captured (marked) session's embedding is bitwise the unmarked session's at the same level: the
    marks are added after ORT's optimiser ran, so the same kernels run on the same values."""
    from actdiff.onnxrt.capture import pad_batch, run_unmarked

    graph = case["graph"]
    ids, mask = pad_batch(case["eval"][:4], graph.dims.pad_token_id)  # 4 prompts: a bitwise comparison
    plain = run_unmarked(case["onnx"], level, ids, mask)[EMBEDDING]
    marked = _capture(case, level).run(ids, mask)[EMBEDDING]
    assert np.array_equal(plain, marked), f"level {level}: max |diff| {np.abs(plain - marked).max()}"


def _gelu_fed_matmuls(graph: Graph) -> set[str]:
    """Dense MLP fc1: a MATMUL whose only consumer is a GELU (ORT's BiasGelu fusion absorbs its bias add)."""
    return {n.name for n in graph if n.op == "MATMUL" and [c.op for c in graph.consumers(n.name)] == ["GELU"]}


def test_fused_nodes_per_level(case, tmp_path):
    """disable and basic keep every node; all fuses each dense MLP's fc1 bias add into com.microsoft.BiasGelu
    (the MoE experts' fc1 has no bias and is gathered per slot: not fused)."""
    graph = case["graph"]
    fused = {lv: _capture(case, lv).fused for lv in ("disable", "basic", "all")}
    for level, nodes in fused.items():
        print(f"\n{case['name']} level {level}: {len(nodes)} fused away: {json.dumps(nodes, indent=1)}")
    assert fused["disable"] == {} and fused["basic"] == {}
    assert set(fused["all"]) == _gelu_fed_matmuls(graph)
    assert all("com.microsoft.BiasGelu" in reason for reason in fused["all"].values())


def test_side_dump_writes_fused_nodes_as_placeholders(case, tmp_path, monkeypatch):
    """... and streamed (the released model's values: actdiff.batching.streams_rows), the same file bit for bit."""
    import actdiff.sides.dump as dump_module
    from actdiff.h5io import ActivationReader
    from actdiff.sides import open_side
    from actdiff.sides.dump import dump_shard

    side = open_side("onnxruntime", case["record"], "fp32", model_file=case["onnx"], level="all", batch_size=4)
    assert set(side.missing_nodes) == _gelu_fed_matmuls(case["graph"])
    items = [(f"p{i}", x) for i, x in enumerate(case["eval"][:4])]
    out = tmp_path / "ort.h5"
    dump_shard(side, case["record"].provenance(), items, out, 0)
    monkeypatch.setattr(dump_module, "streams_rows", lambda graph: True)
    dump_shard(side, case["record"].provenance(), items, tmp_path / "streamed.h5", 0)
    side.close()
    r = ActivationReader(out)
    streamed = ActivationReader(tmp_path / "streamed.h5")
    assert streamed.prompt_ids == r.prompt_ids and list(streamed.offsets) == list(r.offsets)
    for name in r.node_names:
        assert np.array_equal(streamed.f["nodes"][name][()], r.f["nodes"][name][()], equal_nan=True), name
    assert json.loads(r.attrs["fused_away"]).keys() == set(side.missing_nodes)
    for n in side.missing_nodes:
        assert np.isnan(r.node_all(n)).all()
    tol = parity_tolerances(case["graph"], len(items[0][1]))[EMBEDDING]
    assert _rel(r.node(EMBEDDING, "p0"), case["ref"][0][EMBEDDING]) <= tol


# ------------------------------------------------------------------------------------------------ variants
@pytest.mark.parametrize("variant", ["fp32", "fp16", "int8-dynamic", "int8-static"])
def test_variant_embedding_cosine(case, variant, tmp_path):
    from actdiff.onnxrt.variants import write_variant

    calibration = case["ids"][CALIBRATION]
    ids = [f"calib-{i}" for i in range(len(calibration))]
    path = write_variant(case["onnx"], tmp_path / "model.onnx", variant, calibration, ids)
    assert path.is_file() and not list(tmp_path.glob(".*.tmp-*"))  # renamed into place, no temporary left
    side = _side(case, variant, path, "disable")
    recorded = side.provenance()["calibration"]  # the calibration prompts travel with the model into the dumps
    assert recorded == (json.dumps({"prompts": ids, "n": len(ids)}) if variant == "int8-static" else "none")
    cos = _embedding_cosines(_forward(side, case["eval"]), case["ref"])
    aliases = len(side.capture.aliases)
    side.close()
    print(f"\n{case['name']} {variant}: embedding 1 - cosine max {1 - cos.min():.2e} median {1 - np.median(cos):.2e} "
          f"({len(cos)} prompts; {aliases} nodes read from ORT's float32 copies)")  # fmt: skip
    assert cos.min() >= COSINE_FLOOR[variant], f"{variant}: cosine {cos.min()} below {COSINE_FLOOR[variant]}"


# ------------------------------------------------------------------------------------------------ replay
def test_two_variants_made_at_once_from_one_export(case, tmp_path):
    """`make report` makes int8-dynamic and int8-static from one export in two jobs at once: ORT's quantisers
    write "<input>-inferred.onnx" beside their input and delete it, and the two raced on it (FileNotFoundError).
    Each now quantises its own link of the export; the export's folder is left as it was."""
    from concurrent.futures import ThreadPoolExecutor

    from actdiff.onnxrt.variants import write_variant

    before = sorted(p.name for p in Path(case["onnx"]).parent.iterdir())
    calibration = case["ids"][CALIBRATION]
    with ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(write_variant, case["onnx"], tmp_path / v / "model.onnx", v, calibration) for v in
                ("int8-dynamic", "int8-static")]  # fmt: skip
        paths = [j.result() for j in jobs]
    assert all(p.is_file() for p in paths)
    assert sorted(p.name for p in Path(case["onnx"]).parent.iterdir()) == before
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["int8-dynamic", "int8-static", "model.onnx", "model.onnx"]


def _variant_file(case, variant: str) -> Path:
    """The model's variant file, made once per model (int8-static calibrated on CALIBRATION)."""
    from actdiff.onnxrt.variants import write_variant

    files = case.setdefault("variants", {"fp32": case["onnx"]})
    if variant not in files:
        calibration = case["ids"][CALIBRATION]
        files[variant] = write_variant(case["onnx"], case["root"] / f"model-{variant}.onnx", variant, calibration,
                                       [f"calib-{i}" for i in range(len(calibration))])  # fmt: skip
    return files[variant]


def _replay(case, variant: str, level: str = "disable"):
    """ORT's replay of the variant's dump, opened from a dump's provenance as the statistics stage opens it."""
    from actdiff.sides import open_replay

    side = _side(case, variant, _variant_file(case, variant), level)
    provenance = side.provenance()
    side.close()
    return open_replay("onnxruntime", case["dir"], variant, provenance)


@pytest.mark.parametrize("variant", ["fp32", "fp16", "int8-dynamic", "int8-static"])
def test_replay_on_own_inputs_is_the_dump_bit_for_bit(case, variant):
    """Teacher forcing is only sound if the replay is the code that ran: every node's subgraph, fed the side's
    own inputs, gives its dumped value exactly (same kernels, same shapes, one thread), and every MoE block
    with its own routing forced gives its dumped output. Level disable: nothing fused, nothing on another
    path. Three prompts (both models: the tiny one's MoE blocks, MiniLM's BERT attention and embeddings).
    fp16: `pooled` is captured as ORT's float32 result, the value the L2 norm reads, not its unread float16
    rounding (capture.Resolution._rounds_fp32_copy), so `embedding` replays exactly too."""
    side = _side(case, variant, _variant_file(case, variant))
    own = _forward(side, case["eval"][:3])
    side.close()
    replay = _replay(case, variant)
    graph = case["graph"]
    assert replay.fused_nodes() == frozenset() and replay.unreplayable == {}
    for ids, values in zip(case["eval"][:3], own, strict=True):
        values = {**values, "input_ids": np.asarray(ids)}
        for n in graph:
            out = replay.replay_node(n.name, {i: values[i] for i in n.inputs})
            assert out.dtype == values[n.name].dtype and np.array_equal(out, values[n.name]), n.name
        for b in graph.moe_blocks():
            forced = replay.forced_moe(b, values[b.input], values[b.topk_indices], values[b.topk_weights])
            assert np.array_equal(forced, values[b.output]), f"MoE layer {b.layer}"
    print(f"\n{case['name']} {variant}: replay of {len(graph.names())} nodes x 3 prompts {replay.seconds:.1f} s")


def test_weights_dequantised_once_and_fed_as_runtime_values(case):
    """int8-static dequantises every matmul weight in the graph (DequantizeLinear of an int8 initializer), which
    ORT at level disable recomputes at every run. The replay computes each such value once (replay.fold_constants)
    and feeds it: no cut still holds a node that reads only weights, and the values are graph inputs, not weights
    (ORT pre-packs a MatMul's constant operand, another code path than the dump's; the bit-for-bit replay test above
    holds them to the dump). Every folded value is ORT's DequantizeLinear of its weight, bit for bit."""
    import onnx
    from onnx import numpy_helper

    replay = _replay(case, "int8-static")
    src = replay.dumped
    proto = onnx.load(str(_variant_file(case, "int8-static")))
    weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and all(i in weights for i in n.input)]
    assert len(dq) >= 4 * case["graph"].dims.layers, "the variant no longer stores quantised weights"
    assert set(src.folded) >= {n.output[0] for n in dq}
    assert not set(src.folded) & {t.name for t in src.proto.graph.initializer}
    assert set(src.folded) <= {i.name for i in src.proto.graph.input}
    for plan in replay.plans.values():
        assert not [n.op_type for n in plan.cut.nodes if n.input and all(i in src.consts for i in n.input if i)]
    for n in dq[:3]:
        q, scale, *zero = (weights[i] for i in n.input)
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        shape = [1] * q.ndim
        shape[axis] = -1
        z = zero[0].astype(np.int32).reshape(shape) if zero else 0
        expected = ((q.astype(np.int32) - z).astype(np.float32) * scale.reshape(shape)).astype(np.float32)
        assert np.array_equal(src.folded[n.output[0]], expected), n.output[0]


def test_padded_batch_sums_over_tokens_on_another_path(case):
    """A dump made in padded batches sums over the batch's longest prompt where an op sums over tokens (attention
    over its keys, pooling), a one-prompt replay over the prompt's own: the replay declares those nodes on
    another path, checked within the node's budget, and every other node must still replay bit for bit. The
    fp16 model is where attention's contexts differ (its float16 output rounds a float32 sum's last-bit
    difference to a float16 ulp: measured up to 3.9e-5 relative on MiniLM, where the statistics once called
    that a replay mismatch and failed the run); its budget there is at least SAFETY x 2 x 2^-11 (fp16
    activations, compare.budgets), so 2^-11 is a bound the check passes with room."""
    from actdiff.nodes import TOKEN_SUM_OPS
    from actdiff.sides import open_replay

    ids = case["eval"][:4]
    assert len({len(x) for x in ids}) > 1  # padding happens in the batch
    side = _side(case, "fp16", _variant_file(case, "fp16"), batch_size=len(ids))
    own, provenance = _forward(side, ids), side.provenance()
    side.close()
    replay = open_replay("onnxruntime", case["dir"], "fp16", provenance)
    graph = case["graph"]
    summed = {n.name for n in graph if n.op in TOKEN_SUM_OPS}
    assert summed and summed <= replay.fused_nodes() <= summed | {n.name for n in graph if n.axis == "prompt"}
    gaps = {}
    for x, values in zip(ids, own, strict=True):
        values = {**values, "input_ids": np.asarray(x)}
        for n in graph:
            out = replay.replay_node(n.name, {i: values[i] for i in n.inputs})
            if n.name in replay.fused_nodes():
                gaps[n.name] = max(gaps.get(n.name, 0.0), _rel(out, values[n.name]))
            else:
                assert np.array_equal(out, values[n.name]), n.name
    print(f"\n{case['name']} fp16, batch of {len(ids)}: largest gap on another path {max(gaps.values()):.1e}")
    assert max(gaps.values()) <= 2.0**-11, gaps


@pytest.mark.parametrize("variant", ["fp32", "int8-dynamic"])
def test_replay_of_stacked_prompts_is_each_prompts_replay_bit_for_bit(case, variant):
    """replay_many over a group of prompts gives each prompt's replay_node bit for bit, on the first group (where
    it proves, per node, that the stacked call does) and on the next (where it relies on that). fp32: every
    token-wise node outside LAYOUT_OPS is found to stack. int8-dynamic: a matmul's input is quantised with one
    scale over the whole tensor (DynamicQuantizeLinear), so stacked prompts change each other's rounding:
    exactly the nodes whose subgraph quantises so are found not to stack, and are replayed prompt by prompt."""
    from actdiff.nodes import LAYOUT_OPS
    from actdiff.sides.base import same_bits

    prompts = case["eval"][:6]
    side = _side(case, variant, _variant_file(case, variant))
    values = [{**v, "input_ids": np.asarray(ids)} for ids, v in zip(prompts, _forward(side, prompts), strict=True)]
    side.close()
    replay, graph = _replay(case, variant), case["graph"]
    for group in (values[:3], values[3:]):
        for n in graph:
            inputs = [{i: v[i] for i in n.inputs} for v in group]
            for k, out in enumerate(replay.replay_many(n.name, inputs)):
                assert same_bits(np.ascontiguousarray(out), replay.replay_node(n.name, inputs[k])), n.name
    assert set(replay.stacks) == {n.name for n in graph if n.axis == "token" and n.op not in LAYOUT_OPS}
    quantised = {k for k, p in replay.plans.items() if any(x.op_type == "DynamicQuantizeLinear" for x in p.cut.nodes)}
    assert {k for k, ok in replay.stacks.items() if not ok} == quantised & set(replay.stacks)
    assert bool(quantised) == (variant == "int8-dynamic")


def test_stacking_trial_finds_rows_coupled_by_a_range_over_the_whole_tensor(case):
    """A group of one prompt twice: int8-dynamic's per-tensor input range is the same stacked or alone, so every
    node's stacked replay is each prompt's bit for bit, as on ordinary prompts whose extremes sit in rows they all
    share (MiniLM's statistics saw that). The trial's second check (the second prompt's floats 2^10 larger) must
    still find the dynamically quantised matmuls coupled, and the rest independent."""
    from actdiff.nodes import LAYOUT_OPS

    prompt = case["eval"][:1]
    side = _side(case, "int8-dynamic", _variant_file(case, "int8-dynamic"))
    values = {**_forward(side, prompt)[0], "input_ids": np.asarray(prompt[0])}
    side.close()
    replay, graph = _replay(case, "int8-dynamic"), case["graph"]
    for n in graph:
        replay.replay_many(n.name, [{i: values[i] for i in n.inputs}] * 2)
    assert set(replay.stacks) == {n.name for n in graph if n.axis == "token" and n.op not in LAYOUT_OPS}
    quantised = {k for k, p in replay.plans.items() if any(x.op_type == "DynamicQuantizeLinear" for x in p.cut.nodes)}
    assert quantised and {k for k, ok in replay.stacks.items() if not ok} == quantised & set(replay.stacks)


def test_shapes_extrapolated_from_two_probes_are_the_probes_at_other_lengths(case):
    """Source.shapes_at (what a stacked replay is fed instead of probing its length, a forward of the whole
    model): every Shape/Size value and every value's shape, linear in the length from the probes at 2 and 3
    tokens, is the probe's own at other lengths."""
    replay = _replay(case, "fp32")
    for src in (replay.dumped, replay.exported):
        for tokens in (5, 64):
            values, shapes = src.shapes_at(tokens)
            probed, probed_shapes = src.probe(tokens)
            assert shapes == probed_shapes and values.keys() == probed.keys()
            assert all(np.array_equal(values[v], probed[v]) for v in values), tokens


def test_forced_routing_separates_expert_kernel_error_from_flips(case):
    """int8-dynamic on the tiny MoE model: with the reference's expert choice and weights forced, the MoE
    block's error is ORT's int8 expert kernels alone. On tokens whose routing flipped it is the same size as on
    tokens that agree (the kernels do not know which tokens flipped: medians within 2x), while the unforced
    error there is dominated by the swapped expert (an unrelated vector with a weight near 1/k, O(0.1-1))
    against int8 kernel error of a few 2^-7 (measured ~0.03-0.05): unforced > 3x forced on flipped tokens."""
    if not case["graph"].moe_blocks():
        pytest.skip(f"{case['name']} has no MoE block")
    side = _side(case, "int8-dynamic", _variant_file(case, "int8-dynamic"))
    eng = _forward(side, case["eval"])
    side.close()
    replay = _replay(case, "int8-dynamic")

    def rel(a, b):  # per token
        return np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)

    for b in case["graph"].moe_blocks():
        forced, unforced, flip = [], [], []
        for r, e in zip(case["ref"], eng, strict=True):
            f = replay.forced_moe(b, e[b.input], r[b.topk_indices], r[b.topk_weights])
            forced.append(rel(f, r[b.output]))
            unforced.append(rel(e[b.output], r[b.output]))
            flip.append(np.any(np.sort(r[b.topk_indices], 1) != np.sort(e[b.topk_indices], 1), 1))
        forced, unforced, flip = map(np.concatenate, (forced, unforced, flip))
        f_agree, f_flip, u_flip = np.median(forced[~flip]), np.median(forced[flip]), np.median(unforced[flip])
        print(f"\nMoE layer {b.layer}: {flip.sum()}/{flip.size} tokens flipped; forced median agree {f_agree:.3g} "
              f"flipped {f_flip:.3g}; unforced median flipped {u_flip:.3g}")  # fmt: skip
        assert flip.any(), "int8-dynamic flips no routing on these prompts: the test shows nothing"
        assert 0.5 * f_agree <= f_flip <= 2 * f_agree
        assert u_flip > 3 * f_flip


# ------------------------------------------------------------------------------------------------ refusals
def test_refusals(case, tmp_path, tiny_model_dir, minilm_model_dir):
    from actdiff.models.record import ModelRecord
    from actdiff.onnxrt.side import OnnxRuntimeSide

    other = minilm_model_dir if case["name"] == "tiny-nomic-moe" else tiny_model_dir
    with pytest.raises(ModelError, match="does not match the model's graph"):  # an export of another model
        OnnxRuntimeSide(ModelRecord.from_dir(other), "fp32", case["onnx"])
    with pytest.raises(ActdiffError, match="level"):
        OnnxRuntimeSide(case["record"], "fp32", case["onnx"], level="extended")
    with pytest.raises(ActdiffError, match="not available for onnxruntime"):
        OnnxRuntimeSide(case["record"], "q8_0", case["onnx"])
    with pytest.raises(ModelError, match="not found"):
        OnnxRuntimeSide(case["record"], "fp32", tmp_path / "missing.onnx")
    # the replay runs what the dump ran: refused without the dump's settings, or on another model file
    from actdiff.sides import open_replay

    with pytest.raises(ModelError, match="lack.*onnx_path"):
        open_replay("onnxruntime", case["dir"], "fp32", {})
    stale = {"onnx_path": str(case["onnx"]), "onnx_sha256": "0" * 64, "optimization_level": "disable", "threads": 1}
    with pytest.raises(ModelError, match="not the ONNX model the dump ran"):
        open_replay("onnxruntime", case["dir"], "fp32", stale)


# ------------------------------------------------------------------------------------------------ workflow
PIPELINE_MODEL = "tiny-nomic-moe"
PIPELINE_VARIANTS = ("fp32", "int8-dynamic", "int8-static")
PIPELINE_PROMPTS = ("en-0001", "en-0005", "en-cactus", "query-0003", "doc-0001", "doc-0002")  # 10-50 tokens


def _pipeline_config(tmp: Path) -> Path:
    import yaml

    lines = (REPO / "config/prompts/default.tsv").read_text(encoding="utf-8").splitlines()
    keep = [ln for ln in lines[1:] if ln.split("\t", 1)[0] in PIPELINE_PROMPTS]
    assert len(keep) == len(PIPELINE_PROMPTS), "a prompt id of this test is no longer in config/prompts/default.tsv"
    (tmp / "prompts.tsv").write_text("\n".join([lines[0], *keep]) + "\n", encoding="utf-8")
    cfg = {
        "prompts": str(tmp / "prompts.tsv"),
        "results": str(tmp / "results"),
        "shards": 1,
        "models": {PIPELINE_MODEL: {"source": {"generate": PIPELINE_MODEL, "seed": 0}, "max_length": 512}},
        "reference": {"impl": "actdiff", "threads": 1},
        "engines": ["onnxruntime"],
        # int8-static calibrated on 2 of the 6 prompts, which its comparison then leaves out
        "onnxruntime": {"variants": list(PIPELINE_VARIANTS), "level": "disable", "required": True,
                        "calibration_prompts": 2},
        "stats": {"search_seconds": 0},
        "keep_activations": False,
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def ort_run(tmp_path_factory, tiny_model_dir):
    """One workflow run: reference and ORT dumps of 6 short prompts in one shard, up to the verdicts (the
    reports are the same code as every side's; their rendering is left out for time)."""
    from actdiff.layout import Layout

    tmp = tmp_path_factory.mktemp("ort-pipeline")
    cfg = _pipeline_config(tmp)
    L = Layout(str(tmp / "results"))
    targets = [L.verdict(PIPELINE_MODEL, "onnxruntime", v) for v in PIPELINE_VARIANTS]
    p = snakemake(*targets, "--cores", "2", "--configfile", str(cfg))
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return L, cfg, p.stdout + p.stderr


def _ort_verdict(L, variant: str) -> dict:
    return json.loads(Path(L.verdict(PIPELINE_MODEL, "onnxruntime", variant)).read_text(encoding="utf-8"))


@pytest.mark.e2e
def test_pipeline_builds_each_variant_model_under_its_run(ort_run):
    import onnx

    from actdiff.onnxrt.export import META_FORMULATION, MOE_DENSE_GATHER

    L, _, log = ort_run
    for v in PIPELINE_VARIANTS:
        proto = onnx.load(L.onnx_model(PIPELINE_MODEL, v), load_external_data=False)
        meta = {p.key: p.value for p in proto.metadata_props}
        assert meta[META_FORMULATION] == MOE_DENSE_GATHER
    assert "rule export_onnx:" in log and "rule onnx_variant:" in log and "rule dump_onnxruntime:" in log


# ORT's int8 MatMul error depends on the CPU's int8 kernel (MLAS): on an AVX2-only AMD EPYC layer 0's attention
# output projection exceeded its budget (FAIL there); on a Xeon with AVX-512 VNNI/AMX every quantised MatMul's
# local error was 0.013 or less against a budget of 0.049 (DEVIATES). What holds on every CPU is asserted below:
# never PASS, a failure only at a quantised op with its own local error over budget, and the gate agreeing.
QUANTISED_OPS = ("MATMUL", "EXPERT_FC1", "EXPERT_FC2", "ROUTER", "EMBED")


@pytest.mark.e2e
def test_pipeline_fp32_passes_and_int8_dynamic_never_passes(ort_run):
    """fp32 at level disable: ORT's kernels on the export, every node within its fp32 budget. int8-dynamic is
    budgeted like every int8 precision (2^-7 at each weighted op whose weights are int8, compare.budgets), and its
    8-bit per-tensor activations are budgeted by nothing: it is never PASS. Where it FAILS (a CPU whose int8
    kernel adds more error, see QUANTISED_OPS' comment), the first divergence is a quantised op. Its int8
    word-embedding table (local error ~1.1e-2) stays within int8's budget, and every quantised MatMul shows its
    own quantisation error (local error above 1e-3, where fp32's is about 1e-7)."""
    import pandas as pd

    L, _, _ = ort_run
    v = _ort_verdict(L, "fp32")
    assert v["status"] == "pass" and v["side"] == "onnxruntime", v["plain"]
    v = _ort_verdict(L, "int8-dynamic")
    assert v["status"] in ("fail", "deviates"), v["plain"]
    assert v["unbudgeted"] == "activations quantised to int8, which no precision policy budgets", v
    nodes = pd.read_parquet(L.summary(PIPELINE_MODEL, "onnxruntime", "int8-dynamic", "nodes")).set_index("node")
    if v["status"] == "fail":
        assert nodes.loc[v["first_divergence"], "op"] in QUANTISED_OPS, v["plain"]
    emb = nodes.loc["embeddings"]  # int8 (quantize_dynamic quantises the Gather's table), within int8's budget
    assert emb["fail"] == 0 and emb["local_rel_l2_max"] > 1e-3, emb
    matmuls = nodes[nodes.op == "MATMUL"]
    assert len(matmuls) and (matmuls.local_rel_l2_max > 1e-3).all(), matmuls.local_rel_l2_max


@pytest.mark.e2e
def test_pipeline_int8_static_leaves_its_calibration_prompts_out(ort_run):
    """int8-static is calibrated on the first 2 prompts of shard 0 (onnxruntime.calibration_prompts): the ids its
    model records are the ones the statistics leave out, from every table, and the verdict names them."""
    import onnx
    import pandas as pd

    from actdiff.onnxrt.variants import META_CALIBRATION

    L, _, _ = ort_run
    proto = onnx.load(L.onnx_model(PIPELINE_MODEL, "int8-static"), load_external_data=False)
    calibrated = json.loads({p.key: p.value for p in proto.metadata_props}[META_CALIBRATION])["prompts"]
    assert len(calibrated) == 2 and set(calibrated) <= set(PIPELINE_PROMPTS), calibrated
    v = _ort_verdict(L, "int8-static")
    assert v["excluded_prompts"]["ids"] == sorted(calibrated) and v["prompts"] == len(PIPELINE_PROMPTS) - 2, v
    assert f"2 calibration prompt(s) excluded (ids {', '.join(sorted(calibrated))})" in v["plain"], v["plain"]
    assert v["status"] != "pass" and v["unbudgeted"], v["plain"]  # 8-bit activations: never PASS
    for t in ("nodes", "prompts", "embeddings"):
        ids = set(pd.read_parquet(L.stats(PIPELINE_MODEL, "onnxruntime", "int8-static", 0, t))["prompt_id"])
        assert ids == set(PIPELINE_PROMPTS) - set(calibrated), (t, ids)
    assert "excluded_prompts" not in _ort_verdict(L, "int8-dynamic")  # fitted on nothing: every prompt compared


@pytest.mark.e2e
def test_pipeline_splits_ort_errors_into_local_and_propagated(ort_run):
    """With ORT's replay (actdiff.onnxrt.replay), the statistics stage replays every node on the side's own
    inputs bit for bit (no replay_mismatch: the replay is the dump's code) and on the reference's inputs: a
    failing node's local error is then its own quantisation error, the rest of its error inherited. Some
    quantised MatMul fails locally (8-bit activations: the int8 weight allowance does not cover them); the MoE
    output with the reference's routing forced (expert-kernel error alone) is finite and below the unforced one
    on the prompts where routing flipped."""
    import pandas as pd

    L, _, _ = ort_run
    nodes = pd.read_parquet(L.stats(PIPELINE_MODEL, "onnxruntime", "int8-dynamic", 0, "nodes"))
    assert not nodes.replay_mismatch.any() and (nodes.replay_gap == 0).all()
    fail = nodes[nodes.status == "fail"]  # none on a CPU whose int8 kernel stays within budget (QUANTISED_OPS)
    assert np.isfinite(fail.local_rel_l2).all() and (fail.local_rel_l2 > fail.budget).all()
    matmuls = nodes[nodes.op == "MATMUL"]  # each quantised MatMul's own error, on the reference's inputs
    assert np.isfinite(matmuls.local_rel_l2).all() and (matmuls.local_rel_l2 > 0).all()
    qkv = nodes[nodes.node == "encoder.layers.2.attn.qkv"]  # a MatMul deep in the stack: inherits much
    assert (qkv.rel_l2 > qkv.local_rel_l2).all()
    moe = pd.read_parquet(L.stats(PIPELINE_MODEL, "onnxruntime", "int8-dynamic", 0, "prompts"))
    moe = moe[moe.kind == "moe_layer"]
    assert np.isfinite(moe.value2).all()
    flipped = moe[moe["count"] > 0]
    assert len(flipped) and (flipped.value2 < flipped.value).all()


@pytest.mark.e2e
def test_check_exit_codes_per_variant(ort_run):
    L, cfg, _ = ort_run

    def check(*args: str):
        return run_cmd([str(BIN / "actdiff"), "check", L.results, *args]).returncode

    assert check("--only", f"{PIPELINE_MODEL}/onnxruntime/fp32") == 0
    assert check("--strict", "--only", f"{PIPELINE_MODEL}/onnxruntime/fp32") == 0
    # int8-dynamic FAILS or DEVIATES by CPU (QUANTISED_OPS' comment): the gate follows the verdict, and --strict
    # fails it either way (8-bit activations are never PASS)
    int8 = _ort_verdict(L, "int8-dynamic")["status"]
    assert check("--only", f"{PIPELINE_MODEL}/onnxruntime/int8-dynamic") == (1 if int8 == "fail" else 0), int8
    assert check("--strict", "--only", f"{PIPELINE_MODEL}/onnxruntime/int8-dynamic") == 1
    any_fail = any(_ort_verdict(L, v)["status"] == "fail" for v in PIPELINE_VARIANTS)
    assert check("--configfile", str(cfg)) == int(any_fail)  # every configured run has its verdict
    assert check("--strict", "--configfile", str(cfg)) == 1


def test_config_turns_onnxruntime_off_or_requires_it(monkeypatch):
    import actdiff.onnxrt
    from actdiff.config import validate_config
    from actdiff.errors import ConfigError
    from actdiff.sides.configured import configured_runs, engine_specs, usable_engines

    base = {"prompts": "p.tsv", "results": "r", "shards": 1, "engines": ["actdiff", "onnxruntime"],
            "models": {"m": {"source": {"generate": PIPELINE_MODEL, "seed": 0}}}}  # fmt: skip

    def runs(**ort):
        cfg = validate_config({**base, "onnxruntime": ort})
        usable, why = usable_engines(cfg, engine_specs(cfg["engines"]))
        return [r[1:] for r in configured_runs(cfg, usable)], why

    assert runs(variants=["fp32", "int8-static"]) == ([("actdiff", "fp32"), ("onnxruntime", "fp32"),
                                                      ("onnxruntime", "int8-static")], None)  # fmt: skip
    off = "the onnxruntime engine is skipped: onnxruntime.enabled is false"
    assert runs(enabled=False) == ([("actdiff", "fp32")], off)
    with pytest.raises(ConfigError, match=r"'onnxruntime.variants.0'.*fp32, fp16, int8-dynamic, int8-static"):
        runs(variants=["q8_0"])
    with pytest.raises(ConfigError, match="config key 'variants.0'.*not available for the actdiff engine"):
        validate_config({**base, "variants": ["int8-dynamic"]})
    monkeypatch.setattr(actdiff.onnxrt, "available", lambda: (False, "onnxruntime is not installed"))
    assert runs()[0] == [("actdiff", "fp32")]
    with pytest.raises(ConfigError, match=r"required \(onnxruntime.required\) but unavailable"):
        runs(required=True)
