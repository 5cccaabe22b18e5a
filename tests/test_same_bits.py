"""sides.base.same_bits: the statistics' check that a replay is the code that ran (a node's replay on the side's own
inputs against its dump) and the stacked replays' trial. Equal bits only: the same NaN payload is the same, -0.0
is not 0.0, a value one ulp away is not the same; another dtype, shape or memory layout is never the same. Each
case at a size compared as bytes and one compared as integer views (SAME_BITS_AS_BYTES), and for an element width
with no integer of its own (complex64 is 8 bytes, float16 2: both have one; a 3-byte void does not)."""

from __future__ import annotations

import numpy as np
import pytest

from actdiff.sides.base import SAME_BITS_AS_BYTES, same_bits

SIZES = [7, SAME_BITS_AS_BYTES // 4 + 9]  # float32 values: under the bytes bound, over it


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, np.int64])
def test_equal_bits_and_every_way_to_differ(n, dtype):
    rng = np.random.default_rng(7)
    a = rng.integers(-1000, 1000, n) if dtype == np.int64 else rng.standard_normal(n).astype(dtype)
    assert same_bits(a, a.copy())
    assert not same_bits(a, a.astype(np.complex128))  # another dtype
    assert not same_bits(a[:-1], a[1:].copy())
    assert not same_bits(a.reshape(1, -1), a.copy())  # another shape
    b = a.copy()
    b[n // 2] = np.nextafter(b[n // 2], np.inf) if dtype != np.int64 else b[n // 2] + 1
    assert not same_bits(a, b)
    if dtype != np.int64:
        z, nz = np.zeros(n, dtype), np.zeros(n, dtype)
        nz[-1] = -0.0
        assert np.array_equal(z, nz) and not same_bits(z, nz)  # equal values, other bits
        nan = a.copy()
        nan[0] = np.nan
        assert same_bits(nan, nan.copy())  # the same NaN
    wide = np.stack([a, a], axis=1)
    assert not same_bits(wide[:, 0], np.ascontiguousarray(wide[:, 0]))  # a strided view is another layout


@pytest.mark.parametrize("n", [3, SAME_BITS_AS_BYTES])
def test_an_element_width_without_an_integer(n):
    a = np.frombuffer(np.random.default_rng(1).bytes(3 * n), dtype="V3")
    b = a.copy()
    assert same_bits(a, b)
    b = bytearray(b.tobytes())
    b[-1] ^= 1
    assert not same_bits(a, np.frombuffer(bytes(b), dtype="V3"))
