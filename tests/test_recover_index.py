"""Index mappings recovered from the data (actdiff.compare.recover_index) on the tiny NomicBERT-MoE model.

Inputs are the tiny model's real activations (the spec ops run through the graph on its checkpoint); each
planted bug builds the engine's output from those inputs in numpy with a planted index mapping (positions
that wrap or clamp, keys dropped past a limit or outside a window, a token left out of the pooling), rounded
to fp32 like an engine's, and the recovery must name the mapping with its numbers.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import tiny_spec_activations

from actdiff.compare.findings import Deadline, explains
from actdiff.compare.recover_index import recover_attention_keys, recover_pool_weights, recover_rope_positions
from actdiff.compare.refops import attention_scale, run_op, spec_params
from actdiff.compare.search import make_context

BUDGET = 1e-5
LENGTHS = (40, 33, 18, 140)  # long enough for the planted mappings to matter, one short; 140 > hidden (128)


class Tiny:
    def __init__(self):
        self.graph, self.weights, self.vals = tiny_spec_activations(LENGTHS)

    def first(self, op: str) -> str:
        return next(n.name for n in self.graph if n.op == op)

    def inputs(self, name: str) -> list[dict]:
        return [{k: v[k] for k in self.graph[name].inputs} for v in self.vals]

    def findings(self, name: str, targets, searcher):
        targets = [np.asarray(t, np.float32) for t in targets]
        ctx = make_context(self.graph, name, self.inputs(name), targets, self.weights, BUDGET, Deadline(600))
        return ctx, sorted(searcher(ctx), key=lambda f: f.error)


@pytest.fixture(scope="module", autouse=True)
def one_blas_thread():
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


@pytest.fixture(scope="module")
def tiny() -> Tiny:
    return Tiny()


def _explained(ctx, found):
    assert found, "no finding"
    best = found[0]
    assert explains(best.error, ctx.err0, ctx.budget), best.says
    return best


# ------------------------------------------------------------------------------------------ ROPE
def _rope_planted(tiny: Tiny, name: str, positions) -> list[np.ndarray]:
    """Token t rotated by positions(T)[t]: neox rotation in numpy with the model's base."""
    d = tiny.graph.dims
    out = []
    for x in tiny.inputs(name):
        a = np.asarray(x[tiny.graph[name].inputs[0]], np.float64)
        T, _, hd = a.shape
        half = hd // 2
        ang = positions(T)[:, None] * d.rotary_base ** (-np.arange(0, hd, 2) / hd)[None, :]
        cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
        if d.rotary_interleaved:
            x1, x2 = a[..., 0::2], a[..., 1::2]
            r = np.empty_like(a)
            r[..., 0::2], r[..., 1::2] = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        else:
            x1, x2 = a[..., :half], a[..., half:]
            r = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        out.append(r)
    return out


def test_rope_positions_wrap(tiny):
    name = tiny.first("ROPE")
    ctx, found = tiny.findings(name, _rope_planted(tiny, name, lambda T: np.arange(T) % 16.0), recover_rope_positions)
    best = _explained(ctx, found)
    assert best.params["positions"] == "mod" and best.params["period"] == 16, best.says
    assert "wrap at 16" in best.says


def test_rope_positions_clamped(tiny):
    name = tiny.first("ROPE")
    planted = _rope_planted(tiny, name, lambda T: np.minimum(np.arange(T), 20.0))
    ctx, found = tiny.findings(name, planted, recover_rope_positions)
    best = _explained(ctx, found)
    assert best.params["positions"] == "clamp" and best.params["limit"] == 20, best.says


def test_rope_positions_scaled(tiny):
    name = tiny.first("ROPE")
    ctx, found = tiny.findings(name, _rope_planted(tiny, name, lambda T: 0.3 * np.arange(T)), recover_rope_positions)
    best = _explained(ctx, found)
    assert best.params["positions"] == "scaled" and best.params["scale"] == pytest.approx(0.3), best.says


# ------------------------------------------------------------------------------------------ ATTENTION
def _attention_planted(tiny: Tiny, name: str, keep) -> list[np.ndarray]:
    """Attention with query q attending to the keys j where keep(T)[q, j]."""
    out = []
    for x in tiny.inputs(name):
        q, k, v = (np.asarray(x[n], np.float64) for n in tiny.graph[name].inputs[:3])
        T, nh, hd = q.shape
        s = np.einsum("qhd,khd->hqk", q, k) * attention_scale("inv_sqrt_head_dim", hd)
        s = np.where(keep(T)[None], s, -np.inf)
        p = np.exp(s - s.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        out.append(np.einsum("hqk,khd->qhd", p, v).reshape(T, nh * hd))
    return out


def test_attention_keys_dropped(tiny):
    name = tiny.first("ATTENTION")
    planted = _attention_planted(tiny, name, lambda T: np.broadcast_to(np.arange(T) < 24, (T, T)))
    ctx, found = tiny.findings(name, planted, recover_attention_keys)
    best = _explained(ctx, found)
    assert best.params["upper"] == "limit" and best.params["key_limit"] == 24, best.says
    assert "positions >= 24 are dropped" in best.says


def test_attention_sliding_window(tiny):
    name = tiny.first("ATTENTION")
    j = np.arange(max(LENGTHS))
    planted = _attention_planted(tiny, name, lambda T: np.abs(j[:T, None] - j[None, :T]) <= 5)
    ctx, found = tiny.findings(name, planted, recover_attention_keys)
    best = _explained(ctx, found)
    assert (best.params["behind"], best.params["ahead"]) == (5, 5), best.says


def test_attention_causal(tiny):
    name = tiny.first("ATTENTION")
    planted = _attention_planted(tiny, name, lambda T: np.tril(np.ones((T, T), bool)))
    ctx, found = tiny.findings(name, planted, recover_attention_keys)
    best = _explained(ctx, found)
    assert best.params["upper"] == "window" and best.params["ahead"] == 0 and "causal" in best.says


# ------------------------------------------------------------------------------------------ POOL
def _pool_planted(tiny: Tiny, name: str, first: int, last: int) -> list[np.ndarray]:
    out = []
    for x in tiny.inputs(name):
        a = np.asarray(x[tiny.graph[name].inputs[0]], np.float64)
        out.append(a[first : len(a) - last].mean(axis=0, keepdims=True))
    return out


@pytest.mark.parametrize("first, last, words", [(0, 1, "the last token is left out"),
                                                (1, 0, "the first token is left out")])  # fmt: skip
def test_pool_without_a_token(tiny, first, last, words):
    name = tiny.first("POOL")
    ctx, found = tiny.findings(name, _pool_planted(tiny, name, first, last), recover_pool_weights)
    best = _explained(ctx, found)
    assert (best.params["left_out_first"], best.params["left_out_last"]) == (first, last), best.says
    assert best.params["normalised_by"] == "kept" and words in best.says


# ------------------------------------------------------------------------------------------ negatives
SEARCHERS = {"ROPE": recover_rope_positions, "ATTENTION": recover_attention_keys, "POOL": recover_pool_weights}


@pytest.mark.parametrize("op", sorted(SEARCHERS))
@pytest.mark.parametrize("noise", [0.0, 100.0])
def test_spec_and_noise_are_not_explained(tiny, op, noise):
    """The spec's own output (fp32) names no mapping; noise 100x the budget is explained by none."""
    name = tiny.first(op)
    node = tiny.graph[name]
    spec = [run_op(tiny.graph, node, x, tiny.weights, spec_params(tiny.graph, node)) for x in tiny.inputs(name)]
    rng = np.random.default_rng(1)
    scale = noise * BUDGET * np.sqrt(sum(float(np.sum(s * s)) for s in spec) / sum(s.size for s in spec))
    ctx, found = tiny.findings(name, [s + scale * rng.standard_normal(s.shape) for s in spec], SEARCHERS[op])
    assert not [f for f in found if explains(f.error, ctx.err0, ctx.budget)], [f.says for f in found]
