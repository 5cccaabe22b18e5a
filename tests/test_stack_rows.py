"""batching.stack_rows / split_rows: the statistics' stacking of a group's prompts (a view where the prompts' rows lie
back to back in one read window, np.concatenate's copy elsewhere) and the cut back into prompts."""

import numpy as np
import pytest

from actdiff.batching import split_rows, stack_rows


def _window(rows: int = 12, width: int = 5) -> np.ndarray:
    """Rows as a dump's read window holds them: float32 rows viewed on a flat byte buffer (the owner)."""
    raw = np.arange(rows * width, dtype=np.float32).tobytes()
    return np.frombuffer(bytearray(raw), np.uint8).view(np.float32).reshape(rows, width)


def test_consecutive_slices_stack_as_a_read_only_view_of_their_memory():
    w = _window()
    parts = [w[1:4], w[4:5], w[5:9]]
    got = stack_rows(parts)
    assert np.array_equal(got, np.concatenate(parts)) and got.dtype == np.float32 and got.shape == (8, 5)
    assert np.shares_memory(got, w) and not got.flags.writeable
    assert w.flags.writeable  # the window itself is untouched


@pytest.mark.parametrize(
    "parts",
    [
        lambda w: [w[0:3], w[4:6]],  # a gap between them
        lambda w: [w[4:6], w[0:4]],  # out of order
        lambda w: [w[0:3], w[3:6].copy()],  # one made apart
        lambda w: [w[0:3], _window()[3:6]],  # another window
        lambda w: [w[0:3, :4], w[3:6, :4]],  # not whole rows (not C-contiguous)
        lambda w: [w[0:3], w[3:6].view(np.int32)],  # another dtype (np.concatenate's promotion)
    ],
)
def test_anything_else_is_concatenated(parts):
    w = _window()
    ps = parts(w)
    got, want = stack_rows(ps), np.concatenate(ps)
    assert got.dtype == want.dtype and np.array_equal(got, want)
    assert not np.shares_memory(got, w) and got.flags.writeable


def test_one_dimensional_runs_stack_too():
    flat = _window().reshape(-1)
    got = stack_rows([flat[0:10], flat[10:25]])
    assert np.array_equal(got, flat[0:25]) and np.shares_memory(got, flat)


def test_empty_parts_and_a_single_part():
    w = _window()
    assert np.array_equal(stack_rows([w[0:0], w[0:3], w[3:3]]), w[0:3])
    one = stack_rows([w[2:5]])
    assert np.array_equal(one, w[2:5]) and not np.shares_memory(one, w)  # np.concatenate's copy


def test_split_rows_is_np_split_at_the_counts():
    y = np.arange(40.0).reshape(20, 2)
    rows = [3, 0, 9, 8]
    got = split_rows(y, rows)
    want = np.split(y, np.cumsum(rows)[:-1])
    assert len(got) == len(want)
    assert all(g.shape == w.shape and np.array_equal(g, w) for g, w in zip(got, want, strict=True))
    assert all(np.shares_memory(g, y) for g in got if g.size)
