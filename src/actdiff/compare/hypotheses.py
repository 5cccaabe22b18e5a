"""Root-cause hypotheses: which known bug, if any, turns the spec's value of a node into the engine's?

For a node that diverges under teacher forcing (the engine's op run on the reference's inputs), every
catalogue entry that applies to the node's op type (``actdiff/data/hypotheses.yaml``: parameter overrides
of the spec, see :mod:`actdiff.compare.refops`) is computed in float64 on the SAME inputs and compared with
the engine's output. The diagnosis only sees arrays (inputs, weights, the engine's output): it never reads
variant names or fault labels, so a hypothesis is named only because its numbers match.

Error measure: relative L2 against the spec value, ``||target - h|| / ||spec||`` with the SAME
denominator for the baseline and every hypothesis, so errors are directly comparable; for index nodes
(top-k expert ids) the fraction of entries that differ.

Verdict (``err0`` = baseline error of the spec itself, ``err_best`` = error of the best hypothesis):

- ``matches spec`` if ``err0 <= budget``: the engine is within its error budget, nothing to explain;
- ``explained`` by the best hypothesis if ``err_best <= max(budget, 0.05 * err0)`` AND
  ``err_best < err0 / 10``;
- ``unexplained`` otherwise, reported with the measured baseline error and no hypothesis name.

Why this criterion: a hypothesis is a claim that the engine computes *that* function. If it is right the
remaining difference is only the engine's numerical noise, i.e. within the node's budget; the
``0.05 * err0`` allowance keeps a right hypothesis explaining when a large fault sits on top of
reduced-precision noise that alone exceeds the (fp32-sized) budget (the fault then dominates, the noise
leaves at most 5% of it). The ``err0 / 10`` condition demands that the hypothesis remove at least 90% of the
discrepancy: a wrong hypothesis that merely moves in the same direction (eps 1e-3 when the engine uses
1e-2, bias added twice when it is dropped) improves the error by a factor of order one, never by ten, so
the closest wrong name is not reported as the cause; without a match the honest answer is "unexplained"
with the size of the divergence. Hypotheses that equal the spec on these inputs (e.g. the naive softmax in
float64) have ``err_h == err0`` and can never explain. When several hypotheses pass, the lowest error wins
and the others are listed in ``also_consistent`` so a report can say the data do not separate them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import yaml

from ..batching import split_rows
from ..errors import ConfigError
from ..nodes import Graph, Node
from .findings import explains
from .refops import (
    OPS,
    PARAM_NAMES,
    POST_OP_PARAMS,
    NotApplicable,
    aux_inputs,
    finish_op,
    float32_products,
    op_value,
    rows_independent,
    run_op,
    shared_products,
    spec_params,
    stacked_rows,
)

DEFAULT_CATALOGUE = Path(__file__).resolve().parent.parent / "data" / "hypotheses.yaml"

MATCHES_SPEC = "matches spec"
EXPLAINED = "explained"
UNEXPLAINED = "unexplained"


_ENTRY_KEYS = {"name", "op", "params", "says", "when", "note", "fault"}
_WHEN_KEYS = {"arch", "part", "kind", "name_suffix"}


@dataclass(frozen=True)
class Hypothesis:
    """One catalogue entry: overrides of the spec parameters of one or more op types."""

    name: str
    ops: tuple[str, ...]
    params: dict
    says: str
    when: dict = field(default_factory=dict)
    note: str = ""
    fault: str = ""  # the short name the engine's deliberate fault uses for this entry (actdiff.engine.faults)

    def matches(self, node: Node, arch: str | None) -> bool:
        """True if the entry's op and ``when`` conditions select ``node`` (``arch`` None: any architecture).
        The engine's deliberate faults select their nodes with this too (actdiff.engine.faults)."""
        if node.op not in self.ops:
            return False
        facts = {"arch": arch, "part": node.attrs.get("part"), "kind": node.kind}
        for key, want in self.when.items():
            allowed = want if isinstance(want, list) else [want]
            if key == "name_suffix":
                if not any(node.name.endswith(str(s)) for s in allowed):
                    return False
            elif not (key == "arch" and arch is None) and facts[key] not in allowed:
                return False
        return True

    def applies(self, graph: Graph, node: Node, spec: dict | None = None) -> bool:
        """True if this entry is a distinct, meaningful variant of ``node``'s op."""
        if not self.matches(node, graph.dims.arch):
            return False
        spec = spec_params(graph, node) if spec is None else spec
        if not set(self.params) <= set(spec):
            return False  # the node has no such parameter (e.g. positions of a rotary model's EMBED)
        return {**spec, **self.params} != spec  # an override equal to the spec is not a hypothesis


@dataclass(frozen=True)
class Ranked:
    name: str
    error: float
    says: str


@dataclass
class Diagnosis:
    node: str
    op: str
    metric: str  # "rel_l2" or "mismatch_fraction" (index nodes)
    budget: float
    baseline_error: float  # the spec's own error against the engine output
    verdict: str  # MATCHES_SPEC | EXPLAINED | UNEXPLAINED
    explained_by: str | None = None
    says: str | None = None
    ranked: list[Ranked] = field(default_factory=list)  # best first
    also_consistent: list[str] = field(default_factory=list)  # other hypotheses that also pass
    not_tested: list[str] = field(default_factory=list)  # applicable by op, but could not be computed

    @property
    def best(self) -> Ranked | None:
        return self.ranked[0] if self.ranked else None

    def sentence(self) -> str:
        """One plain-words line for reports."""
        what = "mismatch fraction" if self.metric == "mismatch_fraction" else "relative L2"
        if self.verdict == MATCHES_SPEC:
            return f"{self.node}: matches the spec ({what} {self.baseline_error:.2e} <= budget {self.budget:.2e})."
        if self.verdict == EXPLAINED:
            b = self.best
            extra = f" (also consistent: {', '.join(self.also_consistent)})" if self.also_consistent else ""
            return (
                f"{self.node}: {self.says} [{b.name}: {what} {self.baseline_error:.2e} against the spec, "
                f"{b.error:.2e} under this hypothesis]{extra}"
            )
        return (
            f"{self.node}: unexplained divergence ({what} {self.baseline_error:.2e} against the spec, budget "
            f"{self.budget:.2e}); none of {len(self.ranked)} catalogue hypotheses for {self.op} accounts for it."
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sentence"] = self.sentence()
        return d


# ------------------------------------------------------------------------------------------ catalogue
def _parse_entry(i: int, e, source: str) -> Hypothesis:
    where = f"{source}: entry {i + 1}"
    if not isinstance(e, dict):
        raise ConfigError(f"{where}: must be a mapping, got {type(e).__name__}")
    unknown = set(e) - _ENTRY_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)} (allowed: {sorted(_ENTRY_KEYS)})")
    for key in ("name", "op", "params", "says"):
        if key not in e:
            raise ConfigError(f"{where}: missing key {key!r}")
    name = e["name"]
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: name must be a non-empty string")
    where = f"{source}: hypothesis {name!r}"
    ops = e["op"] if isinstance(e["op"], list) else [e["op"]]
    bad = [o for o in ops if o not in OPS]
    if bad or not ops:
        raise ConfigError(f"{where}: unknown op type(s) {bad} (known: {', '.join(OPS)})")
    params = e["params"]
    if not isinstance(params, dict) or not params:
        raise ConfigError(f"{where}: params must be a non-empty mapping of overrides")
    for o in ops:
        unknown = set(params) - PARAM_NAMES[o]
        if unknown:
            raise ConfigError(f"{where}: op {o} has no parameter(s) {sorted(unknown)} (has {sorted(PARAM_NAMES[o])})")
    when = e.get("when") or {}
    if not isinstance(when, dict) or set(when) - _WHEN_KEYS:
        raise ConfigError(f"{where}: when must be a mapping with keys among {sorted(_WHEN_KEYS)}")
    says = e["says"]
    if not isinstance(says, str) or not says.strip():
        raise ConfigError(f"{where}: says must be a non-empty sentence")
    fault = str(e.get("fault") or "")
    return Hypothesis(
        name, tuple(ops), dict(params), " ".join(says.split()), dict(when), str(e.get("note") or ""), fault
    )


@lru_cache(maxsize=8)
def _load(path: str) -> tuple[Hypothesis, ...]:
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{p}: cannot read hypothesis catalogue ({exc})") from None
    if not isinstance(data, list):
        raise ConfigError(f"{p}: the catalogue must be a YAML list of entries")
    out = [_parse_entry(i, e, str(p)) for i, e in enumerate(data)]
    seen: set[str] = set()
    for h in out:
        if h.name in seen:
            raise ConfigError(f"{p}: duplicate hypothesis name {h.name!r}")
        seen.add(h.name)
    return tuple(out)


def load_catalogue(path: str | Path | None = None) -> list[Hypothesis]:
    """Read and validate a catalogue (default: the packaged ``actdiff/data/hypotheses.yaml``)."""
    return list(_load(str(Path(path or DEFAULT_CATALOGUE).resolve())))


# ------------------------------------------------------------------------------------------- ranking
def _error(target: np.ndarray, pred: np.ndarray, denom: float, index: bool) -> float:
    if target.shape != pred.shape:
        return 1.0 if index else math.inf
    if index:
        return float(np.mean(target != pred)) if target.size else 0.0
    num = float(np.linalg.norm(np.asarray(target, dtype=np.float64) - pred))
    if not math.isfinite(num):
        return math.inf
    if denom > 0:
        return num / denom
    return 0.0 if num == 0.0 else math.inf


class _Prompts:
    """The inputs of one node on several prompts, for running an op once over their stacked rows where its rows
    are independent (refops.rows_independent) and prompt by prompt elsewhere. One op call per prompt, node and
    candidate was most of the ranking's cost on short prompts: their ops are microseconds of arithmetic behind
    a Python call, and a float64 product of a few rows runs below the core's rate. The stacked inputs are kept
    for the node's every candidate."""

    def __init__(self, node: Node, inputs: list[dict], weights):
        self.node, self.inputs, self.weights = node, inputs, weights
        self.kept: dict[tuple, tuple | None] = {}  # input names -> refops.stacked_rows of them

    def stacked(self, compute, params: dict, names: list[str]) -> tuple[np.ndarray, list[int]] | None:
        """(``compute`` of the stacked ``names``: the rows of every prompt in turn, each prompt's row count), or
        None where the rows under ``params`` are not independent or the inputs do not stack."""
        if len(self.inputs) < 2 or not rows_independent(self.node, params):
            return None
        key = tuple(names) or tuple(self.node.inputs)  # a candidate that reads no input: the node's rows
        if key not in self.kept:
            self.kept[key] = stacked_rows(self.inputs, list(key))
        if self.kept[key] is None:
            return None
        x, rows = self.kept[key]
        y = compute(x)
        return (y, rows) if y.ndim > 0 and len(y) == sum(rows) else None


def _split(stacked: tuple[np.ndarray, list[int]]) -> list[np.ndarray]:
    y, rows = stacked
    return split_rows(y, rows)


def _candidates(graph, node, cat, spec, prompts: _Prompts, errors, spec_values, spec_stacked) -> tuple[list, list]:
    """Per prompt: each applicable entry of ``cat`` run on the node's inputs and scored by ``errors(outputs)``,
    and the names of those that need inputs the prompt lacks. An entry that overrides only what run_op does
    after the op (its output precision: a quarter of the candidates ranked on a reduced-precision run) finishes
    the spec's ``spec_values`` instead of computing the op again: the same values, since the op never reads
    those. An entry that cannot apply on a prompt (NotApplicable) is left out there."""
    n = len(prompts.inputs)
    ranked: list[list[Ranked]] = [[] for _ in range(n)]
    not_tested: list[list[str]] = [[] for _ in range(n)]
    for h in cat:
        if not h.applies(graph, node, spec):
            continue
        params = {**spec, **h.params}
        try:
            names = list(node.inputs) + aux_inputs(graph, node, params)
        except NotApplicable:
            continue
        have = [all(i in x for i in names) for x in prompts.inputs]
        for k in (k for k in range(n) if not have[k]):
            not_tested[k].append(h.name)
        post_op = set(h.params) <= POST_OP_PARAMS
        outs = _outputs(graph, node, params, prompts, names, have, (spec_values, spec_stacked) if post_op else None)
        for k, e in enumerate(errors(outs)):
            if outs[k] is not None:
                ranked[k].append(Ranked(h.name, e, h.says))
    return ranked, not_tested


def _outputs(graph, node, params, prompts: _Prompts, names, have, spec) -> list:
    """One candidate's output per prompt (None where it lacks an input or the params cannot apply); ``spec``:
    the spec's op values (per prompt, stacked or None) for a candidate that only finishes them, else None."""

    def each(k: int):
        if not have[k]:
            return None
        try:
            if spec is not None:
                return finish_op(node, spec[0][k], params)
            return run_op(graph, node, prompts.inputs[k], prompts.weights, params)
        except NotApplicable:
            return None

    if all(have):
        try:
            if spec is None:
                y = prompts.stacked(lambda x: run_op(graph, node, x, prompts.weights, params), params, names)
            elif spec[1] is not None:  # the spec's op value of the stacked rows, finished once
                y = prompts.stacked(lambda _: finish_op(node, spec[1][0], params), params, [])
            else:
                y = None
        except NotApplicable:  # on the stacked rows: prompt by prompt, as each one can
            y = None
        if y is not None:
            return _split(y)
    return [each(k) for k in range(len(have))]


def rank_hypotheses(
    graph: Graph,
    node: Node | str,
    inputs: dict[str, np.ndarray],
    weights: dict[str, np.ndarray],
    target: np.ndarray,
    budget: float,
    catalogue: list[Hypothesis] | None = None,
) -> Diagnosis:
    """Rank the catalogue's hypotheses for ``node`` by how well they reproduce ``target``.

    ``inputs``: the node's input values (one prompt, [T, ...]), keyed by node name; extra entries are
    allowed and used by hypotheses that read other nodes (:func:`refops.aux_inputs`; a hypothesis whose
    extra input is absent is listed in ``not_tested``). ``weights``: raw checkpoint tensors by name.
    ``target``: the engine's output for this node on these inputs. ``budget``: the node's relative-L2
    error budget (for index nodes: the allowed fraction of differing ids)."""
    return rank_hypotheses_many(graph, node, [(inputs, target, budget)], weights, catalogue)[0]


def rank_hypotheses_many(
    graph: Graph,
    node: Node | str,
    items: list[tuple[dict[str, np.ndarray], np.ndarray, float]],
    weights: dict[str, np.ndarray],
    catalogue: list[Hypothesis] | None = None,
    float32_product: bool = False,
) -> list[Diagnosis]:
    """:func:`rank_hypotheses` at one node for several prompts, ``items``: (inputs, target, budget) each; the
    spec op and every candidate run once over the prompts' stacked rows where they compute rows independently
    (refops.rows_independent), prompt by prompt elsewhere. Each prompt's errors, denominators and verdict are
    its own, as ranked alone: the same values but where a stacked float64 product rounds differently in its
    last bits (another BLAS blocking; ~1e-16 relative, far below any budget). ``float32_product``: the node's
    products in float32 (refops.float32_products), for a node whose every prompt's budget allows it
    (actdiff.compare.propagation.float32_product_ok: the float32 rounding is at most 1/64 of the budget, which
    the errors are judged against; a reduced-precision run's matmuls, 500-5000x their fp32 budget)."""
    if isinstance(node, str):
        node = graph[node]
    cat = load_catalogue() if catalogue is None else catalogue
    index = node.kind == "index"
    spec = spec_params(graph, node)
    prompts = _Prompts(node, [x for x, _, _ in items], weights)
    # a candidate that changes only what follows a product reuses the spec op's (shared_products)
    with float32_products(float32_product), shared_products():
        spec_stacked = prompts.stacked(lambda x: op_value(graph, node, x, weights, dict(spec)), spec, list(node.inputs))
        if spec_stacked is not None:
            spec_values = _split(spec_stacked)
        else:
            spec_values = [op_value(graph, node, x, weights, dict(spec)) for x in prompts.inputs]
        spec_outs = [finish_op(node, v, spec) for v in spec_values]
        targets = [_target(node, t, o, index) for (_, t, _), o in zip(items, spec_outs, strict=True)]
        denoms = [_denominator(o, t, index) for o, t in zip(spec_outs, targets, strict=True)]

        def errors(outs: list) -> list[float]:
            return [math.nan if o is None else _error(t, o, d, index) for t, o, d in zip(targets, outs, denoms,
                                                                                          strict=True)]  # fmt: skip

        err0s = errors(spec_outs)
        ranked, not_tested = _candidates(graph, node, cat, spec, prompts, errors, spec_values, spec_stacked)
    return [_verdict(node, index, float(b), e0, r, nt)
            for (_, _, b), e0, r, nt in zip(items, err0s, ranked, not_tested, strict=True)]  # fmt: skip


def _target(node: Node, target, spec_out: np.ndarray, index: bool) -> np.ndarray:
    """The engine's output as the errors read it (float64 once, not per candidate), its shape checked."""
    target = np.asarray(target)
    if not index:
        target = target.astype(np.float64, copy=False)
    if target.shape != spec_out.shape:
        raise ValueError(f"node {node.name}: engine output has shape {target.shape}, the graph says "
                         f"{spec_out.shape}")  # fmt: skip
    return target


def _denominator(spec_out: np.ndarray, target: np.ndarray, index: bool) -> float:
    if index:
        return 0.0
    denom = float(np.linalg.norm(spec_out))
    return denom if denom != 0.0 else float(np.linalg.norm(target))


def _verdict(node: Node, index: bool, budget: float, err0: float, ranked: list[Ranked], not_tested: list[str]):
    """The Diagnosis of one prompt at ``node`` from its baseline error and its ranked candidates."""
    ranked.sort(key=lambda r: r.error)  # stable: catalogue order breaks ties

    def passes(err: float) -> bool:
        return explains(err, err0, budget)  # the one rule for every explanation (actdiff.compare.findings)

    d = Diagnosis(node.name, node.op, "mismatch_fraction" if index else "rel_l2", budget, err0, UNEXPLAINED)
    d.ranked, d.not_tested = ranked, not_tested
    if err0 <= budget:
        d.verdict = MATCHES_SPEC
    elif ranked and passes(ranked[0].error):
        d.verdict, d.explained_by, d.says = EXPLAINED, ranked[0].name, ranked[0].says
        d.also_consistent = [r.name for r in ranked[1:] if passes(r.error)]
    return d
