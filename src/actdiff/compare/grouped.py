"""What the statistics compute for a group of short prompts node by node, ahead of judging them one by one
(actdiff.compare.stats): the side's replays, the reference noise and budgets, the propagated budgets.

Every node of every prompt is replayed twice, on the reference's inputs (the local error) and on the side's own
inputs (is the replay the code that produced the dump?), and run once more in float64 by the propagation (the
simulated engine, actdiff.compare.propagation). One call per prompt and node was most of the statistics' cost on
small models: a short prompt's op is microseconds of arithmetic behind a Python call. Short prompts are therefore
read in groups (:func:`grouped`, bounded in bytes) and each node is replayed and propagated for the whole group
at once: the side's replay_many (actdiff.sides.base; one kernel call over the stacked rows on a side that
computes rows independently, bitwise what per-prompt calls give) and propagation.step_together. A group of one
prompt (a long prompt, at full size) gets nothing ahead: it is judged node by node as it always was.

Memory: the group's dumps (at most :func:`group_plan`'s bound, both sides: a prompt that would take a group past it
starts the next group, one larger than it is a group of its own), the read windows they are views into
(actdiff.h5io.WINDOW_BYTES per dump, more where a group spans windows), and the replays on the reference's
inputs (at most half the dumps); a float node's replay on the side's own inputs is reduced to its gap here and
not kept. Measured on the tiny model's bundled shard and its
5x copy (Zen 4): peak RSS 475 and 579 MB against 417 and 500 MB judging prompt by prompt (+58 and +79 MB, under
2 x GROUP_BYTES, which the workflow's statistics jobs reserve: stats_mem_mb). Where the shard's longest prompt
takes more than that, groups may take two thirds of it (:func:`group_plan`): the job holds as much for that
prompt anyway; never more than HOLD_BYTES, past which a prompt's values are read node by node.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from ..h5io import prompt_values_bytes
from ..sides.base import replay_many, same_bits
from .metrics import rel_l2
from .propagation import Propagation, float32_product_ok, step_together
from .refops import run_op_many, spec_params

# The dumps read per group, both sides together: 9 prompts of the tiny model's bundled corpus, 5 of MiniLM's, a
# single prompt at full size (~2 MB per token and side), which is then judged as before. Measured on the bundled
# corpus (1-thread statistics jobs, Zen 4) against groups of one: 48 MB took 12-34 % less CPU time (tiny fp32,
# MiniLM fp32, a GELU fault); 128 MB no less, and it raises the job's peak memory by as much more
GROUP_BYTES = 48 << 20
# The most of both dumps' values a statistics job holds at once: a group (group_plan) stays within it, a prompt
# larger is read node by node (actdiff.h5io.NodeByNode), the nodes it last read kept. The released model's
# 512-token prompt holds 1.08 GB of values (both sides) beside 1.13 GB of weights packed for the engine's replay:
# two such prompts peaked at 3.46 GB read whole, 2.58 GB node by node, the same tables (its weights are 1.9 GB,
# the bound on a job 1.5x them, 2.85 GB). A group within this bound holds it and half as much again of
# replays. The small models never reach it (a 512-token prompt of MiniLM: 173 MB): their groups and reads are
# as before
HOLD_BYTES = 512 << 20


@dataclass
class Replayed:
    """One node of one prompt, replayed ahead of its judging."""

    local: np.ndarray | None  # the replay on the reference's inputs; None where the replay is not the code that ran
    own: np.ndarray | None  # the replay on the side's own inputs: kept for an index node only
    gap: float | None  # a float node's replay gap (:func:`float_gap`); None for an index node


def float_gap(own: np.ndarray, dumped: np.ndarray) -> float:
    """A float node's replay on the side's own inputs against its dump: 0 when they are the same values (NaN at
    the same places included), else their relative L2 (inf where that is not finite)."""
    if same_bits(own, dumped) or np.array_equal(own, dumped, equal_nan=True):
        return 0.0
    gap = rel_l2(own, dumped)
    return gap if math.isfinite(gap) else math.inf


def group_plan(graph, tokens: list[int]) -> tuple[int, list[int]]:
    """(the bound on a group's dumps, the dumps' bytes of each prompt, both sides) for prompts of these token
    counts, judged in this order. The bound is GROUP_BYTES, or two thirds of the longest prompt's dumps where they
    are larger: a group holds its dumps and its replays on the reference's inputs (at most half the dumps), so a
    group within two thirds of the longest prompt's dumps holds about what that prompt holds when judged alone,
    and the job's peak does not grow. Never more than HOLD_BYTES: a prompt beyond that is read node by node. At
    full size (2.1 MB of dumps per token) every prompt used to be a group of one; short prompts beside a long one
    now share a visit of each node (its float64 weights converted once, one float64 product over their stacked
    rows where a prompt's few rows left it bound by reading the weights)."""
    fixed = prompt_values_bytes(graph, 0)  # linear in the tokens: the prompt-level rows and the rows per token
    per_token = prompt_values_bytes(graph, 1) - fixed
    sizes = [2 * (int(t) * per_token + fixed) for t in tokens]
    return max(GROUP_BYTES, min(max(sizes, default=0) * 2 // 3, HOLD_BYTES)), sizes


def grouped(paired: Iterable[tuple[str, dict, dict]], max_bytes: int, sizes: Iterable[int]) -> Iterator[list]:
    """The (prompt_id, reference values, side values) of ``paired`` in groups of consecutive prompts of at most
    ``max_bytes`` together. ``sizes``: each prompt's bytes in the same order, known before it is read
    (:func:`group_plan`, from the dumps' token offsets): a prompt that would take its group past the bound starts
    the next group, read only once the group before it is judged (a prompt larger than the bound is a group of its
    own)."""
    yield from _counted(paired, _group_counts(sizes, max_bytes))


def _group_counts(sizes: Iterable[int], limit: int) -> list[int]:
    """Prompts per group: consecutive prompts while their sizes sum to at most ``limit`` (at least one)."""
    counts: list[int] = []
    size = 0
    for n in sizes:
        if counts and size + n <= limit:
            counts[-1] += 1
            size += n
        else:
            counts.append(1)
            size = n
    return counts


def _counted(paired: Iterable, counts: list[int]) -> Iterator[list]:
    """``paired`` in groups of ``counts`` items, each group read only after the one before it is consumed."""
    items = iter(paired)
    for count in counts:
        group = list(itertools.islice(items, count))
        if len(group) < count:
            raise ValueError(f"{len(group)} prompt(s) where the plan counts {count}: the sizes are not the prompts'")
        yield group
        del group  # not held while the next group is read
    if next(items, None) is not None:
        raise ValueError("more prompts than the sizes the groups were planned with")


def replay_group(graph, replay, missing: frozenset, fused: frozenset, group: list) -> list[dict[str, Replayed]]:
    """Per prompt of ``group``, per node: its replays (:class:`Replayed`), each node replayed for the whole group
    in one call. Empty for a side without a replay and for a group of one prompt (replayed while judged), and
    without the nodes whose value or inputs the side did not capture (judged without a replay). A float node
    outside ``fused`` whose replay on its own inputs is not its dump is judged on the spec op instead
    (stats._replay_reproduces): its replay on the reference's inputs is not run (half of an ONNX Runtime int8
    run's nodes)."""
    per: list[dict[str, Replayed]] = [{} for _ in group]
    if replay is None or len(group) < 2:
        return per
    for node in graph:
        if node.name in missing or any(i in missing for i in node.inputs):
            continue
        own = replay_many(replay, node.name, [{i: eng[i] for i in node.inputs} for _, _, eng in group])
        index = node.kind == "index"
        gaps = [None if index else float_gap(own[k], eng[node.name]) for k, (_, _, eng) in enumerate(group)]
        judged = [k for k, gap in enumerate(gaps) if gap is None or gap == 0.0 or node.name in fused]
        ref_inputs = [{i: group[k][1][i] for i in node.inputs} for k in judged]
        local = dict(zip(judged, replay_many(replay, node.name, ref_inputs), strict=True))
        for k in range(len(group)):
            per[k][node.name] = Replayed(local.get(k), own[k] if index else None, gaps[k])
    return per


# The spec op's float64 values on the side's own inputs held per group ahead of judging (spec_on_own_inputs): a
# side without a replay (llama.cpp, an imported dump) is judged on them at every node, an ONNX Runtime int8 run
# at half its nodes. The small models' groups need at most twice their side's dumps (48 MB at GROUP_BYTES); at
# full size a group may hold up to HOLD_BYTES of dumps, and the nodes past this bound are computed per prompt
# while judged, as before, so the job's peak does not grow
SPEC_AHEAD_BYTES = 64 << 20


@dataclass
class Ahead:
    """One prompt's values computed with its group's, per node (judge_prompt uses them instead of computing)."""

    replayed: dict[str, Replayed]
    noise: dict  # node -> the reference's noise (budgets.Noise)
    propagated: dict[str, float]  # node -> propagated budget
    spec: dict[str, np.ndarray] = field(default_factory=dict)  # node -> the spec op on the side's own inputs


def spec_on_own_inputs(ctx, node, group: list, replayed: list[dict[str, Replayed]]) -> dict[int, np.ndarray]:
    """Per prompt of ``group`` judged at ``node`` against the spec op on its own inputs (stats.ShardContext.local:
    a side without a replay; a float node outside ``fused`` whose replay does not reproduce its dump), that
    value, from one op over their stacked rows where the op allows (refops.run_op_many). Index nodes of a
    replaying side and nodes whose inputs were not captured are left to the judging."""
    g = ctx.graph
    if node.name in ctx.missing or any(i in ctx.missing for i in node.inputs):
        return {}
    if ctx.replay is None:
        need = list(range(len(group)))
    elif node.kind == "index" or node.name in ctx.fused:
        return {}
    else:
        need = [k for k, r in enumerate(replayed) if node.name in r and r[node.name].gap not in (None, 0.0)]
    if not need:
        return {}
    own = [{i: group[k][2][i] for i in node.inputs} for k in need]
    return dict(zip(need, run_op_many(g, node, own, ctx.weights64, spec_params(g, node)), strict=True))


def prepare_group(ctx, group: list) -> list[Ahead | None]:
    """Per prompt of ``group`` (``ctx``: the shard's actdiff.compare.stats.ShardContext), what is computed ahead;
    None for a group of one. Node by node: the replays, then each prompt's reference noise (from the shard's
    noise table, else measured) and budget, then the propagation step of the prompts whose propagated budgets
    the noise table does not hold for this run (ShardContext.shared_propagation), with the node's float64
    weights converted once for the group (NodeWeights64.visit)."""
    if len(group) < 2:
        return [None] * len(group)
    replayed = replay_group(ctx.graph, ctx.replay, ctx.missing, ctx.fused, group)
    noise: list[dict] = [{} for _ in group]
    budgets: list[dict[str, float]] = [{} for _ in group]
    spec: list[dict[str, np.ndarray]] = [{} for _ in group]
    held = 0
    shared = [ctx.shared_propagation(pid, ref, eng) for pid, ref, eng in group]
    own = [k for k, s in enumerate(shared) if s is None]  # the prompts simulated here
    props = [Propagation(ctx.graph, *group[k], ctx.weights64) for k in own]
    try:
        for node in ctx.graph:
            ctx.weights64.visit(node)
            for k, (pid, ref, _) in enumerate(group):
                noise[k][node.name] = ctx.reference_noise(pid, ref, node)
                budgets[k][node.name] = ctx.budget(node.name, noise[k][node.name])
            if props:
                f32 = all(float32_product_ok(node, budgets[k][node.name], noise[k][node.name]) for k in own)
                step_together(props, node, [budgets[k] for k in own], f32)
            if held <= SPEC_AHEAD_BYTES:
                for k, y in spec_on_own_inputs(ctx, node, group, replayed).items():
                    spec[k][node.name] = y
                    held += y.nbytes
    finally:
        ctx.weights64.visit(None)
    for k, prop in zip(own, props, strict=True):
        shared[k] = prop.out
    return [Ahead(r, nz, p, sp) for r, nz, p, sp in zip(replayed, noise, shared, spec, strict=True)]
