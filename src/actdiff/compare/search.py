"""Explanations that are found, not looked up: the search run at a failing node the catalogue left unexplained.

Given a bounded sample of one node's inputs (the values the engine's op ran on) and the engine's outputs for
them, every registered searcher proposes functions of the same inputs and reports a
:class:`~actdiff.compare.findings.Finding` with its residual:

- fits of the op's continuous parameters (actdiff.compare.search_fit);
- structural alternatives generated from the op's definition: axes, additive terms, roles of its weights,
  reduced precision at each intermediate step (actdiff.compare.search_fit);
- parameters recovered from the data where the op is linear in them, matched against the checkpoint's tensors
  (actdiff.compare.recover).

The search never reads variant names, fault labels or catalogue entries: only arrays. It runs under a
:class:`~actdiff.compare.findings.Deadline` (logged, configurable: ``stats: {search_seconds: ...}``) and
stops cleanly when it expires, saying so (``timed_out``). It runs once per run, in aggregation, on the shards'
merged samples (actdiff.compare.search_run).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from ..nodes import Graph, Node
from .findings import Deadline, Finding, SearchResult, cpu_seconds, sample_error
from .refops import NotApplicable, float32_products, run_op, spec_params

log = logging.getLogger(__name__)


@dataclass
class SearchContext:
    """One node's sample and the means to evaluate candidates on it."""

    graph: Graph
    node: Node
    inputs: list[dict[str, np.ndarray]]  # per prompt: the node's inputs (and aux nodes, e.g. top-k weights)
    targets: list[np.ndarray]  # per prompt: the engine's output for those inputs
    weights: Mapping[str, np.ndarray]  # every checkpoint tensor by name (read lazily)
    budget: float
    deadline: Deadline
    spec: dict = field(default_factory=dict)  # spec_params of the node
    spec_out: list[np.ndarray] = field(default_factory=list)  # the spec op's outputs, per prompt
    denom: float = 0.0  # sqrt(sum ||spec||^2): the shared denominator
    err0: float = 0.0  # the spec's own error against the targets
    tried: int = 0
    delta32: float | None = None  # float32 products' rounding of the spec op's output (float32_rounding)

    def error_of(self, preds: list[np.ndarray]) -> float:
        self.tried += 1
        return sample_error(self.targets, preds, self.denom)

    def evaluate(self, params: dict) -> float:
        """Residual of the op run with ``params`` overriding the spec (inf when the params cannot apply)."""
        try:
            preds = [run_op(self.graph, self.node, x, self.weights, {**self.spec, **params}) for x in self.inputs]
        except (NotApplicable, KeyError, ValueError, FloatingPointError):
            self.tried += 1
            return float("inf")
        return self.error_of(preds)


# Candidates compared only to find the least (a grid's point, a substituted tensor) may be scored with float32
# products (refops.float32_products, about twice as fast) where nothing rounds the op's output after its product
# (linear_after_product): a residual then moves by about the products' own rounding of the output, measured at the
# node (float32_rounding). Every candidate within COARSE_MARGIN times that of the float32 least is scored again in
# float64 (coarse_scores): the float64 least is among them unless a candidate's float32 rounding is over
# COARSE_MARGIN / 2 times the spec operands' (a candidate's operands have their magnitudes; measured: the residual
# moved by 0.05x the output's rounding).
COARSE_MARGIN = 64.0


def linear_after_product(ctx: SearchContext, params: dict) -> bool:
    """Whether the node's op under the spec with ``params`` is a MATMUL whose product nothing rounds after it (no
    intermediate step or output rounded, no reduced-precision arithmetic)."""
    p = {**ctx.spec, **params}
    if ctx.node.op != "MATMUL" or p.get("accumulate", "fp64") != "fp64" or p.get("output_precision", "fp64") != "fp64":
        return False
    return all(k.startswith(("input.", "weight.")) for k in p.get("round_at", {}))


def float32_rounding(ctx: SearchContext) -> float:
    """Relative L2 by which float32 products move the spec op's output on ``ctx``'s sample (measured once; inf
    where the spec op cannot run)."""
    if ctx.delta32 is None:
        try:
            with float32_products(), np.errstate(all="ignore"):
                y = [run_op(ctx.graph, ctx.node, x, ctx.weights, dict(ctx.spec)) for x in ctx.inputs]
            ctx.delta32 = sample_error(ctx.spec_out, y, ctx.denom)
        except (NotApplicable, KeyError, ValueError, FloatingPointError):
            ctx.delta32 = float("inf")
    return ctx.delta32


def coarse_scores(ctx: SearchContext, candidates: list, score32: Callable, score64: Callable) -> list[float]:
    """Residuals of ``candidates``, in order, for a caller that needs their least: ``score32(c)`` run with float32
    products, then ``score64(c)`` for each within COARSE_MARGIN x float32_rounding(ctx) of the least. The float64
    least, and its residual, as scoring every candidate in float64 gives. Stops when the deadline passes (fewer
    values than candidates)."""
    vals = []
    with float32_products(), np.errstate(all="ignore"):
        for c in candidates:
            if ctx.deadline.expired():
                break
            vals.append(score32(c))
    if not vals:
        return vals
    low = min(vals) + COARSE_MARGIN * float32_rounding(ctx)
    return [score64(c) if v <= low else v for c, v in zip(candidates, vals, strict=False)]


Searcher = Callable[[SearchContext], Iterable[Finding]]
SEARCHERS: list[Searcher] = []  # filled by the searcher modules on import
# The order the searchers run in, whatever order their modules happen to be imported in (two explanations of the
# same output, e.g. a position offset and the recovered positions t + 3, are reported under the first that
# explains, so the order must not depend on imports): the op's own parameters first (cheap: fits of a few
# constants, structural choices, rounding), then what least squares and assignment recover from the data, then
# the index mappings recovered per token.
SEARCH_MODULES = ("search_fit", "search_quant", "recover", "recover_index")


def register(fn: Searcher) -> Searcher:
    SEARCHERS.append(fn)
    return fn


def searchers() -> list[Searcher]:
    """Every searcher, in SEARCH_MODULES order (registration order within a module)."""
    import importlib

    for module in SEARCH_MODULES:
        importlib.import_module(f"{__package__}.{module}")
    return sorted(SEARCHERS, key=lambda fn: SEARCH_MODULES.index(fn.__module__.rsplit(".", 1)[-1]))


def make_context(graph, node, inputs, targets, weights, budget, deadline) -> SearchContext:
    node = graph[node] if isinstance(node, str) else node
    ctx = SearchContext(graph, node, list(inputs), [np.asarray(t) for t in targets], weights, float(budget), deadline)
    ctx.spec = spec_params(graph, node)
    ctx.spec_out = [run_op(graph, node, x, weights, ctx.spec) for x in ctx.inputs]
    ctx.denom = float(np.sqrt(sum(float(np.sum(s.astype(np.float64) ** 2)) for s in ctx.spec_out)))
    if ctx.denom == 0.0:
        ctx.denom = float(np.sqrt(sum(float(np.sum(np.asarray(t, np.float64) ** 2)) for t in ctx.targets)))
    ctx.err0 = sample_error(ctx.targets, ctx.spec_out, ctx.denom)
    ctx.tried = 0
    return ctx


def search_node(
    graph: Graph,
    node: Node | str,
    inputs: list[dict[str, np.ndarray]],
    targets: list[np.ndarray],
    weights: Mapping[str, np.ndarray],
    budget: float,
    deadline: Deadline,
) -> SearchResult:
    """Run every registered searcher at ``node`` on the sample until one explains it or the deadline passes."""
    t0 = cpu_seconds()
    ctx = make_context(graph, node, inputs, targets, weights, budget, deadline)
    res = SearchResult(ctx.node.name, ctx.node.op, ctx.err0, ctx.budget, len(ctx.inputs),
                       int(sum(np.shape(t)[0] for t in ctx.targets)))  # fmt: skip
    spent = []  # (searcher, seconds), for the log: where a node's search time goes
    for searcher in searchers():
        if deadline.expired():
            res.timed_out = True
            break
        t1 = cpu_seconds()
        for f in searcher(ctx):
            res.findings.append(f)
        spent.append(f"{searcher.__name__} {cpu_seconds() - t1:.1f}")
        if res.explained_by is not None:
            break
    res.timed_out = res.timed_out or (deadline.expired() and res.explained_by is None)
    res.findings.sort(key=lambda f: f.error)
    res.tried, res.seconds = ctx.tried, cpu_seconds() - t0
    log.info(
        "search %s: %d candidates in %.2f CPU s (%s)%s; best %s", ctx.node.name, res.tried, res.seconds,
        ", ".join(spent),
        " (time budget spent)" if res.timed_out else "", res.best.says if res.best else "none",
    )  # fmt: skip
    return res
