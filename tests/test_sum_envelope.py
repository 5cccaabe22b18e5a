"""The reference noise's sum envelope (actdiff.compare.budgets.sequential_sum_noise) reads the op on squared inputs
and squared weights only through its sum over the outputs. Where the op is linear in each row
(refops.linear_in_rows: every product of the spec), budgets._squared_op_sum runs it on the rows summed per
distinct index row (one row of a MATMUL, one per distinct expert pair of an expert product) instead of on every
row. What must hold: that sum equals the op over every row summed, to float64's rounding of two summation orders
(terms of one sign: at most ~(T + K) 2^-53 relative; 1e-12 here), at every product node of both bundled models;
and any parameter that rounds a value computed from the inputs, adds a bias or is not known to be linear sends
the envelope back to the op over every row."""

from __future__ import annotations

from collections import ChainMap

import numpy as np
import pytest
from helpers import ensure_tiny_model
from test_hypotheses import TINY, Model
from test_hypotheses_stacked import BERT_PROMPTS, TINY_PROMPTS

from actdiff.compare.budgets import SUM_OPS, _rows_summed, _squared_op_sum
from actdiff.compare.refops import linear_in_rows, run_op, spec_params

SUM_RTOL = 1e-12


@pytest.fixture(scope="module", params=["tiny", "minilm"])
def model(request) -> Model:
    if request.param == "tiny":
        ensure_tiny_model()
        return Model(TINY, TINY_PROMPTS)
    return Model(request.getfixturevalue("minilm_model_dir"), BERT_PROMPTS)


def _every_row(m: Model, node, v: dict, w: dict, params: dict) -> float:
    squares = {
        i: np.square(np.asarray(v[i]), dtype=np.float64) for i in node.inputs if np.asarray(v[i]).dtype.kind == "f"
    }
    sq_w = {k: np.square(w[k]) for k in node.weights}
    return float(np.sum(run_op(m.graph, node, ChainMap(squares, v), sq_w, params)))


def test_summed_rows_give_the_sum_over_every_row(model):
    m = model
    w = {k: np.asarray(a, dtype=np.float64) if a.dtype.kind == "f" else a for k, a in m.weights.items()}
    checked, grouped = 0, []
    for node in (n for n in m.graph if n.op in SUM_OPS and n.op != "POOL"):
        spec = spec_params(m.graph, node)
        no_bias = {**spec, "bias": "none"} if "bias" in spec else spec
        assert linear_in_rows(node, no_bias), node.name
        for v in m.vals:
            want = _every_row(m, node, v, w, no_bias)
            got = _squared_op_sum(m.graph, node, v, w, spec)
            assert abs(got - want) <= SUM_RTOL * want, (node.name, got, want)
            floats = {i: np.asarray(v[i], np.float64) for i in node.inputs if np.asarray(v[i]).dtype.kind == "f"}
            rows, T = len(next(iter(_rows_summed(node, v, floats).values()))), len(v[node.inputs[0]])
            if len(floats) == len(node.inputs):
                assert rows == 1, node.name  # no index input: every row summed into one
            else:
                assert rows <= T, node.name
                grouped.append(rows < T)
            checked += 1
    assert checked >= 3 * 6
    assert not grouped or any(grouped)  # an expert product: tokens routed alike were summed somewhere


@pytest.mark.parametrize("override", [
    {"output_precision": "fp16"}, {"accumulate": "bf16"}, {"arithmetic": "fp16"}, {"bias": "once"},
    {"round_at": {"input.0": "fp16"}}, {"round_at": {"product": "fp16"}}, {"int_pairs": "s16"},
    {"unknown_to_linearity": 1},
])  # fmt: skip
def test_a_rounding_a_bias_or_an_unknown_parameter_is_not_linear(model, override):
    """Each of these makes the op's output not a linear function of its input rows (or is not known to keep it
    one): the envelope then runs the op over every row, as before."""
    node = next(n for n in model.graph if n.op == "MATMUL")
    spec = {**spec_params(model.graph, node), "bias": "none"}
    assert linear_in_rows(node, spec)
    assert linear_in_rows(node, {**spec, "round_at": {"weight.0": "fp16"}})  # a weight's rounding: every row's own
    assert not linear_in_rows(node, {**spec, **override})
