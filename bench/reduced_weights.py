"""The C matmul on reduced-precision weights (fp16, bf16, int8 with per-channel scales) against the same call on
the fp32 weights packed once (what the engine does at load for fp32), at the full-size model's shapes.

    .venv/bin/python bench/reduced_weights.py [--threads 1 2] [--rounds 5] [--out F]

A reduced-precision weight is converted to fp32 while the call packs it, on every call (the engine keeps it in
its storage format); the packed fp32 weight is read in place. The ratio (reduced / packed fp32 throughput,
1.0 = the conversion costs nothing) says what that conversion costs at a given row count: little at 512 rows,
most of the call at 64. Side by side in time: each round times one short block per side, in a rotated order, and
each side's figure is its best round (a shared 2-vCPU guest's speed moves between blocks). Run it with another
build's ``PYTHONPATH`` for a before/after (kernels_c/README.md, "Reduced-precision weights converted a run at a
time").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from actdiff import kernels as K
from actdiff import sysinfo

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peak import measured_peak  # noqa: E402

SHAPES = [(T, C, OC) for T in (64, 128, 512) for C, OC in ((768, 768), (768, 3072), (3072, 768))]
BLOCK_S = 0.15


def _sides(rng: np.random.Generator, C: int, OC: int) -> dict:
    w = (rng.standard_normal((OC, C)) / np.sqrt(C)).astype(np.float32)
    q, s = K.quantize_int8(w)
    return {
        "fp32 packed": (K.pack_f32(w), None),
        "fp16": (w.astype(np.float16), None),
        "bf16": (K.f32_to_bf16(w), None),
        "int8": (q, s),
    }


def _block(x: np.ndarray, weight, scales) -> float:
    """Median seconds of one call over a block of BLOCK_S."""
    K.matmul(x, weight, scales=scales)
    ts, t_end = [], time.perf_counter() + BLOCK_S
    while time.perf_counter() < t_end:
        t = time.perf_counter()
        K.matmul(x, weight, scales=scales)
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def bench_case(T: int, C: int, OC: int, rounds: int, rng: np.random.Generator) -> dict:
    x = rng.standard_normal((T, C)).astype(np.float32)
    sides = _sides(rng, C, OC)
    names = list(sides)
    best = dict.fromkeys(names, float("inf"))
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            best[name] = min(best[name], _block(x, *sides[name]))
    flops = 2.0 * T * C * OC
    return {name: {"gflops": flops / s / 1e9, "vs_fp32_packed": best["fp32 packed"] / s} for name, s in best.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="results/bench/reduced_weights.json")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    cpu, isa = sysinfo.cpu_info(), K.get_isa()
    peak = measured_peak(isa)
    flags = " ".join(sorted(f for f in cpu["flags"] if f.startswith(("avx", "fma", "f16c", "amx"))))
    out = {"cpu": cpu["model"], "flags": flags, "isa": isa, "peak_gflops_per_core": peak, "cases": {}}
    print(f"{cpu['model']}, flags {flags}; kernel path {isa}; measured peak {peak or float('nan'):.1f} GFLOP/s/core")
    print("| threads | T×C×OC | fp32 packed GF/s | fp16 GF/s (x) | bf16 GF/s (x) | int8 GF/s (x) |")
    print("|---|---|---|---|---|---|")
    for threads in args.threads:
        K.set_num_threads(threads)
        for T, C, OC in SHAPES:
            r = bench_case(T, C, OC, args.rounds, rng)
            out["cases"][f"{T}x{C}x{OC}/threads={threads}"] = r
            cells = [f"{r[n]['gflops']:.0f} ({r[n]['vs_fp32_packed']:.2f})" for n in ("fp16", "bf16", "int8")]
            print(f"| {threads} | {T}×{C}×{OC} | {r['fp32 packed']['gflops']:.0f} | " + " | ".join(cells) + " |")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
