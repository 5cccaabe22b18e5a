"""Benchmark the C kernels against numpy (OpenBLAS) and torch eager at the real model's shapes.

    .venv/bin/python bench/kernels.py [--quick] [--out results/bench/kernels.json]

Prints a table and writes ratios (ours / theirs throughput, >1 means the C kernels are faster)
to results/bench/kernels.json.  With ACTDIFF_KERNELS_ISA=avx2 numpy's OpenBLAS and torch run their AVX2
kernels too (AVX2_PEERS), as on an AVX2-only machine.  The C matmul and MoE run on weights packed once beforehand
(``kernels.pack_f32``, outside the timed loop, as the engine does at load); the same calls on the
unpacked float32 weights (B re-packed on every call) are timed beside them ("unpacked").
numpy is timed in a subprocess with OPENBLAS_CORETYPE and
OPENBLAS_L2_SIZE removed from the environment (OpenBLAS reads them at load time) and
OPENBLAS_NUM_THREADS set to the thread count; the BLAS that ran is recorded via threadpoolctl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

from actdiff import sysinfo

H, F, NH, HD, E, TOPK = 768, 3072, 12, 64, 8, 2
MATMUL_SHAPES = [(C, OC) for C, OC in [(768, 2304), (768, 768), (768, 3072), (3072, 768)]]


def timeit(fn, min_time=0.25, min_reps=3):
    fn()
    ts = []
    t_end = time.perf_counter() + min_time
    while len(ts) < min_reps or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
        if len(ts) > 200:
            break
    return float(np.median(ts))


NUMPY_CHILD = r"""
import json, sys, time
import numpy as np
from threadpoolctl import threadpool_info
tokens, shapes, min_time = json.loads(sys.argv[1])
def timeit(fn):
    fn(); ts = []; t_end = time.perf_counter() + min_time
    while len(ts) < 3 or time.perf_counter() < t_end:
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
        if len(ts) > 200: break
    return float(np.median(ts))
res = {}
rng = np.random.default_rng(0)
for T in tokens:
    for C, OC in shapes:
        x = rng.standard_normal((T, C), dtype=np.float32); w = rng.standard_normal((OC, C), dtype=np.float32)
        o = np.empty((T, OC), np.float32)
        res[f"{T}x{C}x{OC}"] = 2.0 * T * C * OC / timeit(lambda: np.matmul(x, w.T, out=o)) / 1e9
info = [{k: d.get(k) for k in ("internal_api", "version", "architecture", "num_threads", "filepath")}
        for d in threadpool_info() if d.get("user_api") == "blas"]
print(json.dumps({"gflops": res, "blas": info}))
"""


# On the forced AVX2 path the baselines run their AVX2 kernels too, as on an AVX2-only machine (set before
# numpy/torch load them): OpenBLAS's Haswell kernel, MKL and ATen at AVX2. threadpoolctl records what ran.
AVX2_PEERS = {"OPENBLAS_CORETYPE": "Haswell", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def peers_env(isa: str) -> dict:
    """The environment the baselines run in: the AVX2 peers' settings on the avx2 path, else none of them."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", *AVX2_PEERS)}
    return {**env, **AVX2_PEERS} if isa == "avx2" else env


def numpy_gflops(tokens, nthreads, min_time, isa):
    env = peers_env(isa)
    env["OPENBLAS_NUM_THREADS"] = str(nthreads)
    env["OMP_NUM_THREADS"] = str(nthreads)
    r = subprocess.run(
        [sys.executable, "-c", NUMPY_CHILD, json.dumps([tokens, MATMUL_SHAPES, min_time])],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(r.stdout)


def measured_peak(isa: str) -> float | None:
    """The fp32 FMA peak of one core on the kernels' ISA path, measured (bench/peak.py's independent FMA chains,
    best of 10 short repeats), not assumed from the clock: turbo clocks and the number of FMA pipes differ per CPU
    (the nominal figure printed 151-230 % "of peak" on an AVX2 EPYC). None on the scalar path or without gcc."""
    import peak

    try:
        rows = peak.fma_peak(1, 0.05, 10)
    except RuntimeError as e:
        print(f"peak not measured: {e}")
        return None
    best = [r["gflops_best"] for r in rows if r["isa"] == isa and r["threads"] == 1]
    return max(best) if best else None


def cpu_info():
    c = sysinfo.cpu_info()
    keys = ("model", "mhz", "fp32_flop_per_cycle_per_core", "cores")
    return {k: c[k] for k in keys}


def torch_attention(q, k, v, mask, scale):
    import torch

    T, nh, hd = q.shape
    qt, kt, vt = (a.permute(1, 0, 2) for a in (q, k, v))
    s = (qt @ kt.transpose(1, 2)) * scale
    s = s.masked_fill(~mask[None, None, :], float("-inf"))
    p = torch.softmax(s, -1)
    return (p @ vt).permute(1, 0, 2).reshape(T, nh * hd)


def torch_moe(h, rw, w1, w2, bias, k):
    """Straightforward torch eager MoE layer as specified (fp32)."""
    import torch
    import torch.nn.functional as TF

    probs = torch.softmax(h @ rw.T, -1)
    wts, idx = torch.topk(probs, k, -1)
    out = torch.zeros_like(h)
    for e in range(w1.shape[0]):
        tok, slot = torch.nonzero(idx == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        y = TF.gelu(h[tok] @ w1[e].T) @ w2[e]
        out.index_add_(0, tok, y * wts[tok, slot, None])
    return out + bias


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="results/bench/kernels.json")
    ap.add_argument("--quick", action="store_true", help="fewer shapes, shorter timing")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--parts", default="matmul,attention,moe", help="comma list of matmul, attention, moe")
    args = ap.parse_args()
    isa_env = os.environ.get("ACTDIFF_KERNELS_ISA", "")
    env = peers_env("avx2" if isa_env == "avx2" else "")  # torch reads its MKL/ATen settings at import
    os.environ.clear()
    os.environ.update(env)
    import torch

    import actdiff.kernels as K

    min_time = 0.1 if args.quick else 0.3
    tokens = [128, 512] if args.quick else [128, 256, 512]
    threads = [int(t) for t in args.threads.split(",")]
    parts = set(args.parts.split(","))
    cpu = cpu_info()
    peak_core = measured_peak(K.get_isa())
    rng = np.random.default_rng(0)
    res = {
        "cpu": cpu,
        "peak_gflops_per_core_measured": peak_core,
        "isa": K.get_isa(),
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "python": platform.python_version(),
        "matmul": {},
        "attention": {},
        "moe": {},
        "numpy_blas": {},
        "peers_env": {k: os.environ[k] for k in AVX2_PEERS if k in os.environ},
    }
    print(
        f"CPU {cpu['model']} @ {cpu['mhz']} MHz, isa={K.get_isa()}, fp32 peak of that path measured "
        f"{peak_core:.1f} GFLOP/s per core (bench/peak.py),"
        f" baselines' settings {res['peers_env'] or 'default'}"
    )
    for nt in threads:
        K.set_num_threads(nt)
        torch.set_num_threads(nt)
        npres = numpy_gflops(tokens, nt, min_time, res["isa"]) if "matmul" in parts else {"blas": None}
        res["numpy_blas"][str(nt)] = npres["blas"]
        print(f"\n== {nt} thread(s); load average {os.getloadavg()[0]:.2f}; numpy BLAS: {npres['blas']}")
        print(
            f"{'shape TxCxOC':>18} {'ak GF/s':>9} {'%peak':>6} {'unpacked':>9} {'numpy':>8} {'torch':>8} {'ak/np':>6}"
            f" {'unp/np':>6} {'ak/torch':>8}"
        )
        for T in tokens if "matmul" in parts else []:
            for C, OC in MATMUL_SHAPES:
                x = rng.standard_normal((T, C), dtype=np.float32)
                w = rng.standard_normal((OC, C), dtype=np.float32)
                o = np.empty((T, OC), np.float32)
                fl = 2.0 * T * C * OC
                wp = K.pack_f32(w)  # once, outside the timed loop: the engine packs at load
                g_ak = fl / timeit(lambda: K.matmul(x, wp, out=o), min_time) / 1e9
                g_unp = fl / timeit(lambda: K.matmul(x, w, out=o), min_time) / 1e9
                xt, wt, ot = torch.from_numpy(x), torch.from_numpy(w), torch.empty(T, OC)
                g_t = fl / timeit(lambda: torch.mm(xt, wt.T, out=ot), min_time) / 1e9
                key = f"{T}x{C}x{OC}"
                g_np = npres["gflops"][key]
                pk = 100 * g_ak / (peak_core * nt) if peak_core else None
                pk_s = f"{pk:6.1f}" if pk is not None else f"{'-':>6}"
                res["matmul"][f"{key}/threads={nt}"] = {
                    "ak_gflops": g_ak,
                    "ak_unpacked_gflops": g_unp,
                    "numpy_openblas_gflops": g_np,
                    "torch_gflops": g_t,
                    "ratio_ak_over_numpy_openblas": g_ak / g_np,
                    "ratio_ak_unpacked_over_numpy_openblas": g_unp / g_np,
                    "ratio_ak_over_torch": g_ak / g_t,
                    "ak_pct_of_measured_peak": pk,
                }
                print(
                    f"{key:>18} {g_ak:9.1f} {pk_s} {g_unp:9.1f} {g_np:8.1f} {g_t:8.1f} {g_ak / g_np:6.2f}"
                    f" {g_unp / g_np:6.2f} {g_ak / g_t:8.2f}"
                )
        # attention (bidirectional, key padding mask), 12 heads x 64
        for T in tokens if "attention" in parts else []:
            q, k, v = (rng.standard_normal((T, NH, HD), dtype=np.float32) for _ in range(3))
            mask = np.ones(T, bool)
            mask[-T // 8 :] = False
            o = np.empty((T, NH * HD), np.float32)
            t_ak = timeit(lambda: K.attention(q, k, v, mask, 0.125, out=o), min_time)
            qt, kt, vt, mt = torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), torch.from_numpy(mask)
            t_t = timeit(lambda: torch_attention(qt, kt, vt, mt, 0.125), min_time)
            ref = torch_attention(qt, kt, vt, mt, 0.125).numpy()
            err = float(np.abs(o - ref).max())
            res["attention"][f"T={T}/threads={nt}"] = {
                "ak_ms": t_ak * 1e3,
                "torch_eager_ms": t_t * 1e3,
                "ratio_torch_time_over_ak_time": t_t / t_ak,
                "max_abs_diff": err,
            }
            print(
                f"attention T={T:4d}: ak {t_ak * 1e3:7.2f} ms  torch eager {t_t * 1e3:7.2f} ms"
                f"  speedup {t_t / t_ak:5.2f}x"
            )
        # one MoE layer: H=768, F=3072, 8 experts, top-2
        w1 = (rng.standard_normal((E, F, H), dtype=np.float32) / np.sqrt(H)).astype(np.float32)
        w2 = (rng.standard_normal((E, F, H), dtype=np.float32) / np.sqrt(F)).astype(np.float32)
        rw = rng.standard_normal((E, H), dtype=np.float32)
        bias = rng.standard_normal(H, dtype=np.float32)
        p1, p2 = K.pack_f32(w1), K.pack_f32(w2, trans=False)  # once, as the engine does at load
        for T in tokens if "moe" in parts else []:
            h = rng.standard_normal((T, H), dtype=np.float32)
            o = np.empty((T, H), np.float32)
            t_ak = timeit(lambda: K.moe(h, rw, p1, p2, bias, top_k=TOPK, out=o), min_time)
            t_unp = timeit(lambda: K.moe(h, rw, w1, w2, bias, top_k=TOPK, out=o), min_time)
            ts = [torch.from_numpy(a) for a in (h, rw, w1, w2, bias)]
            t_t = timeit(lambda: torch_moe(*ts, TOPK), min_time)
            err = float(np.abs(o - torch_moe(*ts, TOPK).numpy()).max())
            fl = 2.0 * 2 * T * TOPK * H * F
            res["moe"][f"T={T}/threads={nt}"] = {
                "ak_ms": t_ak * 1e3,
                "ak_unpacked_ms": t_unp * 1e3,
                "torch_eager_ms": t_t * 1e3,
                "ratio_torch_time_over_ak_time": t_t / t_ak,
                "ratio_torch_time_over_ak_unpacked_time": t_t / t_unp,
                "ak_expert_gflops": fl / t_ak / 1e9,
                "max_abs_diff": err,
            }
            print(
                f"moe T={T:4d}: ak {t_ak * 1e3:7.2f} ms ({fl / t_ak / 1e9:5.1f} GF/s, unpacked {t_unp * 1e3:7.2f} ms)"
                f"  torch eager {t_t * 1e3:7.2f} ms  speedup {t_t / t_ak:5.2f}x (unpacked {t_t / t_unp:5.2f}x)"
                f"  max|diff| {err:.2e}"
            )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
