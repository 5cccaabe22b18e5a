"""Benchmark the whole workflow end to end: the bundled corpus replicated to thousands of prompts on the
tiny model, and a subset on the full-size released config with random weights.

    .venv/bin/python bench/pipeline.py [--sizes 500,1000,2000] [--shard-size 250] [--fullsize-prompts 32]
                                       [--skip-fullsize] [--quick] [--out results/bench/pipeline.json]
                                       [--long-prompts N] [--fullsize-long-prompts N] [--no-peak]
                                       [--fullsize-growth 4,8,16,32]

Every run is a real ``snakemake --cores 2 --configfile <run>/config.yaml`` in a fresh directory
``results/bench/pipeline/<run>/`` (removed first, so every timing is real): one model, variant fp32, the
actdiff engine on the reference's ids, reference and engine jobs at 1 thread each (two shards run side by
side on 2 cores), temp() dumps (``keep_activations: false``), ``shard_size`` prompts per shard. The first
invocation builds everything up to the verdict and the weight parity; a second one renders the report
alone, so report rendering is timed on its own.

Prompt sheets: ``config/prompts/default.tsv`` (357 prompts) replicated: each row ``n // 357`` times plus
an evenly spaced subset of the rows for the remainder, so every size has the same mix of prompts; copy k
of a row has ``prompt_id`` + ``.r<k>`` (the id grammar allows letters, digits and ``. _ : -``); the other
columns and the text are copied byte for byte. The full-size subset is the first two ``long-*`` prompts
(truncated at 512 tokens, the memory peak) plus evenly spaced other rows (which may hold more of them).
``--fullsize-growth`` runs the full-size config once per size on evenly spaced rows without the long-* ones
(tokens then grow with the prompts), one shard each, and fits time, peak RSS and disk against the size, with
the largest corpus the machine finishes in an hour (bench/README.md, "Cost growth").

What is measured, per run (all from one run; the machine may be shared, so rates are noisy):

- per stage (tokenize, dump_reference, dump_engine, reference_noise, compute_stats), from each job's "job cost"
  log line (actdiff.workflow_support.job_cost_line: wall since the process started, CPU of it and of its
  children, peak RSS) and the rule logs ("tokenized N prompts ... in X s", "dumped
  N prompts ... in X s", "engine fp32: dumped N prompts in X s", "reference noise: N prompts x K nodes in X
  s", "stats: N prompts in X s"): steady-state
  rate = prompts / logged processing seconds (summed over shards), start-up = job wall - logged processing
  seconds (per job). The tokenize log's seconds include loading the reference tokenizer (transformers), so
  its steady rate is a lower bound and its start-up excludes that load;
- the per-prompt stages as one pipeline: 1 / (sum over the five stages of the steady seconds per prompt) is
  the rate of one shard on one core; x2 is the ideal for 2 cores running two shards side by side (what the
  workflow does with --cores 2 and 1-thread jobs); the measured 2-core rate of the per-prompt phase
  (prompts / (end of the last compute_stats - start of the first tokenize), from log timestamps) includes
  every start-up and scheduling gap; the end-to-end rate is prompts / wall of the whole snakemake run;
- peak RSS per rule: this script polls every 0.1 s the ``VmHWM`` of every job's processes (the rule's
  script and what it starts, e.g. the report's pandoc; VmHWM is the kernel's high-water mark of
  resident memory, so a peak between two polls is not missed, only growth in the last poll interval before
  exit is); a job's peak is the sum over its processes (exact for the one-process jobs, an upper bound
  otherwise). It also reads Snakemake's ``max_rss`` (sampled every 0.5 s for the first 30 s of a job, then
  every 30 s); the larger is reported, the maximum over the rule's jobs;
- HDF5 bytes per prompt: the dumps are temp() files, so this script records the size of each final
  ``activations/shard-*.h5`` while it exists (it is renamed into place complete and lives until its
  statistics are computed) and the peak bytes of dumps on disk at once; Parquet bytes: the stats and
  summary tables (and the tokens table) after the run;
- report rendering: wall of the second snakemake invocation, the render_report log span and peak RSS;
- scaling (tiny, the ``--sizes``): wall of the snakemake run, per-stage job seconds and per-rule peak RSS
  against the corpus size; a least-squares line (slope s/prompt, intercept, R^2), the marginal cost per
  prompt between consecutive sizes and time(largest)/time(smallest).

The floor (issue 19), per stage (tokenize, dump_reference, dump_engine, reference_noise, compute_stats, render)
and end to
end: prompts/s, FLOPs, achieved GFLOP/s, fraction of the fp32 peak, bytes moved, peak RSS.

- FLOPs come from the node graph (``Graph.node_flops``: multiply-add = 2, the top-k experts each token uses,
  real tokens only, never the padding) over the run's own token counts (the tokens tables): one forward each
  for the two dumps; reference_noise (:func:`noise_flops`) three float64 passes (the fp32 noise, the sum-op
  envelope counted at the sum ops' FLOPs, and the fp32 propagated budgets), once per shard whatever the number
  of sides; compute_stats (:func:`stats_flops`) two fp32 replays and the forced-routing MoE replay (the fp32
  run takes its propagated budgets from reference_noise); about 7 forwards in all; tokenize and render 0.
  Bytes (``Graph.bytes_moved``): weights read once per batch, as the dumps batch (:func:`dump_bytes`), every
  node's output written once; reference_noise and
  compute_stats: the dumps they read and their passes' traffic per prompt (:func:`noise_bytes`,
  :func:`stats_bytes`).
- The peak is measured in the same run, before and after the runs (bench/peak.py: FMA chains compiled with
  gcc -O2 -march=native per ISA, at 1 and N threads, numpy's sgemm beside them; the best repeat of either
  measurement). A per-prompt stage's GFLOP/s is its FLOPs over its jobs' summed steady seconds (they are
  1-thread jobs) against the 1-core peak; render's is over its snakemake invocation; end to end is all the
  FLOPs over the wall of both snakemake invocations against the machine's peak (N x the 1-core peak), and
  ``prompts_per_s_at_peak`` is the rate the FLOPs alone would allow.
- ``--long-prompts N`` / ``--fullsize-long-prompts N`` add a run on N long prompts (:func:`write_long_sheet`:
  bundled rows joined up to 480-512 tokens, none truncated), on the tiny model / the full-size config.

Targets (reported as information, never asserted): the per-prompt stages of one (model, variant) at >= 50
prompts/s in steady state on 2 cores on the tiny model; peak RSS of every rule < 4 GB at full size; no
rule's peak RSS grows with the corpus size (growth from the smallest to the largest size < max(50 MB,
10 %)).

Writes results/bench/pipeline.json and results/bench/pipeline.md (the markdown table, also printed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

for _var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
    os.environ.pop(_var, None)
os.environ["OPENBLAS_NUM_THREADS"] = "1"

import numpy as np  # noqa: E402
import psutil  # noqa: E402

from actdiff import sysinfo  # noqa: E402
from actdiff.layout import REFERENCE_SIDE, REFERENCE_VARIANT, Layout  # noqa: E402
from actdiff.workflow_support import parse_job_cost  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "config/prompts/default.tsv"
TINY_DIR = ROOT / "resources/models/tiny-nomic-moe"
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
VARIANT = "fp32"
SIDE = "actdiff"
STAGES = ("tokenize", "dump_reference", "dump_engine", "reference_noise", "compute_stats")
MB, GB = 1e6, 1e9
RSS_TARGET_BYTES = 4 * GB
RATE_TARGET = 50.0
POLL_S = 0.1

LOG_TS = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
LOG_DONE = {
    "tokenize": re.compile(r"tokenized (\d+) prompts .* in ([\d.]+) s \("),
    # actdiff.sides.dump logs every side the same way: "<side> <variant>: dumped N prompts, T tokens, K nodes ..."
    "dump_reference": re.compile(r"reference \S+: dumped (\d+) prompts, \d+ tokens, .* in ([\d.]+) s \("),
    "dump_engine": re.compile(r"actdiff \S+: dumped (\d+) prompts, \d+ tokens, .* in ([\d.]+) s \("),
    "reference_noise": re.compile(
        r"reference noise(?: and \w+ propagated budgets)?: (\d+) prompts x \d+ nodes in ([\d.]+) s"
    ),
    "compute_stats": re.compile(r"stats: (\d+) prompts in ([\d.]+) s \("),
}
SCRIPT_RE = re.compile(r"\.snakemake/scripts/tmp[^/\s]*?\.(\w+)\.py")


# ----------------------------------------------------------------------------- helpers
def cpu_info() -> dict:
    c = sysinfo.cpu_info()
    return {"model": c["model"], "mhz_nominal": c["mhz"], "avx512f": c["avx512f"], "cores": c["cores"]}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("actdiff", "snakemake", "numpy", "pandas", "pyarrow", "h5py", "torch", "transformers", "psutil"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def git_info() -> dict:
    def git(*a):
        r = subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    status = git("status", "--porcelain")
    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty_files": None if status is None else len([x for x in status.splitlines() if x.strip()]),
    }


def fmt_rate(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else (f"{x:.0f}" if x >= 100 else f"{x:.1f}")


def fit_line(x: list[float], y: list[float]) -> dict:
    """Least squares y = a + b x; slope, intercept, R^2."""
    xa, ya = np.asarray(x, float), np.asarray(y, float)
    if len(xa) < 2:
        return {"slope": None, "intercept": None, "r2": None}
    b, a = np.polyfit(xa, ya, 1)
    pred = a + b * xa
    ss_res = float(((ya - pred) ** 2).sum())
    ss_tot = float(((ya - ya.mean()) ** 2).sum())
    return {"slope": float(b), "intercept": float(a), "r2": 1 - ss_res / ss_tot if ss_tot > 0 else 1.0}


# ----------------------------------------------------------------------------- prompt sheets and configs
def corpus_lines() -> tuple[str, list[tuple[str, str]]]:
    """Header and (prompt_id, rest of the raw line) of the bundled corpus; raw, so escapes stay as they are."""
    lines = CORPUS.read_text(encoding="utf-8").split("\n")
    header, rows = lines[0], []
    for line in lines[1:]:
        if not line.strip():
            continue
        pid, _, rest = line.partition("\t")
        rows.append((pid, rest))
    return header, rows


def evenly_spaced(n_rows: int, k: int) -> list[int]:
    return [i * n_rows // k for i in range(k)]


def write_replicated_sheet(n: int, path: Path) -> int:
    """n prompts: every corpus row n // len times, plus an evenly spaced subset for the remainder."""
    header, rows = corpus_lines()
    full, rem = divmod(n, len(rows))
    out = [header]
    for k in range(full):
        out += [f"{pid}.r{k}\t{rest}" for pid, rest in rows]
    out += [f"{rows[i][0]}.r{full}\t{rows[i][1]}" for i in evenly_spaced(len(rows), rem)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return len(out) - 1


def write_subset_sheet(n: int, path: Path) -> list[str]:
    """n prompts of the corpus: the first two long-* prompts (512 tokens after truncation) + evenly spaced others."""
    header, rows = corpus_lines()
    longs = [i for i, (pid, _) in enumerate(rows) if pid.startswith("long-")][: min(2, n)]
    others = [i for i in range(len(rows)) if i not in longs]
    pick = sorted(longs + [others[i] for i in evenly_spaced(len(others), n - len(longs))])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header] + [f"{rows[i][0]}\t{rows[i][1]}" for i in pick]) + "\n", encoding="utf-8")
    return [rows[i][0] for i in pick]


def write_uniform_sheet(n: int, path: Path) -> list[str]:
    """n evenly spaced prompts of the corpus, the long-* rows left out (512 tokens each after truncation: one of
    them dominates a small subset), so the token count grows in proportion to the prompts, as the growth fit of
    ``--fullsize-growth`` assumes."""
    header, rows = corpus_lines()
    short = [r for r in rows if not r[0].startswith("long-")]
    pick = [short[i] for i in evenly_spaced(len(short), n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header] + [f"{pid}\t{rest}" for pid, rest in pick]) + "\n", encoding="utf-8")
    return [pid for pid, _ in pick]


LONG_PREFIX = "longcat-"


def write_long_sheet(n: int, path: Path, max_tokens: int = 512, min_tokens: int = 480) -> list[int]:
    """n long prompts made deterministically of the bundled corpus: prompt i starts at row i * rows // n (the
    long-* rows left out: they exceed 512 tokens alone) and appends the following rows, joined by a space, as
    long as the prompt stays within ``max_tokens`` tokens (the tiny model's tokenizer, which the full-size
    random model shares; special tokens included), until it has ``min_tokens``. Nothing is truncated. The
    raw escaped texts are joined, so every escape stays as it was. Returns the prompts' token counts."""
    from actdiff.engine.tokenizer import EngineTokenizer
    from actdiff.prompts import decode_text

    tok = EngineTokenizer.from_file(TINY_DIR / "tokenizer.json")
    header, rows = corpus_lines()
    cols = header.split("\t")
    if "text" not in cols:
        raise ValueError(f"{CORPUS}: no 'text' column in the header {cols}; the long corpus joins that column")
    at = cols.index("text") - 1  # rest = the line after prompt_id
    texts = [rest.split("\t")[at] for pid, rest in rows if not pid.startswith("long-")]
    texts = [t for t in texts if t.strip()]
    out, counts = [header], []
    for i in range(n):
        start, text, length = i * len(texts) // n, "", 0
        for j in range(len(texts)):
            cand = (text + " " if text else "") + texts[(start + j) % len(texts)]
            m = tok.encode(decode_text(cand))[1]
            if m <= max_tokens:  # a row that would overflow is skipped, the next one tried
                text, length = cand, m
            if length >= min_tokens:
                break
        out.append(f"{LONG_PREFIX}{i:03d}\tlong-concat\tmixed\t{text}")
        counts.append(length)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return counts


def write_config(run_dir: Path, sheet: Path, model: str, source: dict, batch_size: int, shard_size: int) -> Path:
    cfg = {
        "prompts": str(sheet.relative_to(ROOT)),
        "results": str(run_dir.relative_to(ROOT)),
        "shard_size": shard_size,
        "models": {model: {"source": source, "max_length": 512, "batch_size": batch_size, "variants": [VARIANT]}},
        "reference": {"impl": "actdiff", "threads": 1},
        "variants": [VARIANT],
        "engines": [SIDE],
        "engine_ids": "reference",
        "engine_threads": 1,
        "keep_activations": False,
        "activation_compression": "none",
    }
    path = run_dir / "config.yaml"
    path.write_text(json.dumps(cfg, indent=1) + "\n", encoding="utf-8")  # JSON is YAML
    return path


# ----------------------------------------------------------------------------- monitoring a snakemake run
class Monitor(threading.Thread):
    """Poll the snakemake process tree: VmHWM/VmRSS of every rule job (its script process and whatever that
    starts, e.g. the report's pandoc), and the HDF5 dumps."""

    def __init__(self, root_pid: int, h5_dirs: list[Path]):
        super().__init__(daemon=True)
        self.root_pid, self.h5_dirs = root_pid, h5_dirs
        self.stop_evt = threading.Event()
        self.procs: dict[tuple[int, float], dict] = {}
        self.h5_final: dict[str, int] = {}  # final dump path -> largest size seen
        self.peak_h5_bytes = 0  # every file in the activation dirs (final and in progress)
        self.peak_jobs_rss = 0  # sum of VmRSS over the running jobs
        self.samples = 0

    def run(self) -> None:
        while not self.stop_evt.is_set():
            self.sample()
            self.stop_evt.wait(POLL_S)
        self.sample()

    def sample(self) -> None:
        self.samples += 1
        try:
            kids = psutil.Process(self.root_pid).children(recursive=True)
        except psutil.Error:
            kids = []
        total_rss = 0
        for p in kids:
            try:
                key = (p.pid, p.create_time())
                info = self.procs.get(key)
                if info is None:
                    info = {"rule": None, "job": None, "hwm": 0, "first": time.time()}
                    for anc in p.parents():  # a descendant of a job's script belongs to that job
                        a = self.procs.get((anc.pid, anc.create_time()))
                        if a is not None and a["job"] is not None:
                            info["rule"], info["job"] = a["rule"], a["job"]
                            break
                    else:
                        m = SCRIPT_RE.search(" ".join(p.cmdline()))
                        if m:
                            info["rule"], info["job"] = m.group(1), key
                    self.procs[key] = info
                if info["rule"] is None:
                    continue
                st = Path(f"/proc/{p.pid}/status").read_text()
            except (psutil.Error, OSError):
                continue
            vals = {}
            for line in st.splitlines():
                k, _, v = line.partition(":")
                if k in ("VmHWM", "VmRSS"):
                    vals[k] = int(v.split()[0]) * 1024
            info["hwm"] = max(info["hwm"], vals.get("VmHWM", 0))
            info["last"] = time.time()
            try:
                ct = p.cpu_times()
                info["cpu_s"] = ct.user + ct.system
            except psutil.Error:
                pass
            total_rss += vals.get("VmRSS", 0)
        self.peak_jobs_rss = max(self.peak_jobs_rss, total_rss)
        h5_total = 0
        for d in self.h5_dirs:
            try:
                entries = list(os.scandir(d))
            except OSError:
                continue
            for e in entries:
                try:
                    size = e.stat().st_size
                except OSError:
                    continue
                h5_total += size
                if re.fullmatch(r"shard-\d+\.h5", e.name):
                    self.h5_final[e.path] = max(self.h5_final.get(e.path, 0), size)
        self.peak_h5_bytes = max(self.peak_h5_bytes, h5_total)

    def per_rule(self) -> dict:
        """Per rule: jobs, and per job the sum of its processes' VmHWM (exact for a one-process job, an upper
        bound when the job runs several processes whose peaks need not coincide) and CPU seconds."""
        jobs: dict = {}
        for info in self.procs.values():
            if info["job"] is None or not info["hwm"]:
                continue
            j = jobs.setdefault(info["job"], {"rule": info["rule"], "hwm": 0, "cpu_s": 0.0, "processes": 0})
            j["hwm"] += info["hwm"]
            j["cpu_s"] += info.get("cpu_s", 0.0)
            j["processes"] += 1
        out: dict = {}
        for j in jobs.values():
            r = out.setdefault(
                j["rule"],
                {"jobs": 0, "processes": 0, "peak_vmhwm_bytes": 0, "vmhwm_bytes_per_job": [], "cpu_s_polled": 0.0},
            )
            r["jobs"] += 1
            r["processes"] += j["processes"]
            r["cpu_s_polled"] += j["cpu_s"]
            r["peak_vmhwm_bytes"] = max(r["peak_vmhwm_bytes"], j["hwm"])
            r["vmhwm_bytes_per_job"].append(j["hwm"])
        for r in out.values():
            r["vmhwm_bytes_per_job"].sort()
            r["median_vmhwm_bytes"] = float(np.median(r["vmhwm_bytes_per_job"]))
        return out


def run_snakemake(config: Path, targets: list[str], log_path: Path, h5_dirs: list[Path]) -> dict:
    # targets first: --configfile takes several values
    cmd = [SNAKEMAKE, *targets, "--cores", "2", "--configfile", str(config.relative_to(ROOT))]
    t0 = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as logf:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT)
        mon = Monitor(p.pid, h5_dirs)
        mon.start()
        rc = p.wait()
        wall = time.perf_counter() - t0
        mon.stop_evt.set()
        mon.join()
    if rc != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace")[-4000:]
        raise RuntimeError(f"snakemake failed (exit {rc}): {' '.join(cmd)}\n{tail}")
    return {
        "cmd": " ".join(cmd),
        "wall_s": wall,
        "rss_by_rule": mon.per_rule(),
        "peak_jobs_rss_bytes": mon.peak_jobs_rss,
        "h5_final_sizes": mon.h5_final,
        "peak_h5_on_disk_bytes": mon.peak_h5_bytes,
        "monitor_samples": mon.samples,
    }


# ----------------------------------------------------------------------------- tokenize without the tokenizer load
TOKENIZE_CHILD = r"""
import json, logging, sys, time
logging.disable(logging.CRITICAL)
from pathlib import Path
import pandas as pd
import actdiff.token_shards as T
from actdiff.engine.tokenizer import EngineTokenizer
model_json, prompts, out = sys.argv[1:4]
max_length, repeats = int(sys.argv[4]), int(sys.argv[5])
info = json.loads(Path(model_json).read_text())
d = info["dir"]
df = pd.read_parquet(prompts)
et = EngineTokenizer.from_file(Path(d) / "tokenizer.json")
t0 = time.perf_counter()
tok = T.load_reference_tokenizer(d)  # cold: imports transformers, as the rule's job does
first = time.perf_counter() - t0
load, work = [], []
for _ in range(repeats):
    t0 = time.perf_counter()
    T.load_reference_tokenizer(d)
    load.append(time.perf_counter() - t0)
T.load_reference_tokenizer = lambda _d: tok  # tokenize_shard with the tokenizer already loaded
for _ in range(repeats):
    t0 = time.perf_counter()
    T.tokenize_shard(df, d, max_length, out, model_name=info["name"], engine_tokenizer=et)
    work.append(time.perf_counter() - t0)
print(json.dumps({"prompts": len(df), "first_load_incl_import_s": first, "load_s": load, "tokenize_shard_s": work}))
"""


def tokenize_breakdown(R: Path, model: str, repeats: int = 3) -> dict:
    """The tokenize stage's work without loading the reference tokenizer, on shard 0 of a finished run, in a
    fresh process: ``tokenize_shard`` (both tokenizers, parity columns, Parquet write) with the reference
    tokenizer already loaded, median of ``repeats``; and the tokenizer load itself (first one cold, which
    imports transformers, then warm)."""
    out = R / "bench-tokenize-probe.parquet"
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            TOKENIZE_CHILD,
            Layout(str(R)).model_json(model),
            Layout(str(R)).prompts(0),
            str(out),
            "512",
            str(repeats),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    out.unlink(missing_ok=True)
    if r.returncode != 0:
        raise RuntimeError(f"tokenize probe failed:\n{r.stderr[-3000:]}")
    m = json.loads(r.stdout.strip().splitlines()[-1])
    work = float(np.median(m["tokenize_shard_s"]))
    m.update(
        {
            "load_s_median": float(np.median(m["load_s"])),
            "tokenize_shard_s_median": work,
            "steady_s_per_prompt": work / m["prompts"],
            "steady_prompts_per_s": m["prompts"] / work,
        }
    )
    return m


# ----------------------------------------------------------------------------- reading a finished run
def log_times(path: Path) -> tuple[datetime | None, datetime | None]:
    first = last = None
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        m = LOG_TS.match(line)
        if m:
            t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
            first = first or t
            last = t
    return first, last


def log_span(path: Path) -> float | None:
    first, last = log_times(path)
    return (last - first).total_seconds() if first and last else None


def stage_jobs(R: Path, model: str, stage: str) -> list[dict]:
    """One row per shard job of a per-prompt stage: prompts, logged seconds, job wall, RSS, CPU."""
    L = Layout(str(R))
    sub = {  # the rule's wildcards before the shard (workflow/rules/*.smk)
        "tokenize": (model,),
        "dump_reference": (model,),
        "dump_engine": (model, VARIANT),
        "reference_noise": (model,),
        "compute_stats": (model, SIDE, VARIANT),
    }[stage]
    jobs = []
    for log in sorted(Path(L.log(stage, *sub, "*")).parent.glob("shard-*.log")):
        text = log.read_text(encoding="utf-8", errors="replace")
        m = LOG_DONE[stage].search(text)
        if not m:
            raise RuntimeError(f"{log}: no completion line matching {LOG_DONE[stage].pattern!r}")
        cost = parse_job_cost(text)  # the job's own figures (actdiff.workflow_support.job_cost_line)
        if cost is None:
            raise RuntimeError(f"{log}: no job cost line (the job did not finish)")
        first, last = log_times(log)
        n, sec = int(m.group(1)), float(m.group(2))
        jobs.append(
            {
                "shard": int(log.stem.split("-")[1]),
                "prompts": n,
                "log_seconds": sec,
                "job_wall_s": cost["wall_s"],
                "startup_s": cost["wall_s"] - sec,
                "max_rss_bytes_job": max(cost["max_rss_mb"], cost["children_max_rss_mb"]) * 2**20,
                "cpu_time_s": cost["cpu_s"],
                "log_first": first.isoformat() if first else None,
                "log_last": last.isoformat() if last else None,
            }
        )
    return jobs


def dir_bytes(d: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in d.glob(pattern) if p.is_file())


def analyse_run(R: Path, model: str, n_prompts: int, sm: dict, report: dict, tok_probe: dict | None) -> dict:
    run: dict = {"results_dir": str(R.relative_to(ROOT)), "prompts": n_prompts}
    # tokens (from the tokens tables)
    import pyarrow.parquet as pq

    tok_files = sorted(Path(Layout(str(R)).tokens(model, 0)).parent.glob("shard-*.parquet"))
    lengths = [len(x) for f in tok_files for x in pq.read_table(f, columns=["reference_ids"]).column(0).to_pylist()]
    run["shards"] = len(tok_files)
    run["tokens"] = int(sum(lengths))
    run["tokens_per_prompt_mean"] = float(np.mean(lengths)) if lengths else None
    run["snakemake_wall_s"] = sm["wall_s"]
    run["end_to_end_prompts_per_s"] = n_prompts / sm["wall_s"]
    run["peak_jobs_rss_bytes"] = sm["peak_jobs_rss_bytes"]
    run["peak_h5_on_disk_bytes"] = sm["peak_h5_on_disk_bytes"]
    rss = sm["rss_by_rule"]

    stages: dict = {}
    starts, ends = [], []
    for st in STAGES:
        jobs = stage_jobs(R, model, st)
        n = sum(j["prompts"] for j in jobs)
        sec = sum(j["log_seconds"] for j in jobs)
        wall = sum(j["job_wall_s"] for j in jobs)
        job_rss = max((j["max_rss_bytes_job"] or 0) for j in jobs)
        hwm = rss.get(st, {}).get("peak_vmhwm_bytes", 0)
        per_job = rss.get(st, {}).get("vmhwm_bytes_per_job") or []
        if len(per_job) != len(jobs):  # a job the poller missed: fall back to the jobs' own peak (job cost line)
            per_job = [j["max_rss_bytes_job"] or 0 for j in jobs]
        cpu = sum(j["cpu_time_s"] or 0 for j in jobs)
        stages[st] = {
            "jobs": len(jobs),
            "prompts": n,
            "log_seconds_total": sec,
            "job_wall_s_total": wall,
            "steady_prompts_per_s": n / sec if sec > 0 else float("inf"),
            "steady_s_per_prompt": sec / n,
            "startup_s_median": float(np.median([j["startup_s"] for j in jobs])),
            "startup_s_max": max(j["startup_s"] for j in jobs),
            "job_prompts_per_s_incl_startup": n / wall,
            "peak_rss_bytes": max(job_rss, hwm),
            "peak_rss_bytes_vmhwm_polled": hwm,
            "median_job_peak_rss_bytes": float(np.median(per_job)),
            "peak_rss_bytes_job_cost_line": job_rss,
            "cpu_time_over_wall": cpu / wall if wall > 0 else None,
            "per_job": jobs,
        }
        if st == "tokenize":
            starts += [datetime.fromisoformat(j["log_first"]) for j in jobs if j["log_first"]]
        if st == "compute_stats":
            ends += [datetime.fromisoformat(j["log_last"]) for j in jobs if j["log_last"]]
    run["stages"] = stages
    s_logs = sum(stages[s]["steady_s_per_prompt"] for s in STAGES)
    s_per_prompt = s_logs
    if tok_probe:
        run["tokenize_breakdown"] = tok_probe
        stages["tokenize"]["steady_prompts_per_s_excl_tokenizer_load"] = tok_probe["steady_prompts_per_s"]
        s_per_prompt = s_logs - stages["tokenize"]["steady_s_per_prompt"] + tok_probe["steady_s_per_prompt"]
    phase = (max(ends) - min(starts)).total_seconds() if starts and ends else None
    run["per_prompt_stages"] = {
        "steady_s_per_prompt_sum": s_per_prompt,
        "steady_prompts_per_s_1core": 1 / s_per_prompt,
        "steady_prompts_per_s_2cores_ideal": 2 / s_per_prompt,
        "steady_prompts_per_s_2cores_ideal_tokenize_incl_load": 2 / s_logs,
        "phase_wall_s": phase,
        "measured_prompts_per_s_2cores_incl_startup": (n_prompts / phase) if phase else None,
        "note": "1core: one shard through the four stages, steady state (log seconds; tokenize from the "
        "in-process breakdown without the tokenizer load when measured, the _tokenize_incl_load variant "
        "uses its log seconds); 2cores_ideal: x2, two 1-thread shards side by side; measured: prompts / "
        "(last compute_stats log line - first tokenize log line), includes start-ups and scheduling",
    }
    # the other rules: log span (script time after imports) and polled peak RSS
    other: dict = {}
    for rule, logs in (
        ("split_prompts", [Path(Layout(str(R)).log("split_prompts", "split_prompts"))]),
        ("resolve_model", [Path(Layout(str(R)).log("resolve_model", model))]),
        ("aggregate_stats", [Path(Layout(str(R)).log("aggregate_stats", model, SIDE, VARIANT))]),
        ("parity", [Path(Layout(str(R)).log("parity", model, VARIANT))]),
    ):
        spans = [log_span(p) for p in logs if p.is_file()]
        other[rule] = {
            "log_span_s": sum(s for s in spans if s is not None) if spans else None,
            "peak_rss_bytes": rss.get(rule, {}).get("peak_vmhwm_bytes"),
        }
    run["other_rules"] = other
    run["polled_rss_by_rule"] = rss
    # render_report, its own snakemake invocation
    rlog = Path(Layout(str(R)).log("render_report", model, SIDE, VARIANT))
    run["report"] = {
        "snakemake_wall_s": report["wall_s"],
        "log_span_s": log_span(rlog) if rlog.is_file() else None,
        "peak_rss_bytes": report["rss_by_rule"].get("render_report", {}).get("peak_vmhwm_bytes"),
        "html_bytes": (R / f"reports/{model}/{SIDE}/{VARIANT}.html").stat().st_size,
    }
    # peak RSS of every rule (max over jobs)
    peak = {st: stages[st]["peak_rss_bytes"] for st in STAGES}
    peak.update({r: v["peak_rss_bytes"] for r, v in other.items() if v["peak_rss_bytes"]})
    if run["report"]["peak_rss_bytes"]:
        peak["render_report"] = run["report"]["peak_rss_bytes"]
    run["peak_rss_bytes_by_rule"] = peak
    # the typical job: median over shards for the per-shard rules (the max also reflects which shard drew
    # the most long prompts into one reference batch), the one job for the others
    run["typical_job_peak_rss_bytes_by_rule"] = {
        r: (stages[r]["median_job_peak_rss_bytes"] if r in stages else v) for r, v in peak.items()
    }
    # HDF5 sizes (seen while they existed), Parquet sizes (after the run)
    shard_prompts = {j["shard"]: j["prompts"] for j in stages["tokenize"]["per_job"]}
    shard_tokens = {}
    for f in tok_files:
        shard_tokens[int(f.stem.split("-")[1])] = sum(
            len(x) for x in pq.read_table(f, columns=["reference_ids"]).column(0).to_pylist()
        )
    h5: dict = {}
    L = Layout(str(R))
    for side, run_id in (("reference", (model, REFERENCE_SIDE, REFERENCE_VARIANT)), ("engine", (model, SIDE, VARIANT))):
        folder = Path(L.activations(*run_id, 0)).parent
        seen = {L.shard_of(p): s for p, s in sm["h5_final_sizes"].items() if Path(p).parent == folder}
        n = sum(shard_prompts[s] for s in seen)
        t = sum(shard_tokens[s] for s in seen)
        tot = sum(seen.values())
        h5[side] = {
            "shards_seen": len(seen),
            "shards": len(shard_prompts),
            "bytes_total_seen": tot,
            "bytes_per_prompt": tot / n if n else None,
            "bytes_per_token": tot / t if t else None,
        }
    run["hdf5"] = h5
    run_dir = Path(L.run_dir(model, SIDE, VARIANT))
    stats_b = dir_bytes(run_dir / "stats", "shard-*/*.parquet")
    summ_b = dir_bytes(Path(L.verdict(model, SIDE, VARIANT)).parent, "*.parquet")
    summ_all = dir_bytes(Path(L.verdict(model, SIDE, VARIANT)).parent, "*")
    tok_b = dir_bytes(Path(L.tokens(model, 0)).parent, "*.parquet")
    run["parquet"] = {
        "stats_bytes": stats_b,
        "summary_parquet_bytes": summ_b,
        "summary_all_bytes_incl_json": summ_all,
        "tokens_bytes": tok_b,
        "stats_plus_summary_bytes_per_prompt": (stats_b + summ_b) / n_prompts,
        "stats_bytes_per_prompt": stats_b / n_prompts,
        "tokens_bytes_per_prompt": tok_b / n_prompts,
    }
    return run


# ----------------------------------------------------------------------------- the floor (issue 19)
FLOOR_STAGES = (*STAGES, "render")


def stats_flops(graph, tokens: int) -> dict[str, int]:
    """FLOPs compute_stats spends on one prompt, in parts of the model's forward (actdiff.compare): the side's
    node-by-node replay on the reference's inputs (local error) and on its own inputs (the replay check), both
    fp32; and each MoE block replayed with the reference's routing (forced_moe). The fp32 noise and, for this
    fp32 run, the propagated-budget forward in float64 are rule reference_noise's (:func:`noise_flops`; a prompt
    whose engine chose other experts than the shared simulation at a near tie is simulated here once more, not
    counted: the bench's fp32 engine routes as the reference)."""
    f = graph.flops(tokens)
    return {
        "fp32_replays": 2 * f,
        "forced_moe": sum(graph.node_flops(x, tokens) for b in graph.moe_blocks() for x in b.nodes()),
    }


def noise_flops(graph, tokens: int) -> int:
    """FLOPs reference_noise spends on one prompt, in float64: every node's spec op on the reference's inputs
    (the fp32 noise), the sum ops once more on squared inputs and weights (the sequential-sum envelope,
    budgets.SUM_OPS), and the fp32 propagated budgets' forward (actdiff.compare.refnoise). The float64 FLOPs
    are counted as FLOPs: the fraction of the fp32 peak does not discount them."""
    from actdiff.compare.budgets import SUM_OPS

    return 2 * graph.flops(tokens) + sum(graph.node_flops(n, tokens) for n in graph if n.op in SUM_OPS)


def dump_bytes(graph, lengths: list[int], batch_size: int) -> int:
    """Bytes one dump stage moves over a shard (prompts in shard order): the dumps form windows of at most
    batch_size x WINDOW_BATCHES prompts and 2 GiB of results (actdiff.batching.windows), sort each by length into
    batches, and read the weights once per batch (Graph.bytes_moved over the batch's tokens); every node's output
    of every prompt is written once."""
    from actdiff.batching import length_sorted_batches, window_tokens_for, windows

    if batch_size <= 1:
        return sum(graph.bytes_moved(T)["total"] for T in lengths)
    total = 0
    for w in windows(lengths, batch_size, window_tokens_for(graph)):
        chunk = [lengths[i] for i in w]
        for b in length_sorted_batches(chunk, batch_size):
            total += graph.bytes_moved(sum(chunk[i] for i in b))["weights"]
            total += sum(graph.bytes_moved(chunk[i])["activations"] for i in b)  # per prompt: its pooled rows
    return total


def stats_bytes(graph, T: int) -> int:
    """Bytes compute_stats moves for one prompt: both dumps read; two fp32 replays (weights + outputs)."""
    b32 = graph.bytes_moved(T)
    return 2 * b32["activations"] + 2 * b32["total"]


def noise_bytes(graph, T: int) -> int:
    """Bytes reference_noise moves for one prompt: the reference dump read; three float64 passes, the noise, the
    sum-op envelope (counted as a whole pass: the sum ops hold nearly all the weights) and the fp32 propagated
    budgets (weights at 8 bytes, outputs at twice their fp32 size)."""
    b32, b64 = graph.bytes_moved(T), graph.bytes_moved(T, weight_itemsize=8)
    return b32["activations"] + 3 * (b64["weights"] + 2 * b64["activations"])


def floor_counts(R: Path, model: str, batch_size: int) -> dict:
    """FLOPs and bytes of every stage of a finished run, from the node graph and the run's token counts
    (the tokens tables, shard by shard). Padding is not counted (Graph.node_flops)."""
    import pyarrow.parquet as pq

    from actdiff.nodes import graph_for_model_dir

    L = Layout(str(R))
    graph = graph_for_model_dir(json.loads(Path(L.model_json(model)).read_text(encoding="utf-8"))["dir"])
    shards = [
        [len(x) for x in pq.read_table(f, columns=["reference_ids"]).column(0).to_pylist()]
        for f in sorted(Path(L.tokens(model, 0)).parent.glob("shard-*.parquet"))
    ]
    lengths = [T for sh in shards for T in sh]
    fwd = sum(graph.flops(T) for T in lengths)
    st_parts: dict[str, int] = {}
    for T in lengths:
        for k, v in stats_flops(graph, T).items():
            st_parts[k] = st_parts.get(k, 0) + v
    dumps = sum(dump_bytes(graph, sh, batch_size) for sh in shards)
    noise = sum(noise_flops(graph, T) for T in lengths)
    flops = {"tokenize": 0, "dump_reference": fwd, "dump_engine": fwd, "reference_noise": noise,
             "compute_stats": sum(st_parts.values())}  # fmt: skip
    return {
        "prompts": len(lengths),
        "tokens": sum(lengths),
        "tokens_max": max(lengths, default=0),
        "batch_size": batch_size,
        "forward_flops": fwd,
        "forward_mflop_per_token": fwd / max(sum(lengths), 1) / 1e6,
        "stats_flops_parts": st_parts,
        "flops": flops | {"render": 0},
        "bytes": {
            "tokenize": None,  # token ids and text: small, not estimated
            "dump_reference": dumps,
            "dump_engine": dumps,
            "reference_noise": sum(noise_bytes(graph, T) for T in lengths),
            "compute_stats": sum(stats_bytes(graph, T) for T in lengths),
            "render": None,
        },
        "forward_weight_bytes_1_token": graph.bytes_moved(1)["weights"],
        "forward_weight_bytes_all": graph.bytes_moved(10**9)["weights"],
        "convention": "Graph.node_flops (multiply-add = 2, real tokens only); bytes: Graph.bytes_moved",
    }


def floor_table(run: dict, peak: dict) -> dict:
    """Per stage and end to end: prompts/s, GFLOP, achieved GFLOP/s, fraction of the measured peak, bytes,
    peak RSS. A per-prompt stage runs 1-thread jobs (two side by side on 2 cores): its GFLOP/s is FLOPs over
    the jobs' summed steady seconds (per core) against the 1-core peak; end to end is FLOPs over the wall of
    both snakemake invocations against the machine's peak (N cores x the 1-core peak)."""
    fc, n = run["floor"], run["prompts"]
    p1, pm = peak["peak_1thread_gflops"], peak["peak_machine_gflops"]
    rows: dict = {}
    for st in FLOOR_STAGES:
        cpu = None
        if st == "render":
            sec = wall = run["report"]["snakemake_wall_s"]
            rss = run["report"]["peak_rss_bytes"]
        else:
            sec, wall = run["stages"][st]["log_seconds_total"], run["stages"][st]["job_wall_s_total"]
            rss = run["stages"][st]["peak_rss_bytes"]
            cpu = sum(j["cpu_time_s"] or 0 for j in run["stages"][st]["per_job"]) or None
        fl, by = fc["flops"][st], fc["bytes"][st]
        rows[st] = {
            "prompts_per_s": n / sec if sec > 0 else None,
            "prompts_per_s_incl_startup": n / wall if wall > 0 else None,
            "gflop": fl / 1e9,
            "gflops": fl / sec / 1e9 if sec > 0 else None,
            "fraction_of_peak": fl / sec / 1e9 / p1 if sec > 0 else None,
            # per CPU second the jobs got (Snakemake's cpu_time, start-up included): on a shared machine the
            # wall-clock fraction also measures how much of a core the job was given
            "fraction_of_peak_per_cpu_s": fl / cpu / 1e9 / p1 if cpu else None,
            "bytes": by,
            "gb_per_s": by / sec / 1e9 if by is not None and sec > 0 else None,
            "peak_rss_bytes": rss,
            "peak_against": "1 core",
        }
    wall = run["snakemake_wall_s"] + run["report"]["snakemake_wall_s"]
    total = sum(fc["flops"].values())
    rows["end_to_end"] = {
        "prompts_per_s": n / wall,
        "gflop": total / 1e9,
        "gflops": total / wall / 1e9,
        "fraction_of_peak": total / wall / 1e9 / pm,
        "bytes": sum(b for b in fc["bytes"].values() if b),
        "gb_per_s": sum(b for b in fc["bytes"].values() if b) / wall / 1e9,
        "peak_rss_bytes": max(v for v in run["peak_rss_bytes_by_rule"].values() if v),
        "peak_rss_bytes_all_jobs_at_once": run["peak_jobs_rss_bytes"],
        "peak_against": f"machine ({peak['threads_all']} cores)",
        # the compute floor: every FLOP at the machine's peak
        "prompts_per_s_at_peak": n / (total / 1e9 / pm) if total else None,
        "forwards_per_prompt": total / fc["forward_flops"] if fc["forward_flops"] else None,
    }
    return rows


# ----------------------------------------------------------------------------- one run
def do_run(
    name: str,
    model: str,
    source: dict,
    sheet_writer,
    batch_size: int,
    shard_size: int,
    base: Path,
    tokenize_probe: bool = True,
) -> dict:
    run_dir = base / name
    if run_dir.exists():
        shutil.rmtree(run_dir)  # fresh results: every job runs, so the timings are real
    run_dir.mkdir(parents=True)
    sheet = run_dir / "prompts.tsv"
    n = sheet_writer(sheet)
    cfg = write_config(run_dir, sheet, model, source, batch_size, shard_size)
    R = run_dir
    rel = Layout(str(R.relative_to(ROOT)))
    targets = [rel.verdict(model, SIDE, VARIANT), rel.summary(model, SIDE, VARIANT, "weights")]
    L = Layout(str(R))
    sides = ((REFERENCE_SIDE, REFERENCE_VARIANT), (SIDE, VARIANT))
    h5_dirs = [Path(L.activations(model, *side, 0)).parent for side in sides]
    load0 = os.getloadavg()
    print(f"\n[{name}] {n} prompts, shard_size {shard_size}: snakemake up to the verdict ...", flush=True)
    sm = run_snakemake(cfg, targets, R / "snakemake-main.log", h5_dirs)
    print(f"[{name}]   {sm['wall_s']:.1f} s; rendering the report ...", flush=True)
    rep = run_snakemake(cfg, [rel.report(model, SIDE, VARIANT)], R / "snakemake-report.log", [])
    print(f"[{name}]   {rep['wall_s']:.1f} s", flush=True)
    probe = None
    if tokenize_probe:
        print(f"[{name}]   tokenize breakdown (tokenizer load vs tokenization) ...", flush=True)
        probe = tokenize_breakdown(R, model)
    res = analyse_run(R, model, n, sm, rep, probe)
    res["floor"] = floor_counts(R, model, batch_size)
    res["config"] = json.loads(cfg.read_text())
    res["loadavg_1_5_15_at_start"] = load0
    res["loadavg_1_5_15_at_end"] = os.getloadavg()
    res["snakemake_cmd"] = sm["cmd"]
    res["git"] = git_info()  # the tree may change between runs on a shared checkout
    ps = res["per_prompt_stages"]
    print(
        f"[{name}]   per-prompt stages steady {ps['steady_prompts_per_s_1core']:.1f} prompts/s on 1 core "
        f"(x2 = {ps['steady_prompts_per_s_2cores_ideal']:.1f} on 2 cores); "
        + ", ".join(f"{s} {fmt_rate(res['stages'][s]['steady_prompts_per_s'])}" for s in STAGES),
        flush=True,
    )
    return res


# ----------------------------------------------------------------------------- scaling, targets, tables
def scaling(runs: list[dict]) -> dict:
    runs = sorted(runs, key=lambda r: r["prompts"])
    x = [r["prompts"] for r in runs]
    out: dict = {"prompts": x, "shards": [r["shards"] for r in runs], "tokens": [r["tokens"] for r in runs]}
    series = {"snakemake_wall_s": [r["snakemake_wall_s"] for r in runs]}
    for st in STAGES:
        series[f"{st}_job_wall_s_total"] = [r["stages"][st]["job_wall_s_total"] for r in runs]
        series[f"{st}_log_seconds_total"] = [r["stages"][st]["log_seconds_total"] for r in runs]
    series["per_prompt_job_s_total"] = [sum(r["stages"][st]["job_wall_s_total"] for st in STAGES) for r in runs]
    # CPU seconds (Snakemake's cpu_time of every per-prompt job): what the work costs, nearly independent of
    # other processes taking the cores, so the linearity check that survives a shared machine
    series["per_prompt_job_cpu_s_total"] = [
        sum(j["cpu_time_s"] or 0 for st in STAGES for j in r["stages"][st]["per_job"]) for r in runs
    ]
    series["aggregate_stats_log_span_s"] = [r["other_rules"]["aggregate_stats"]["log_span_s"] or 0 for r in runs]
    series["report_snakemake_wall_s"] = [r["report"]["snakemake_wall_s"] for r in runs]
    fits = {}
    for k, y in series.items():
        f = fit_line(x, y)
        f["values"] = y
        f["ratio_largest_over_smallest"] = y[-1] / y[0] if y[0] else None
        f["marginal_s_per_prompt"] = [(y[i + 1] - y[i]) / (x[i + 1] - x[i]) for i in range(len(x) - 1)]
        fits[k] = f
    out["time"] = fits
    out["size_ratio_largest_over_smallest"] = x[-1] / x[0]
    rules = sorted({r for run in runs for r in run["peak_rss_bytes_by_rule"]})
    mem = {}
    for rule in rules:
        vals = [run["peak_rss_bytes_by_rule"].get(rule) for run in runs]
        typ = [run["typical_job_peak_rss_bytes_by_rule"].get(rule) for run in runs]
        ok = [v for v in vals if v]
        grow = (typ[-1] - typ[0]) if typ[0] and typ[-1] else None
        mem[rule] = {
            "per_shard_rule": rule in STAGES,
            "peak_rss_bytes_max_over_jobs": vals,
            "peak_rss_bytes_typical_job": typ,
            "growth_bytes_smallest_to_largest": grow,
            "growth_bytes_max_over_jobs": (vals[-1] - vals[0]) if vals[0] and vals[-1] else None,
            "grows": None if grow is None else bool(grow > max(50 * MB, 0.10 * typ[0])),
            "max_bytes": max(ok) if ok else None,
        }
    out["memory"] = mem
    return out


def floor_runs(res: dict) -> list[tuple[str, dict]]:
    """Every run that has a floor table, labelled: tiny bundled, tiny long, full size bundled, full size long."""
    out = [(f"tiny, {r['prompts']} bundled", r) for r in res.get("tiny", {}).values()]
    out += [(f"tiny, {r['prompts']} long", r) for r in res.get("tiny_long", {}).values()]
    if res.get("fullsize"):
        out.append((f"full size, {res['fullsize']['prompts']} bundled", res["fullsize"]))
    if res.get("fullsize_long"):
        out.append((f"full size, {res['fullsize_long']['prompts']} long", res["fullsize_long"]))
    return [(label, r) for label, r in out if r.get("floor_table")]


def _num(x, fmt: str = ".1f") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def _rate(x) -> str:
    # the full-size rates are well under 1 prompt/s: three significant digits, not one decimal
    return "-" if x is None or not math.isfinite(x) else (fmt_rate(x) if x >= 10 else f"{x:.3g}")


def floor_markdown(res: dict) -> list[str]:
    pk = res.get("peak")
    runs = floor_runs(res)
    if not pk or not runs:
        return []
    L = [
        f"fp32 peak measured in this run (bench/peak.py, {pk['best_isa']}, best of {pk['repeats']} short repeats, "
        f"before and after the runs): {pk['peak_1thread_gflops']:.1f} GFLOP/s on 1 core, machine "
        f"{pk['threads_all']} x that = {pk['peak_machine_gflops']:.1f}; {pk['threads_all']} threads at once "
        f"measured {pk['peak_all_threads_gflops']:.1f}; numpy sgemm (OpenBLAS, n={pk['sgemm_n']}) "
        + ", ".join(f"{g['threads']} thread(s) {g['gflops_best']:.1f}" for g in pk["sgemm"])
        + " GFLOP/s.",
        "",
        "| run | stage | prompts/s (steady) | prompts/s (with start-ups) | GFLOP | GFLOP/s | % of peak "
        "| % of peak per CPU-s | GB moved | GB/s | peak RSS, MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in runs:
        ft, fc = r["floor_table"], r["floor"]
        for st in (*FLOOR_STAGES, "end_to_end"):
            x = ft[st]
            pct = None if x["fraction_of_peak"] is None else 100 * x["fraction_of_peak"]
            cpu_pct = x.get("fraction_of_peak_per_cpu_s")
            cpu_pct = None if cpu_pct is None else 100 * cpu_pct
            gb = None if x["bytes"] is None else x["bytes"] / GB
            L.append(
                f"| {label} ({fc['tokens'] / fc['prompts']:.0f} tok/prompt) | {st.replace('_', ' ')} | "
                f"{_rate(x['prompts_per_s'])} | {_rate(x.get('prompts_per_s_incl_startup'))} | "
                f"{_num(x['gflop'], '.2f')} | {_num(x['gflops'])} | {_num(pct)} | {_num(cpu_pct)} | "
                f"{_num(gb, '.2f')} | "
                f"{_num(x['gb_per_s'], '.2f')} | {_num((x['peak_rss_bytes'] or 0) / MB, '.0f')} |"
            )
    L.append("")
    for label, r in runs:
        e, fc = r["floor_table"]["end_to_end"], r["floor"]
        L.append(
            f"- {label}: forward {fc['forward_mflop_per_token']:.1f} MFLOP/token; the run does "
            f"{e['forwards_per_prompt']:.1f} forwards' worth of FLOPs per prompt; at the machine's peak it would "
            f"run {_rate(e['prompts_per_s_at_peak'])} prompts/s, it ran {_rate(e['prompts_per_s'])} "
            f"({100 * e['fraction_of_peak']:.2f} % of peak end to end)."
        )
    return L + [""]


def growth_markdown(res: dict) -> list[str]:
    """The growth table (one row per corpus size) and its fitted lines."""
    g, runs = res.get("growth_fit"), sorted(res.get("growth", {}).values(), key=lambda r: r["prompts"])
    if not g:
        return []
    rules = sorted({k for r in runs for k in r["peak_rss_bytes_by_rule"]})
    L = ["", f"| full size, uniform corpus: prompts | tokens | wall to verdict + report, s | CPU of per-prompt jobs, s "
         f"| HDF5 on disk at once, GB | peak RSS GB: {' / '.join(rules)} |", "|---|---|---|---|---|---|"]  # fmt: skip
    cpu = g["time"]["per_prompt_job_cpu_s_total"]["values"]
    for r, w, c in zip(runs, g["wall_s"]["values"], cpu, strict=True):
        rss = " / ".join(_num((r["peak_rss_bytes_by_rule"].get(k) or 0) / GB, ".2f") for k in rules)
        L.append(f"| {r['prompts']} | {r['tokens']} | {w:.0f} | {c:.0f} | {r['peak_h5_on_disk_bytes'] / GB:.2f} "
                 f"| {rss} |")  # fmt: skip
    wp, wt, d = g["wall_s"]["per_prompt"], g["wall_s"]["per_token"], g["peak_h5_on_disk_bytes"]["per_prompt"]
    c = g["time"]["per_prompt_job_cpu_s_total"]
    hour = g["prompts_per_hour"]
    L += ["", f"Fitted lines (least squares over {len(runs)} sizes, {runs[0]['prompts']} to {runs[-1]['prompts']} "
          f"prompts): wall = {wp['intercept']:.0f} s + {wp['slope']:.2f} s/prompt (R^2 {wp['r2']:.3f}), or "
          f"{wt['intercept']:.0f} s + {wt['slope'] * 1e3:.1f} ms/token (R^2 {wt['r2']:.3f}); CPU of the per-prompt "
          f"jobs = {c['intercept']:.0f} s + {c['slope']:.2f} s/prompt (R^2 {c['r2']:.3f}); HDF5 on disk at once = "
          f"{d['intercept'] / GB:.2f} GB + {d['slope'] / MB:.1f} MB/prompt (one shard: every dump of the run exists "
          f"at once). One hour on this machine: about **{_num(hour, ',.0f')} prompts** of "
          f"{g['tokens_per_prompt_mean']:.0f} tokens on average."]  # fmt: skip
    return L


def markdown(res: dict) -> str:
    L: list[str] = floor_markdown(res) + growth_markdown(res)
    tiny = res.get("tiny", {})
    if tiny:
        big = max(tiny.values(), key=lambda r: r["prompts"])
        st = big["stages"]
        tb = big.get("tokenize_breakdown")
        rates = [fmt_rate(st[s]["steady_prompts_per_s"]) for s in STAGES]
        if tb:
            rates[0] = f"{rates[0]} ({fmt_rate(tb['steady_prompts_per_s'])} without the tokenizer load)"
        L.append(
            f"| tiny-nomic-moe fp32, {big['prompts']:,} prompts, {big['shards']} shards, 1-thread jobs, "
            "`--cores 2` | " + " | ".join(STAGES) + " |"
        )
        L.append("|---" * (len(STAGES) + 1) + "|")
        L.append("| steady state, prompts/s per job | " + " | ".join(rates) + " |")
        L.append(
            "| start-up per job, s (median) | " + " | ".join(f"{st[s]['startup_s_median']:.1f}" for s in STAGES) + " |"
        )
        L.append(
            "| peak RSS, MB (max over jobs) | "
            + " | ".join(f"{st[s]['peak_rss_bytes'] / MB:.0f}" for s in STAGES)
            + " |"
        )
        L.append(
            "| CPU time / wall of the jobs | "
            + " | ".join(f"{st[s]['cpu_time_over_wall'] or float('nan'):.2f}" for s in STAGES)
            + " |"
        )
        ps = big["per_prompt_stages"]
        rep = big["report"]
        L.append("")
        L.append(
            f"Per-prompt stages as one pipeline, steady state: {ps['steady_prompts_per_s_1core']:.1f} prompts/s "
            f"on one core, **{ps['steady_prompts_per_s_2cores_ideal']:.1f} prompts/s on 2 cores** (two shards side "
            f"by side, x2; {ps['steady_prompts_per_s_2cores_ideal_tokenize_incl_load']:.1f} counting the tokenizer "
            f"load as tokenize time); measured over the per-prompt phase, start-ups included: "
            f"{fmt_rate(ps['measured_prompts_per_s_2cores_incl_startup'])} prompts/s; whole snakemake run "
            f"{big['snakemake_wall_s']:.0f} s = {big['end_to_end_prompts_per_s']:.1f} prompts/s. Report render: "
            f"{rep['snakemake_wall_s']:.1f} s (its snakemake invocation; the rule's script "
            f"{rep['log_span_s'] or float('nan'):.1f} s), peak RSS {(rep['peak_rss_bytes'] or 0) / MB:.0f} MB. "
            f"HDF5 per prompt: reference {big['hdf5']['reference']['bytes_per_prompt'] / MB:.2f} MB, engine "
            f"{big['hdf5']['engine']['bytes_per_prompt'] / MB:.2f} MB ({big['tokens_per_prompt_mean']:.0f} "
            f"tokens/prompt; {big['hdf5']['reference']['bytes_per_token'] / 1e3:.0f} kB/token); at most "
            f"{big['peak_h5_on_disk_bytes'] / GB:.2f} GB of dumps on disk at once. Parquet: stats + summary "
            f"{big['parquet']['stats_plus_summary_bytes_per_prompt'] / 1e3:.1f} kB/prompt, tokens "
            f"{big['parquet']['tokens_bytes_per_prompt'] / 1e3:.2f} kB/prompt."
        )
        sc = res.get("scaling")
        if sc and len(sc["prompts"]) > 1:
            mem_rules = ("dump_reference", "compute_stats", "aggregate_stats", "render_report")
            L.append("")
            L.append(
                "| prompts | shards | snakemake wall, s | per-prompt stage jobs, s (sum) | their CPU, s | aggregate, s "
                "| report, s | "
                "peak RSS MB, typical job: " + " / ".join(mem_rules) + " |"
            )
            L.append("|---|---|---|---|---|---|---|---|")
            runs = sorted(tiny.values(), key=lambda r: r["prompts"])
            for r in runs:
                typ = r["typical_job_peak_rss_bytes_by_rule"]
                L.append(
                    f"| {r['prompts']:,} | {r['shards']} | {r['snakemake_wall_s']:.1f} | "
                    f"{sum(r['stages'][s]['job_wall_s_total'] for s in STAGES):.1f} | "
                    f"{sum(j['cpu_time_s'] or 0 for s in STAGES for j in r['stages'][s]['per_job']):.1f} | "
                    f"{r['other_rules']['aggregate_stats']['log_span_s'] or 0:.1f} | "
                    f"{r['report']['snakemake_wall_s']:.1f} | "
                    + " / ".join(f"{typ[m] / MB:.0f}" if typ.get(m) else "n/a" for m in mem_rules)
                    + " |"
                )
            w = sc["time"]["snakemake_wall_s"]
            p = sc["time"]["per_prompt_job_s_total"]
            c = sc["time"]["per_prompt_job_cpu_s_total"]
            grow = [k for k, v in sc["memory"].items() if v["grows"]]
            mx = max(sc["memory"].items(), key=lambda kv: abs(kv[1]["growth_bytes_smallest_to_largest"] or 0))
            L.append("")
            L.append(
                f"Scaling {sc['prompts'][0]:,} -> {sc['prompts'][-1]:,} prompts "
                f"({sc['size_ratio_largest_over_smallest']:.0f}x): wall = {w['intercept']:.1f} s + "
                f"{w['slope'] * 1e3:.1f} ms/prompt (R^2 {w['r2']:.4f}), time ratio "
                f"{w['ratio_largest_over_smallest']:.2f}x; marginal cost "
                + " / ".join(f"{m * 1e3:.1f}" for m in w["marginal_s_per_prompt"])
                + f" ms/prompt between consecutive sizes; per-prompt stage jobs {p['slope'] * 1e3:.1f} ms/prompt "
                f"(R^2 {p['r2']:.4f}, ratio {p['ratio_largest_over_smallest']:.2f}x); their CPU time "
                f"{c['slope'] * 1e3:.1f} ms/prompt (R^2 {c['r2']:.4f}, ratio {c['ratio_largest_over_smallest']:.2f}x, "
                "marginal "
                + " / ".join(f"{m * 1e3:.1f}" for m in c["marginal_s_per_prompt"])
                + f" ms/prompt). Rules whose typical peak RSS "
                f"grows with the corpus: {', '.join(grow) if grow else 'none'} (largest change: {mx[0]} "
                f"{mx[1]['growth_bytes_smallest_to_largest'] / MB:+.0f} MB)."
            )
    fs = res.get("fullsize")
    if fs:
        st = fs["stages"]
        rules = list(STAGES) + ["aggregate_stats", "parity", "render_report"]
        L.append("")
        L.append(f"| full size (475M params, random weights), {fs['prompts']} prompts | " + " | ".join(rules) + " |")
        L.append("|---" * (len(rules) + 1) + "|")
        L.append(
            "| steady state, prompts/s | "
            + " | ".join(fmt_rate(st[s]["steady_prompts_per_s"]) for s in STAGES)
            + " | - | - | - |"
        )
        L.append("| start-up, s | " + " | ".join(f"{st[s]['startup_s_median']:.1f}" for s in STAGES) + " | - | - | - |")
        L.append(
            "| peak RSS, GB | "
            + " | ".join(
                f"{fs['peak_rss_bytes_by_rule'][r] / GB:.2f}" if fs["peak_rss_bytes_by_rule"].get(r) else "n/a"
                for r in rules
            )
            + " |"
        )
        L.append("")
        L.append(
            f"Full size: {fs['tokens_per_prompt_mean']:.0f} tokens/prompt (incl. "
            f"{sum(p.startswith('long-') for p in fs.get('prompt_ids', []))} long prompts truncated at 512); HDF5 "
            f"{fs['hdf5']['reference']['bytes_per_prompt'] / MB:.0f} MB (reference) and "
            f"{fs['hdf5']['engine']['bytes_per_prompt'] / MB:.0f} MB (engine) per prompt = "
            f"{fs['hdf5']['reference']['bytes_per_token'] / MB:.2f} MB/token; whole snakemake run "
            f"{fs['snakemake_wall_s']:.0f} s, report {fs['report']['snakemake_wall_s']:.0f} s; all jobs running at "
            f"once peaked at {fs['peak_jobs_rss_bytes'] / GB:.1f} GB."
        )
    bb = res.get("fullsize_by_batch_size")
    if bb:
        first, last = min(bb, key=int), max(bb, key=int)
        L.append("")
        L.append(
            "| full size, steady prompts/s by the model's batch_size | " + " | ".join(STAGES) + " | snakemake wall, s |"
        )
        L.append("|---" * (len(STAGES) + 2) + "|")
        for bs, r in sorted(bb.items(), key=lambda kv: int(kv[0])):
            L.append(
                f"| batch_size {bs} | "
                + " | ".join(fmt_rate(r[st]) for st in STAGES)
                + f" | {r['snakemake_wall_s']:.0f} |"
            )
        a, b = bb[first]["dump_engine"], bb[last]["dump_engine"]
        if a and b:
            L.append("")
            L.append(
                f"dump_engine at full size: {a:.2f} -> {b:.2f} prompts/s (x{b / a:.2f}) "
                f"from batch_size {first} to {last}."
            )
    tg = res.get("targets", {})
    if tg:
        L.append("")
        L.append(
            "Targets: "
            + "; ".join(f"{k}: {'PASS' if v['pass'] else 'FAIL'}" for k, v in tg.items() if v.get("pass") is not None)
            + "."
        )
    return "\n".join(L) + "\n"


def targets(res: dict) -> dict:
    t: dict = {}
    tiny = res.get("tiny", {})
    if tiny:
        big = max(tiny.values(), key=lambda r: r["prompts"])
        v = big["per_prompt_stages"]["steady_prompts_per_s_2cores_ideal"]
        t["tiny per-prompt stages >= 50 prompts/s steady on 2 cores"] = {
            "value": v,
            "measured_2cores_incl_startup": big["per_prompt_stages"]["measured_prompts_per_s_2cores_incl_startup"],
            "pass": bool(v >= RATE_TARGET),
        }
    if res.get("fullsize"):
        peak = res["fullsize"]["peak_rss_bytes_by_rule"]
        worst = max(peak, key=peak.get)
        t["full-size peak RSS of every rule < 4 GB"] = {
            "value_bytes": peak[worst],
            "value_gib": peak[worst] / 2**30,
            "rule": worst,
            "criterion": "< 4e9 bytes (4 GB; 4 GiB = 4.29e9 bytes)",
            "pass": bool(peak[worst] < RSS_TARGET_BYTES),
        }
    weights = res.get("fullsize_weights_bytes")
    runs = [k for k in ("fullsize", "fullsize_long") if res.get(k)]
    if weights and runs:  # issue 19 item 2: every job of a full-size run, the bundled and the long prompts
        peak = {f"{k}: {rule}": b for k in runs for rule, b in res[k]["peak_rss_bytes_by_rule"].items()}
        worst = max(peak, key=peak.get)
        t["full-size peak RSS of every rule <= 1.5x the fp32 weights"] = {
            "value_bytes": peak[worst],
            "rule": worst,
            "weights_bytes": weights,
            "ratio": peak[worst] / weights,
            "criterion": "<= 1.5 x the checkpoint's bytes (model.safetensors, fp32)",
            "pass": bool(peak[worst] <= 1.5 * weights),
        }
    sc = res.get("scaling")
    if sc and len(sc["prompts"]) > 1:
        grows = {k: v["grows"] for k, v in sc["memory"].items() if v["grows"] is not None}
        t["no rule's peak RSS grows with corpus size"] = {
            "growing_rules": [k for k, g in grows.items() if g],
            "criterion": "peak RSS of the typical job (median over shards for per-shard rules, the one job "
            "otherwise) at the largest size - at the smallest > max(50 MB, 10 %) counts as growth",
            "pass": not any(grows.values()),
        }
        w = sc["time"]["snakemake_wall_s"]
        c = sc["time"]["per_prompt_job_cpu_s_total"]

        def linear(f):
            m = f["marginal_s_per_prompt"]
            if len(m) < 2:  # two sizes always lie on a line
                return None
            return bool(f["r2"] is not None and f["r2"] >= 0.99 and min(m) > 0 and max(m) <= 1.25 * min(m))

        crit = "R^2 >= 0.99 and the marginal costs between consecutive sizes within 25 % of each other"
        t["cost linear in corpus size (CPU seconds of the per-prompt jobs)"] = {
            "r2": c["r2"],
            "marginal_s_per_prompt": c["marginal_s_per_prompt"],
            "criterion": crit,
            "pass": linear(c),
        }
        t["wall time linear in corpus size (snakemake run; other load on the cores distorts it)"] = {
            "r2": w["r2"],
            "marginal_s_per_prompt": w["marginal_s_per_prompt"],
            "criterion": crit,
            "pass": linear(w),
        }
    return t


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--sizes", default=None, help="comma-separated corpus sizes (default 500,1000,2000; --quick 60,120)"
    )
    ap.add_argument("--shard-size", type=int, default=None, help="prompts per shard (default 250; --quick 30)")
    ap.add_argument("--fullsize-prompts", type=int, default=None, help="full-size subset (default 32; --quick 3)")
    ap.add_argument("--skip-fullsize", action="store_true")
    ap.add_argument(
        "--fullsize-growth",
        default=None,
        help="comma-separated corpus sizes (e.g. 4,8,16,32): the full-size config on uniform subsets, one run each, "
        "and the growth fit (time, memory, disk, prompts per hour)",
    )
    ap.add_argument("--skip-tiny", action="store_true", help="only the full-size runs")
    ap.add_argument(
        "--fullsize-batch-sizes",
        default="1,16",
        help="model batch_size of the full-size runs, one run each (default 1,16: dump stages before and after "
        "batching; 16 is what config/config.yaml uses)",
    )
    ap.add_argument(
        "--long-prompts",
        type=int,
        default=0,
        help="also run the tiny model on this many long prompts (bundled rows joined up to 480-512 tokens)",
    )
    ap.add_argument(
        "--fullsize-long-prompts", type=int, default=0, help="also run the full-size config on this many long prompts"
    )
    ap.add_argument("--peak-seconds", type=float, default=0.05, help="one repeat of the FMA peak (bench/peak.py)")
    ap.add_argument("--peak-repeats", type=int, default=20)
    ap.add_argument("--sgemm-n", type=int, default=2048, help="numpy sgemm size of the peak's cross-check")
    ap.add_argument("--no-peak", action="store_true", help="skip the peak measurement (no fraction of peak)")
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    ap.add_argument("--out", default="results/bench/pipeline.json")
    ap.add_argument("--workdir", default="results/bench/pipeline", help="run directories (removed and rebuilt)")
    ap.add_argument("--fullsize-dir", default="results/bench/fullsize-random")
    ap.add_argument(
        "--reanalyse",
        metavar="JSON",
        help="re-derive scaling, targets and the table from a saved pipeline.json (no runs); writes --out",
    )
    args = ap.parse_args()
    if args.reanalyse:
        res = json.loads((ROOT / args.reanalyse).read_text(encoding="utf-8"))
        res["reanalysed_utc"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        recount_floor(res)
        finish(res, ROOT / args.out)
        return
    sizes = [int(s) for s in (args.sizes or ("60,120" if args.quick else "500,1000,2000")).split(",")]
    shard_size = args.shard_size or (30 if args.quick else 250)
    n_full = args.fullsize_prompts or (3 if args.quick else 32)
    base = (ROOT / args.workdir).resolve()
    if not base.is_relative_to(ROOT):  # the runs' config files name their results folder relative to the repo
        sys.exit(f"--workdir {args.workdir}: must be a folder inside {ROOT} (e.g. results/bench/pipeline)")
    if not (TINY_DIR / "config.json").is_file():
        sys.exit(
            f"{TINY_DIR} is missing; generate it with\n"
            f"  cd {ROOT} && .venv/bin/snakemake --cores 2 resources/models/tiny-nomic-moe/config.json"
        )
    if os.getloadavg()[0] > 0.5:
        print(f"warning: load average {os.getloadavg()[0]:.2f} at start: other processes share the cores")

    res: dict = {
        "about": {
            "what": "the snakemake workflow end to end (tokenize, reference and engine dumps, statistics, "
            "aggregate, parity; report rendered by a second invocation), one model, variant fp32",
            "steady_state": "prompts / seconds logged by the stage around its per-prompt loop (after loading "
            "the model); start-up = the job's wall (its job cost line) - those seconds. The tokenize log's "
            "seconds include loading the reference tokenizer",
            "per_prompt_pipeline": "1core = 1 / sum over tokenize, dump_reference, dump_engine, reference_noise, "
            "compute_stats of "
            "steady s/prompt; 2cores_ideal = x2 (two 1-thread shards side by side); measured = prompts / per-"
            "prompt phase wall from log timestamps, start-ups included",
            "peak_rss": "max over the rule's jobs of max(sum of the job's processes' VmHWM polled every 0.1 s, "
            "Snakemake max_rss)",
            "hdf5": "size of each final temp() dump while it exists (polled every 0.1 s)",
            "units": "bytes; MB = 1e6, GB = 1e9 in the tables",
        },
        "cpu": cpu_info(),
        "versions": versions(),
        "git": git_info(),
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {
            "sizes": sizes,
            "shard_size": shard_size,
            "fullsize_prompts": None if args.skip_fullsize else n_full,
            "quick": args.quick,
            "snakemake": f"{SNAKEMAKE} <targets> --cores 2 --configfile <run>/config.yaml",
            "workdir": str(base.relative_to(ROOT)),
        },
        "loadavg_1_5_15_at_start": os.getloadavg(),
    }
    res["cpu"]["vector_flags"] = cpu_vector_flags()
    if not args.no_peak:
        measure_peak(args, res, "before the runs")

    tiny: dict = {}
    for n in [] if args.skip_tiny else sizes:
        name = f"tiny-n{n}"
        tiny[name] = do_run(
            name,
            "tiny-nomic-moe",
            {"generate": "tiny-nomic-moe", "seed": 0},
            lambda p, n=n: write_replicated_sheet(n, p),
            16,
            shard_size,
            base,
        )
    res["tiny"] = tiny
    if args.long_prompts and not args.skip_tiny:
        n = args.long_prompts
        res["tiny_long"] = {
            f"tiny-long-n{n}": do_run(
                f"tiny-long-n{n}",
                "tiny-nomic-moe",
                {"generate": "tiny-nomic-moe", "seed": 0},
                lambda p, n=n: len(write_long_sheet(n, p)),
                16,
                shard_size,
                base,
                tokenize_probe=False,
            )
        }

    if not args.skip_fullsize:
        run_fullsize(args, n_full, base, res)
    if args.fullsize_growth:
        run_growth(args, [int(s) for s in args.fullsize_growth.split(",")], base, res)

    if not args.no_peak:
        measure_peak(args, res, "after the runs")
    res["loadavg_1_5_15_at_end"] = os.getloadavg()
    finish(res, ROOT / args.out)


def run_fullsize(args, n_full: int, base: Path, res: dict) -> None:
    """The full-size subset once per batch size (``--fullsize-batch-sizes``, default 1 and 16: before and
    after the engine batched its dump like the reference); res["fullsize"] is the largest batch size's run."""
    from actdiff.models.fullsize import build_fullsize_random

    t0 = time.perf_counter()
    full_dir = build_fullsize_random(ROOT / args.fullsize_dir, seed=0, tokenizer_dir=TINY_DIR)
    res["fullsize_build_or_reuse_s"] = time.perf_counter() - t0
    res["fullsize_weights_bytes"] = (full_dir / "model.safetensors").stat().st_size
    by_batch: dict[str, dict] = {}
    for bs in [int(b) for b in args.fullsize_batch_sizes.split(",")]:
        picked: list[str] = []

        def subset(p: Path, picked=picked) -> int:
            picked[:] = write_subset_sheet(n_full, p)
            return len(picked)

        fs = do_run(
            f"fullsize-n{n_full}-b{bs}",
            "fullsize-random",
            {"path": str(full_dir)},
            subset,
            bs,
            max(n_full, 1),
            base,
            tokenize_probe=False,  # the tiny model's tokenizer, measured on the tiny runs
        )
        fs["prompt_ids"] = picked
        fs["batch_size"] = bs
        by_batch[str(bs)] = fs
    res["fullsize"] = by_batch[max(by_batch, key=int)]
    if args.fullsize_long_prompts:
        n, bs = args.fullsize_long_prompts, max(int(b) for b in by_batch)
        res["fullsize_long"] = do_run(
            f"fullsize-long-n{n}-b{bs}",
            "fullsize-random",
            {"path": str(full_dir)},
            lambda p: len(write_long_sheet(n, p)),
            bs,
            max(n, 1),
            base,
            tokenize_probe=False,
        )
        res["fullsize_long"]["batch_size"] = bs
    if len(by_batch) > 1:
        res["fullsize_by_batch_size"] = {
            bs: {st: r["stages"][st]["steady_prompts_per_s"] for st in STAGES}
            | {"snakemake_wall_s": r["snakemake_wall_s"]}
            for bs, r in by_batch.items()
        }


def run_growth(args, sizes: list[int], base: Path, res: dict) -> None:
    """The full-size config on uniform subsets of the corpus (write_uniform_sheet), one run per size, one shard
    each, the largest ``--fullsize-batch-sizes``: res["growth"] by size; :func:`growth` fits them."""
    from actdiff.models.fullsize import build_fullsize_random

    full_dir = build_fullsize_random(ROOT / args.fullsize_dir, seed=0, tokenizer_dir=TINY_DIR)
    bs = max(int(b) for b in args.fullsize_batch_sizes.split(","))
    runs = res.setdefault("growth", {})
    for n in sizes:
        sheet = lambda p, n=n: len(write_uniform_sheet(n, p))  # noqa: E731
        r = do_run(f"growth-n{n}-b{bs}", "fullsize-random", {"path": str(full_dir)}, sheet, bs, max(n, 1), base,
                   tokenize_probe=False)  # fmt: skip
        r["batch_size"] = bs
        runs[str(n)] = r


def growth(runs: list[dict]) -> dict:
    """How time, memory and disk grow with the corpus at full size: :func:`scaling` (a line per time series,
    peak RSS per rule), the whole run's wall (to the verdict, then the report) against prompts and tokens, the
    HDF5 bytes on disk at once, and the largest corpus one machine finishes in an hour by the wall-time line
    (prompts like these: the mean tokens per prompt is stated beside it)."""
    runs = sorted(runs, key=lambda r: r["prompts"])
    out = scaling(runs)
    x, tokens = [r["prompts"] for r in runs], [r["tokens"] for r in runs]
    wall = [r["snakemake_wall_s"] + r["report"]["snakemake_wall_s"] for r in runs]
    disk = [r["peak_h5_on_disk_bytes"] for r in runs]
    out["wall_s"] = {"values": wall, "per_prompt": fit_line(x, wall), "per_token": fit_line(tokens, wall)}
    out["peak_h5_on_disk_bytes"] = {"values": disk, "per_prompt": fit_line(x, disk)}
    fit = out["wall_s"]["per_prompt"]
    slope, icpt = fit["slope"], fit["intercept"]
    out["prompts_per_hour"] = (3600.0 - icpt) / slope if slope and slope > 0 and icpt < 3600 else None
    out["tokens_per_prompt_mean"] = sum(tokens) / max(sum(x), 1)
    return out


def floor_runs_all(res: dict) -> list[tuple[str, dict]]:
    """Every run with floor counts (FLOPs and bytes from the graph), whatever its table holds yet."""
    runs = [*res.get("tiny", {}).values(), *res.get("tiny_long", {}).values()]
    runs += [res[k] for k in ("fullsize", "fullsize_long") if res.get(k)]
    return [(r["results_dir"], r) for r in runs if r.get("floor")]


def recount_floor(res: dict) -> None:
    """Recompute every run's FLOPs and bytes (floor_counts) from its results directory where it still exists
    (the cost model may have changed since the run; the timings stay as measured)."""
    runs = [*res.get("tiny", {}).values(), *res.get("tiny_long", {}).values()]
    runs += [res[k] for k in ("fullsize", "fullsize_long") if res.get(k)]
    for r in runs:
        R = ROOT / r["results_dir"]
        model = next(iter(r["config"]["models"]))
        if Path(Layout(str(R)).model_json(model)).is_file():
            r["floor"] = floor_counts(R, model, r["config"]["models"][model]["batch_size"])


def cpu_vector_flags() -> list[str]:
    """The CPU's avx* and fma flags (what `grep -o 'avx[^ ]*\\|fma' /proc/cpuinfo | sort -u` prints)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return sorted(set(re.findall(r"\b(avx\S*|fma)\b", text)))


def measure_peak(args, res: dict, when: str) -> None:
    """bench/peak.py in this run; res["peak"] keeps the best figures of every measurement (the least
    disturbed on a shared machine) and each measurement as it came."""
    import peak as peak_bench  # bench/peak.py: this script's directory is on sys.path

    print(f"measuring the fp32 peak ({when}) ...", flush=True)
    m = peak_bench.measure(args.peak_seconds, args.peak_repeats, args.sgemm_n)
    print(peak_bench.describe(m), flush=True)
    res.setdefault("peak_measurements", {})[when] = m
    ms = list(res["peak_measurements"].values())
    best = max(ms, key=lambda x: x["peak_1thread_gflops"])
    res["peak"] = {
        "best_isa": best["best_isa"],
        "threads_all": best["threads_all"],
        "repeats": args.peak_repeats,
        "sgemm_n": args.sgemm_n,
        "peak_1thread_gflops": best["peak_1thread_gflops"],
        "peak_machine_gflops": best["peak_machine_gflops"],
        "peak_all_threads_gflops": max(x["peak_all_threads_gflops"] for x in ms),
        "sgemm": [
            max((g for x in ms for g in x["sgemm"] if g["threads"] == t), key=lambda g: g["gflops_best"])
            for t in sorted({g["threads"] for x in ms for g in x["sgemm"]})
        ],
        "note": "the best of the measurements before and after the runs",
    }


def finish(res: dict, out: Path) -> None:
    """Derive scaling, targets and the markdown table from the runs; write the JSON and the table."""
    if len(res.get("tiny", {})) > 1:
        res["scaling"] = scaling(list(res["tiny"].values()))
    if len(res.get("growth", {})) > 1:
        res["growth_fit"] = growth(list(res["growth"].values()))
    res["targets"] = targets(res)
    if res.get("peak"):
        for _, run in floor_runs_all(res):
            run["floor_table"] = floor_table(run, res["peak"])
    md = markdown(res)
    res["markdown"] = md
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(res, indent=1, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    md_path = out.with_suffix(".md")
    md_path.write_text(md, encoding="utf-8")
    print("\n" + md)
    print(f"wrote {out} and {md_path}")


if __name__ == "__main__":
    main()
