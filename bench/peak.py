"""Measure this machine's fp32 peak, so "fraction of peak" divides by a measured number, not an assumed one.

    .venv/bin/python bench/peak.py [--seconds 0.3] [--repeats 5] [--sgemm-n 2048] [--json out.json]

An earlier benchmark assumed one FMA pipe and printed 151-230 % of "peak"; here the peak is what the cores
execute, measured in the same run as what it is compared with (bench/pipeline.py calls :func:`measure`).

- FMA micro-benchmark: a small C program compiled at run time with ``gcc -O2 -march=native -fopenmp``
  (never -ffast-math: the chains are exact fp32 FMAs either way, and the flag has no place in this project)
  runs independent chains ``acc = fma(acc, m, a)``: CHAINS_AVX2 = 12 chains of 8 floats (ymm), CHAINS_AVX512
  = 24 chains of 16 floats (zmm). Saturating the FMA pipes needs pipes x latency chains in flight (Zen 4 and
  Intel since Skylake: 2 pipes x 4 cycles = 8), so 12 and 24 leave slack and still fit the 16 ymm / 32 zmm
  registers (written out one variable per chain: an array may be kept on the stack). The fixed point
  a / (1 - m) = 0.1 keeps every value normal. FLOPs = threads x iterations x chains x lanes x 2.
- Each ISA the CPU has (``__builtin_cpu_supports``: avx2+fma; avx512f), at 1 thread and at N threads (one
  OpenMP thread per CPU this process may run on), each ``--repeats`` times for about ``--seconds`` (many short
  repeats: on a shared machine some of them run undisturbed); the peak is the best repeat (the median is
  reported beside it). The machine's peak is N x the best single-thread figure of the best ISA.
- Cross-check: numpy's float32 matmul (OpenBLAS sgemm) of ``--sgemm-n`` square matrices at 1 and N threads,
  each in a fresh process with OPENBLAS_NUM_THREADS set (OpenBLAS reads it once, at load); 2 n^3 FLOPs, best of
  ``--repeats``. A good sgemm reaches 80-95 % of the FMA peak; more than 100 % would mean the peak is wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CFLAGS = ["-O2", "-march=native", "-fopenmp"]  # never -ffast-math (project rule)
CHAINS = {"avx2": 12, "avx512": 24}
LANES = {"avx2": 8, "avx512": 16}


def _chain_source(isa: str) -> str:
    n, vec, fma, set1 = CHAINS[isa], *(
        ("__m256", "_mm256_fmadd_ps", "_mm256_set1_ps")
        if isa == "avx2"
        else ("__m512", "_mm512_fmadd_ps", "_mm512_set1_ps")
    )
    target = "avx2,fma" if isa == "avx2" else "avx512f"
    store = "_mm256_storeu_ps" if isa == "avx2" else "_mm512_storeu_ps"
    decl = "\n".join(f"    {vec} a{i} = {set1}(seed + {i}e-3f);" for i in range(n))
    body = "\n".join(f"        a{i} = {fma}(a{i}, m, c);" for i in range(n))
    total = " + ".join(f"a{i}" for i in range(n))
    return f"""
__attribute__((target("{target}"))) static float chains_{isa}(long iters, float seed) {{
    const {vec} m = {set1}(0.999999f), c = {set1}(1e-7f);
{decl}
    for (long it = 0; it < iters; it++) {{
{body}
    }}
    {vec} s = {total};
    float out[16];
    {store}(out, s);
    return out[0];
}}
"""


C_MAIN = r"""
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
%(chains)s
typedef float (*chain_fn)(long, float);

/* wall seconds of `threads` threads each running `iters` iterations (all started behind one barrier) */
static double timed(chain_fn f, long iters, int threads, float *sink) {
    double t0 = 0, t1 = 0;
    float acc = 0;
#pragma omp parallel num_threads(threads) reduction(+ : acc)
    {
#pragma omp barrier
#pragma omp single
        t0 = omp_get_wtime();
        acc += f(iters, 1.0f + omp_get_thread_num());
#pragma omp barrier
#pragma omp single
        t1 = omp_get_wtime();
    }
    *sink += acc;
    return t1 - t0;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void run(const char *isa, chain_fn f, int chains, int lanes, int threads, double seconds, int reps) {
    float sink = 0;
    long iters = 1000000;
    double t = timed(f, iters, 1, &sink);  /* calibrate on one thread, then scale to `seconds` */
    iters = (long)(iters * seconds / (t > 1e-6 ? t : 1e-6));
    if (iters < 1000) iters = 1000;
    double g[64];
    if (reps > 64) reps = 64;
    for (int r = 0; r < reps; r++) {
        double s = timed(f, iters, threads, &sink);
        g[r] = (double)threads * iters * chains * lanes * 2.0 / s / 1e9;
    }
    qsort(g, reps, sizeof(double), cmp);
    printf("{\"isa\": \"%%s\", \"threads\": %%d, \"chains\": %%d, \"lanes\": %%d, \"iterations\": %%ld, "
           "\"gflops_best\": %%.3f, \"gflops_median\": %%.3f, \"gflops_all\": [", isa, threads, chains, lanes,
           iters, g[reps - 1], g[reps / 2]);
    for (int r = 0; r < reps; r++) printf("%%s%%.3f", r ? ", " : "", g[r]);
    printf("], \"sink\": %%g}\n", (double)sink);
}

int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: peak THREADS SECONDS REPEATS\n"); return 2; }
    int threads = atoi(argv[1]), reps = atoi(argv[3]);
    double seconds = atof(argv[2]);
    __builtin_cpu_init();
    int have = 0;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        have = 1;
        run("avx2", chains_avx2, %(n_avx2)d, 8, 1, seconds, reps);
        if (threads > 1) run("avx2", chains_avx2, %(n_avx2)d, 8, threads, seconds, reps);
    }
    if (__builtin_cpu_supports("avx512f")) {
        have = 1;
        run("avx512", chains_avx512, %(n_avx512)d, 16, 1, seconds, reps);
        if (threads > 1) run("avx512", chains_avx512, %(n_avx512)d, 16, threads, seconds, reps);
    }
    if (!have) {
        fprintf(stderr, "this CPU has neither AVX2+FMA nor AVX-512F: no vector FMA peak to measure\n");
        return 3;
    }
    return 0;
}
"""


def c_source() -> str:
    return C_MAIN % {
        "chains": _chain_source("avx2") + _chain_source("avx512"),
        "n_avx2": CHAINS["avx2"],
        "n_avx512": CHAINS["avx512"],
    }


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def fma_peak(threads: int, seconds: float, repeats: int) -> list[dict]:
    """Compile the chains program in a temporary directory and run it: one dict per (ISA, thread count)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise RuntimeError("bench/peak.py needs gcc on PATH to compile the FMA micro-benchmark (apt-get install gcc)")
    with tempfile.TemporaryDirectory(prefix="actdiff-peak-") as tmp:
        src, exe = Path(tmp) / "peak.c", Path(tmp) / "peak"
        src.write_text(c_source(), encoding="utf-8")
        cmd = [gcc, *CFLAGS, str(src), "-o", str(exe)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"compiling the peak micro-benchmark failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
        r = subprocess.run([str(exe), str(threads), str(seconds), str(repeats)], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"the peak micro-benchmark failed (exit {r.returncode}): {r.stderr.strip()}")
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    for row in rows:
        row["compile"] = " ".join(["gcc", *CFLAGS])
    return rows


# On the forced AVX2 path (ACTDIFF_KERNELS_ISA=avx2) the baselines run their AVX2 kernels too, as on an AVX2-only
# machine (set before numpy/torch load them): OpenBLAS's Haswell kernel, MKL and ATen at AVX2. llama.cpp's kernels
# are chosen when it is built, so it keeps the machine's own.
AVX2_PEERS = {"OPENBLAS_CORETYPE": "Haswell", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def peers_env(isa: str) -> dict:
    """The environment the baselines run in: the AVX2 peers' settings on the avx2 path, else none of them."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", *AVX2_PEERS)}
    return {**env, **AVX2_PEERS} if isa == "avx2" else env


def measured_peak(isa: str) -> float | None:
    """The fp32 FMA peak of one core on the kernels' ISA path, measured (the independent FMA chains, best of 10
    short repeats), not assumed from the clock: turbo clocks and the number of FMA pipes differ per CPU (the
    nominal figure printed 151-230 % "of peak" on an AVX2 EPYC). None on the scalar path or without gcc."""
    try:
        rows = fma_peak(1, 0.05, 10)
    except RuntimeError as e:
        print(f"peak not measured: {e}")
        return None
    best = [r["gflops_best"] for r in rows if r["isa"] == isa and r["threads"] == 1]
    return max(best) if best else None


SGEMM_CHILD = r"""
import json, sys, time
import numpy as np
n, reps = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
a = rng.standard_normal((n, n), dtype=np.float32)
b = rng.standard_normal((n, n), dtype=np.float32)
a @ b  # warm-up: OpenBLAS starts its threads and touches its buffers
best = []
for _ in range(reps):
    t0 = time.perf_counter()
    a @ b
    best.append(time.perf_counter() - t0)
from numpy import __version__ as v
print(json.dumps({"n": n, "seconds": sorted(best), "numpy": v}))
"""


def sgemm(n: int, threads: int, repeats: int) -> dict:
    """numpy float32 n x n matmul (OpenBLAS sgemm) in a fresh process with ``threads`` BLAS threads."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    env.update(OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    r = subprocess.run(
        [sys.executable, "-c", SGEMM_CHILD, str(n), str(repeats)], capture_output=True, text=True, env=env
    )
    if r.returncode != 0:
        raise RuntimeError(f"numpy sgemm cross-check failed:\n{r.stderr[-2000:]}")
    m = json.loads(r.stdout.strip().splitlines()[-1])
    flops = 2.0 * n**3
    secs = m["seconds"]
    return {
        "n": n,
        "threads": threads,
        "gflops_best": flops / secs[0] / 1e9,
        "gflops_median": flops / secs[len(secs) // 2] / 1e9,
        "numpy": m["numpy"],
    }


def measure(seconds: float = 0.05, repeats: int = 20, sgemm_n: int = 2048) -> dict:
    """The FMA peak per ISA at 1 and N threads, numpy's sgemm beside it, and the figures a benchmark divides
    by (best ISA, best repeat): ``peak_1thread_gflops``, one core; ``peak_machine_gflops`` = N x that, the
    machine's peak (``peak_all_threads_gflops``, measured with N threads at once, is also kept: on a shared
    machine the other jobs take some of the cores, so it can fall below N x one core, or below one core)."""
    n = usable_cpus()
    rows = fma_peak(n, seconds, repeats)
    gemm = [sgemm(sgemm_n, t, repeats) for t in sorted({1, n})]
    best = {t: max(r["gflops_best"] for r in rows if r["threads"] == t) for t in {r["threads"] for r in rows}}
    isa = max(rows, key=lambda r: (r["threads"] == 1, r["gflops_best"]))["isa"]
    out = {
        "fma": rows,
        "sgemm": gemm,
        "threads_all": n,
        "best_isa": isa,
        "peak_1thread_gflops": best[1],
        "peak_machine_gflops": n * best[1],
        "peak_all_threads_gflops": best[max(best)],
        "loadavg_1_5_15": os.getloadavg(),
        "note": "best of the repeats (a shared machine disturbs some); fraction of peak divides by these",
    }
    for g in gemm:
        g["over_fma_peak"] = g["gflops_best"] / best.get(g["threads"], best[max(best)])
    return out


def describe(p: dict) -> str:
    lines = [f"fp32 peak (FMA chains, gcc {' '.join(CFLAGS)}; best / median of the repeats, GFLOP/s):"]
    for r in p["fma"]:
        lines.append(
            f"  {r['isa']:7s} {r['threads']:2d} thread(s): {r['gflops_best']:8.1f} / {r['gflops_median']:8.1f}  "
            f"({r['chains']} chains x {r['lanes']} lanes)"
        )
    for g in p["sgemm"]:
        lines.append(
            f"  numpy sgemm n={g['n']} {g['threads']:2d} thread(s): {g['gflops_best']:8.1f} / "
            f"{g['gflops_median']:8.1f} = {100 * g['over_fma_peak']:.0f} % of the FMA peak"
        )
    lines.append(
        f"  peak used: {p['peak_1thread_gflops']:.1f} GFLOP/s per core ({p['best_isa']}), machine "
        f"{p['threads_all']} x that = {p['peak_machine_gflops']:.1f}"
    )
    lines.append(f"  load average {' '.join(f'{x:.2f}' for x in p['loadavg_1_5_15'])}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=0.05, help="duration of one repeat (default 0.05)")
    ap.add_argument("--repeats", type=int, default=20, help="short repeats: the best is the least disturbed")
    ap.add_argument("--sgemm-n", type=int, default=2048)
    ap.add_argument("--json", help="write the measurement here")
    args = ap.parse_args()
    p = measure(args.seconds, args.repeats, args.sgemm_n)
    print(describe(p))
    if args.json:
        from actdiff.atomic import write_json_atomic

        write_json_atomic(args.json, p)


if __name__ == "__main__":
    main()
