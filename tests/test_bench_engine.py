"""bench/engine.py's account of a large engine-vs-torch difference (issue 19): on an MoE model the token whose
top-k choice is the closest call, from the engine's own router probabilities; nothing where the outputs agree
or the model has no MoE layer. A near-tie is planted in one layer's probabilities of the real tiny model's
forward; no timing."""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import numpy as np
from helpers import REPO

sys.path.insert(0, str(REPO / "bench"))
_saved_env = dict(os.environ)
import engine as bench_engine  # noqa: E402  (sets the baselines' environment at import: restored below)

os.environ.clear()
os.environ.update(_saved_env)


def _trio(model_dir, planted=None):
    """A stand-in for bench_engine.Trio: the real engine, its forward's router probabilities of one MoE layer
    replaced by ``planted`` (layer, probabilities) where given."""
    from actdiff.engine.core import Engine

    e = Engine(model_dir)
    e.prepare("fp32")
    forward = e.forward

    def planted_forward(ids, variant):
        vals = dict(forward(ids, variant))
        if planted is not None:
            layer, probs = planted
            block = next(b for b in e.graph.moe_blocks() if b.layer == layer)
            vals[block.probs] = probs
        return vals

    return SimpleNamespace(engine=SimpleNamespace(graph=e.graph, forward=planted_forward)), forward


def test_the_closest_routing_call_is_named(tiny_model_dir):
    p, forward = _trio(tiny_model_dir)
    ids = list(range(5, 17))
    blocks = p.engine.graph.moe_blocks()
    assert blocks, "the tiny model has MoE layers"
    layer, k = blocks[-1].layer, p.engine.graph.dims.top_k
    probs = np.array(forward(ids, "fp32")[blocks[-1].probs], dtype=np.float32)
    E = probs.shape[1]
    row = np.full(E, 0.5 / (E - k), np.float32)  # token 7: its k-th and (k+1)-th probabilities 3e-8 apart
    row[:k] = 0.5 / k
    row[k - 1], row[k] = 0.2, np.nextafter(np.float32(0.2), np.float32(0))
    probs[7] = row
    p, _ = _trio(tiny_model_dir, (layer, probs))
    h = np.zeros((len(ids), 4), np.float32)
    moved = h.copy()
    moved[3:, 0] = 0.25  # 9 tokens differ by more than DIFF_EXPLAINED_ABOVE, 3 by less
    moved[:3, 0] = 0.5 * bench_engine.DIFF_EXPLAINED_ABOVE
    got = bench_engine.routing_near_ties(p, ids, moved, h)
    assert got["tokens_differing"] == 9
    assert (got["at_layer"], got["at_token"]) == (layer, 7)
    assert got["smallest_topk_gap"] == float(row[k - 1]) - float(row[k])  # exactly: one float32 ulp of 0.2


def test_nothing_to_explain_where_the_outputs_agree_or_nothing_routes(tiny_model_dir, minilm_model_dir):
    p, _ = _trio(tiny_model_dir)
    h = np.ones((12, 4), np.float32)
    assert bench_engine.routing_near_ties(p, list(range(5, 17)), h + 1e-6, h) is None
    dense, _ = _trio(minilm_model_dir)  # no MoE layer: a difference there is not a routing call
    assert bench_engine.routing_near_ties(dense, list(range(5, 17)), h + 1.0, h) is None
