"""Propagated budgets: how far a CORRECT engine's values may drift from the reference at each node, the
outputs included, once every node's own error has propagated through the rest of the model.

A node's local budget (actdiff.compare.budgets) bounds the error a correct engine adds at that node. What
the outputs may then show is not the output node's local budget: errors made early are amplified or damped by
everything after them, and nonlinearly so (a top-k choice at a near tie flips). Rather than bound that with
per-op condition numbers, it is measured on each prompt by simulating the engine the budgets describe:

    the spec model run in float64 (actdiff.compare.refops) from the prompt's token ids, where every float
    node's output is perturbed by a random error of relative L2 norm equal to the node's local budget (fixed
    seed from the prompt id; half independent per element like rounding, half a per-feature relative error
    shared by all tokens like a rounded weight, which mean pooling does not average away), and every later
    node computed from the perturbed values.

The propagated budget of a node is that simulated engine's relative L2 error against the reference there. It
is what an engine that spends its WHOLE local budget at EVERY node would show, so a correct engine, whose
local errors sit several times below the budgets (budgets.SAFETY), stays well inside it, at any precision;
an engine whose outputs exceed it diverges beyond anything correct local errors can produce, whether or not
some node fails locally (e.g. a fused kernel that differs from the per-node code the replay runs, or many
small errors each under budget). Index nodes (top-k ids) are recomputed from the perturbed probabilities, so
routing flips are part of the simulation. At a near tie (the reference's margin between the k-th and the
next expert within twice the engine's probability error there, as the routing tables define it:
actdiff.compare.routing.near_ties) a correct engine may route either way, and one such flip moves a short
prompt's outputs by percents; so there the simulated engine routes as the engine under test did (its weights
still its own probabilities at those experts), and the budget covers the choices actually made. Elsewhere it
routes by its own probabilities: a clear-margin disagreement of the engine is a failing top-k node, not
something a budget should absorb.

The routing rule makes the simulation the same computation for every engine that chose as it did at the near
ties: where the engine took the experts the simulated engine chose itself nothing is replaced. So one
simulation that follows no engine serves every run at a precision with the same budgets, at each prompt where
:func:`shared_routing_holds` (actdiff.compare.refnoise: the fp32 budgets, simulated once per shard).

Cost: one float64 forward per prompt, about what the fp32-noise measurement already costs; 41 % of a MiniLM
fp32 statistics job and 32 % of the tiny model's before the fp32 runs shared it. A run whose budget at a MATMUL
dwarfs what float32 rounding adds there (reduced-precision weights: :func:`float32_product_ok`) takes that
product in float32, about twice as fast (MiniLM's fp16 statistics 20.2 -> 17.7 CPU-s).
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Mapping

import numpy as np

from ..nodes import EMBEDDING, INPUT_IDS, POOLED, Graph
from .budgets import Noise, budget
from .metrics import rel_l2
from .refops import float32_products, run_op, run_op_many, spec_params
from .routing import near_ties


def output_nodes(graph: Graph) -> list[str]:
    """The nodes a user consumes: the final hidden state (what pooling reads), the pooled vector and the
    normalised embedding."""
    pool = graph[POOLED]
    return [*pool.inputs, POOLED, EMBEDDING]


# A product the simulation takes in float32 adds its own rounding to the node's simulated error: the float32
# rounding of both operands and another order of the sums, i.e. a correct fp32 kernel's error on these values,
# which the node's fp32 budget bounds (budgets.SAFETY times the reference's measured fp32 noise there, SAFETY
# covering a second implementation's 3x and the tail). Where the run's budget at the node is at least
# FLOAT32_PRODUCT_MARGIN times that, the added error is at most 1/64 of the perturbation the simulation adds
# there, and it reaches later nodes as that perturbation does: a propagated budget moves by at most 1/64 (1.6 %)
# were the two aligned, and by far less as independent roundings are (MiniLM at fp16, 357 prompts: at most
# 2.3e-4 relative, 0 on average; bench/README.md). Reduced-precision weights give a MATMUL 500-5000x its fp32
# budget (2^-11 or more against noise of 1e-7-1e-6); an fp32 run's budgets are the fp32 budgets, so it is
# simulated in float64 throughout.
FLOAT32_PRODUCT_MARGIN = 64.0


def float32_product_ok(node, run_budget: float, noise: Noise) -> bool:
    """May the simulation take ``node``'s product in float32 (refops.float32_products), given the run's local
    budget there and the node's fp32 noise on this prompt? Only a MATMUL (a dense product: the float64 product
    was most of a reduced-precision run's simulation), with a measured noise and a finite budget at least
    FLOAT32_PRODUCT_MARGIN times the fp32 budget."""
    if node.op != "MATMUL" or not math.isfinite(run_budget) or not math.isfinite(noise.measured):
        return False
    return run_budget >= FLOAT32_PRODUCT_MARGIN * budget(node, "fp32", noise)


def _seed(prompt_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"propagation:{prompt_id}".encode()).digest()[:8], "little")


# The per-element part of a perturbation is a slice of one fixed sequence of standard normal draws (the bank) at
# a random offset from the prompt's generator: drawing fresh normals for every node of every prompt was a seventh
# of a statistics job. A slice is n independent standard normals; two nodes' slices share values only as shifted
# copies (uncorrelated element for element) unless their offsets coincide (chance n / BANK_SIZE).
BANK_SIZE = 1 << 21  # 8 MB of float32, drawn once per process (80 ms; a full-size node of 512 tokens is < 2^21)
_BANK_SEED = 0x5EED_BA4C


@functools.lru_cache(maxsize=1)
def _bank() -> np.ndarray:
    z = np.random.default_rng(_BANK_SEED).standard_normal(BANK_SIZE, dtype=np.float32)
    z.flags.writeable = False
    return z


def _draw(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` independent standard normal values (float32; read-only where a slice of the bank)."""
    if n > BANK_SIZE // 2:  # a larger node draws its own
        return rng.standard_normal(n, dtype=np.float32)
    o = int(rng.integers(0, BANK_SIZE - n + 1))
    return _bank()[o : o + n]


def _perturb(y: np.ndarray, budget: float, rng: np.random.Generator) -> np.ndarray:
    """``y`` plus an error of relative L2 ``budget``, half of its energy independent per element (rounding) and
    half a per-feature relative error shared by every token (what a rounded weight or scale does: it does not
    average out over tokens, so the mean-pooled output sees it in full)."""
    out = _perturbed(y, budget, rng)
    return y if out is None else out[0]


def _perturbed(y: np.ndarray, budget: float, rng: np.random.Generator, ref=None):
    """(:func:`_perturb`'s value, its relative L2 against ``ref`` or None), or None where nothing can be scaled
    (no values, a zero or non-finite norm, a non-finite budget). The per-element draws first, then one per
    feature, from ``rng``; the rest is one C kernel (actdiff.kernels.perturb_f64: the per-feature sums of squares
    of y, the norms, the scaled sum and the error sums against ``ref`` in two passes, where numpy took a dozen
    with float64 temporaries: 7 % of the default report's CPU)."""
    if y.ndim == 0 or y.size == 0 or not math.isfinite(budget):
        return None
    from ..kernels import perturb_f64

    y2 = np.ascontiguousarray(y.reshape(y.shape[0], -1), dtype=np.float64)  # [tokens, features]
    g = _draw(y2.size, rng)
    s = rng.standard_normal(y2.shape[1], dtype=np.float32)
    r = None
    if isinstance(ref, np.ndarray) and ref.dtype == np.float32 and ref.shape == y.shape:
        r = np.ascontiguousarray(ref).reshape(y2.shape)
    done = perturb_f64(y2, s, g, budget, r)
    if done is None:
        return None
    out, sums = done
    out = out.reshape(y.shape)
    if ref is None:
        return out, None
    if sums is None:  # a reference the kernel does not take (another dtype or shape): numpy's definition
        return out, rel_l2(out, ref)
    num, den = sums
    if den == 0.0:
        return out, 0.0 if num == 0.0 else math.inf
    return out, math.sqrt(num) / math.sqrt(den)


def _route_like_engine(graph: Graph, node, y: np.ndarray, vals: dict, ref: Mapping, eng: Mapping, budgets):
    """A top-k node of the simulated engine: its own choice, except at the reference's near ties where the engine
    chose other experts than the simulated engine's own: there it takes the engine's expert ids (and its own
    probabilities at them, renormalised as the spec says). Where both choose alike nothing is replaced, so a
    simulation that follows no engine is this one bit for bit wherever :func:`shared_routing_holds`."""
    block = graph.moe_block_of(node.name)
    if block is None or block.probs not in vals or block.topk_indices not in eng or block.probs not in eng:
        return y  # nothing to follow (a simulation that follows no engine: refnoise's)
    own = y if node.attrs.get("part") == "indices" else _own_choice(graph, block, vals[block.probs])
    take = _engine_choice(graph, block, ref, eng, budgets, own)
    if take is None:
        return y
    tie, eng_idx = take
    out = np.array(y, copy=True)
    if node.attrs.get("part") == "indices":
        out[tie] = eng_idx[tie]
        return out
    w = np.take_along_axis(np.asarray(vals[block.probs], np.float64), eng_idx, axis=1)
    if spec_params(graph, node).get("renormalize"):
        w = w / w.sum(axis=1, keepdims=True)
    out[tie] = w[tie]
    return out


def _engine_choice(graph: Graph, block, ref: Mapping, eng: Mapping, budgets, own: np.ndarray):
    """(the tokens where the simulated engine takes the engine's experts, the engine's expert ids) at ``block``'s
    top-k, or None where it takes none: the reference's near ties at which the engine chose other experts than
    ``own``, the simulated engine's own choice."""
    if block.topk_indices not in eng or block.probs not in eng:
        return None
    k = graph.dims.top_k
    tie = near_ties(ref[block.probs], eng[block.probs], k, float(budgets[block.probs]))
    eng_idx = np.asarray(eng[block.topk_indices], np.int64)
    if not tie.any() or eng_idx.shape != (len(tie), k) or eng_idx.min(initial=0) < 0:
        return None
    tie &= np.any(eng_idx != np.asarray(own, np.int64).reshape(eng_idx.shape), axis=1)
    return (tie, eng_idx) if tie.any() else None


def _own_choice(graph: Graph, block, probs: np.ndarray) -> np.ndarray:
    """The simulated engine's own expert ids at ``block``: the spec's top-k indices of its probabilities."""
    node = graph[block.topk_indices]
    return np.asarray(run_op(graph, node, {block.probs: probs}, {}, spec_params(graph, node)), np.int64)


def shared_routing_holds(graph: Graph, ref: Mapping, eng: Mapping, routed: Mapping[str, np.ndarray], budgets) -> bool:
    """Does the simulated engine of the engine whose values are ``eng`` route exactly as a simulation that
    follows no engine did (``routed``: that simulation's expert ids at each top-k indices node,
    :attr:`Propagation.routed`)? Unless, at some near tie, the engine chose other experts than those: the
    simulated engine follows it there, and everything after differs. ``budgets``: node -> the engine's local
    budget (the probabilities' budget bounds the near ties). Where it holds, the two simulations are the same
    computation on the same draws, and the shared one's propagated budgets are the engine's own
    (actdiff.compare.refnoise)."""
    for block in graph.moe_blocks():
        if block.topk_indices not in routed:
            return False
        if _engine_choice(graph, block, ref, eng, budgets, routed[block.topk_indices]) is not None:
            return False
    return True


class Propagation:
    """The simulated engine of the module docstring, one node at a time in graph order (:meth:`step`), so a
    caller can run it in the same visit of a node as the node's other float64 spec ops and convert the node's
    weights once (actdiff.compare.stats); the random draws come in graph order. ``out``: per float node, the
    relative L2 error against the reference of the simulated engine (NaN for index nodes: their disagreement is
    judged on the routing tables). ``eng``: the engine's values (its routing at near ties is followed; empty: a
    simulation that follows no engine, actdiff.compare.refnoise's). ``routed``: per top-k indices node, the
    expert ids the simulated engine took."""

    def __init__(self, graph: Graph, prompt_id: str, ref: Mapping, eng: Mapping, weights: Mapping):
        self.graph, self.ref, self.eng, self.weights = graph, ref, eng, weights
        self.rng = np.random.default_rng(_seed(prompt_id))
        self.vals: dict[str, np.ndarray] = {INPUT_IDS: np.asarray(ref[INPUT_IDS])}
        self.out: dict[str, float] = {}
        self.routed: dict[str, np.ndarray] = {}
        self.last_use = _last_use(graph)

    def _release(self, node) -> None:
        """Drop the values no later node reads: the float64 values of every node of a 512-token prompt held at
        once were 1.1 GB of the released model's statistics job."""
        for i in (*node.inputs, node.name):
            if self.last_use.get(i, -1) <= node.index:
                self.vals.pop(i, None)

    def step(self, node, budgets: Mapping[str, float], float32_product: bool = False) -> float:
        """The node's propagated budget (NaN for an index node); ``budgets`` holds the local budgets of the
        node and of every node before it; ``float32_product``: :func:`float32_product_ok` at this node."""
        g = self.graph
        with float32_products(float32_product):
            y = run_op(g, node, self.inputs(node), self.weights, spec_params(g, node))
        return self.finish(node, y, budgets)

    def inputs(self, node) -> dict[str, np.ndarray]:
        """The simulated engine's values of the node's inputs."""
        return {i: self.vals[i] for i in node.inputs}

    def finish(self, node, y: np.ndarray, budgets: Mapping[str, float]) -> float:
        """:meth:`step` from the spec op's value ``y`` on :meth:`inputs`: the routing at near ties, the
        perturbation, the error against the reference."""
        g, vals = self.graph, self.vals
        if node.op == "TOPK":
            y = _route_like_engine(g, node, y, vals, self.ref, self.eng, budgets)
        if node.kind == "index":
            self.out[node.name] = math.nan
            if node.op == "TOPK":
                self.routed[node.name] = np.asarray(y, np.int64)
        else:
            ref = self.ref[node.name]
            done = _perturbed(y, float(budgets[node.name]), self.rng, ref)
            if done is None:
                self.out[node.name] = rel_l2(y, ref)
            else:
                y, self.out[node.name] = done
        vals[node.name] = y
        self._release(node)
        return self.out[node.name]


def step_together(
    props: list[Propagation], node, budgets: list[Mapping[str, float]], float32_product: bool = False
) -> None:
    """:meth:`Propagation.step` of ``node`` for several prompts (``budgets``: each one's), with one spec op over
    their stacked rows where the op computes rows independently (refops.run_op_many): a float64 op per prompt and
    node was most of the propagation's cost on short prompts. The random draws stay each prompt's own, in graph
    order; a stacked float64 product may round differently from a prompt's own in the last bits (another BLAS
    blocking), far below the budgets the simulation adds. ``float32_product``: :func:`float32_product_ok` at this
    node for every one of the prompts."""
    g = props[0].graph
    with float32_products(float32_product):
        ys = run_op_many(g, node, [p.inputs(node) for p in props], props[0].weights, spec_params(g, node))
    for prop, y, b in zip(props, ys, budgets, strict=True):
        prop.finish(node, y, b)


def _last_use(graph: Graph) -> dict[str, int]:
    """Per value: the index of the last node that reads it (a top-k node also reads its block's
    probabilities, :func:`_route_like_engine`)."""
    last: dict[str, int] = {}
    for node in graph:
        reads = list(node.inputs)
        block = graph.moe_block_of(node.name) if node.op == "TOPK" else None
        if block is not None:
            reads.append(block.probs)
        for i in reads:
            last[i] = max(last.get(i, -1), node.index)
    return last
