"""The statistics' float32 products (actdiff.compare.refops.float32_products) against numpy's sgemm, side by side.

    .venv/bin/python bench/refops_products.py [--rounds 15] [--threads 1]

Inside ``float32_products`` a MATMUL's product ``a @ W.T`` is taken in float32 and returned in float64: the ranking
of hypotheses, the propagated budgets' simulation and the search's coarse scores on a reduced-precision run. It is
computed by the C matmul core on the weight packed once (refops._product_f32); this times that path, the
conversions included (float64 rows in, float64 out), beside what it replaced, numpy's sgemm on the float32 weight,
at the shapes those callers run: a statistics group's stacked rows of MiniLM's and the tiny model's products
(rows x K x N). Each round runs both, alternated; the table gives the best round of each and the median of the
per-round ratios (numpy's time over ours: above 1, ours is faster). One BLAS and one kernel thread by default, as a
workflow job runs them. Prints the CPU's kernel path beside the figures.

``--float64`` also times the float64 products (refops._product_f64: actdiff.kernels.matmul_f64, the weight packed
whole once below refops.PACK_WHOLE_BELOW_ROWS rows, per call above) against numpy's dgemm, at the same shapes and at
one prompt's rows and a single row (the reference ops' products where an op cannot stack prompts, the squared
operands' sum).

``--conversions`` also times the float32 <-> float16 conversions of an ONNX Runtime float16 variant's values
(actdiff.kernels.cast: f32_to_f16 / f16_to_f32, numpy's bits) against numpy's astype, into
preallocated arrays (np.copyto), per value."""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

SHAPES = [(40, 384, 1536), (160, 384, 1536), (256, 384, 1536), (160, 1536, 384), (256, 1536, 384), (200, 384, 384),
          (30, 128, 384), (200, 128, 384), (30, 512, 128), (250, 512, 128)]  # fmt: skip
# the float64 products: the same, and one prompt's rows (MiniLM's and the tiny model's) and a single row (the
# squared operands' sum, actdiff.compare.budgets._squared_op_sum)
SHAPES64 = SHAPES + [(30, 384, 384), (30, 384, 1536), (30, 1536, 384), (1, 384, 1536)]


def best_of(fn, reps: int) -> float:
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--float64", action="store_true", help="also time the float64 products")
    ap.add_argument("--conversions", action="store_true", help="also time the float16 conversions")
    args = ap.parse_args()
    from actdiff import kernels
    from actdiff.compare.refops import _packed_f32, _product_f32, _product_f64

    kernels.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    blas = [(i["internal_api"], i.get("architecture")) for i in threadpool_info()]
    print(f"kernel path {kernels.get_isa()}, {args.threads} thread(s); numpy BLAS {blas}")
    with threadpool_limits(args.threads):
        products(rng, args.rounds, "sgemm", np.float32, SHAPES, _packed_f32, _product_f32)
        if args.float64:
            # the product as the reference ops take it: the weight packed whole (memoised) from its second use on
            # below refops.PACK_WHOLE_BELOW_ROWS rows, its blocks packed per call from there on
            products(rng, args.rounds, "dgemm", np.float64, SHAPES64, lambda W: W, _product_f64)
    if args.conversions:
        conversions(rng, args.rounds)


def products(rng, rounds: int, blas: str, dtype, shapes, pack, product) -> None:
    """One table: ``product`` on the weight packed by ``pack`` against numpy's matmul in ``dtype``, float64 in and
    out, per shape (rows x K x N)."""
    print(f"\n| rows x K x N | numpy {blas} ms | ours ms | numpy / ours (median of rounds) | max rel. difference |")
    print("|---|---|---|---|---|")
    for T, K, N in shapes:
        W = rng.standard_normal((N, K)).astype(dtype)
        x = rng.standard_normal((T, K))
        packed = pack(W)
        ours = lambda: product(x, packed)  # noqa: E731
        theirs = lambda: (np.asarray(x, dtype) @ W.T).astype(np.float64)  # noqa: E731
        reps = max(3, int(0.02 / max(best_of(theirs, 3), 1e-6)))
        pairs = [(best_of(theirs, reps), best_of(ours, reps)) for _ in range(rounds)]
        a, b = theirs(), ours()
        diff = float(np.max(np.abs(a - b)) / np.max(np.abs(a)))
        ratio = statistics.median(t / o for t, o in pairs)
        print(f"| {T} x {K} x {N} | {min(t for t, _ in pairs) * 1e3:.3f} | {min(o for _, o in pairs) * 1e3:.3f} | "
              f"{ratio:.2f} | {diff:.1e} |")  # fmt: skip


def conversions(rng, rounds: int) -> None:
    """ns per value of each float16 conversion, ours (ak_convert_*) and numpy's, 1.5 M values, best round."""
    from actdiff.kernels import ffi, lib

    x = rng.standard_normal((4000, 384)).astype(np.float32)
    h = x.astype(np.float16)
    y, g = np.empty_like(x), np.empty_like(h)
    x16, y16 = ffi.from_buffer("float[]", x), ffi.from_buffer("uint16_t[]", g)  # float32 in, float16 out
    h16, y32 = ffi.from_buffer("uint16_t[]", h), ffi.from_buffer("float[]", y)
    sides = {
        "float32 -> float16": (lambda: lib.ak_convert_f32_f16(y16, x16, x.size), lambda: np.copyto(g, x, "unsafe")),
        "float16 -> float32": (lambda: lib.ak_convert_f16_f32(y32, h16, h.size), lambda: np.copyto(y, h, "unsafe")),
    }  # fmt: skip
    print("\n| conversion | numpy ns / value | ours ns / value | numpy / ours |\n|---|---|---|---|")
    for name, (ours, theirs) in sides.items():
        pairs = [(best_of(theirs, 10), best_of(ours, 10)) for _ in range(rounds)]
        t, o = min(p[0] for p in pairs) / x.size * 1e9, min(p[1] for p in pairs) / x.size * 1e9
        print(f"| {name} | {t:.2f} | {o:.3f} | {statistics.median(a / b for a, b in pairs):.0f} |")


if __name__ == "__main__":
    main()
