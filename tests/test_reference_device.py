"""reference.device and the reference's numerics (actdiff.reference_device), on the CPU this suite runs on.

Device resolution and the torch settings are checked against torch's real flags (they can be set and read
back without a GPU); the CUDA branches are checked for what they would set and record. The budgets' TF32 term is
checked on a reference whose matmul operands are rounded to TF32 on the CPU (what TF32 tensor cores do to
each operand before multiplying; the accumulation stays fp32): a correct fp32 engine must pass against it.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from helpers import DATA, ensure_tiny_model, shard_outputs, summary_outputs

from actdiff import reference_device as rd
from actdiff.compare.budgets import SAFETY, TF32_OPS, U_REFERENCE, Noise, budget, reference_precision_of
from actdiff.config import validate_config
from actdiff.errors import ConfigError, DumpError

NO_CUDA = not torch.cuda.is_available()


# ------------------------------------------------------------------------------------------- device choice
@pytest.mark.parametrize(
    ("spec", "available", "count", "expected"),
    [("auto", False, 0, "cpu"), ("auto", True, 2, "cuda:0"), ("cpu", True, 2, "cpu"), ("cuda", True, 1, "cuda:0"),
     ("cuda:1", True, 2, "cuda:1")],
)  # fmt: skip
def test_device_resolution(spec, available, count, expected):
    assert rd.resolve_device(spec, available, count) == expected


@pytest.mark.parametrize(("spec", "available", "count", "says"), [
    ("cuda", False, 0, "no usable CUDA device"), ("cuda:0", False, 0, "no usable CUDA device"),
    ("cuda:2", True, 2, "sees 2 CUDA device(s)"), ("gpu", True, 1, "is not a device"),
])  # fmt: skip
def test_unusable_device_is_refused_naming_the_key(spec, available, count, says):
    with pytest.raises(ConfigError, match="reference.device") as e:
        rd.resolve_device(spec, available, count)
    assert says in str(e.value)


@pytest.mark.skipif(not NO_CUDA, reason="this torch has CUDA")
def test_auto_picks_the_cpu_without_cuda_and_cuda_is_refused():
    assert rd.pick_device("auto") == "cpu"
    with pytest.raises(ConfigError, match="config key 'reference.device' is 'cuda'"):
        rd.pick_device("cuda")


def test_batch_size_per_device():
    assert rd.batch_size_for("cpu", 16, None) == 16
    assert rd.batch_size_for("cuda:1", 16, {"cuda": 64}) == 64
    assert rd.batch_size_for("cpu", 16, {"cuda": 64}) == 16


# ------------------------------------------------------------------------------------------- torch settings
@pytest.mark.parametrize(("device", "tf32"), [("cuda:0", False), ("cuda:0", True), ("cpu", False), ("cpu", True)])
def test_settings_reach_torch_and_are_restored(device, tf32):
    """The plan is set through torch's own flags and read back equal; closing puts the previous flags back."""
    before = rd.read_numerics()
    saved = rd.apply_numerics(rd.numerics_plan(device, tf32))
    try:
        now = rd.read_numerics()
    finally:
        rd.restore_numerics(saved)
    assert now == rd.numerics_plan(device, tf32)
    assert rd.read_numerics() == before


LEGACY = """
import actdiff.reference_device as rd
rd._new_api = lambda torch: False  # torch < 2.9: allow_tf32 flags only
r0 = rd.read_numerics()
for dev, tf32 in (("cuda:0", False), ("cuda:0", True), ("cpu", True)):
    saved = rd.apply_numerics(rd.numerics_plan(dev, tf32))
    now = rd.read_numerics()
    rd.restore_numerics(saved)
    assert now == rd.numerics_plan(dev, tf32), (dev, tf32, now)
    assert rd.read_numerics() == r0
print("ok")
"""


def test_settings_through_the_legacy_allow_tf32_flags():
    """The torch < 2.9 branch, on this torch's legacy flags, in a fresh process (torch refuses to read flags set
    through both APIs in one process)."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", LEGACY], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]


def test_cuda_plan_is_true_fp32_unless_tf32_is_allowed():
    strict, loose, cpu = rd.numerics_plan("cuda:0"), rd.numerics_plan("cuda:0", True), rd.numerics_plan("cpu", True)
    assert strict["float32_matmul_precision"] == "highest"
    assert not strict["cuda_matmul_tf32"] and not strict["cudnn_tf32"]
    assert strict["deterministic_algorithms"] and strict["cudnn_deterministic"] and not strict["cudnn_benchmark"]
    assert strict["cublas_workspace_config"] == rd.CUBLAS_WORKSPACE
    assert loose["cuda_matmul_tf32"] and loose["cudnn_tf32"] and loose["float32_matmul_precision"] == "high"
    # TF32 is a CUDA format: on the CPU the matmul precision stays highest (oneDNN would otherwise round)
    assert cpu["float32_matmul_precision"] == "highest" and not cpu["cuda_matmul_tf32"]
    assert rd.reference_precision("cuda:0", loose) == "tf32"
    assert rd.reference_precision("cuda:0", strict) == "fp32"
    assert rd.reference_precision("cpu", {**loose}) == "fp32"


def test_cuda_provenance_records_the_device_versions_and_settings(monkeypatch):
    """What a CUDA dump records (the hardware query stubbed: there is no GPU here)."""
    from actdiff import sysinfo

    gpu = {"device_name": "NVIDIA H200", "cuda_capability": "9.0", "cuda_memory_mb": 143771, "cuda_runtime": "12.8",
           "cuda_driver": "570.86", "cudnn_version": "91002"}  # fmt: skip
    monkeypatch.setattr(sysinfo, "cuda_info", lambda index: dict(gpu, index=index))
    attrs = rd.device_provenance("cuda:1", rd.numerics_plan("cuda:1", True))
    assert attrs["device"] == "cuda:1" and attrs["index"] == 1 and attrs["reference_precision"] == "tf32"
    assert json.loads(attrs["torch_numerics"])["cuda_matmul_tf32"] is True
    assert {k: attrs[k] for k in gpu} == gpu


# ------------------------------------------------------------------------------------------- config
def _config(**reference):
    return {"prompts": "p.tsv", "models": {"m": {"source": {"path": "x"}}}, "reference": reference}


def test_config_defaults_and_refusals():
    c = validate_config(_config())
    assert c["reference"]["device"] == "auto" and c["reference"]["allow_tf32"] is False
    assert validate_config(_config(device="cuda:3"))["reference"]["device"] == "cuda:3"
    with pytest.raises(ConfigError, match="config key 'reference.device'"):
        validate_config(_config(device="gpu"))
    c = _config()
    c["models"]["m"]["device_batch_size"] = {"cuda": 64}
    assert validate_config(c)["models"]["m"]["batch_size"] == 1  # batch_size unchanged: the engines' and the CPU's
    c["models"]["m"]["device_batch_size"] = {"tpu": 8}
    with pytest.raises(ConfigError, match="config key 'models.m.device_batch_size'"):
        validate_config(c)


# ------------------------------------------------------------------------------------------- the side
@pytest.fixture(scope="module")
def tiny_record():
    from actdiff.models.record import ModelRecord

    return ModelRecord.from_dir(ensure_tiny_model(), "tiny-nomic-moe")


PROMPTS = [("a", [0, 1061, 76, 2]), ("b", [0, 5, 2]), ("c", [0, 17, 99, 345, 2000, 7, 2])]


@pytest.fixture(scope="module")
def auto_dumps(tiny_record, tmp_path_factory):
    """A reference dump at reference.device auto (the CPU here), an engine dump, their statistics and verdict."""
    from actdiff.compare.aggregate import aggregate
    from actdiff.compare.stats import StatsConfig, compute_shard_stats
    from actdiff.sides import open_side
    from actdiff.sides.dump import dump_shard
    from actdiff.tables import SHARD_TABLES

    tmp = tmp_path_factory.mktemp("auto")
    before = rd.read_numerics()
    sides = {"ref": open_side("reference", tiny_record, "fp32", device="auto", batch_size=2,
                              device_batch_size={"cuda": 64}),
             "eng": open_side("actdiff", tiny_record, "fp32")}  # fmt: skip
    for name, side in sides.items():
        try:
            dump_shard(side, tiny_record.provenance(), PROMPTS, tmp / f"{name}.h5", 0)
        finally:
            side.close()
    after = rd.read_numerics()
    (tmp / "stats").mkdir()
    out = shard_outputs(tmp / "stats")
    compute_shard_stats(tiny_record.dir, tmp / "ref.h5", tmp / "eng.h5", "actdiff", "fp32", 0, out,
                        StatsConfig(search_seconds=0))  # fmt: skip
    meta = {"model": "tiny-nomic-moe", "side": "actdiff", "variant": "fp32", "experts": 8}
    verdict = aggregate({t: [out[t]] for t in SHARD_TABLES}, summary_outputs(tmp / "summary"), meta)
    return {"ref": tmp / "ref.h5", "verdict": verdict, "numerics": (before, after)}


@pytest.mark.skipif(not NO_CUDA, reason="this torch has CUDA")
def test_auto_reference_dump_records_cpu_and_its_settings(auto_dumps):
    before, after = auto_dumps["numerics"]
    assert after == before  # the side put torch's flags back when it closed
    with h5py.File(auto_dumps["ref"]) as f:
        attrs = dict(f.attrs)
    assert attrs["device"] == "cpu" and attrs["reference_precision"] == "fp32" and attrs["batch_size"] == 2
    numerics = json.loads(attrs["torch_numerics"])
    assert numerics == rd.numerics_plan("cpu")
    rec = rd.reference_record(attrs)
    assert rec["device"] == "cpu" and rec["device_name"] and rec["torch_numerics"] == numerics


@pytest.mark.skipif(not NO_CUDA, reason="this torch has CUDA")
def test_verdict_and_report_name_the_cpu(auto_dumps):
    from types import SimpleNamespace

    from actdiff.report.sections import first_screen_md, provenance_md

    v = auto_dumps["verdict"]
    assert [r["device"] for r in v["reference"]] == ["cpu"] and v["reference"][0]["reference_precision"] == "fp32"
    run = SimpleNamespace(model="tiny-nomic-moe", side="actdiff", variant="fp32", verdict=v, embeddings_summary={},
                          model_info={}, imported=[], run_dir="results/x")  # fmt: skip
    prov = provenance_md(run)
    assert "| reference device | `cpu (" in prov and "float32_matmul_precision highest" in prov
    assert "TF32" not in first_screen_md(run)  # the default: the first screen says nothing about the device
    gpu = dict(v["reference"][0], device="cuda:0", device_name="NVIDIA H200", cuda_runtime="12.8")
    strict = first_screen_md(SimpleNamespace(**{**vars(run), "verdict": {**v, "reference": [gpu]}}))
    assert "The reference ran on `cuda:0` (NVIDIA H200) in true fp32 (TF32 off)." in strict
    loose = {**gpu, "reference_precision": "tf32"}
    tf32 = first_screen_md(SimpleNamespace(**{**vars(run), "verdict": {**v, "reference": [loose]}}))
    assert "**The reference ran with TF32 allowed**" in tf32 and "reference.allow_tf32: true" in tf32


@pytest.mark.skipif(not NO_CUDA, reason="this torch has CUDA")
def test_cuda_reference_without_cuda_fails_before_touching_torch(tiny_record):
    from actdiff.sides.reference import ReferenceSide

    before = rd.read_numerics()
    with pytest.raises(ConfigError, match="config key 'reference.device' is 'cuda:0'"):
        ReferenceSide(tiny_record, device="cuda:0")
    assert rd.read_numerics() == before


# ------------------------------------------------------------------------------------------- budgets
def test_tf32_term_is_added_at_matmul_like_nodes_only(tiny_record):
    from actdiff.nodes import graph_for_model_dir

    graph = graph_for_model_dir(tiny_record.dir)
    noise = Noise(1e-7)
    for node in graph:
        fp32, tf32 = budget(node, "fp32", noise), budget(node, "fp32", noise, reference="tf32")
        if node.op in TF32_OPS:
            # 2 * 2^-11: both factors of every product rounded to a 10-bit mantissa, accumulated in fp32
            assert tf32 - fp32 == pytest.approx(SAFETY * 2.0**-10, rel=1e-12), node.name
        else:
            assert tf32 == fp32, node.name
    assert U_REFERENCE["tf32"] == 2.0**-10
    assert reference_precision_of({}) == "fp32"  # a dump from before the reference recorded it: the CPU
    with pytest.raises(DumpError, match="reference_precision is 'bf16'"):
        reference_precision_of({"reference_precision": "bf16"}, "ref.h5")


def _tf32(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to TF32 (10 explicit mantissa bits, round to nearest even), still stored as float32."""
    i = t.contiguous().view(torch.int32)
    i = (i + 0xFFF + ((i >> 13) & 1)) & ~0x1FFF
    return i.view(torch.float32)


def _tf32_reference(model: torch.nn.Module) -> None:
    """The reference as a TF32 GPU computes its GEMMs, on the CPU: every Linear's and the experts' weights and
    inputs rounded to TF32 before the fp32 product (attention's own products and the experts' second GEMM input
    are left in fp32: a smaller error than a GPU's)."""
    with torch.no_grad():
        for m in model.modules():
            kind = type(m).__name__
            params = [m.weight] if isinstance(m, torch.nn.Linear) else [m.w1, m.w2] if kind == "ExpertWeights" else []
            for p in params:
                p.copy_(_tf32(p))
            if isinstance(m, torch.nn.Linear) or kind == "Experts":
                m.register_forward_pre_hook(lambda _m, args: (_tf32(args[0]), *args[1:]))


def test_fp32_engine_passes_against_a_tf32_reference(tiny_record, tmp_path):
    from actdiff.compare.stats import StatsConfig, compute_shard_stats
    from actdiff.engine.core import Engine
    from actdiff.h5io import ActivationWriter
    from actdiff.models.loading import load_reference_model
    from actdiff.nodes import build_graph
    from actdiff.prompts import load_prompt_sheet
    from actdiff.reference import ReferenceRunner
    from actdiff.token_shards import load_reference_tokenizer, tokenize_texts

    sheet = load_prompt_sheet(DATA / "ci_prompts.tsv").head(8)
    ids = [r["ids"] for r in tokenize_texts(load_reference_tokenizer(tiny_record.dir), sheet["text"].tolist(), 512)]
    model, cfg, _ = load_reference_model(tiny_record.dir)
    graph = build_graph(cfg)
    runner = ReferenceRunner(model, graph)  # its taps first: they record the inputs before the rounding hooks
    _tf32_reference(model)
    engine = Engine(tiny_record.dir, threads=1)
    dumps = {"ref": ({"side": "reference", "reference_precision": "tf32"}, lambda x: runner.run_batch([x])[0]),
             "eng": ({"side": "actdiff"}, lambda x: engine.forward(x, "fp32"))}  # fmt: skip
    for name, (attrs, forward) in dumps.items():
        with ActivationWriter(tmp_path / f"{name}.h5", graph, attrs) as w:
            for pid, x in zip(sheet["prompt_id"], ids, strict=True):
                w.append(pid, forward(x), input_ids=np.asarray(x, np.int64))
    out = shard_outputs(tmp_path / "stats")
    (tmp_path / "stats").mkdir()
    compute_shard_stats(tiny_record.dir, tmp_path / "ref.h5", tmp_path / "eng.h5", "actdiff", "fp32", 0, out,
                        StatsConfig(search_seconds=0))  # fmt: skip
    n = pd.read_parquet(out["nodes"])
    assert (n["status"] != "fail").all(), n.loc[n.status == "fail", ["prompt_id", "node", "local_rel_l2", "budget"]]
    gemm = n[n["node"].isin([x.name for x in graph if x.op in TF32_OPS])]
    assert len(gemm) and (gemm["budget"] >= SAFETY * 2.0**-10).all()
    worst = gemm["local_rel_l2"].max()
    # the TF32 reference's own error reaches the engine's local error at its GEMMs: far above fp32 (~1e-7)
    print(f"fp32 engine vs TF32-rounded reference: worst GEMM local error {worst:.2e}")
    assert worst > 1e-5
