"""Profile of the statistics stage (actdiff.compare.stats.compute_shard_stats) on a small fixture, in-process.

    python bench/stats_profile.py prepare --model results/bench/fullsize-random --prompts 4 --workdir /tmp/sp/full
    python bench/stats_profile.py run --workdir /tmp/sp/full --label before [--cprofile] [--isa avx512]
    python bench/stats_profile.py same --workdir /tmp/sp/full before after

``prepare`` writes the fixture once: the model record, ``--prompts`` evenly spaced prompts of the bundled corpus
(no long-* rows; ``--with-long``: bench/pipeline.py's full-size subset, two long-* prompts first), their tokens,
the reference's dump and our engine's dump of ``--variant`` (fp32; one thread). ``run`` runs compute_shard_stats
in a fresh subprocess (one BLAS thread, as rule compute_stats pins; PYTHONPATH picks the tree) and prints one
JSON line: seconds, seconds per prompt, the peak RSS of that subprocess (VmHWM, which includes the model the
engine's replay holds), the stack at the highest RSS sample (a thread samples VmRSS every 20 ms), the stage's
FLOPs (bench/pipeline.py's model: stats_flops) and GFLOP/s; with ``--cprofile`` the 25 most expensive functions
by cumulative and own time; with ``--shared-noise`` it first measures the reference noise table (``noise_s``), as
rule reference_noise does, and passes it. Tables go to ``<workdir>/stats-<label>/``. ``same`` compares two
labels' tables: every column bit-identical except the float64-derived ones (budgets, noises, propagated budgets),
which must agree within ``--rtol`` (1e-12)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIDE = "actdiff"

# nodes-table columns computed in float64 (the spec passes): equal within rtol, not bit for bit
FLOAT64_COLUMNS = ("ref_fp32_error", "fp32_noise", "budget", "propagated_budget")


def prepare(model: Path, n: int, wd: Path, with_long: bool, variant: str = "fp32") -> None:
    from actdiff.pipeline import dump, resolve_model, tokenize
    from actdiff.prompts import load_prompt_sheet

    sys.path.insert(0, str(ROOT / "bench"))
    from pipeline import CORPUS, evenly_spaced, write_subset_sheet

    wd.mkdir(parents=True, exist_ok=True)
    resolve_model("profiled", {"path": str(model.resolve())}, str(wd / "model.json"))
    if with_long:  # bench/pipeline.py's full-size subset: the first two long-* prompts and evenly spaced others
        write_subset_sheet(n, wd / "prompts.tsv")
        load_prompt_sheet(str(wd / "prompts.tsv")).to_parquet(wd / "prompts.parquet", index=False)
    else:
        sheet = load_prompt_sheet(str(CORPUS))
        short = sheet[~sheet["prompt_id"].str.startswith("long-")].reset_index(drop=True)
        short.iloc[evenly_spaced(len(short), n)].to_parquet(wd / "prompts.parquet", index=False)
    tokenize(str(wd / "model.json"), str(wd / "prompts.parquet"), 512, str(wd / "tokens.parquet"))
    t0 = time.perf_counter()
    dump(str(wd / "model.json"), str(wd / "tokens.parquet"), str(wd / "ref.h5"), "reference", "fp32", 0,
         impl="actdiff", batch_size=16)  # fmt: skip
    t1 = time.perf_counter()
    dump(str(wd / "model.json"), str(wd / "tokens.parquet"), str(wd / "eng.h5"), SIDE, variant, 0, threads=1,
         engine_ids="reference")  # fmt: skip
    (wd / "variant.txt").write_text(variant)
    print(json.dumps({"reference_s": t1 - t0, "engine_s": time.perf_counter() - t1}))


WORKER = r"""
import cProfile, io, json, os, pstats, sys, threading, time, traceback
from pathlib import Path
from threadpoolctl import threadpool_limits

a = json.loads(sys.argv[1])
sys.path.insert(0, a["bench"])
from actdiff.compare.stats import compute_shard_stats
from actdiff.models.record import ModelRecord
from actdiff.nodes import build_graph
from actdiff.tables import SHARD_TABLES
import pyarrow.parquet as pq
from pipeline import stats_flops

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

peak = {"rss": 0, "stack": ""}
main = threading.main_thread().ident
done = threading.Event()

def sample():  # the main thread's stack whenever the RSS reaches a new high: where the peak memory is held
    while not done.wait(0.02):
        r = rss("VmRSS:")
        if r > peak["rss"] + (16 << 20):
            frame = sys._current_frames().get(main)
            peak.update(rss=r, stack="".join(traceback.format_stack(frame)[-6:]) if frame else "")

rec = ModelRecord.load(a["model_json"])
out = Path(a["out"]); out.mkdir(parents=True, exist_ok=True)
outputs = {t: str(out / f"{t}.parquet") for t in SHARD_TABLES}
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
prof = cProfile.Profile() if a["cprofile"] else None
noise, noise_s = None, 0.0
if a["shared_noise"]:  # rule reference_noise's table, measured first (once per shard in the workflow)
    from actdiff.compare.refnoise import measure_reference_noise
    noise = str(out / "reference_noise.parquet")
    noise_s = measure_reference_noise(rec.dir, a["ref"], noise)["seconds"]
t0 = time.perf_counter()
with threadpool_limits(limits=1):
    if prof: prof.enable()
    summary = compute_shard_stats(rec.dir, a["ref"], a["eng"], "actdiff", a["variant"], 0, outputs, noise=noise)
    if prof: prof.disable()
dt = time.perf_counter() - t0
done.set()
# joined before the interpreter exits: left running into its shutdown, the worker hung there for good (every
# thread asleep, the main one waiting for h5py's lock while clearing the modules) or exited 1, in 3 of 3 runs on
# the full-size fixture on 2026-12-05
sampler.join()
graph = build_graph(rec.config)
nodes = pq.read_table(outputs["nodes"], columns=["prompt_id", "tokens"]).to_pandas().drop_duplicates("prompt_id")
flops = sum(sum(stats_flops(graph, int(t)).values()) for t in nodes["tokens"])
res = {"seconds": dt, "noise_s": noise_s, "prompts": summary["prompts"],
       "s_per_prompt": dt / max(summary["prompts"], 1),
       "tokens": [int(t) for t in nodes["tokens"]], "replay_s": summary["replay_seconds"],
       "peak_rss_gb": rss("VmHWM:") / 1e9, "gflop": flops / 1e9, "gflops": flops / 1e9 / dt,
       "isa": os.environ.get("ACTDIFF_KERNELS_ISA", "auto")}
print("peak RSS sample at:\n" + peak["stack"], file=sys.stderr)
if prof:
    for key in ("cumulative", "tottime"):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats(key).print_stats(25)
        print(s.getvalue(), file=sys.stderr)
print(json.dumps(res))
"""


def run(wd: Path, label: str, cprofile: bool, isa: str | None, shared_noise: bool = False) -> dict:
    args = {"model_json": str(wd / "model.json"), "ref": str(wd / "ref.h5"), "eng": str(wd / "eng.h5"),
            "out": str(wd / f"stats-{label}"), "cprofile": cprofile, "bench": str(ROOT / "bench"),
            "shared_noise": shared_noise,
            "variant": (wd / "variant.txt").read_text() if (wd / "variant.txt").exists() else "fp32"}  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if isa:
        env["ACTDIFF_KERNELS_ISA"] = isa
    p = subprocess.run([sys.executable, "-c", WORKER, json.dumps(args)], env=env, capture_output=True, text=True)
    (wd / f"stats-{label}.log").write_text(p.stderr)
    if p.returncode != 0:
        sys.exit(f"compute_shard_stats failed (log {wd}/stats-{label}.log):\n{p.stderr[-3000:]}")
    res = {"label": label, **json.loads(p.stdout.strip().splitlines()[-1])}
    print(json.dumps(res))
    return res


def same(wd: Path, a: str, b: str, rtol: float) -> bool:
    """Every shard table of run ``a`` against run ``b``: columns equal (NaN equal to NaN), the float64-derived
    nodes columns within ``rtol`` relative."""
    import numpy as np
    import pyarrow.parquet as pq

    ok = True
    for f in sorted(p for p in (wd / f"stats-{a}").glob("*.parquet") if p.stem != "reference_noise"):
        ta, tb = pq.read_table(f).to_pandas(), pq.read_table(wd / f"stats-{b}" / f.name).to_pandas()
        if list(ta.columns) != list(tb.columns) or len(ta) != len(tb):
            print(f"{f.name}: shape or columns differ ({ta.shape} vs {tb.shape})")
            ok = False
            continue
        for c in ta.columns:
            if f.stem == "search" and c == "seconds":
                continue  # wall-clock
            x, y = ta[c].to_numpy(), tb[c].to_numpy()
            if x.dtype.kind == "f" and f.stem == "nodes" and c in FLOAT64_COLUMNS:
                rel = np.abs(x - y) / np.maximum(np.abs(x), np.finfo(float).tiny)
                worst = float(np.nanmax(np.where(np.isnan(x) & np.isnan(y), 0.0, rel), initial=0.0))
                good = worst <= rtol
                print(f"{f.name}:{c}: max relative difference {worst:.3g}{'' if good else ' > ' + str(rtol)}")
            elif x.dtype.kind == "f":
                good = bool(np.array_equal(x, y, equal_nan=True))
            else:
                good = [repr(v) for v in x] == [repr(v) for v in y]
            if not good:
                print(f"{f.name}:{c}: DIFFERS")
                ok = False
    print("same" if ok else "DIFFERENT")
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--with-long", action="store_true", help="bench/pipeline.py's subset (two long-* prompts)")
    p.add_argument("--variant", default="fp32", help="the engine dump's variant, e.g. fp32+fault=gelu_tanh")
    r = sub.add_parser("run")
    r.add_argument("--workdir", type=Path, required=True)
    r.add_argument("--label", required=True)
    r.add_argument("--cprofile", action="store_true")
    r.add_argument("--isa", choices=("avx512", "avx2", "scalar"))
    r.add_argument(
        "--shared-noise",
        action="store_true",
        help="measure the reference noise table first (noise_s) and pass it, as the workflow does",
    )
    s = sub.add_parser("same")
    s.add_argument("--workdir", type=Path, required=True)
    s.add_argument("labels", nargs=2)
    s.add_argument("--rtol", type=float, default=1e-12)
    a = ap.parse_args()
    if a.cmd == "prepare":
        prepare(a.model, a.prompts, a.workdir, a.with_long, a.variant)
    elif a.cmd == "run":
        run(a.workdir, a.label, a.cprofile, a.isa, a.shared_noise)
    else:
        sys.exit(0 if same(a.workdir, *a.labels, a.rtol) else 1)


if __name__ == "__main__":
    main()
