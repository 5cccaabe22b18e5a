"""stats._columns: a prompt's rows of the nodes table as its columns, in node order; rows whose columns differ are
refused (a table with columns of different lengths would otherwise be written)."""

import pytest

from actdiff.compare.stats import _columns


def test_rows_become_columns_in_order():
    rows = [{"node": "a", "rel_l2": 0.5, "status": "pass"}, {"status": "fail", "node": "b", "rel_l2": 2.0}]
    assert _columns(rows) == {"node": ["a", "b"], "rel_l2": [0.5, 2.0], "status": ["pass", "fail"]}
    assert _columns([]) == {}


@pytest.mark.parametrize("other", [{"node": "b"}, {"node": "b", "rel_l2": 1.0, "status": "x", "extra": 1}])
def test_rows_with_other_columns_are_refused(other):
    with pytest.raises((KeyError, ValueError)):
        _columns([{"node": "a", "rel_l2": 0.5, "status": "pass"}, other])
