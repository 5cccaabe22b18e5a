"""Statistics computed for groups of prompts (actdiff.compare.grouped): the engine's replay of stacked prompts is
its per-prompt replay bit for bit, and a shard's tables are the same whether its prompts are judged in groups or
one by one, their values read whole or node by node."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from helpers import engine_dump, shard_outputs

from actdiff.compare import grouped
from actdiff.compare import stats as stats_module
from actdiff.compare.grouped import same_bits
from actdiff.compare.refnoise import measure_reference_noise
from actdiff.compare.stats import compute_shard_stats
from actdiff.engine.core import Engine
from actdiff.engine.faults import runnable_faults
from actdiff.h5io import NodeByNode
from actdiff.nodes import INPUT_IDS, LAYOUT_OPS
from actdiff.tables import SHARD_TABLES
from actdiff.variants import resolve_variant

# lengths around the kernels' row tiles (1, a partial tile, several tiles plus a tail)
LENGTHS = (1, 5, 17, 40)
FAULTS = sorted(n for n, f in runnable_faults().items() if not f.padding_only)
VARIANTS = ["fp32", "fp16", "bf16", "int8", "fp16-act", *(f"fp32+fault={n}" for n in FAULTS)]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine(tiny_model_dir)


@pytest.mark.isa_paths  # the kernels' row contract is each path's own
@pytest.mark.parametrize("variant", VARIANTS)
def test_engine_replay_of_stacked_prompts_is_each_prompts_replay_bit_for_bit(engine, variant):
    """Every node, stacked and alone, on the prompts' own forward values: the same bits (the kernels compute each
    row on its own; the layout ops run per prompt)."""
    v = resolve_variant(variant, {n: n for n in FAULTS})
    rng = np.random.default_rng(0)
    values = []
    for n in LENGTHS:
        ids = rng.integers(0, engine.dims.vocab, n, dtype=np.int64)
        values.append({**engine.forward(ids, v), INPUT_IDS: ids})
    stacked_ops = set()
    for node in engine.graph:
        inputs = [{i: x[i] for i in node.inputs} for x in values]
        together = engine.replay_nodes(node.name, inputs, v)
        for k, x in enumerate(inputs):
            alone = engine.replay_node(node.name, x, v)
            assert same_bits(np.ascontiguousarray(together[k]), alone), (variant, node.name, LENGTHS[k])
        if node.op not in LAYOUT_OPS:
            stacked_ops.add(node.op)
    assert {"MATMUL", "LAYERNORM", "GELU", "TOPK", "EXPERT_FC1", "EXPERT_FC2"} <= stacked_ops


def test_planned_groups_stay_within_the_bound_and_read_no_prompt_ahead():
    """With each prompt's size known before it is read (the statistics' plan from the token offsets), a prompt
    that would take its group past the bound starts the next group, and it is read only once the group before
    it has been handed on: the old rule (close once the bound is reached) put a 512-token prompt of the released
    model in one group with the short prompt before it, and held both with their replays."""
    nbytes = [80, 80, 80, 800, 80, 8]
    read: list[str] = []

    def paired():
        for i, n in enumerate(nbytes):
            read.append(f"p{i}")
            yield f"p{i}", {"a": np.zeros(n // 8, np.float32)}, {"a": np.zeros(n // 8, np.float32)}

    seen = []
    for g in grouped.grouped(paired(), 160, nbytes):
        assert read == [p for gr in seen for p in gr] + [p for p, _, _ in g], "a prompt was read ahead of its group"
        assert len(g) == 1 or sum(nbytes[int(p[1:])] for p, _, _ in g) <= 160
        seen.append([p for p, _, _ in g])
    assert seen == [["p0", "p1"], ["p2"], ["p3"], ["p4", "p5"]]
    assert [len(g) for g in grouped.grouped(paired(), 1, nbytes)] == [1] * 6
    with pytest.raises(ValueError, match="more prompts than the sizes"):
        list(grouped.grouped(paired(), 160, nbytes[:-1]))
    with pytest.raises(ValueError, match="the sizes are not the prompts"):
        list(grouped.grouped(paired(), 160, [*nbytes, 8]))


def test_group_bound_follows_the_longest_prompt_only_where_it_exceeds_the_default(tiny_model_dir):
    """GROUP_BYTES while every prompt's dumps are smaller (the bundled corpus on the small models); where one prompt's
    are larger (the released model's 512-token prompt: 1.1 GB), groups may take two thirds of the longest prompt's,
    about what that prompt holds judged alone with its replays, up to HOLD_BYTES."""
    from actdiff.h5io import prompt_values_bytes
    from actdiff.nodes import build_graph, load_config_json

    graph = build_graph(load_config_json(tiny_model_dir))

    def dumps(tokens):  # both sides
        return 2 * prompt_values_bytes(graph, tokens)

    assert grouped.group_plan(graph, [3, 4]) == (grouped.GROUP_BYTES, [dumps(3), dumps(4)])
    long = 2 * grouped.GROUP_BYTES // (dumps(1) - dumps(0))  # one prompt's dumps twice the default bound
    bound, sizes = grouped.group_plan(graph, [29, long, 4])
    assert sizes == [dumps(29), dumps(long), dumps(4)] and bound == dumps(long) * 2 // 3 > grouped.GROUP_BYTES
    huge = 2 * grouped.HOLD_BYTES // (dumps(1) - dumps(0))  # past HOLD_BYTES: read node by node, groups stay within
    assert grouped.group_plan(graph, [29, huge, 4])[0] == grouped.HOLD_BYTES


# A side judged against the spec op on its own inputs (no replay: llama.cpp, an imported dump) gets that op over the
# group's stacked rows (grouped.spec_on_own_inputs), whose float64 sums may round differently in their last bits:
# each by at most K * 2^-53 of its terms' magnitudes (K <= 512 here: 5.7e-14), so a local relative L2 moves by
# about that, absolutely (measured: 1.2e-16), and the amplification (propagated error / max(local, 2^-24)) by that
# over 2^-24, relatively
SPEC_LOCAL_ATOL = 1e-13
SPEC_AMPLIFICATION_RTOL = SPEC_LOCAL_ATOL / 2**-24
SPEC_COLUMNS = {"local_rel_l2", "local_max_abs", "error", "baseline_error"}


@pytest.mark.e2e
@pytest.mark.parametrize("replay", [True, False], ids=["replayed", "spec_on_own_inputs"])
def test_tables_are_the_same_judged_in_groups_or_one_by_one(ci_run, tiny_model_dir, tmp_path, monkeypatch, replay):
    """A fault (failing nodes, hypotheses, the search's sample) judged in the default groups and in groups of one
    prompt (the path of a long prompt): every table equal; the propagated budgets, a float64 simulation whose
    stacked products may round differently in the last bits, within 1e-8 relative (they are compared with
    errors at 1e-7 and beyond). Without a replay (the side's output judged against the spec op on its own inputs,
    computed for the group) the local errors within SPEC_LOCAL_ATOL."""
    import actdiff.sides as sides

    if not replay:
        monkeypatch.setattr(sides, "open_replay", lambda *a, **k: None)
    ref = ci_run.results / "tiny-nomic-moe/reference/fp32/activations/shard-0.h5"
    noise = tmp_path / "noise.parquet"
    measure_reference_noise(tiny_model_dir, ref, noise)
    variant = resolve_variant("fp32+fault=f1", {"f1": "gelu_tanh"})
    eng = tmp_path / "eng.h5"
    engine_dump(tiny_model_dir, ref, eng, variant)
    tables, lengths = {}, {}
    # the plan's own bound, one prompt per group, and one prompt per group read node by node (h5io.NodeByNode: a
    # prompt larger than HOLD_BYTES)
    # without a replay also the default groups with no spec values held ahead past the first node
    # (grouped.SPEC_AHEAD_BYTES 0: the rest computed per prompt while judged, the path of a full-size group)
    runs = (("grouped", None, None), ("alone", 1, None), ("node_by_node", 1, 0))
    ahead_calls: list[int] = []
    if not replay:
        runs += (("capped", None, None),)
        spec_ahead = grouped.spec_on_own_inputs

        def counted(*args):
            out = spec_ahead(*args)
            ahead_calls.append(len(out))
            return out

        monkeypatch.setattr(grouped, "spec_on_own_inputs", counted)
    for label, bound, hold in runs:
        seen = lengths[label] = []
        monkeypatch.setattr(stats_module, "HOLD_BYTES", grouped.HOLD_BYTES if hold is None else hold)
        monkeypatch.setattr(grouped, "SPEC_AHEAD_BYTES", 0 if label == "capped" else 64 << 20)
        ahead_calls.clear()

        def plan(graph, tokens, bound=bound):
            default, sizes = grouped.group_plan(graph, tokens)
            return default if bound is None else bound, sizes

        def recorded(paired, *args, seen=seen):
            for group in grouped.grouped(paired, *args):
                seen.append(len(group) if not isinstance(group[0][1], NodeByNode) else "node by node")
                yield group
                del group

        monkeypatch.setattr(stats_module, "group_plan", plan)
        monkeypatch.setattr(stats_module, "grouped", recorded)
        out = shard_outputs(tmp_path / label)
        compute_shard_stats(tiny_model_dir, ref, eng, "actdiff", variant, 0, out, noise=noise)
        tables[label] = {t: pd.read_parquet(out[t]) for t in SHARD_TABLES}
        groups = sum(1 for n in seen if n != 1)  # a group of one prompt is judged node by node, nothing ahead
        if label == "grouped" and not replay:
            assert sum(n > 0 for n in ahead_calls) > groups  # several nodes of each group computed ahead
        if label == "capped":  # the first node of each group only (values of the tiny model are never 0 bytes)
            assert sum(n > 0 for n in ahead_calls) == groups, (ahead_calls, seen)
    assert max(lengths["alone"]) == 1 and max(lengths["grouped"]) > 1, lengths
    assert set(lengths["node_by_node"]) == {"node by node"}
    for t in SHARD_TABLES:  # the same per-prompt path, the values read whole or node by node: equal bit for bit
        a, b = tables["alone"][t], tables["node_by_node"][t]
        pd.testing.assert_frame_equal(a, b, check_exact=True, obj=t)
    nodes = tables["grouped"]["nodes"]
    assert len(nodes) > 0 and (nodes["status"] == "fail").any()
    assert nodes["replay_gap"].notna().any() == replay  # the path the parameter names ran
    for t in SHARD_TABLES:
        _same_tables(tables["grouped"][t], tables["alone"][t], t, replay)
        if not replay:
            _same_tables(tables["capped"][t], tables["grouped"][t], t, replay)


def _same_tables(a: pd.DataFrame, b: pd.DataFrame, t: str, replay: bool) -> None:
    """Equal but for the float64 values that stacking may round differently (see the test)."""
    assert list(a.columns) == list(b.columns) and len(a) == len(b), t
    for c in a.columns:
        if c == "propagated_budget":
            np.testing.assert_allclose(a[c], b[c], rtol=1e-8, atol=0, err_msg=t)
        elif not replay and c in SPEC_COLUMNS:
            np.testing.assert_allclose(a[c], b[c], rtol=0, atol=SPEC_LOCAL_ATOL, err_msg=f"{t}.{c}")
        elif not replay and c == "amplification":
            np.testing.assert_allclose(a[c], b[c], rtol=SPEC_AMPLIFICATION_RTOL, atol=0, err_msg=f"{t}.{c}")
        else:
            pd.testing.assert_series_equal(a[c], b[c], check_exact=True, obj=f"{t}.{c}")
