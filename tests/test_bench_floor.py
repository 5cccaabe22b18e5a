"""bench/pipeline.py's floor (issue 19): the long-prompt corpus, the per-stage cost model over the node graph,
the fractions of the measured peak; and bench/peak.py's micro-benchmark builds and reports every ISA the CPU
has. No pipeline run and no timing assertion: the peak's values are only checked to be finite and positive."""

from __future__ import annotations

import math
import os
import sys

import pytest
from helpers import REPO

sys.path.insert(0, str(REPO / "bench"))
_env = dict(os.environ)
import peak  # noqa: E402
import pipeline  # noqa: E402  (sets OPENBLAS_NUM_THREADS for its own process: restored below)

os.environ.clear()
os.environ.update(_env)

from actdiff.engine.tokenizer import EngineTokenizer  # noqa: E402
from actdiff.models.tiny import tiny_config  # noqa: E402
from actdiff.nodes import build_graph  # noqa: E402
from actdiff.prompts import load_prompt_sheet  # noqa: E402


@pytest.fixture(scope="module")
def tiny(released_config):
    return build_graph(tiny_config(released_config, n_tokens=4000))


def test_long_sheet_is_deterministic_and_untruncated(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(pipeline, "TINY_DIR", tiny_model_dir)
    a, b = tmp_path / "a.tsv", tmp_path / "b.tsv"
    counts = pipeline.write_long_sheet(4, a)
    assert pipeline.write_long_sheet(4, b) == counts and a.read_bytes() == b.read_bytes()
    df = load_prompt_sheet(a)
    assert len(df) == 4 and df["prompt_id"].str.startswith(pipeline.LONG_PREFIX).all()
    tok = EngineTokenizer.from_file(tiny_model_dir / "tokenizer.json")
    assert [tok.encode(t)[1] for t in df["text"]] == counts  # the sheet holds what was counted
    assert all(480 <= c <= 512 for c in counts)  # long, and nothing truncated at max_length 512


def test_dump_bytes_reads_weights_once_per_batch(tiny):
    lengths = [30] * 16
    one_by_one = pipeline.dump_bytes(tiny, lengths, 1)
    batched = pipeline.dump_bytes(tiny, lengths, 16)
    assert one_by_one == 16 * tiny.bytes_moved(30)["total"]
    # one batch of 16: the weights its 480 tokens reach read once, every prompt's outputs written
    assert batched == tiny.bytes_moved(480)["weights"] + 16 * tiny.bytes_moved(30)["activations"]
    assert one_by_one - batched == 16 * tiny.bytes_moved(30)["weights"] - tiny.bytes_moved(480)["weights"]


def test_stats_flops_parts(tiny):
    T = 20
    parts = pipeline.stats_flops(tiny, T)
    f = tiny.flops(T)
    assert parts["fp32_replays"] == 2 * f
    assert "float64_spec_passes" not in parts  # the fp32 run's propagated budgets are reference_noise's
    # the noise and the propagated budgets, a forward each, and the envelope: the sum ops, most but not all of one
    assert 2 * f < pipeline.noise_flops(tiny, T) < 3 * f
    moe = sum(tiny.node_flops(x, T) for b in tiny.moe_blocks() for x in b.nodes())
    assert parts["forced_moe"] == moe


def _fake_run() -> dict:
    job = {"cpu_time_s": 1.0}  # two jobs per stage: 2 CPU seconds in all
    stages = {
        st: {"log_seconds_total": 2.0, "job_wall_s_total": 4.0, "peak_rss_bytes": 1e8, "per_job": [job, job]}
        for st in pipeline.STAGES
    }
    flops = {"tokenize": 0, "dump_reference": 4e9, "dump_engine": 4e9, "reference_noise": 0, "compute_stats": 20e9,
             "render": 0}  # fmt: skip
    return {
        "prompts": 10,
        "stages": stages,
        "report": {"snakemake_wall_s": 5.0, "peak_rss_bytes": 3e8},
        "snakemake_wall_s": 15.0,
        "peak_rss_bytes_by_rule": {"dump_reference": 1e8, "render_report": 3e8},
        "peak_jobs_rss_bytes": 2e8,
        "floor": {
            "flops": flops,
            "bytes": {
                "tokenize": None,
                "dump_reference": 1e9,
                "dump_engine": 1e9,
                "reference_noise": 0,
                "compute_stats": 2e9,
                "render": None,
            },
            "forward_flops": 4e9,
        },
    }


def test_floor_table_fractions():
    pk = {"peak_1thread_gflops": 40.0, "peak_machine_gflops": 80.0, "threads_all": 2}
    t = pipeline.floor_table(_fake_run(), pk)
    # dump_reference: 4 GFLOP in 2 steady seconds of 1-thread jobs = 2 GFLOP/s = 5 % of one core's 40
    assert t["dump_reference"]["gflops"] == pytest.approx(2.0, rel=1e-12)
    assert t["dump_reference"]["fraction_of_peak"] == pytest.approx(0.05, rel=1e-12)
    # per CPU second the jobs got: 4 GFLOP / 2 CPU-s against 40 (a shared machine gives a job less than a core)
    assert t["dump_reference"]["fraction_of_peak_per_cpu_s"] == pytest.approx(0.05, rel=1e-12)
    assert t["render"]["fraction_of_peak_per_cpu_s"] is None
    assert t["dump_reference"]["prompts_per_s"] == 5.0 and t["dump_reference"]["prompts_per_s_incl_startup"] == 2.5
    assert t["tokenize"]["gb_per_s"] is None and t["render"]["prompts_per_s"] == 2.0
    e = t["end_to_end"]  # 28 GFLOP over 15 + 5 s against the machine's 80
    assert e["gflops"] == pytest.approx(1.4, rel=1e-12)
    assert e["fraction_of_peak"] == pytest.approx(1.4 / 80, rel=1e-12)
    assert e["forwards_per_prompt"] == pytest.approx(7.0, rel=1e-12)
    assert e["prompts_per_s_at_peak"] == pytest.approx(10 / (28 / 80), rel=1e-12)
    assert e["peak_rss_bytes"] == 3e8 and e["bytes"] == 4e9


def test_peak_source_and_flags():
    assert "-ffast-math" not in " ".join(peak.CFLAGS) and "-ffast-math" not in peak.c_source()
    assert "-march=native" in peak.CFLAGS
    src = peak.c_source()
    # one variable per chain, written out (an array of vectors may live on the stack)
    assert src.count("_mm256_fmadd_ps(a") == peak.CHAINS["avx2"]
    assert src.count("_mm512_fmadd_ps(a") == peak.CHAINS["avx512"]


def test_peak_runs_every_isa_the_cpu_has():
    flags = set(pipeline.cpu_vector_flags())
    if not {"avx2", "fma"} <= flags:
        pytest.skip("no AVX2+FMA on this CPU")
    rows = peak.fma_peak(2, 0.002, 2)
    isas = {r["isa"] for r in rows}
    assert isas == ({"avx2", "avx512"} if "avx512f" in flags else {"avx2"})
    assert {r["threads"] for r in rows} == {1, 2}
    assert all(math.isfinite(r["gflops_best"]) and r["gflops_best"] > 0 for r in rows)


def test_report_time_sums_job_cost_lines(tmp_path):
    """bench/report_time.py sums the "job cost:" lines the adapters log (workflow_support.job_cost_line), per rule,
    their system seconds and page faults too; a log without one is listed, never silently dropped, and a family
    with a line from before the system seconds were logged shows none rather than a partial sum."""
    import resource

    import report_time

    from actdiff.workflow_support import job_cost_line, parse_job_cost

    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    line = job_cost_line("compute_stats")  # this process's real figures, parsed back
    cost = parse_job_cost(f"2026 INFO started\n2026 INFO {line}\n")
    assert cost is not None and cost["rule"] == "compute_stats" and cost["cpu_s"] > 0 and cost["max_rss_mb"] > 0, line
    assert 0 <= cost["sys_s"] <= cost["cpu_s"] + 0.01 and cost["minflt"] >= before > 0, line  # 0.01: both rounded
    assert parse_job_cost("2026 ERROR failed before the end\n") is None
    logs = tmp_path / "logs"
    new = " sys_s={:.2f} minflt={}"
    jobs = [
        ("a/x.log", "compute_stats", 3.5, new.format(0.5, 1000)),
        ("a/y.log", "compute_stats", 1.5, new.format(0.25, 2500)),
        ("b/z.log", "tokenize", 1.0, ""),
        ("b/w.log", "tokenize", 1.0, new.format(0.1, 9)),
    ]
    for rel, rule, cpu, tail in jobs:
        (logs / rel).parent.mkdir(parents=True, exist_ok=True)
        (logs / rel).write_text(f"2026 INFO started\n2026 INFO job cost: rule={rule} wall_s=9.00 cpu_s={cpu:.2f} "
                                f"max_rss_mb=120 children_max_rss_mb=0{tail}\n")  # fmt: skip
    (logs / "c.log").write_text("2026 ERROR failed before the end\n")
    jobs, missing = report_time.job_costs(logs)
    rows = {r["rule"]: r for r in report_time.per_rule(jobs)}
    assert missing == ["c.log"]
    assert rows["compute_stats"]["jobs"] == 2 and rows["compute_stats"]["cpu_s"] == pytest.approx(5.0)
    assert rows["compute_stats"]["cpu_share"] == pytest.approx(5.0 / 7.0)
    assert rows["compute_stats"]["sys_s"] == pytest.approx(0.75) and rows["compute_stats"]["minflt"] == 3500
    assert rows["tokenize"]["cpu_s_max"] == pytest.approx(1.0)
    assert rows["tokenize"]["sys_s"] is None and rows["tokenize"]["minflt"] is None  # one line predates them
    slog = tmp_path / "run.log"
    slog.write_text("[Wed Dec  2 13:02:58 2026]\nrule x\n[Wed Dec  2 13:07:28 2026]\nFinished\n")
    assert report_time.run_wall_s(slog) == pytest.approx(270.0)


def _growth_run(n: int) -> dict:
    """A full-size run of n prompts as bench/pipeline.py's analyse_run records it: 20 s fixed + 3 s per prompt,
    100 MB of dumps per prompt, memory flat."""
    job = {"cpu_time_s": 2.5 * n}
    stage = {"job_wall_s_total": 1.0 * n, "log_seconds_total": 0.5 * n, "per_job": [job]}
    stages = {st: dict(stage) for st in pipeline.STAGES}
    rss = {"dump_reference": 4e9, "compute_stats": 3e9}
    return {
        "prompts": n,
        "tokens": 40 * n,
        "shards": 1,
        "snakemake_wall_s": 15.0 + 3.0 * n,
        "report": {"snakemake_wall_s": 5.0},
        "peak_h5_on_disk_bytes": 1e8 * n,
        "stages": stages,
        "other_rules": {"aggregate_stats": {"log_span_s": 1.0}},
        "peak_rss_bytes_by_rule": rss,
        "typical_job_peak_rss_bytes_by_rule": rss,
    }


def test_growth_fits_lines_and_prompts_per_hour():
    runs = {str(n): _growth_run(n) for n in (32, 4, 16, 8)}  # any order
    g = pipeline.growth(list(runs.values()))
    w = g["wall_s"]["per_prompt"]
    assert w["slope"] == pytest.approx(3.0, rel=1e-9) and w["intercept"] == pytest.approx(20.0, rel=1e-9)
    assert g["wall_s"]["per_token"]["slope"] == pytest.approx(3.0 / 40, rel=1e-9)
    assert g["peak_h5_on_disk_bytes"]["per_prompt"]["slope"] == pytest.approx(1e8, rel=1e-9)
    assert g["prompts_per_hour"] == pytest.approx((3600 - 20) / 3.0, rel=1e-9)
    assert g["tokens_per_prompt_mean"] == pytest.approx(40.0)
    assert not any(m["grows"] for m in g["memory"].values())  # flat memory is reported flat
    md = "\n".join(pipeline.growth_markdown({"growth_fit": g, "growth": runs}))
    assert "about **1,193 prompts**" in md and "+ 3.00 s/prompt" in md


def test_the_completion_patterns_match_what_the_jobs_log(tiny_model_dir, tmp_path, caplog):
    """The floor reads each stage's prompts and seconds from its job's completion line (pipeline.LOG_DONE): the
    reference noise's line as measure_reference_noise logs it (its wording changed once and the floor stopped)."""
    import logging

    from test_stats import _dump_pair

    from actdiff.compare.refnoise import measure_reference_noise

    ref, _ = _dump_pair(tmp_path, tiny_model_dir, "fp32", 1, n_prompts=2)
    with caplog.at_level(logging.INFO, logger="actdiff.compare.refnoise"):
        measure_reference_noise(tiny_model_dir, ref, tmp_path / "noise.parquet")
    lines = [r.getMessage() for r in caplog.records if r.name == "actdiff.compare.refnoise"]
    m = [pipeline.LOG_DONE["reference_noise"].search(line) for line in lines]
    assert any(x is not None and x.group(1) == "2" for x in m), lines
