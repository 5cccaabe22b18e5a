"""Root-cause ranking of several prompts at once (actdiff.compare.hypotheses.rank_hypotheses_many): the spec op and
every candidate run once over the prompts' stacked rows where refops.rows_independent says the op computes rows
independently, prompt by prompt elsewhere.

What must hold: wherever rows_independent says yes, the stacked op gives every prompt's own values (to the last
bits of a float64 product, which BLAS blocks by the row count: at most 1e-12 of the values' scale here), for the
spec and every catalogue entry at every node of both bundled models; where a parameter couples the rows (a
quantisation range over the whole tensor) the rule says no and the ranking still equals each prompt's own.
"""

from __future__ import annotations

from collections import ChainMap

import numpy as np
import pytest
from helpers import ensure_tiny_model
from test_hypotheses import TINY, Model

from actdiff.compare.budgets import SUM_OPS, _rows_summed, _squared_op_sum
from actdiff.compare.hypotheses import load_catalogue, rank_hypotheses, rank_hypotheses_many
from actdiff.compare.refops import (
    NotApplicable,
    aux_inputs,
    linear_in_rows,
    rows_independent,
    run_op,
    spec_params,
    squared_weights_output_sum,
)
from actdiff.nodes import LAYOUT_OPS

# three prompts of different lengths: stacked rows that a per-prompt op would not see together
TINY_PROMPTS = [[0, 45, 120, 987, 33, 2001, 64, 5, 2], [0, 3000, 17, 2], [0, 11, 12, 13, 14, 15, 2]]
BERT_PROMPTS = [[101, 2023, 2003, 1037, 3231, 6251, 1012, 102], [101, 7592, 102], [101, 2000, 2001, 2002, 102]]
# a stacked float64 product may round differently from a prompt's own in its last bits: relative to the largest
# value of the node, a sum of K products each rounded to 2^-53 differs by at most ~K * 2^-53 (K <= 1536 here)
STACKED_RTOL = 1e-12
BUDGET = 1e-5


@pytest.fixture(scope="module", params=["tiny", "minilm"])
def model(request) -> Model:
    """Each bundled model with three prompts of different lengths."""
    if request.param == "tiny":
        ensure_tiny_model()
        return Model(TINY, TINY_PROMPTS)
    return Model(request.getfixturevalue("minilm_model_dir"), BERT_PROMPTS)


def _weights64(m: Model) -> dict:
    return {k: np.asarray(a, dtype=np.float64) if a.dtype.kind == "f" else a for k, a in m.weights.items()}


def _stacked_and_alone(m: Model, node, params, w) -> tuple[list, list] | None:
    """(every prompt's output from one op over the stacked rows, each prompt's own), None where not applicable."""
    names = list(node.inputs) + aux_inputs(m.graph, node, params)
    x = {n: np.concatenate([v[n] for v in m.vals]) for n in names}
    try:
        stacked = run_op(m.graph, node, x, w, params)
        alone = [run_op(m.graph, node, v, w, params) for v in m.vals]
    except NotApplicable:
        return None
    rows = np.cumsum([len(v[node.inputs[0]]) for v in m.vals])[:-1]
    return np.split(stacked, rows), alone


def test_rows_independent_ops_give_each_prompt_its_own_values_stacked(model):
    """Every node of the model, the spec and every catalogue entry that applies there: where rows_independent
    says yes, stacked = alone within STACKED_RTOL (index nodes exactly); the layout ops are never stacked."""
    m = model
    w, cat, checked = _weights64(m), load_catalogue(), 0
    for node in m.graph:
        spec = spec_params(m.graph, node)
        cases = [spec] + [{**spec, **h.params} for h in cat if h.applies(m.graph, node, spec)]
        if node.op in LAYOUT_OPS:
            assert not any(rows_independent(node, p) for p in cases), node.name
            continue
        for params in cases:
            assert rows_independent(node, params), (node.name, params)  # no catalogue entry couples rows
            got = _stacked_and_alone(m, node, params, w)
            if got is None:
                continue
            for s, a in zip(*got, strict=True):
                assert s.shape == a.shape and s.dtype == a.dtype, (node.name, params)
                if node.kind == "index":
                    np.testing.assert_array_equal(s, a, err_msg=f"{node.name} {params}")
                    continue
                scale = max(float(np.max(np.abs(a), initial=0.0)), 1e-300)
                diff = float(np.max(np.abs(s - a), initial=0.0))
                assert diff <= STACKED_RTOL * scale, (node.name, params, diff / scale)
            checked += 1
    assert checked >= 100, checked  # the models' every non-layout node, most with several candidates


def test_a_range_over_the_whole_tensor_is_never_stacked(model, tmp_path):
    """A catalogue entry whose output is quantised with one dynamic range per tensor couples the prompts' rows:
    stacked, the ranges would be the group's. rows_independent says no, and the ranking of three prompts
    together gives each the errors it gets alone, bit for bit."""
    node = next(n for n in model.graph if n.op == "MATMUL")
    spec = spec_params(model.graph, node)
    coupled = {**spec, "output_precision": {"bits": 4, "granularity": "tensor"}}
    assert not rows_independent(node, coupled)
    assert rows_independent(node, {**spec, "output_precision": "int8"})  # int8 strings round per row
    w = _weights64(model)
    stacked, alone = _stacked_and_alone(model, node, coupled, w)
    assert any(not np.array_equal(s, a) for s, a in zip(stacked, alone, strict=True))  # the coupling is real
    (tmp_path / "cat.yaml").write_text(
        "- name: output_4bit_per_tensor\n  op: MATMUL\n"
        "  params: {output_precision: {bits: 4, granularity: tensor}}\n"
        "  says: the output is quantised to 4 bits with one range per tensor.\n"
    )
    cat = load_catalogue(tmp_path / "cat.yaml")
    targets = alone  # the engine computed exactly that, prompt by prompt
    many = rank_hypotheses_many(model.graph, node, [(v, t, BUDGET) for v, t in zip(model.vals, targets, strict=True)],
                                w, cat)  # fmt: skip
    for v, t, d in zip(model.vals, targets, many, strict=True):
        one = rank_hypotheses(model.graph, node, v, w, t, BUDGET, cat)
        assert [(r.name, r.error) for r in d.ranked] == [(r.name, r.error) for r in one.ranked]
        assert d.ranked[0].error == 0.0 and d.explained_by == "output_4bit_per_tensor"


def test_ranking_together_is_each_prompts_own_ranking(model):
    """The engine's fp16 outputs at every node (every float node then diverges from the fp32 spec): ranked for the
    three prompts together, every prompt has the verdict, cause, candidate order and not-tested list it has
    alone, and the same errors to STACKED_RTOL in absolute terms: an error is a norm relative to the spec value's
    norm, so values that move by STACKED_RTOL of their scale move it by about as much, however small the error
    itself (a candidate that nearly matches: 2e-7 whose last bits cancel)."""
    m = model
    w, cat = _weights64(m), load_catalogue()
    for node in m.graph:
        targets = [m.engine_out(node.name, "fp16", k) for k in range(len(m.vals))]
        budgets = [BUDGET * (k + 1) for k in range(len(m.vals))]  # each prompt's own budget
        many = rank_hypotheses_many(m.graph, node, list(zip(m.vals, targets, budgets, strict=True)), w, cat)
        for v, t, b, d in zip(m.vals, targets, budgets, many, strict=True):
            one = rank_hypotheses(m.graph, node, v, w, t, b, cat)
            assert (d.verdict, d.explained_by, d.budget, d.not_tested) == (
                one.verdict, one.explained_by, one.budget, one.not_tested), node.name  # fmt: skip
            assert [r.name for r in d.ranked] == [r.name for r in one.ranked], node.name
            np.testing.assert_allclose([r.error for r in d.ranked], [r.error for r in one.ranked],
                                       rtol=0, atol=STACKED_RTOL, err_msg=node.name)  # fmt: skip
            np.testing.assert_allclose(d.baseline_error, one.baseline_error, rtol=0, atol=STACKED_RTOL)


def test_float32_products_move_each_error_within_the_float32_rounding_bound(model):
    """Where a run's budget allows (propagation.float32_product_ok, stats.diagnose_group), the ranking takes a
    MATMUL's products in float32 (refops.float32_products). The engine's int8 outputs at every MATMUL, three
    prompts together: every prompt keeps its verdict, cause and not-tested list, and each candidate's error moves
    by at most what float32 products can move it. That bound, derived: the operands are float32 values (the
    reference's activations, fp32 weights, and their roundings to fp16/bf16/int8 grids), so each product is
    exact in float32's 48-bit products and only the K-term sums round: |y32 - y64| <= K u32 (|x| @ |W|^T)
    element by element (u32 = 2^-24), and an error, a norm relative to the spec's, moves by at most the norm of
    that over the spec's norm (times 1.01 for the float64 side's own rounding)."""
    m = model
    w, cat = _weights64(m), load_catalogue()
    budget = 0.05  # an int8 run's MATMUL budget: its every entry is judged against this
    for node in (n for n in m.graph if n.op == "MATMUL"):
        items = [(v, m.engine_out(node.name, "int8", k), budget) for k, v in enumerate(m.vals)]
        f64 = rank_hypotheses_many(m.graph, node, items, w, cat)
        f32 = rank_hypotheses_many(m.graph, node, items, w, cat, float32_product=True)
        K = m.graph.reduction_length(node)
        W = np.abs(w[node.weights[0]])
        for (v, _, _), a, b in zip(items, f64, f32, strict=True):
            x = np.abs(np.asarray(v[node.inputs[0]], np.float64)).reshape(-1, W.shape[1])
            spec = run_op(m.graph, node, v, w, spec_params(m.graph, node))
            bound = 1.01 * K * 2.0**-24 * float(np.linalg.norm(x @ W.T)) / float(np.linalg.norm(spec))
            assert (a.verdict, a.explained_by, a.not_tested) == (b.verdict, b.explained_by, b.not_tested), node.name
            errs = {r.name: r.error for r in a.ranked}
            assert {r.name for r in b.ranked} == set(errs), node.name
            moved = max(abs(r.error - errs[r.name]) for r in b.ranked)
            assert moved <= bound, (node.name, moved, bound)
            assert moved > 0.0 or not a.ranked, node.name  # float32 was used: the errors moved in the last bits


def test_float32_products_are_the_kernels_matmul_on_every_isa_path(model):
    """refops.float32_products takes a MATMUL's product with the C matmul core (refops._product_f32) on the
    float32-rounded operands, so the ranking's and the simulation's float32 products are the same bits on every
    CPU, ISA path and thread count (kernels_c's arithmetic contract), where numpy's sgemm changed with the CPU.
    Every MATMUL, each prompt's rows, every path this CPU runs at one and two threads: the op's value (its
    product plus its bias in float64) equals the product computed by actdiff.kernels.matmul on the unpacked
    float32 weight, plus the same bias, bit for bit."""
    from actdiff import kernels
    from actdiff.compare.refops import float32_products, op_value

    m = model
    w = _weights64(m)
    before = (kernels.get_isa(), kernels.get_num_threads())
    try:
        for isa in kernels.supported_isas():
            for threads in (1, 2):
                kernels.set_isa(isa)
                kernels.set_num_threads(threads)
                for node in (n for n in m.graph if n.op == "MATMUL"):
                    spec = spec_params(m.graph, node)
                    W32 = np.asarray(w[node.weights[0]], np.float32)
                    b = np.asarray(w[node.weights[1]], np.float64) if len(node.weights) > 1 else 0.0
                    for v in m.vals:
                        with float32_products():
                            y = op_value(m.graph, node, v, w, dict(spec))
                        x = np.asarray(v[node.inputs[0]], np.float32).reshape(-1, W32.shape[1])
                        want = kernels.matmul(np.ascontiguousarray(x), W32).astype(np.float64) + b
                        assert np.array_equal(np.asarray(y).reshape(want.shape), want), (isa, threads, node.name)
    finally:
        kernels.set_isa(before[0])
        kernels.set_num_threads(before[1])


# ---- the reference noise's sum envelope on summed rows (budgets._squared_op_sum)
# The reference noise's sum envelope (actdiff.compare.budgets.sequential_sum_noise) reads the op on squared inputs
# and squared weights only through its sum over the outputs. Where the op is linear in each row
# (refops.linear_in_rows: every product of the spec), budgets._squared_op_sum runs it on the rows summed per
# distinct index row (one row of a MATMUL, one per distinct expert pair of an expert product) instead of on every
# row. What must hold: that sum equals the op over every row summed, to float64's rounding of two summation orders
# (terms of one sign: at most ~(T + K) 2^-53 relative; 1e-12 here), at every product node of both bundled models;
# and any parameter that rounds a value computed from the inputs, adds a bias or is not known to be linear sends
# the envelope back to the op over every row.
SUM_RTOL = 1e-12


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


# The spec's plain products take q without running the op: the summed rows dotted with the weights' squares summed
# over the outputs (refops.squared_weights_output_sum). The test above checks it through _squared_op_sum on the spec;
# these check it under the layouts it also reads (a weight read transposed, expert tensors read (E, H, F), a
# permuted expert index) against the op over every row on squared weights, to the same float64 rounding of two
# summation orders (SUM_RTOL), and that whatever rounds a weight, scales the output or swaps operands is refused
# (None: the envelope then runs the op on squared weights).
LAYOUTS = {
    "MATMUL": [{"weight_orientation": "transposed"}],
    "EXPERT_FC1": [{"w1_orientation": "HF"}, {"expert_index_map": "reversed"}],
    "EXPERT_FC2": [{"w2_orientation": "HF"}, {"expert_index_map": "off_by_one"}],
}


def test_weight_squares_summed_over_the_outputs_under_every_layout(model):
    m, w = model, _weights64(model)
    checked = set()
    for node in (n for n in m.graph if n.op in LAYOUTS):
        for layout in LAYOUTS[node.op]:
            spec = spec_params(m.graph, node)
            params = {**spec, **({"bias": "none"} if "bias" in spec else {}), **layout}
            for v in m.vals:
                floats = {i: np.square(np.asarray(v[i], np.float64)) for i in node.inputs if v[i].dtype.kind == "f"}
                try:
                    want = _every_row(m, node, v, w, params)
                except NotApplicable:  # a non-square weight read transposed
                    continue
                got = squared_weights_output_sum(m.graph, node, _rows_summed(node, v, floats), w, params)
                assert got is not None and abs(got - want) <= SUM_RTOL * want, (node.name, layout, got, want)
                checked.add(node.op)
    assert checked == ({"MATMUL", "EXPERT_FC1", "EXPERT_FC2"} if any(n.op == "ROUTER" for n in m.graph) else
                       {"MATMUL"})  # fmt: skip


@pytest.mark.parametrize("override", [
    {"weight_precision": "fp32"}, {"round_at": {"weight.0": "fp16"}}, {"output_scale": 2.0}, {"bias": "once"},
    {"accumulate": "bf16"},
])  # fmt: skip
def test_weight_squares_summed_only_for_the_plain_product(model, override):
    node = next(n for n in model.graph if n.op == "MATMUL")
    v, w = model.vals[0], _weights64(model)
    plain = {**spec_params(model.graph, node), "bias": "none"}
    x = {node.inputs[0]: np.square(np.asarray(v[node.inputs[0]], np.float64)).sum(axis=0, keepdims=True)}
    assert squared_weights_output_sum(model.graph, node, x, w, plain) is not None
    assert squared_weights_output_sum(model.graph, node, x, w, {**plain, **override}) is None
