"""The generic search (actdiff.compare.search_fit): bugs that no catalogue entry names are found from the op's
definition alone.

Each planted bug is a refops parameter set applied to the reference model's own inputs at one node; the target is
that output rounded to fp32 (what an engine hands over), so the right candidate leaves ~3e-8 of fp32 rounding,
well inside the budget, while the fit has to get the value from the data. Test ids are opaque (p1..) so no
planted parameter leaks into what the search could see.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import ensure_tiny_model
from test_hypotheses import BERT_PROMPTS, TINY, TINY_PROMPTS, Model

from actdiff.compare.findings import Deadline, explains
from actdiff.compare.hypotheses import UNEXPLAINED, rank_hypotheses
from actdiff.compare.refops import run_op, spec_params
from actdiff.compare.search import search_node
from actdiff.compare.search_fit import fmt, simple_values

BUDGET = 1e-5
L0 = "encoder.layers.0."
MOE = "encoder.layers.1.mlp."
_rng = np.random.default_rng(1)
# the two short prompts of test_hypotheses plus one of 48 tokens, so token-axis bugs see a realistic length
PROMPTS = [*TINY_PROMPTS, [0, *_rng.integers(5, 4000, size=46).tolist(), 2]]

# (node, planted parameters, expected finding name, {param: (value, relative tolerance)}).
# Tolerances: the target carries fp32 rounding (relative ~6e-8); each fitted constant moves the output by an
# order-one relative amount per unit relative change (ROPE offset: per unit), so rounding alone shifts a fit by
# ~1e-6. 1e-3 is also the resolution below which a fit counts as the spec value (SAME_AS_SPEC), so a fit
# inside it is the planted value. LayerNorm eps is weakly identified (eps/var ~ 3e-3 changes the output only
# ~1e-3 relative), hence 1e-2 there.
CASES = [
    (L0 + "attn.q_rot", {"base": 5000.0}, "ROPE.base", {"base": (5000.0, 1e-3)}),
    (L0 + "attn.k_rot", {"position_offset": 3}, "ROPE.position_offset", {"position_offset": (3.0, 1e-3)}),
    (L0 + "attn.q_rot", {"base": 500.0, "position_offset": 1}, "ROPE.base+position_offset",
     {"base": (500.0, 1e-3), "position_offset": (1.0, 1e-3)}),
    ("emb_ln", {"eps": 3e-3}, "LAYERNORM.eps", {"eps": (3e-3, 1e-2)}),
    (L0 + "attn.context", {"scale": 1.0 / 128}, "ATTENTION.scale", {"scale": (1.0 / 128, 1e-3)}),
    (MOE + "experts.act", {"form": "sigmoid", "sigmoid_scale": 1.5}, "GELU.sigmoid_scale",
     {"sigmoid_scale": (1.5, 1e-3)}),
    (MOE + "experts.act", {"form": "tanh", "tanh_cubic": 0.03}, "GELU.tanh_scale+tanh_cubic",
     {"tanh_scale": (np.sqrt(2 / np.pi), 1e-3), "tanh_cubic": (0.03, 1e-3)}),
    (MOE + "router.probs", {"temperature": 0.5}, "SOFTMAX.temperature", {"temperature": (0.5, 1e-3)}),
    (MOE + "router.probs", {"axis": "tokens"}, "SOFTMAX.axis=tokens", {}),
    (L0 + "norm1", {"axis": "tokens"}, "LAYERNORM.axis=tokens", {}),
    (L0 + "attn.context", {"softmax_axis": "queries"}, "ATTENTION.softmax_axis=queries", {}),
    (L0 + "resid_attn", {"second_scale": 0.5}, "ADD.second_scale", {"second_scale": (0.5, 1e-3)}),
    (L0 + "attn.context", {"round_at": {"probs": "fp16"}}, "ATTENTION.round_at.probs=fp16", {}),
    (L0 + "norm2", {"round_at": {"normalized": "bf16"}}, "LAYERNORM.round_at.normalized=bf16", {}),
    (L0 + "attn.q", {"part": 1}, "SPLIT.part=1", {}),
]  # fmt: skip
IDS = [f"p{i + 1}" for i in range(len(CASES))]


@pytest.fixture(scope="module")
def tiny() -> Model:
    ensure_tiny_model()
    return Model(TINY, PROMPTS)


def _planted_targets(m: Model, node: str, params: dict) -> list[np.ndarray]:
    return [run_op(m.graph, node, v, m.weights, params).astype(np.float32) for v in m.vals]


def _search(m: Model, node: str, targets: list[np.ndarray]):
    return search_node(m.graph, node, m.vals, targets, m.weights, BUDGET, Deadline(600))


def test_planted_bugs_are_not_in_the_catalogue(tiny):
    """The point of the search: no catalogue entry explains any of these (the catalogue ranking, run on the
    same target, leaves each unexplained)."""
    for node, planted, *_ in CASES:
        v = tiny.vals[0]
        target = run_op(tiny.graph, node, v, tiny.weights, planted).astype(np.float32)
        d = rank_hypotheses(tiny.graph, node, v, tiny.weights, target, BUDGET)
        assert d.verdict == UNEXPLAINED, (node, d.explained_by)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_planted_bug_is_found(tiny, case):
    node, planted, name, values = case
    res = _search(tiny, node, _planted_targets(tiny, node, planted))
    assert res.baseline_error > 10 * BUDGET  # the bug really changes this node
    best = res.best
    assert best is not None and best.name == name, [f.says for f in res.findings]
    assert explains(best.error, res.baseline_error, res.budget) and res.explained_by == best
    for param, (want, tol) in values.items():
        assert best.params[param] == pytest.approx(want, rel=tol, abs=tol), best.says
    assert f"{best.error:.1e}" in best.says and best.kind in ("fit", "structure", "precision")
    assert json.loads(json.dumps(best.to_dict())) == best.to_dict()  # params are JSON-safe
    print(f"{node}: {best.name} in {res.seconds:.2f} s, {res.tried} candidates")  # timings reported, never asserted


def test_variance_divisor_reads_as_gamma_scale_and_fits_as_ddof(tiny):
    """Dividing the variance by n - 2 scales the normalized values by sqrt(n / (n - 2)) up to eps: the data
    cannot tell the two apart, so the cheap closed-form term fit explains it first and names the equivalent
    divisor; the continuous fit of the divisor itself finds ddof 2 with the same residual."""
    from actdiff.compare.search import make_context
    from actdiff.compare.search_fit import continuous

    node = L0 + "norm2"
    targets = _planted_targets(tiny, node, {"ddof": 2.0})
    res = _search(tiny, node, targets)
    n = tiny.graph.dims.hidden
    assert res.explained_by is not None and res.best.name == "LAYERNORM.gamma_scale"
    assert res.best.params["gamma_scale"] == pytest.approx(np.sqrt((n - 2) / n), rel=1e-6)
    assert f"divided by {n - 2} instead of {n}" in res.best.says
    ctx = make_context(tiny.graph, node, tiny.vals, targets, tiny.weights, BUDGET, Deadline(600))
    fits = {f.name: f for f in continuous(ctx)}
    assert fits["LAYERNORM.ddof"].params["ddof"] == pytest.approx(2.0, abs=1e-3)
    assert explains(fits["LAYERNORM.ddof"].error, ctx.err0, BUDGET)


_SUBSET_NAMES = ("ROPE.base", "GELU.sigmoid_scale", "LAYERNORM.axis=tokens", "ATTENTION.round_at.probs=fp16")
SUBSET_CASES = [c for c in CASES if c[2] in _SUBSET_NAMES]


@pytest.mark.parametrize("case", SUBSET_CASES, ids=[f"s{i}" for i in range(len(SUBSET_CASES))])
def test_fits_on_a_subset_and_screening_find_the_same(tiny, case, monkeypatch):
    """With the fit/screen subset forced small (16 rows: whole short prompts, or every 4th row of a row-wise
    op), fits run on the subset and discrete candidates are screened on it; the result is the same finding,
    with its residual measured on the whole sample."""
    import actdiff.compare.search_fit as sf

    monkeypatch.setattr(sf, "MAX_FIT_ROWS", 16)
    node, planted, name, values = case
    res = _search(tiny, node, _planted_targets(tiny, node, planted))
    assert res.best is not None and res.best.name == name and res.explained_by == res.best
    assert res.rows == sum(len(v["input_ids"]) for v in tiny.vals)
    for param, (want, tol) in values.items():
        assert res.best.params[param] == pytest.approx(want, rel=tol, abs=tol)


def test_searchers_stop_at_the_deadline(tiny):
    """A spent deadline stops the search at once and says so; one that expires mid-fit ends the fit cleanly."""
    node = MOE + "experts.act"
    targets = _planted_targets(tiny, node, {"form": "tanh", "tanh_cubic": 0.03})
    res = search_node(tiny.graph, node, tiny.vals, targets, tiny.weights, BUDGET, Deadline(0.0))
    assert res.timed_out and res.tried == 0 and not res.findings
    # a deadline that expires mid-search: it stops cleanly, says so, and has tried less than a full search (the
    # candidates are counted, not timed: a loaded machine only shifts where it stops)
    noise = [t + np.random.default_rng(1).standard_normal(t.shape) * 100 * BUDGET * np.linalg.norm(t) / np.sqrt(t.size)
             for t in targets]  # fmt: skip
    full = search_node(tiny.graph, node, tiny.vals, noise, tiny.weights, BUDGET, Deadline(600))
    part = search_node(tiny.graph, node, tiny.vals, noise, tiny.weights, BUDGET, Deadline(0.05))
    assert not full.timed_out and part.timed_out and part.tried < full.tried, (part.tried, full.tried)


def test_rounded_target_snaps_to_simple_value(tiny):
    """A fit lands a hair off the planted value (fp32 rounding); the report snaps it and says so."""
    node = L0 + "attn.context"
    res = _search(tiny, node, _planted_targets(tiny, node, {"scale": 1.0 / 128}))
    assert res.best.params["scale"] == 1.0 / 128
    assert "1/128" in res.best.says and "spec 0.1768" in res.best.says


NOISE_NODES = [L0 + "attn.q_rot", L0 + "attn.context", "emb_ln", MOE + "experts.act", MOE + "router.probs",
               L0 + "resid_attn", L0 + "attn.q", "embeddings", "embedding", MOE + "experts.weighted_sum"]  # fmt: skip


@pytest.mark.parametrize("node", NOISE_NODES, ids=[f"n{i}" for i in range(len(NOISE_NODES))])
def test_noise_and_spec_are_not_explained(tiny, node):
    """Spec plus random noise 100x the budget: nothing explains it (no candidate absorbs noise). The spec
    itself (rounded to fp32): no finding explains it either."""
    rng = np.random.default_rng(7)
    spec = [run_op(tiny.graph, node, v, tiny.weights, {}) for v in tiny.vals]
    scale = 100 * BUDGET * np.sqrt(sum(float(np.sum(s * s)) for s in spec) / sum(s.size for s in spec))
    noisy = [s + scale * rng.standard_normal(s.shape) for s in spec]
    res = _search(tiny, node, noisy)
    assert res.baseline_error == pytest.approx(100 * BUDGET, rel=0.1)
    assert res.explained_by is None, res.best.says
    assert not any(explains(f.error, res.baseline_error, BUDGET) for f in res.findings)
    res = _search(tiny, node, [s.astype(np.float32) for s in spec])
    assert res.explained_by is None and not any(explains(f.error, res.baseline_error, BUDGET) for f in res.findings)


def test_bert_attention_roles_and_embedding_term(minilm_model_dir):
    """The same searchers on a BERT graph: q and k trade roles; the position embedding added twice."""
    m = Model(minilm_model_dir, BERT_PROMPTS)
    res = _search(m, L0 + "attn.context", _planted_targets(m, L0 + "attn.context", {"input_order": [1, 0, 2]}))
    assert res.explained_by is not None and res.best.name == "ATTENTION.input_order=[1,0,2]", res.best
    res = _search(m, "embeddings", _planted_targets(m, "embeddings", {"position_scale": 2.0}))
    assert res.explained_by is not None and res.best.name == "EMBED.position_scale", res.best
    assert res.best.params["position_scale"] == pytest.approx(2.0, rel=1e-3)


def test_search_parameters_at_spec_values_are_the_spec(tiny):
    """The numeric forms of the named constants compute what the names do (the spec path is unchanged)."""
    g, v, w = tiny.graph, tiny.vals[2], tiny.weights
    ctx = L0 + "attn.context"
    hd = g.dims.head_dim
    np.testing.assert_array_equal(
        run_op(g, ctx, v, w, {"scale": 1.0 / hd}), run_op(g, ctx, v, w, {"scale": "inv_head_dim"})
    )
    np.testing.assert_array_equal(
        run_op(g, "emb_ln", v, w, {"ddof": 1.0}), run_op(g, "emb_ln", v, w, {"variance": "unbiased"})
    )
    act = MOE + "experts.act"
    np.testing.assert_allclose(run_op(g, act, v, w, {"form": "sigmoid", "sigmoid_scale": 1.702}),
                               run_op(g, act, v, w, {"form": "sigmoid"}), rtol=0, atol=0)  # fmt: skip
    for node in g:
        out = run_op(g, node, v, w, {})
        np.testing.assert_array_equal(out, run_op(g, node, v, w, spec_params(g, node)))


def test_number_formats():
    assert fmt(4980.2) == "4,980" and fmt(10000.0) == "10,000" and fmt(0.003) == "0.003" and fmt(3) == "3"
    labels = dict((label, v) for v, label in simple_values(0.0078125))
    assert labels["1/128"] == 1.0 / 128
    assert simple_values(4999.9997)[0] == (5000.0, "5,000")


def test_deadline_counts_cpu_seconds_not_waiting():
    """The search's budget is CPU time of the statistics job's thread: time spent waiting for a core (a loaded
    machine, here a sleep) leaves it whole, so a loaded machine gets the same search as a quiet one; and other
    threads of the process (here one spinning beside it, as an idle BLAS or ORT pool does) do not spend it."""
    import threading
    import time

    stop = threading.Event()

    def spin():
        while not stop.is_set():
            pass

    spinner = threading.Thread(target=spin, daemon=True)
    d = Deadline(0.05)
    spinner.start()
    time.sleep(0.2)
    stop.set()
    spinner.join()
    assert not d.expired() and d.left() > 0.04
    t_end = time.thread_time() + 0.06
    while time.thread_time() < t_end:
        pass
    assert d.expired()
    with Deadline(10).capped(0.0) as c:
        assert c.expired()
