"""Rounded weights memoised per tensor object (actdiff.compare.refops.WeightMemo): the same bits as rounding each
time, one object per (tensor, rounding), entries that leave with their tensor, and a byte bound."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from actdiff.compare import refops
from actdiff.compare.refops import WeightMemo, round_to


@pytest.fixture
def w():
    return np.random.default_rng(0).standard_normal((48, 32))


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16", "int8"])
@pytest.mark.parametrize("axis", [0, 1])
def test_memoised_rounding_is_the_rounding(w, precision, axis):
    got = refops._rounded_weight(w, precision, axis)
    assert np.array_equal(got, round_to(w, precision, axis=axis))
    assert refops._rounded_weight(w, precision, axis) is got and not got.flags.writeable


def test_transposed_weight_is_rounded_after_the_transpose(w):
    """weight_orientation transposed: the transposed matrix is what gets rounded (int8's per-row ranges and a
    quantisation spec's rows are the transposed matrix's), memoised apart from the stored orientation."""
    sq = np.random.default_rng(1).standard_normal((32, 32))
    spec = {"bits": 4, "symmetric": False, "granularity": "row"}
    for precision in ("int8", "bf16", spec):
        got = refops._rounded_weight(sq, precision, 1, transposed=True)
        assert np.array_equal(got, round_to(sq.T, precision, axis=1))
        assert not np.array_equal(got, refops._rounded_weight(sq, precision, 1).T) or precision == "bf16"


def test_entry_leaves_with_its_tensor():
    memo = WeightMemo(1 << 20)
    a = np.ones((16, 16))
    memo.get(a, "x", lambda: np.full((16, 16), 2.0))
    assert len(memo.items) == 1 and memo.bytes == a.nbytes
    del a
    gc.collect()
    assert not memo.items and memo.bytes == 0


def test_byte_bound_keeps_the_most_recent(w):
    memo = WeightMemo(2 * w.nbytes)
    tensors = [w + i for i in range(3)]
    outs = [memo.get(t, "r", lambda t=t: t.copy()) for t in tensors]
    assert memo.bytes <= memo.max_bytes and len(memo.items) == 2
    assert memo.get(tensors[2], "r", lambda: None) is outs[2]  # kept: no compute
    calls = []
    memo.get(tensors[0], "r", lambda: calls.append(1) or tensors[0].copy())  # the least recent went first
    assert calls == [1]


def test_too_large_and_non_arrays_are_not_kept():
    memo = WeightMemo(100)
    big = np.zeros(1000)
    out = memo.get(big, "r", lambda: big + 1)
    assert out.flags.writeable and not memo.items
    assert memo.get([1.0, 2.0], "r", lambda: np.array([3.0])).tolist() == [3.0] and not memo.items
