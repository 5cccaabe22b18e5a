"""Root-cause hypotheses: the parametric float64 ops (actdiff.compare.refops) and their ranking.

Uses the tiny NomicBERT-MoE model and MiniLM (BERT); faults are injected through the engine, and the
diagnosis sees only arrays. Test ids use opaque labels (f1..f8) so no fault name leaks into them.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
from helpers import ensure_tiny_model

from actdiff.compare import hypotheses
from actdiff.compare.hypotheses import (
    EXPLAINED,
    MATCHES_SPEC,
    UNEXPLAINED,
    Hypothesis,
    load_catalogue,
    rank_hypotheses,
)
from actdiff.compare.refops import OPS, PARAM_NAMES, run_op, spec_params
from actdiff.errors import ConfigError
from actdiff.nodes import INPUT_IDS

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "resources/models/tiny-nomic-moe"
TINY_PROMPTS = [[0, 45, 120, 987, 33, 2001, 64, 5, 2], [0, 3000, 17, 2]]
BERT_PROMPTS = [[101, 2023, 2003, 1037, 3231, 6251, 1012, 102], [101, 7592, 102]]

# (engine fault, the catalogue entry that describes it); ids are opaque on purpose
FAULT_CASES = [
    ("causal_mask", "attention_causal_mask"),
    ("gelu_tanh", "gelu_tanh_approximation"),
    ("expert_bias_dropped", "expert_bias_missing"),
    ("topk_renorm", "topk_weights_renormalized"),
    ("w2_transposed", "expert_w2_transposed"),
    ("ln_eps", "layernorm_eps_1e-2"),
    ("rotary_interleaved", "rotary_interleaved_pairs"),
    ("qkv_head_major", "qkv_split_head_major"),
]
FAULT_IDS = [f"f{i + 1}" for i in range(len(FAULT_CASES))]
BUDGET = 1e-5


class Model:
    def __init__(self, model_dir: Path, prompts: list[list[int]]):
        from safetensors.numpy import load_file

        from actdiff.models.loading import load_reference_model
        from actdiff.nodes import build_graph
        from actdiff.reference import ReferenceRunner

        self.dir = Path(model_dir)
        model, cfg, _ = load_reference_model(self.dir)
        self.graph = build_graph(cfg)
        runner = ReferenceRunner(model, self.graph)
        self.vals = runner.run_batch(prompts)
        runner.close()
        for v, ids in zip(self.vals, prompts, strict=True):
            v[INPUT_IDS] = np.asarray(ids, dtype=np.int64)
        self.weights = load_file(str(self.dir / "model.safetensors"))
        self._engine = None

    @property
    def engine(self):
        if self._engine is None:
            from actdiff.engine.core import Engine

            self._engine = Engine(self.dir)
        return self._engine

    def engine_out(self, name: str, variant: str, prompt: int = 0) -> np.ndarray:
        v = self.vals[prompt]
        return self.engine.run_node(name, {i: v[i] for i in self.graph[name].inputs}, variant=variant)


@pytest.fixture(scope="module")
def tiny() -> Model:
    ensure_tiny_model()
    return Model(TINY, TINY_PROMPTS)


@pytest.fixture(scope="module")
def minilm(minilm_model_dir) -> Model:
    return Model(minilm_model_dir, BERT_PROMPTS)


def _first_changed(graph, fault_name: str):
    from actdiff.engine.faults import runnable_faults

    return next(n for n in graph if runnable_faults()[fault_name].changes(n))


# ------------------------------------------------------------------------------- (a) spec params
@pytest.mark.parametrize("which", ["tiny", "minilm"])
def test_spec_params_reproduce_reference_at_every_node(which, request):
    m: Model = request.getfixturevalue(which)
    ops_seen = set()
    for v in m.vals:
        for node in m.graph:
            y = run_op(m.graph, node, v, m.weights, spec_params(m.graph, node))
            ref = v[node.name]
            assert y.shape == ref.shape, node.name
            if node.kind == "index":
                assert y.dtype == np.int64
                np.testing.assert_array_equal(y, ref, err_msg=node.name)
            else:
                assert y.dtype == np.float64
                err = np.linalg.norm(y - ref) / np.linalg.norm(ref)
                assert err < 1e-5, f"{node.name} ({node.op}): relative L2 {err:.2e}"
            ops_seen.add(node.op)
    if which == "tiny":
        assert ops_seen == set(OPS)  # the tiny graph exercises every op type


# ------------------------------------------------------------------------------------ catalogue
def test_catalogue_covers_every_parameter_of_every_op():
    cat = load_catalogue()
    assert len({h.name for h in cat}) == len(cat) >= 60
    for op in OPS:
        for param in PARAM_NAMES[op]:
            assert any(op in h.ops and param in h.params for h in cat), f"no hypothesis varies {op}.{param}"


def test_catalogue_is_validated(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- {name: x, op: GELU, params: {shape: odd}, says: Something.}\n")
    with pytest.raises(ConfigError, match="no parameter"):
        load_catalogue(bad)
    bad.write_text("- {name: x, op: NOT_AN_OP, params: {form: tanh}, says: Something.}\n")
    with pytest.raises(ConfigError, match="unknown op"):
        load_catalogue(bad)


def test_catalogue_is_extensible_without_code(tiny, tmp_path):
    """A new entry in a YAML file is ranked like the packaged ones (here: an eps not in the catalogue)."""
    f = tmp_path / "extra.yaml"
    f.write_text("- {name: my_eps, op: LAYERNORM, params: {eps: 0.02}, says: LayerNorm eps is 0.02.}\n")
    cat = load_catalogue(f)
    name = "emb_ln"
    target = run_op(tiny.graph, name, tiny.vals[0], tiny.weights, {"eps": 0.02})
    d = rank_hypotheses(tiny.graph, name, tiny.vals[0], tiny.weights, target, BUDGET, cat)
    assert (d.verdict, d.explained_by) == (EXPLAINED, "my_eps")


# ------------------------------------------------------------------------- (b) and (c) faults
@pytest.mark.parametrize("case", FAULT_CASES, ids=FAULT_IDS)
def test_fault_is_explained_by_its_hypothesis(tiny, case):
    fault, expected = case
    variant = f"fp32+fault={fault}"
    node = _first_changed(tiny.graph, fault)
    target = tiny.engine_out(node.name, variant)
    d = rank_hypotheses(tiny.graph, node, tiny.vals[0], tiny.weights, target, BUDGET)
    assert d.baseline_error > 10 * BUDGET  # the fault really changes this node
    assert d.ranked[0].name == expected, d.sentence()
    assert (d.verdict, d.explained_by) == (EXPLAINED, expected)
    assert d.ranked[0].error <= BUDGET
    assert variant not in repr(d) and variant not in str(d.to_dict())


@pytest.mark.parametrize("case", FAULT_CASES, ids=FAULT_IDS)
def test_fault_without_its_hypothesis_is_unexplained(tiny, case):
    fault, expected = case
    node = _first_changed(tiny.graph, fault)
    target = tiny.engine_out(node.name, f"fp32+fault={fault}")
    full = rank_hypotheses(tiny.graph, node, tiny.vals[0], tiny.weights, target, BUDGET)
    cat = [h for h in load_catalogue() if h.name != expected]
    d = rank_hypotheses(tiny.graph, node, tiny.vals[0], tiny.weights, target, BUDGET, cat)
    assert d.verdict == UNEXPLAINED
    assert d.explained_by is None and d.says is None and not d.also_consistent
    assert d.baseline_error == pytest.approx(full.baseline_error)
    sentence = d.sentence()
    assert f"{d.baseline_error:.2e}" in sentence
    assert not any(r.name in sentence for r in d.ranked)  # the closest wrong name is not reported


# ------------------------------------------------------------------------------ (d) clean engine
def _one_node_per_op(graph):
    seen, out = set(), []
    for n in graph:
        key = (n.op, n.attrs.get("part") if n.op == "TOPK" else None)
        if key not in seen:
            seen.add(key)
            out.append(n.name)
    return out


def test_clean_engine_matches_spec_at_every_op_type(tiny):
    names = _one_node_per_op(tiny.graph)
    assert {tiny.graph[n].op for n in names} == set(OPS)
    for name in names:
        d = rank_hypotheses(tiny.graph, name, tiny.vals[0], tiny.weights, tiny.engine_out(name, "fp32"), BUDGET)
        assert d.verdict == MATCHES_SPEC, d.sentence()
        assert d.explained_by is None


def test_clean_engine_matches_spec_on_bert(minilm):
    for name in _one_node_per_op(minilm.graph) + ["encoder.layers.0.attn.q", "encoder.layers.0.attn.v"]:
        target = minilm.engine_out(name, "fp32")
        d = rank_hypotheses(minilm.graph, name, minilm.vals[0], minilm.weights, target, BUDGET)
        assert d.verdict == MATCHES_SPEC, d.sentence()


# --------------------------------------------------------------------------------- criterion
def test_hypothesis_equal_to_spec_never_explains(tiny):
    """A target far from the spec that no entry reproduces, with an entry identical to the spec here."""
    name = "encoder.layers.0.attn.context"
    spec = run_op(tiny.graph, name, tiny.vals[0], tiny.weights, {})
    rng = np.random.default_rng(0)
    target = spec + 0.1 * np.linalg.norm(spec) / np.sqrt(spec.size) * rng.standard_normal(spec.shape)
    cat = [h for h in load_catalogue() if h.name == "attention_softmax_without_max"]
    d = rank_hypotheses(tiny.graph, name, tiny.vals[0], tiny.weights, target, BUDGET, cat)
    assert d.verdict == UNEXPLAINED
    assert d.ranked[0].error == pytest.approx(d.baseline_error)


def test_index_nodes_use_mismatch_fraction(tiny):
    name = "encoder.layers.1.mlp.router.topk_indices"
    target = run_op(tiny.graph, name, tiny.vals[0], tiny.weights, {"order": "by_index"})
    cat = [Hypothesis("ids_sorted", ("TOPK",), {"order": "by_index"}, "Sorted by id.")]
    d = rank_hypotheses(tiny.graph, name, tiny.vals[0], tiny.weights, target, 0.0, cat)
    assert d.metric == "mismatch_fraction"
    assert 0 < d.baseline_error <= 1
    assert (d.verdict, d.explained_by, d.ranked[0].error) == (EXPLAINED, "ids_sorted", 0.0)


def test_an_unexplained_search_row_carries_no_candidate_sentence(tmp_path):
    """The search summary keeps the best residual of a node nothing explains, never its candidate's sentence:
    the report would otherwise show one hypothesis's text beside a node it does not explain (issue 15)."""
    import pandas as pd

    from actdiff.compare.aggregate import search_summary
    from actdiff.report.data import Run
    from actdiff.report.sections import _search_md
    from actdiff.tables import SUMMARY_TABLES

    row = {"node": "encoder.layers.0.attn.q_rot", "node_index": 9, "op": "ROPE", "rank": 1, "kind": "fit",
           "name": "ROPE.angles", "says": "RoPE angles built in float32 by repeated multiplication", "error": 1e-3,
           "params": "{}", "explains": False, "baseline_error": 2e-3, "budget": 1e-6, "prompts": 2, "rows": 3,
           "tried": 40, "seconds": 0.5, "timed_out": False}  # fmt: skip
    p = tmp_path / "search.parquet"
    pd.DataFrame([row]).astype({"node_index": "int64"}).to_parquet(p)
    assert SUMMARY_TABLES["search"].schema is not None
    s = search_summary(pd.read_parquet(p))
    assert s["says"].tolist() == [""] and s["error"].tolist() == [1e-3]
    run = Run(tmp_path, "m", "s", "fp32", {}, {}, {}, None, {}, summary={"search": s})
    md = _search_md(run)
    assert "nothing explains" in md and "repeated multiplication" not in md


def test_equal_residuals_go_to_the_search_order_not_the_alphabet(tmp_path):
    """Two findings with the same residual (sqrt(2) is 1.4140625 in fp16 and in bf16, so rounding a GELU's
    divisor to either gives identical values) are told apart by the search's own order (rank: fp16 is tried
    first), not by name: sorting by name reported a float16 model's GELUs as rounding to bf16."""
    import pandas as pd

    from actdiff.compare.aggregate import search_summary

    base = {"node": "encoder.layers.0.mlp.act", "node_index": 20, "op": "GELU", "kind": "precision", "error": 6e-8,
            "params": "{}", "explains": True, "baseline_error": 7e-5, "budget": 3e-7, "prompts": 3, "rows": 30,
            "tried": 40, "seconds": 0.5, "timed_out": False}  # fmt: skip
    rows = [{**base, "rank": r, "name": f"GELU.round_at.divisor={f}", "says": f"divisor in {f}"}
            for r, f in ((1, "fp16"), (2, "bf16"))]  # fmt: skip
    p = tmp_path / "search.parquet"
    pd.DataFrame(rows).astype({"node_index": "int64"}).to_parquet(p)
    assert search_summary(pd.read_parquet(p))["name"].tolist() == ["GELU.round_at.divisor=fp16"]


def test_search_table_says_each_explanation_once(tmp_path):
    """Issue 18: the searched-explanations table has one row per distinct explanation with the nodes it explains
    (it repeated a multi-line sentence per node), names a verdict cause by its number instead of repeating its
    sentence, and keeps unexplained nodes apart."""
    import pandas as pd

    from actdiff.report.data import Run
    from actdiff.report.sections import _search_md

    says = "GELU computed with the tanh approximation."
    base = {"op": "GELU", "rank": 1, "kind": "fit", "name": "GELU.tanh", "says": says, "error": 1e-7, "params": "{}",
            "explains": True, "baseline_error": 1e-3, "budget": 1e-6, "prompts": 2, "rows": 3, "tried": 10,
            "seconds": 0.5, "timed_out": False}  # fmt: skip
    rows = [
        base | {"node": f"encoder.layers.{i}.mlp.act", "node_index": 10 * i, "error": 10.0 ** -(7 + i)}
        for i in range(3)
    ]
    rows.append(base | {"node": "emb_ln", "node_index": 1, "op": "LAYERNORM", "explains": False, "says": ""})
    s = pd.DataFrame(rows)
    verdict = {"causes": [{"hypothesis": "GELU.tanh", "says": says, "nodes": [r["node"] for r in rows[:3]]}]}
    run = Run(tmp_path, "m", "s", "fp32", {}, verdict, {}, None, {}, summary={"search": s})
    md = _search_md(run)
    table = [ln for ln in md.splitlines() if ln.startswith("| ") and "found" not in ln]
    assert len(table) == 2, md  # one explanation, one unexplained node
    assert says not in md and "cause 1" in table[0] and "mlp\\.act" in table[0] and "nothing explains" in table[1]
    assert "| 1.00e-07 |" in table[0]  # the worst residual over the three nodes
    assert md.lstrip().startswith("<details><summary>Searched explanations at 4 node(s)")


# --------------------------------------------------------------------------- products shared in a ranking
def test_shared_products_give_the_same_bits_and_compute_each_product_once(tiny, monkeypatch):
    """Inside refops.shared_products every MATMUL candidate of the catalogue gives the bits it gives alone, and
    the candidates that change only what follows the product (bias, output precision) reuse the spec op's:
    products computed = distinct (weight, operand) pairs. A ranking gives the same errors either way."""
    from actdiff.compare import refops

    cat = load_catalogue()
    v, w = tiny.vals[0], {k: np.asarray(a, dtype=np.float64) for k, a in tiny.weights.items()}
    node = next(n for n in tiny.graph if n.op == "MATMUL" and len(n.weights) == 2)  # with a bias
    spec = spec_params(tiny.graph, node)
    cands = [spec] + [{**spec, **h.params} for h in cat if h.applies(tiny.graph, node, spec)]
    post = {"bias", "output_precision"}  # what follows the product
    post_only = [c for c in cands if all(c[k] == spec[k] for k in spec if k not in post)]
    assert len(post_only) >= 5  # spec, bias missing / twice, activations fp16 / bf16

    def outputs():
        out = []
        for c in cands:
            try:
                out.append(run_op(tiny.graph, node, v, w, c))
            except refops.NotApplicable:
                out.append(None)
        return out

    alone = outputs()
    with refops.shared_products():
        shared = outputs()
        computed = list(refops._SHARED)
    for c, a, b in zip(cands, alone, shared, strict=True):
        assert (a is None) == (b is None), c
        if a is not None:
            np.testing.assert_array_equal(a, b, err_msg=str(c))
    assert refops._SHARED is None  # the block ended
    # one product for the post-only candidates together, one for each other applicable candidate at most
    assert len(computed) <= len(cands) - len(post_only) + 1
    assert len(computed) < len(cands), (len(computed), len(cands), len(post_only))
    target = tiny.engine_out(node.name, "fp32")
    d = rank_hypotheses(tiny.graph, node, v, w, target, BUDGET)
    monkeypatch.setattr(hypotheses, "shared_products", contextlib.nullcontext)  # every product computed
    d0 = rank_hypotheses(tiny.graph, node, v, w, target, BUDGET)
    assert [(r.name, r.error) for r in d.ranked] == [(r.name, r.error) for r in d0.ranked]
    assert d.baseline_error == d0.baseline_error


def test_gelu_candidates_give_their_own_bits_inside_shared_products(tiny):
    """Inside refops.shared_products every GELU candidate gives the bits it gives alone. (Their erf is no longer
    shared: at 1-3 ns a value (actdiff.kernels.erf_f64) computing it again costs what comparing the inputs with a
    kept one did, and a kept erf took the place of a product.)"""
    from actdiff.compare import refops

    v, w = tiny.vals[0], {k: np.asarray(a, dtype=np.float64) for k, a in tiny.weights.items()}
    node = next(n for n in tiny.graph if n.op == "GELU")
    spec = spec_params(tiny.graph, node)
    cands = [spec] + [{**spec, **h.params} for h in load_catalogue() if h.applies(tiny.graph, node, spec)]
    assert sum(c["form"] == "erf" and not c.get("round_at") for c in cands) >= 3  # the spec, activations fp16/bf16
    alone = [run_op(tiny.graph, node, v, w, c) for c in cands]
    with refops.shared_products():
        shared = [run_op(tiny.graph, node, v, w, c) for c in cands]
    for c, a, b in zip(cands, alone, shared, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=str(c))


def test_output_precision_candidates_finish_the_spec_value_and_run_no_op(tiny, monkeypatch):
    """At one node of every op type, a candidate that overrides only what run_op does after the op (output
    precision, scale, arithmetic: refops.POST_OP_PARAMS) is scored on the spec's op value, finished: the op runs
    once for the spec and once per other candidate, and every error is the one computing each candidate
    whole gives, to the bit."""
    from actdiff.compare import refops

    calls = []
    for op, impl in list(refops._IMPL.items()):
        monkeypatch.setitem(refops._IMPL, op, lambda *a, _impl=impl, _op=op: calls.append(_op) or _impl(*a))
    v, w = tiny.vals[0], {k: np.asarray(a, dtype=np.float64) for k, a in tiny.weights.items()}
    cat, post_only_seen = load_catalogue(), 0
    for name in _one_node_per_op(tiny.graph):
        node = tiny.graph[name]
        spec = spec_params(tiny.graph, node)
        applicable = [h for h in cat if h.applies(tiny.graph, node, spec)]
        post_only = [h for h in applicable if set(h.params) <= refops.POST_OP_PARAMS]
        post_only_seen += len(post_only)
        # a target off the spec (10 % noise) so every candidate is scored, none is exact
        target = run_op(tiny.graph, node, v, w, spec)
        if node.kind != "index":
            target = target * (1.0 + 0.1 * np.random.default_rng(0).standard_normal(target.shape))
        calls[:] = []
        d = rank_hypotheses(tiny.graph, node, v, w, target, BUDGET)
        assert calls.count(node.op) <= 1 + len(applicable) - len(post_only), (name, calls)
        monkeypatch.setattr(hypotheses, "POST_OP_PARAMS", frozenset())  # every candidate computed whole
        d0 = rank_hypotheses(tiny.graph, node, v, w, target, BUDGET)
        monkeypatch.setattr(hypotheses, "POST_OP_PARAMS", refops.POST_OP_PARAMS)
        assert [(r.name, r.error) for r in d.ranked] == [(r.name, r.error) for r in d0.ranked], name
        assert d.baseline_error == d0.baseline_error and d.verdict == d0.verdict
    assert post_only_seen >= 2 * (len(set(OPS)) - 2)  # activations fp16 / bf16 at every float op
