"""Benchmark the whole engine forward pass against the torch fp32 reference and llama.cpp (f32 GGUF), on
the tiny model and on a full-size (released shapes, random weights) NomicBERT-MoE.

    .venv/bin/python bench/engine.py [--threads 1 2] [--tokens 128 512] [--repeats 5] [--quick]
                                     [--out results/bench/engine.json]
                                     [--fullsize-dir results/bench/fullsize-random]
                                     [--gguf-dir results/bench] [--no-llamacpp]
                                     [--no-ort] [--ort-dir results/bench/onnx] [--ort-variants ...]
                                     [--skip-tiny] [--no-precisions] [--batch-sizes 8 32]

For each model, token count and thread count, the engine's fp32 ``Engine.forward``, the torch reference
forward and llama.cpp's ``llama_encode`` run on the same random token ids (fixed seed, ids in [4, 4000)),
interleaved: one warm-up of each, then rounds of one run of each, the order rotated every round
(E T L, T L E, L E T, ...) so no side always follows the same other side; the median of each is reported,
and ratios are ratios of those medians (the median of the per-round ratios is recorded too). Only the
forward is timed (model loading, weight preparation and GGUF conversion are not). The engine's forward
returns every node's value (that is its API), the torch forward returns the last hidden state, llama.cpp
returns the mean-pooled embedding. A fourth side, "engine streamed", is the engine's forward as a dump runs it
(``Engine.forward_batch_into``): each node's value handed over when computed and dropped after its last reader, as
torch's eager forward drops its intermediates (the same arithmetic and bits; checked on the warm-up). Keeping
every value of a 512-token forward (about 700 MB) puts each op's output in memory no cache holds, which the
streamed forward reuses warm.

llama.cpp: llama-cpp-python 0.3.36 through ``actdiff.llamacpp.capture.LlamaCppRunner(gguf, threads=n,
capture_nodes=False)``: n_threads = n_threads_batch = n, flash attention disabled, n_ctx = n_batch =
n_ubatch = the trained context (512), mean pooling, and NO eval callback (the runner's node capture calls
into Python for every graph node; with ``capture_nodes=False`` ggml runs the graph in one piece). Its
``forward`` fills a llama_batch from Python (one ctypes store per field and token), calls ``llama_encode``
and copies the pooled embedding: that is the lowest-overhead path of the module, and what is timed. The
GGUFs (f32, llama.cpp's own converter via ``actdiff.llamacpp.gguf_export.convert_to_gguf``) are cached as
``<gguf-dir>/<model dir name>-f32.gguf`` and reused when newer than the checkpoint and their metadata still
match config.json. llama.cpp's graph differs slightly from ours (no shared expert bias, tanh GELU from an
fp16 table; docs/llamacpp.md), so its pooled embedding is compared with the engine's for information only.

FLOPs are counted analytically (multiply-add = 2): every matmul 2*T*in*out (Wqkv, out_proj, dense fc1 and
fc2, the router, and expert fc1/fc2 for the top-k experts of each token), plus attention 2*2*T*T*hidden
(QK^T and PV). Peak = cores used * clock * 32 fp32 FLOP/cycle/core (Zen 4: AVX-512 FMA, double-pumped
over two 256-bit pipes), with the clock from /proc/cpuinfo "cpu MHz". That is the nominal clock: the cores
boost above it, so "% of peak" can exceed what the nominal figure suggests (bench/kernel_speed.py measures a
single-core matmul at ~128 % of it).

ONNX Runtime (full size only; ``--no-ort`` skips it): bench/engine_ort.py exports the model once
(``actdiff.onnxrt.export.export_model``, dense-gather MoE) and quantises it (int8-dynamic, int8-static), caches
the files keyed by config.json, and adds one unmarked session per variant (graph optimisation level ``all``,
intra_op threads = the row's threads, inter_op 1) to the rotation of every full-size row, single and batched
(padded batch with mask). Its GFLOP/s count the FLOPs ORT executes, which the dense-gather MoE makes 6x the
top-2 expert work; its embedding is checked against torch's (max |diff|, cosine) in the same run.

The engine is also timed at fp16, bf16 and int8 (full size, 128 tokens, 2 threads) for information.
Peak RSS is measured first, in two fresh subprocesses (the engine: prepare fp32 + one forward at 512
tokens; torch: load the reference + one forward at 512 tokens), and divided by the fp32 weight bytes. The
peak is the child's own VmHWM (/proc/self/status), not ru_maxrss: on Linux ru_maxrss survives exec, so a
child forked from this (large) process can report the parent's RSS.

numpy's OpenBLAS is not used by the engine (its compute runs in the C kernels); OPENBLAS_CORETYPE and
OPENBLAS_L2_SIZE are removed and OPENBLAS_NUM_THREADS is set to 1 before numpy is imported, in this
process and in the subprocesses, so whatever they were set to cannot matter.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak import measured_peak, peers_env  # noqa: E402

# the baselines' environment (bench/peak.py): on the forced avx2 path torch runs its AVX2 kernels too
_env = peers_env("avx2" if os.environ.get("ACTDIFF_KERNELS_ISA") == "avx2" else "")
os.environ.clear()
os.environ.update(_env)
os.environ["OPENBLAS_NUM_THREADS"] = "1"

import engine_ort  # noqa: E402
import numpy as np  # noqa: E402

from actdiff import sysinfo  # noqa: E402
from actdiff.compare.routing import margins  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY_DIR = ROOT / "resources/models/tiny-nomic-moe"
SEED = 1234
FP32_FLOP_PER_CYCLE_PER_CORE = 32
PEAK_NOTE = (
    "peak = threads x the fp32 FMA peak of one core on the kernels' ISA path, measured at the start of the run "
    "(bench/peak.py's independent FMA chains, best of 10 repeats); only where it cannot be measured (no gcc) the "
    "nominal /proc/cpuinfo clock x 32 FLOP/cycle, which the boosting cores exceed"
)


# ----------------------------------------------------------------------------- helpers
def cpu_info() -> dict:
    c = sysinfo.cpu_info()
    return {"model": c["model"], "mhz_nominal": c["mhz"], "avx512f": c["avx512f"], "cores": c["cores"]}


def peak_gflops(peak_core: float, threads: int) -> float:
    return threads * peak_core


def is_moe_layer(cfg: dict, i: int) -> bool:
    n = int(cfg.get("moe_every_n_layers", 0) or 0)
    return int(cfg.get("num_experts", 0) or 0) > 0 and n > 0 and i % n == 1


def count_flops(cfg: dict, T: int) -> dict:
    """Analytic FLOPs of one forward over T tokens (multiply-add = 2), by part."""
    H, F, L = cfg["n_embd"], cfg["n_inner"], cfg["n_layer"]
    E, k = int(cfg.get("num_experts", 0) or 0), int(cfg.get("moe_top_k", 0) or 0)
    parts = {"qkv": 0, "out_proj": 0, "attention": 0, "dense_mlp": 0, "router": 0, "experts": 0}
    for i in range(L):
        parts["qkv"] += 2 * T * H * 3 * H
        parts["out_proj"] += 2 * T * H * H
        parts["attention"] += 2 * 2 * T * T * H
        if is_moe_layer(cfg, i):
            parts["router"] += 2 * T * H * E
            parts["experts"] += 2 * T * k * (H * F + F * H)
        else:
            parts["dense_mlp"] += 2 * T * (H * F + F * H)
    parts["total"] = sum(parts.values())
    return parts


def token_ids(T: int) -> list[int]:
    return np.random.default_rng(SEED + T).integers(4, 4000, T).tolist()


def weight_bytes(model_dir: Path) -> int:
    """Bytes of the fp32 weights: the data section of model.safetensors (every tensor is fp32)."""
    import struct

    with open(model_dir / "model.safetensors", "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    assert all(v["dtype"] == "F32" for k, v in header.items() if k != "__metadata__")
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")


# ----------------------------------------------------------------------------- peak RSS
RSS_CHILD = r"""
import json, resource, sys, time
import numpy as np
side, model_dir, T, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

def status():
    s = {}
    for line in open('/proc/self/status'):
        k, _, v = line.partition(':')
        if k in ('VmHWM', 'VmRSS', 'RssAnon', 'RssFile'):
            s[k] = int(v.split()[0]) * 1024
    return s

ids = np.random.default_rng(int(sys.argv[5])).integers(4, 4000, T).tolist()
out = {'after_imports': None}
t0 = time.perf_counter()
if side == 'engine':
    from actdiff.engine.core import Engine
    out['after_imports'] = status()
    e = Engine(model_dir, threads=threads)
    e.prepare('fp32')
    out['after_prepare'] = status()
    vals = e.forward(ids, 'fp32')
    out['node_values_bytes'] = int(sum(a.nbytes for a in vals.values()))
    out['prepared_weight_bytes'] = int(sum(w.data.nbytes for w in e.prepare('fp32').weights.values()))
else:
    import torch
    from actdiff.models.loading import load_reference_model
    torch.set_num_threads(threads)
    out['after_imports'] = status()
    model, cfg, arch = load_reference_model(model_dir)
    out['after_prepare'] = status()
    with torch.inference_mode():
        model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, T, dtype=torch.long))
out['after_forward'] = status()
out['ru_maxrss_bytes'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
out['seconds'] = time.perf_counter() - t0
print(json.dumps(out))
"""


def measure_rss(side: str, model_dir: Path, T: int, threads: int) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", RSS_CHILD, side, str(model_dir), str(T), str(threads), str(SEED + T)],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        cwd=ROOT,
    )
    if r.returncode != 0:
        raise RuntimeError(f"RSS subprocess ({side}) failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def rss_section(model_dir: Path, T: int, threads: int) -> dict:
    wb = weight_bytes(model_dir)
    res: dict = {"model_dir": str(model_dir), "tokens": T, "threads": threads, "fp32_weight_bytes": wb}
    for side in ("engine", "torch"):
        m = measure_rss(side, model_dir, T, threads)
        # the child's own VmHWM only: it is per address space and starts afresh at exec. ru_maxrss is NOT
        # used for the peak: on Linux it survives exec, so the child (forked from this process, which may
        # already hold models) can report the parent's RSS at fork time; it is recorded for information
        peak = m["after_forward"]["VmHWM"]
        res[side] = {
            "peak_rss_bytes": peak,
            "peak_rss_over_fp32_weight_bytes": peak / wb,
            "rss_after_imports_bytes": m["after_imports"]["VmRSS"],
            "rss_after_load_bytes": m["after_prepare"]["VmRSS"],
            "rss_anon_after_load_bytes": m["after_prepare"]["RssAnon"],
            "rss_file_after_load_bytes": m["after_prepare"]["RssFile"],
            "rss_after_forward_bytes": m["after_forward"]["VmRSS"],
            "rss_anon_after_forward_bytes": m["after_forward"]["RssAnon"],
            "rss_file_after_forward_bytes": m["after_forward"]["RssFile"],
            "ru_maxrss_bytes": m["ru_maxrss_bytes"],  # information only (can include the forking parent)
            "vm_hwm_bytes": m["after_forward"]["VmHWM"],
            "seconds": m["seconds"],
        }
        if side == "engine":
            res[side]["node_values_bytes"] = m["node_values_bytes"]
            res[side]["prepared_weight_bytes"] = m["prepared_weight_bytes"]
    ratio = res["engine"]["peak_rss_over_fp32_weight_bytes"]
    res["requirement"] = "engine peak RSS / fp32 weight bytes < 2 (the engine holds at most one fp32 copy)"
    res["engine_passes"] = bool(ratio < 2)
    res["note"] = (
        "RssFile is file-backed memory: pages of model.safetensors mapped by safetensors' safe_open (clean, "
        "reclaimable page cache, but counted in RSS while mapped); RssAnon is the process's own memory "
        "(weights copied out of the file, activations)"
    )
    return res


# ----------------------------------------------------------------------------- llama.cpp GGUFs
def checkpoint_mtime(model_dir: Path) -> float:
    return max(
        (model_dir / f).stat().st_mtime for f in ("model.safetensors", "config.json") if (model_dir / f).exists()
    )


def ensure_gguf(model_dir: Path, gguf_dir: Path) -> tuple[Path, dict]:
    """The f32 GGUF of ``model_dir`` (``<gguf_dir>/<dir name>-f32.gguf``): reused when newer than the
    checkpoint and its metadata match config.json, otherwise converted (not timed as part of any forward)."""
    from actdiff.llamacpp.gguf_export import GGUFConfigMismatch, convert_to_gguf, verify_gguf
    from actdiff.llamacpp.gguf_meta import read_gguf_header
    from actdiff.nodes import load_config_json

    gguf = gguf_dir / f"{model_dir.name}-f32.gguf"
    info: dict = {"path": str(gguf)}
    if gguf.is_file() and gguf.stat().st_mtime > checkpoint_mtime(model_dir):
        try:
            meta = verify_gguf(
                read_gguf_header(gguf), load_config_json(model_dir), "f32", str(model_dir / "config.json")
            )
            info.update(reused=True, convert_s=None, tensor_types=meta["tensor_types"], expert_bias=meta["expert_bias"])
        except GGUFConfigMismatch as e:
            print(f"  {gguf}: stale ({e}); converting again")
    if "reused" not in info:
        t0 = time.perf_counter()
        meta = convert_to_gguf(str(model_dir), str(gguf), "f32")
        info.update(
            reused=False,
            convert_s=time.perf_counter() - t0,
            tensor_types=meta["tensor_types"],
            expert_bias=meta["expert_bias"],
            sha256=meta["sha256"],
        )
    info["bytes"] = gguf.stat().st_size
    return gguf, info


# ----------------------------------------------------------------------------- ONNX Runtime
def ort_models(full_dir: Path, cache: Path, variants: list[str]) -> tuple[dict | None, dict]:
    """The full-size model's ONNX files (bench/engine_ort.py: exported and quantised once, then reused), and
    what the JSON records about them; (None, why) when onnxruntime is not installed."""
    from actdiff.onnxrt import available

    ok, why = available()
    if not ok:
        print(f"onnxruntime not benchmarked: {why}")
        return None, {"used": False, "why_not": why}
    paths, manifest = engine_ort.ensure_ort_models(full_dir, cache, variants)
    import onnxruntime

    res = {
        "used": True,
        "versions": why,
        "providers": ["CPUExecutionProvider"],
        "level": engine_ort.LEVEL,
        "session": "unmarked (the model's own output 'embedding' only), graph optimisation level all "
        "(ORT_ENABLE_ALL, the production setting), intra_op threads = the row's threads, inter_op 1",
        "moe": "the export's dense-gather MoE: every expert's fc1 on every token, every expert's fc2 on every "
        "top-k slot, then gathered; ORT executes 6x the expert FLOPs of top-2 routing (8 experts); "
        "ort_*_gflops_executed count those executed FLOPs (padding included in batched rows)",
        "accuracy": "ORT 'embedding' (L2-normalised mean pool) vs torch's last hidden state mean-pooled and "
        "L2-normalised, float64: max |diff| and min cosine over the row's prompts",
        "calibration": f"int8-static: MinMax on {engine_ort.CALIBRATION_PROMPTS} random-id prompts of "
        f"{engine_ort.CALIBRATION_TOKENS} tokens (seed 4321, not the timed ids)",
        "onnxruntime_build": onnxruntime.get_build_info() if hasattr(onnxruntime, "get_build_info") else None,
        "files": manifest,
    }
    for v, f in manifest["files"].items():
        made = f"made in {f['seconds']:.1f} s, peak RSS {f['peak_rss_bytes'] / 1e9:.2f} GB"
        how = "reused" if f.get("reused") else made
        print(f"onnxruntime {v}: {paths.get(v, f['path'])} ({f['bytes'] / 1e9:.2f} GB, {how})")
    return paths, res


# ----------------------------------------------------------------------------- timing
class Trio:
    """The engine, the torch reference and (optionally) llama.cpp for one model directory."""

    def __init__(self, name: str, model_dir: Path, gguf: Path | None = None):
        import torch

        from actdiff.engine.core import Engine
        from actdiff.models.loading import load_reference_model

        self.name, self.model_dir, self.gguf = name, model_dir, gguf
        t0 = time.perf_counter()
        self.engine = Engine(model_dir)
        self.engine.prepare("fp32")
        self.engine_load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.model, self.cfg, _ = load_reference_model(model_dir)
        self.torch_load_s = time.perf_counter() - t0
        self.torch = torch
        self.last = f"encoder.layers.{self.cfg['n_layer'] - 1}.norm2"
        self.runners: dict[int, object] = {}  # threads -> LlamaCppRunner (the GGUF is mmapped: pages shared)
        self.batched_runners: dict[tuple[int, int], object] = {}  # (threads, B) -> runner with n_seq_max = B
        self.llamacpp_load_s: dict[int, float] = {}
        self.tokenizer_dir = model_dir if (model_dir / "tokenizer.json").is_file() else TINY_DIR

    def run_engine(self, ids, variant="fp32"):
        t0 = time.perf_counter()
        vals = self.engine.forward(ids, variant)
        return time.perf_counter() - t0, vals[self.last], vals["pooled"].reshape(-1)

    def run_engine_streamed(self, ids, variant="fp32"):
        """The forward as a dump runs it (see the module docstring); keeps the last hidden state and the pooled
        embedding only."""
        want, kept = (self.last, "pooled"), {}

        def put(b, name, value):
            if name in want:
                kept[name] = value

        t0 = time.perf_counter()
        self.engine.forward_batch_into([ids], put, variant)
        return time.perf_counter() - t0, kept[self.last], kept["pooled"].reshape(-1)

    def run_torch(self, ids):
        torch = self.torch
        x = torch.tensor([ids])
        mask = torch.ones(1, len(ids), dtype=torch.long)
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model(input_ids=x, attention_mask=mask)
            dt = time.perf_counter() - t0
        return dt, out[0][0].numpy()  # a ModelOutput: last_hidden_state (1, T, H), prompt 0

    def llamacpp_batched(self, threads: int, B: int, tokens: int):
        """A runner packing up to B prompts into one llama_batch; its context holds the batch's tokens."""
        key = (threads, B)
        if key not in self.batched_runners or self.batched_runners[key].n_ctx < tokens:
            from actdiff.llamacpp.capture import LlamaCppRunner

            if key in self.batched_runners:
                self.batched_runners.pop(key).close()
            n_ctx = -(-tokens // 256) * 256
            self.batched_runners[key] = LlamaCppRunner(
                self.gguf, threads=threads, capture_nodes=False, n_seq_max=B, n_ctx=n_ctx
            )
        return self.batched_runners[key]

    def close_batched_runners(self) -> None:
        for r in self.batched_runners.values():
            r.close()
        self.batched_runners.clear()

    def llamacpp(self, threads: int):
        if threads not in self.runners:
            from actdiff.llamacpp.capture import LlamaCppRunner

            t0 = time.perf_counter()
            self.runners[threads] = LlamaCppRunner(self.gguf, threads=threads, capture_nodes=False)
            self.llamacpp_load_s[threads] = time.perf_counter() - t0
        return self.runners[threads]

    def run_llamacpp(self, ids, threads: int):
        r = self.llamacpp(threads)
        t0 = time.perf_counter()
        out = r.forward(ids)
        return time.perf_counter() - t0, out["result_embd_pooled"]

    def free(self):
        self.close_batched_runners()
        for r in self.runners.values():
            r.close()
        del self.engine, self.model, self.runners


# a last-hidden difference above this is more than fp32 rounding through the layers (1e-6 to 1e-5 here)
DIFF_EXPLAINED_ABOVE = 1e-3


def routing_near_ties(p: Trio, ids: list[int], h_e: np.ndarray, h_t: np.ndarray) -> dict | None:
    """Where the engine's last hidden state differs from torch's by more than DIFF_EXPLAINED_ABOVE: how many
    tokens differ that much, and the smallest gap between the k-th and the (k+1)-th largest router probability
    of any token in any MoE layer (the engine's forward). A gap within fp32 rounding (one ulp of a probability
    is ~3e-8) is a near-tie that either side may break its own way: that token then runs another expert, its row
    differs from there on, and bidirectional attention carries the difference to every token of the next
    layers. No error of either side (the pipeline judges routing at clear margins only: actdiff.compare.routing).
    None where nothing differs that much, or the model has no MoE layer."""
    differing = int((np.abs(h_e - h_t).max(axis=1) > DIFF_EXPLAINED_ABOVE).sum())
    blocks = p.engine.graph.moe_blocks()
    if not differing or not blocks:
        return None
    vals, k = p.engine.forward(ids, "fp32"), p.engine.graph.dims.top_k
    gap, layer, token = math.inf, None, None
    for b in blocks:
        g = margins(vals[b.probs], k)  # the routing table's own: k-th minus (k+1)-th largest, per token
        i = int(np.argmin(g))
        if g[i] < gap:
            gap, layer, token = float(g[i]), b.layer, i
    return {"tokens_differing": differing, "smallest_topk_gap": gap, "at_layer": layer, "at_token": token}


def bench_trio(p: Trio, T: int, threads: int, repeats: int, peak_core: float, ort=None) -> dict:
    """One row: every side on the same T random ids, rotated rounds; ``ort`` (engine_ort.OrtSides) adds the
    ORT sessions of each variant to the rotation."""
    from actdiff import kernels

    kernels.set_num_threads(threads)
    p.torch.set_num_threads(threads)
    ids = token_ids(T)
    with_llama = p.gguf is not None
    runs = {
        "engine": lambda: p.run_engine(ids)[0],
        "engine_streamed": lambda: p.run_engine_streamed(ids)[0],
        "torch": lambda: p.run_torch(ids)[0],
    }
    if with_llama:
        runs["llamacpp"] = lambda: p.run_llamacpp(ids, threads)[0]
    ort_runs = ort.single(threads, ids) if ort is not None else {}
    runs.update({s: (lambda run=run: run()[0]) for s, run in ort_runs.items()})
    # warm-up (and the outputs for the sanity checks)
    _, h_e, pooled_e = p.run_engine(ids)
    _, h_s, pooled_s = p.run_engine_streamed(ids)
    if not (np.array_equal(h_s, h_e) and np.array_equal(pooled_s, pooled_e)):
        raise RuntimeError(f"the streamed forward differs from Engine.forward at T={T}, {threads} thread(s)")
    _, h_t = p.run_torch(ids)
    pooled_l = p.run_llamacpp(ids, threads)[1] if with_llama else None
    ort_out = {s: run()[1] for s, run in ort_runs.items()}
    sides = list(runs)
    load_before = os.getloadavg()[0]
    times: dict[str, list[float]] = {s: [] for s in sides}
    for i in range(repeats):  # one run of each side per round, order rotated every round
        for s in sides[i % len(sides) :] + sides[: i % len(sides)]:
            times[s].append(runs[s]())
    med = {s: float(np.median(v)) for s, v in times.items()}
    e_s, t_s = med["engine"], med["torch"]
    fl = count_flops(p.cfg, T)["total"]
    pk = peak_gflops(peak_core, threads)
    r = {
        "engine_ms": e_s * 1e3,
        "torch_ms": t_s * 1e3,
        "ratio_torch_over_engine": t_s / e_s,
        "engine_gflops": fl / e_s / 1e9,
        "torch_gflops": fl / t_s / 1e9,
        "engine_pct_peak": 100 * fl / e_s / 1e9 / pk,
        "torch_pct_peak": 100 * fl / t_s / 1e9 / pk,
        "model_gflop": fl / 1e9,
        "peak_gflops": pk,
        "engine_streamed_ms": med["engine_streamed"] * 1e3,
        "ratio_torch_over_engine_streamed": t_s / med["engine_streamed"],
        "engine_streamed_pct_peak": 100 * fl / med["engine_streamed"] / 1e9 / pk,
        "engine_ms_all": [x * 1e3 for x in times["engine"]],
        "engine_streamed_ms_all": [x * 1e3 for x in times["engine_streamed"]],
        "torch_ms_all": [x * 1e3 for x in times["torch"]],
        "repeats": repeats,
        "max_abs_diff_last_hidden_engine_vs_torch": float(np.abs(h_e - h_t).max()),
        "routing_near_ties": routing_near_ties(p, ids, h_e, h_t),
        # other processes on the cores inflate OpenMP runtimes (torch, llama.cpp) most at 2 threads
        "loadavg_1min_before_after": [load_before, os.getloadavg()[0]],
    }
    if with_llama:
        l_s = med["llamacpp"]
        te, tt, tl = (np.array(times[s]) for s in ("engine", "torch", "llamacpp"))
        r.update(
            {
                "llamacpp_ms": l_s * 1e3,
                "ratio_engine_over_llamacpp": e_s / l_s,
                "ratio_torch_over_llamacpp": t_s / l_s,
                "ratio_engine_over_llamacpp_median_per_round": float(np.median(te / tl)),
                "ratio_torch_over_llamacpp_median_per_round": float(np.median(tt / tl)),
                "llamacpp_gflops": fl / l_s / 1e9,
                "llamacpp_pct_peak": 100 * fl / l_s / 1e9 / pk,
                "llamacpp_ms_all": [x * 1e3 for x in times["llamacpp"]],
                "max_abs_diff_pooled_llamacpp_vs_engine": float(np.abs(pooled_l - pooled_e).max()),
                "rel_l2_pooled_llamacpp_vs_engine": float(
                    np.linalg.norm(pooled_l - pooled_e) / np.linalg.norm(pooled_e)
                ),
            }
        )
    if ort_runs:
        torch_emb = engine_ort.l2n(h_t.astype(np.float64).mean(0))  # the model's embedding: L2-normalised mean
        r.update(engine_ort.ort_fields(med, ort_out, torch_emb, engine_ort.count_flops_dense_gather(p.cfg, T), pk))
        r.update({f"{s}_ms_all": [x * 1e3 for x in times[s]] for s in ort_runs})
    return r


def bench_precisions(p: Trio, T: int, threads: int, repeats: int, peak_core: float, fp32_ms: float | None) -> dict:
    from actdiff import kernels

    kernels.set_num_threads(threads)
    ids = token_ids(T)
    _, ref, _ = p.run_engine(ids, "fp32")
    fl = count_flops(p.cfg, T)["total"]
    out = {}
    for v in ("fp16", "bf16", "int8"):
        t0 = time.perf_counter()
        p.engine.prepare(v)  # replaces the fp32 weights (one variant at a time)
        prep_s = time.perf_counter() - t0
        _, h, _ = p.run_engine(ids, v)  # warm-up
        ts = [p.run_engine(ids, v)[0] for _ in range(repeats)]
        s = float(np.median(ts))
        out[f"{p.name}/precision={v}/T={T}/threads={threads}"] = {
            "engine_ms": s * 1e3,
            "engine_fp32_ms": fp32_ms,
            "speedup_over_engine_fp32": (fp32_ms / (s * 1e3)) if fp32_ms else None,
            "engine_gflops_fp32_equivalent": fl / s / 1e9,
            "engine_pct_peak_fp32": 100 * fl / s / 1e9 / peak_gflops(peak_core, threads),
            "prepare_s": prep_s,
            "max_abs_diff_last_hidden_vs_engine_fp32": float(np.abs(h - ref).max()),
            "engine_ms_all": [x * 1e3 for x in ts],
        }
    p.engine.prepare("fp32")
    return out


# ----------------------------------------------------------------------------- batched rows
BATCH_SIZES = (8, 32)
CORPUS = ROOT / "config/prompts/default.tsv"


def corpus_batch(tokenizer_dir: Path, B: int, max_length: int = 512) -> list[list[int]]:
    """A batch of B corpus prompts as the pipeline forms it (actdiff.batching): a window of WINDOW_BATCHES * B
    prompts drawn from the bundled corpus (fixed seed), sorted by length into batches of B, and the batch with
    the median padded length. Prompts cut at ``max_length`` are left out (the T=512 rows time those), so the
    batch has the corpus' typical lengths. (A batch drawn at random instead pads a lot: 32 prompts, 1202
    tokens padded to 3936, measured once; that is why the pipeline sorts.)"""
    from actdiff.batching import WINDOW_BATCHES, length_sorted_batches
    from actdiff.engine.tokenizer import EngineTokenizer
    from actdiff.prompts import load_prompt_sheet

    et = EngineTokenizer.from_file(tokenizer_dir / "tokenizer.json")
    ids = [et.encode(t, max_length)[0] for t in load_prompt_sheet(CORPUS).text]
    whole = [x for x in ids if len(x) < max_length]
    pick = np.random.default_rng(SEED + B).choice(len(whole), min(len(whole), WINDOW_BATCHES * B), replace=False)
    window = [whole[i] for i in sorted(pick)]
    batches = [b for b in length_sorted_batches([len(x) for x in window], B, max_batch_tokens=B * max_length)]
    full = sorted((b for b in batches if len(b) == B), key=lambda b: max(len(window[i]) for i in b))
    return [window[i] for i in full[len(full) // 2]]


def torch_padded(p: Trio, batch: list[list[int]]):
    """The reference's padded batch: right-padded with the pad id, attention mask (as ReferenceRunner)."""
    torch = p.torch
    S = max(len(x) for x in batch)
    ids = torch.full((len(batch), S), p.engine.dims.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(batch), S), dtype=torch.long)
    for b, x in enumerate(batch):
        ids[b, : len(x)] = torch.tensor(x)
        mask[b, : len(x)] = 1
    return ids, mask


def batched_sides(p: Trio, batch: list[list[int]], threads: int, ort=None) -> dict:
    """name -> callable returning (seconds, pooled [B, H]): each side batched its own way, and one by one."""
    torch = p.torch
    ids, mask = torch_padded(p, batch)

    def engine_batched():
        t0 = time.perf_counter()
        vals = p.engine.forward_batch(batch, "fp32")
        return time.perf_counter() - t0, np.stack([v["pooled"].reshape(-1) for v in vals])

    def torch_batched():
        with torch.inference_mode():
            t0 = time.perf_counter()
            h = p.model(input_ids=ids, attention_mask=mask)[0]
            dt = time.perf_counter() - t0
            m = mask.unsqueeze(-1).to(h.dtype)
            return dt, ((h * m).sum(1) / m.sum(1)).numpy()

    def torch_pooled(dt, hidden):  # one prompt, no padding: the mean over its tokens
        return dt, hidden.mean(0)

    def one_by_one(run):
        def go():
            out = [run(x) for x in batch]
            return sum(o[0] for o in out), np.stack([o[-1] for o in out])

        return go

    runs = {"engine": engine_batched, "torch": torch_batched}
    if p.gguf is not None:
        runner = p.llamacpp_batched(threads, len(batch), sum(len(x) for x in batch))

        def llamacpp_batched():
            t0 = time.perf_counter()
            pooled = runner.encode_batch(batch)
            return time.perf_counter() - t0, pooled

        runs["llamacpp"] = llamacpp_batched
    runs["engine_1by1"] = one_by_one(lambda x: p.run_engine(x))
    runs["torch_1by1"] = one_by_one(lambda x: torch_pooled(*p.run_torch(x)))
    if p.gguf is not None:
        runs["llamacpp_1by1"] = one_by_one(lambda x: p.run_llamacpp(x, threads))
    if ort is not None:
        runs.update(ort.batched(threads, batch))
    return runs


def bench_batched(p: Trio, B: int, threads: int, repeats: int, peak_core: float, ort=None) -> dict:
    """One batch of B corpus-length prompts on every side (batched, and the same prompts one by one),
    interleaved and rotated as bench_trio; FLOPs are those of the real (unpadded) tokens."""
    from actdiff import kernels

    kernels.set_num_threads(threads)
    p.torch.set_num_threads(threads)
    batch = corpus_batch(p.tokenizer_dir, B)
    runs = batched_sides(p, batch, threads, ort)
    pooled = {s: run()[1] for s, run in runs.items()}  # warm-up, and the outputs for the sanity checks
    times: dict[str, list[float]] = {s: [] for s in runs}
    sides = list(runs)
    for i in range(repeats):
        for s in sides[i % len(sides) :] + sides[: i % len(sides)]:
            times[s].append(runs[s]()[0])
    med = {s: float(np.median(v)) for s, v in times.items()}
    lengths = [len(x) for x in batch]
    fl = sum(count_flops(p.cfg, T)["total"] for T in lengths)
    pk = peak_gflops(peak_core, threads)
    r: dict = {
        "prompts": B,
        "tokens": sum(lengths),
        "padded_tokens": B * max(lengths),
        "lengths": lengths,
        "model_gflop_unpadded": fl / 1e9,
        "repeats": repeats,
        "ms": {s: v * 1e3 for s, v in med.items()},
        "ms_all": {s: [x * 1e3 for x in v] for s, v in times.items()},
        "prompts_per_s": {s: B / v for s, v in med.items()},
        "pct_peak": {s: 100 * fl / v / 1e9 / pk for s, v in med.items()},
        "ratio_torch_over_engine": med["torch"] / med["engine"],
        "engine_batched_speedup_over_1by1": med["engine_1by1"] / med["engine"],
        "torch_batched_speedup_over_1by1": med["torch_1by1"] / med["torch"],
        "engine_batched_equals_1by1_bitwise": bool(np.array_equal(pooled["engine"], pooled["engine_1by1"])),
        "max_abs_diff_pooled_engine_vs_torch": float(np.abs(pooled["engine"] - pooled["torch"]).max()),
        "loadavg_1min_after": os.getloadavg()[0],
    }
    if "llamacpp" in med:
        r["ratio_engine_over_llamacpp"] = med["engine"] / med["llamacpp"]
        r["llamacpp_batched_speedup_over_1by1"] = med["llamacpp_1by1"] / med["llamacpp"]
        r["max_abs_diff_pooled_llamacpp_vs_engine"] = float(np.abs(pooled["llamacpp"] - pooled["engine"]).max())
    if ort is not None:  # ORT runs the padded batch: its executed FLOPs count the padding
        torch_emb = engine_ort.l2n(pooled["torch"].astype(np.float64))
        fl_ort = engine_ort.count_flops_dense_gather(p.cfg, max(lengths), B)
        r.update(engine_ort.ort_fields(med, pooled, torch_emb, fl_ort, pk))
    return r


def print_batched(name: str, B: int, nt: int, r: dict) -> None:
    pps = r["prompts_per_s"]
    ll = (
        f"{pps['llamacpp']:8.1f} {r['ratio_engine_over_llamacpp']:9.2f}"
        if "llamacpp" in pps
        else f"{'-':>8s} {'-':>9s}"
    )
    print(
        f"{name:9s} {B:3d} {nt:3d} {r['tokens']:6d} {r['padded_tokens']:6d} {pps['engine']:8.1f} {pps['torch']:8.1f} "
        f"{ll} {r['ratio_torch_over_engine']:9.2f} {r['engine_batched_speedup_over_1by1']:8.2f} "
        f"{r['torch_batched_speedup_over_1by1']:8.2f} {r['pct_peak']['engine']:7.1f}"
    )


BATCHED_HDR = (
    f"{'model':9s} {'B':>3s} {'thr':>3s} {'tokens':>6s} {'padded':>6s} {'eng p/s':>8s} {'torch p/s':>8s} "
    f"{'llama p/s':>8s} {'eng/llama':>9s} {'torch/eng':>9s} {'eng b/1':>8s} {'torch b/1':>8s} {'eng %pk':>7s}"
)


def run_batched_rows(p: Trio, threads: list[int], repeats: int, peak_core: float, res: dict,
                     batch_sizes=BATCH_SIZES, ort=None) -> None:  # fmt: skip
    """Threads outer: ORT sessions are made per thread count (one count's sessions alive at a time)."""
    print(
        f"\nbatched, {p.name}: B corpus prompts as one batch per side (engine, torch and ORT right-padded with a "
        "mask, llama.cpp packed sequences); p/s = prompts/s; 'b/1' = the same prompts one by one / batched"
    )
    print(BATCHED_HDR)
    for nt in threads:
        for B in batch_sizes:
            r = bench_batched(p, B, nt, repeats, peak_core, ort)
            res[f"{p.name}/batched/B={B}/threads={nt}"] = r
            print_batched(p.name, B, nt, r)
            if ort is not None:
                print_ort(r, per_s=B)
    p.close_batched_runners()


def print_near_ties(r: dict) -> None:
    """A line under a row whose max|diff| is more than rounding: how many tokens, and the closest routing call."""
    t = r.get("routing_near_ties")
    if t:
        print(
            f"          {t['tokens_differing']} token(s) differ by more than {DIFF_EXPLAINED_ABOVE:g}; the smallest "
            f"gap between a top-k and the next expert's router probability: {t['smallest_topk_gap']:.1e} (layer "
            f"{t['at_layer']}, token {t['at_token']}): within fp32 rounding, a near-tie either side may break its "
            "own way (attention then spreads that token's change to all)"
        )


def print_ort(r: dict, per_s: int | None = None) -> None:
    """The ORT sides of a row: time (or prompts/s), ratios to the other sides, accuracy against torch."""
    for v in engine_ort.ORT_VARIANTS:
        s = f"ort_{v}"
        if f"{s}_ms" not in r:
            continue
        t = r[f"{s}_ms"]
        head = f"{per_s * 1e3 / t:8.2f} p/s" if per_s else f"{t:9.1f} ms"
        others = [o for o in ("engine", "torch", "llamacpp") if f"ratio_{s}_over_{o}" in r]
        ratios = "  ".join(f"/{o} {r[f'ratio_{s}_over_{o}']:.2f}" for o in others)
        print(
            f"    ORT {v:13s} {head}  {ratios}  {r[f'{s}_gflops_executed']:6.1f} GFLOP/s executed  "
            f"vs torch: max|diff| {r[f'max_abs_diff_embedding_{s}_vs_torch']:.1e}, "
            f"min cos {r[f'min_cosine_embedding_{s}_vs_torch']:.6f}"
        )


def cell(r: dict, key: str, width: int, fmt: str) -> str:
    """One column of the printed table; '-' when the row has no such value (llama.cpp not run)."""
    return f"{r[key]:{width}{fmt}}" if key in r else f"{'-':>{width}s}"


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tokens", type=int, nargs="+", default=None, help="default 128 512 (--quick: 128)")
    ap.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed repeats per side (default 5, --quick 2); "
        "the tiny model uses 4x as many (its forwards take milliseconds)",
    )
    ap.add_argument("--quick", action="store_true", help="128 tokens only, 2 repeats")
    ap.add_argument("--out", default="results/bench/engine.json")
    ap.add_argument("--fullsize-dir", default="results/bench/fullsize-random")
    ap.add_argument("--tiny-dir", default=str(TINY_DIR))
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    ap.add_argument("--gguf-dir", default="results/bench", help="where the f32 GGUFs are cached")
    ap.add_argument("--no-llamacpp", action="store_true", help="engine and torch only")
    ap.add_argument("--no-batched", action="store_true", help="skip the batched rows (batch 8 and 32)")
    ap.add_argument(
        "--batched-only", action="store_true", help="only the full-size batched rows (no RSS, no single prompts)"
    )
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=list(BATCH_SIZES), help="batched rows' B")
    ap.add_argument("--skip-tiny", action="store_true", help="the full-size model only")
    ap.add_argument("--no-precisions", action="store_true", help="skip the engine's fp16/bf16/int8 timings")
    ap.add_argument("--no-ort", action="store_true", help="no ONNX Runtime rows (full size only)")
    ap.add_argument("--ort-variants", nargs="+", default=list(engine_ort.ORT_VARIANTS), choices=engine_ort.ORT_VARIANTS)
    ap.add_argument("--ort-dir", default="results/bench/onnx", help="where the ONNX model files are cached")
    args = ap.parse_args()
    if args.batched_only:
        args.no_rss = True
    tokens = args.tokens or ([128] if args.quick else [128, 512])
    repeats = args.repeats or (2 if args.quick else 5)
    tiny_dir = Path(args.tiny_dir)
    if not (tiny_dir / "config.json").is_file():
        sys.exit(
            f"{tiny_dir} is missing; generate it with\n"
            f"  cd {ROOT} && .venv/bin/snakemake --cores 2 resources/models/tiny-nomic-moe/config.json"
        )

    from actdiff.models.fullsize import build_fullsize_random

    t0 = time.perf_counter()
    full_dir = build_fullsize_random(args.fullsize_dir, seed=0, tokenizer_dir=tiny_dir)
    build_s = time.perf_counter() - t0
    print(f"full-size random model: {full_dir} ({build_s:.1f} s to build or reuse)")

    ggufs: dict[str, Path | None] = {"tiny": None, "fullsize": None}
    llama_res: dict = {"used": False}
    if not args.no_llamacpp:
        from actdiff.llamacpp import available

        ok, why = available()
        if not ok:
            print(f"llama.cpp not benchmarked: {why}")
            llama_res["why_not"] = why
        else:
            from actdiff.llamacpp.capture import library_info

            llama_res.update(used=True, **library_info())
            for name, d in (("tiny", tiny_dir), ("fullsize", full_dir)):
                if name == "tiny" and (args.skip_tiny or args.batched_only):
                    continue
                ggufs[name], info = ensure_gguf(Path(d), Path(args.gguf_dir))
                llama_res[f"{name}/gguf"] = info
                how = "reused" if info["reused"] else f"converted in {info['convert_s']:.1f} s"
                print(f"llama.cpp f32 GGUF ({name}): {ggufs[name]} ({how})")

    ort_paths, ort_res = None, {"used": False}
    if not args.no_ort:
        ort_paths, ort_res = ort_models(full_dir, Path(args.ort_dir), args.ort_variants)

    cpu = cpu_info()
    mhz = cpu["mhz_nominal"]
    res: dict = {
        "about": {
            "what": "whole-model forward, engine fp32 (C kernels) vs torch fp32 reference (eager) vs llama.cpp "
            "f32 GGUF, same token ids",
            "timing": "one warm-up each, then rounds of one run per side (engine, engine streamed, torch, "
            "llama.cpp), the order rotated every round; median of the repeats; only the forward is timed",
            "flops": "analytic: 2*T*in*out per matmul (Wqkv, out_proj, dense fc1/fc2, router, top-k expert "
            "fc1/fc2) + 2*2*T*T*hidden for attention",
            "peak": PEAK_NOTE,
            "ratio_torch_over_engine": "torch time / engine time; > 1 means the engine is faster",
            "engine_streamed": "the engine's forward as a dump runs it (Engine.forward_batch_into): each value handed "
            "over when computed and dropped after its last reader, as torch's eager forward drops its intermediates; "
            "bitwise Engine.forward's values (checked on the warm-up); ratio_torch_over_engine_streamed likewise",
            "llamacpp": "llama.cpp (llama-cpp-python 0.3.36) on the f32 GGUF of the same checkpoint: LlamaCppRunner("
            "capture_nodes=False, no eval callback), n_threads = n_threads_batch = threads, flash attention "
            "disabled, mean pooling; timed: runner.forward = llama_batch fill + llama_encode + pooled copy",
            "ratio_engine_over_llamacpp": "engine time / llama.cpp time; <= 1 means the engine is at least as fast",
            "ratio_torch_over_llamacpp": "torch time / llama.cpp time",
            "pooled_diff": "llama.cpp's pooled embedding vs the engine's, for information: llama.cpp has no shared "
            "expert bias and uses tanh GELU from an fp16 table (docs/llamacpp.md), so they differ",
        },
        "cpu": cpu,
        "fp32_flop_per_cycle_per_core": FP32_FLOP_PER_CYCLE_PER_CORE,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "settings": {
            "threads": args.threads,
            "tokens": tokens,
            "repeats": repeats,
            "quick": args.quick,
            "token_id_seed": SEED,
            "fullsize_dir": str(full_dir),
            "tiny_dir": str(tiny_dir),
        },
        "fullsize_build_or_reuse_s": build_s,
        "loadavg_1_5_15_at_start": os.getloadavg(),
        "llamacpp": llama_res,
        "onnxruntime": ort_res,
    }
    if os.getloadavg()[0] > 0.5:
        print(f"warning: load average {os.getloadavg()[0]:.2f} at start: other processes share the cores")

    if not args.no_rss:  # first, while this process is small
        T_rss = 512 if 512 in tokens or not args.quick else max(tokens)
        rss = rss_section(full_dir, T_rss, max(args.threads))
        res["rss"] = rss
        gb = 1e9
        print(
            f"\npeak RSS, full-size model, one forward at {T_rss} tokens "
            f"(fp32 weights {rss['fp32_weight_bytes'] / gb:.2f} GB):"
        )
        for side in ("engine", "torch"):
            r = rss[side]
            print(
                f"  {side:6s} peak {r['peak_rss_bytes'] / gb:5.2f} GB = {r['peak_rss_over_fp32_weight_bytes']:.2f}x "
                f"weights; after load: anon {r['rss_anon_after_load_bytes'] / gb:.2f} GB + file-mapped "
                f"{r['rss_file_after_load_bytes'] / gb:.2f} GB"
            )
        print(f"  engine < 2x fp32 weights: {'PASS' if rss['engine_passes'] else 'FAIL'}")

    import torch

    res["torch"] = torch.__version__
    from actdiff import kernels

    res["isa"] = kernels.get_isa()
    try:
        from threadpoolctl import threadpool_info

        res["numpy_blas_threadpools"] = [
            {k: d.get(k) for k in ("internal_api", "version", "num_threads")}
            for d in threadpool_info()
            if d.get("user_api") == "blas"
        ]
    except ImportError:
        pass

    measured = measured_peak(res["isa"])
    res["peak_gflops_per_core"] = {"measured": measured, "nominal": mhz * FP32_FLOP_PER_CYCLE_PER_CORE / 1e3}
    peak_core = measured or res["peak_gflops_per_core"]["nominal"]
    print(
        f"\nCPU {cpu['model']}, {cpu['cores']} cores @ {mhz} MHz nominal, kernels' path {res['isa']}; peak "
        f"{peak_core:.0f} GFLOP/s/core ({'measured, bench/peak.py' if measured else 'nominal clock x 32'})"
    )
    hdr = (
        f"{'model':9s} {'T':>4s} {'thr':>3s} {'GFLOP':>6s} {'engine ms':>10s} {'torch ms':>9s} {'llama ms':>9s} "
        f"{'torch/eng':>9s} {'eng/llama':>9s} {'torch/llama':>11s} {'eng %pk':>7s} {'torch %pk':>9s} "
        f"{'llama %pk':>9s} {'max|diff|':>9s} {'streamed ms':>11s} {'torch/str':>9s}"
    )
    fp32_full_128_2 = None
    for name, d in (("tiny", tiny_dir), ("fullsize", full_dir)):
        if (args.batched_only or args.skip_tiny) and name != "fullsize":
            continue
        p = Trio(name, d, ggufs[name])
        ort = engine_ort.OrtSides(ort_paths, p.engine.dims.pad_token_id) if ort_paths and name == "fullsize" else None
        res[f"{name}/load_s"] = {"engine_prepare_fp32": p.engine_load_s, "torch_load": p.torch_load_s}
        res[f"{name}/flops_per_forward"] = {f"T={T}": count_flops(p.cfg, T) for T in tokens}
        if ort is not None:
            res[f"{name}/ort_flops_executed_per_forward"] = {
                f"T={T}": engine_ort.count_flops_dense_gather(p.cfg, T) for T in tokens
            }
        if name == "fullsize" and not args.no_batched:
            run_batched_rows(p, args.threads, max(1, repeats - 2), peak_core, res, args.batch_sizes, ort)
        if args.batched_only:
            if ort is not None:
                ort_res["session_create_s"] = ort.session_s
                ort.close()
            p.free()
            continue
        print("\n" + hdr)
        reps = repeats * 4 if name == "tiny" else repeats
        for nt in args.threads:  # threads outer: ORT sessions are made per thread count
            for T in tokens:
                r = bench_trio(p, T, nt, reps, peak_core, ort)
                res[f"{name}/T={T}/threads={nt}"] = r
                if name == "fullsize" and T == 128 and nt == 2:
                    fp32_full_128_2 = r["engine_ms"]
                print(
                    f"{name:9s} {T:4d} {nt:3d} {r['model_gflop']:6.2f} {r['engine_ms']:10.2f} {r['torch_ms']:9.2f} "
                    f"{cell(r, 'llamacpp_ms', 9, '.2f')} {r['ratio_torch_over_engine']:9.2f} "
                    f"{cell(r, 'ratio_engine_over_llamacpp', 9, '.2f')} "
                    f"{cell(r, 'ratio_torch_over_llamacpp', 11, '.2f')} "
                    f"{r['engine_pct_peak']:7.1f} {r['torch_pct_peak']:9.1f} {cell(r, 'llamacpp_pct_peak', 9, '.1f')} "
                    f"{r['max_abs_diff_last_hidden_engine_vs_torch']:9.1e} {r['engine_streamed_ms']:11.2f} "
                    f"{r['ratio_torch_over_engine_streamed']:9.2f}"
                )
                print_near_ties(r)
                print_ort(r)
        if ort is not None:
            ort_res["session_create_s"] = ort.session_s
            ort.close()
        if name == "fullsize" and not args.no_precisions:
            T, nt = 128, 2
            prec = bench_precisions(p, T, nt, repeats, peak_core, fp32_full_128_2)
            res.update(prec)
            print(
                f"\nengine reduced precision, full size, T={T}, {nt} threads (fp32 "
                f"{fp32_full_128_2 and f'{fp32_full_128_2:.1f} ms'}):"
            )
            for k, r in prec.items():
                sp = r["speedup_over_engine_fp32"]
                print(
                    f"  {k.split('/')[1]:16s} {r['engine_ms']:8.2f} ms  speedup vs fp32 "
                    f"{(f'{sp:.2f}x' if sp else 'n/a'):>6s}  max|diff| vs fp32 "
                    f"{r['max_abs_diff_last_hidden_vs_engine_fp32']:.1e}"
                )
        if p.llamacpp_load_s:
            res[f"{name}/load_s"]["llamacpp_runner_by_threads"] = {str(k): v for k, v in p.llamacpp_load_s.items()}
        p.free()
        del p

    res["loadavg_1_5_15_at_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
