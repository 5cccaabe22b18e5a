"""Shared helpers for the kernel tests.

NMSE thresholds are derived from fp32 rounding: with unit roundoff u = 2^-24, a length-K
fp32 dot product (sequential fma chain) on random data has a relative error ~ u*sqrt(K/3)
(the partial sums grow like sqrt(k)), so NMSE = ||err||^2/||ref||^2 ~ K u^2 / 3 = K 2^-48 / 3.
We allow `nmse_tol(K) = 8 * K * 2^-48` (~24x the expectation) plus the op's own terms.
"""

from __future__ import annotations

import numpy as np

U2 = 2.0**-48  # (unit roundoff)^2 for fp32

GUARD = 32
SENTINEL = np.float32(-1234.5678)


def nmse(a, ref) -> float:
    a = np.asarray(a, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    den = float(np.sum(ref * ref))
    num = float(np.sum((a - ref) ** 2))
    return num / den if den > 0 else num


def nmse_tol(k: int) -> float:
    return 8.0 * max(k, 1) * U2


class Guarded:
    """An output array followed by a guard region of sentinels (checked unchanged)."""

    def __init__(self, shape, dtype=np.float32):
        n = int(np.prod(shape, dtype=np.int64))
        self.buf = np.empty(n + GUARD, dtype=dtype)
        self.buf[n:] = SENTINEL
        self.n = n
        self.out = self.buf[:n].reshape(shape)

    def check(self):
        assert np.array_equal(self.buf[self.n :], np.full(GUARD, SENTINEL, self.buf.dtype)), "guard region overwritten"
