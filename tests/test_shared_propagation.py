"""The fp32 propagated budgets simulated once per shard beside the reference noise (actdiff.compare.refnoise) and
taken by a run wherever they are its own (propagation.shared_routing_holds): the statistics with the table are the
statistics simulated in place; the routing rule that makes them so; what shares and what does not."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from helpers import shard_outputs
from test_stats import _dump_pair

from actdiff.compare import propagation as P
from actdiff.compare import refnoise
from actdiff.compare.budgets import Noise, budget, fp32_noise
from actdiff.compare.refnoise import NoiseTable, measure_reference_noise
from actdiff.compare.stats import StatsConfig, compute_shard_stats
from actdiff.h5io import ActivationReader
from actdiff.nodes import build_graph, load_config_json
from actdiff.tables import SHARD_TABLES

# A prompt the run simulates itself is stacked with fewer prompts than in the table's run (only those that do not
# share), and a stacked float64 product may round differently in its last bits (refops.run_op_many): its
# propagated budgets then move by far less than this, relatively (they are compared with errors of 1e-7 and up)
PROPAGATED_RTOL = 1e-8


@pytest.fixture(scope="module", params=["gelu_tanh", "ln_eps"])
def run(request, tiny_model_dir, tmp_path_factory):
    """(folder, reference dump, engine dump, noise table, variant) of 24 corpus prompts: a fault that leaves the
    router's probabilities alone (every prompt shares) and one that moves them (near ties where the engine chose
    other experts than the shared simulation: those prompts are simulated by the run)."""
    tmp = tmp_path_factory.mktemp(f"shared-{request.param}")
    variant = f"fp32+fault={request.param}"
    ref, eng = _dump_pair(tmp, tiny_model_dir, variant, 1)
    noise = tmp / "noise.parquet"
    measure_reference_noise(tiny_model_dir, ref, noise)
    return tmp, ref, eng, noise, variant


def _stats(tmp, label, model_dir, ref, eng, variant, noise, monkeypatch=None, seen=None):
    out = shard_outputs(tmp / label)
    (tmp / label).mkdir(exist_ok=True)
    if monkeypatch is not None:
        real = NoiseTable.propagated

        def counted(self, pid, *args):
            got = real(self, pid, *args)
            seen[pid] = got is not None
            return got

        monkeypatch.setattr(NoiseTable, "propagated", counted)
    compute_shard_stats(model_dir, ref, eng, "actdiff", variant, 0, out, StatsConfig(search_seconds=0), noise=noise)
    return {t: pd.read_parquet(out[t]) for t in SHARD_TABLES}


def test_statistics_with_the_shared_budgets_are_those_simulated_in_place(run, tiny_model_dir, monkeypatch):
    """Every table of the run equal with the shared budgets and without them (noise measured and every prompt
    simulated in place): bit for bit, but a propagated budget of a prompt the run simulated itself, within
    PROPAGATED_RTOL. gelu_tanh shares every prompt; ln_eps moves the routers' probabilities, and at least one
    prompt has a near tie where the engine took other experts (simulated by the run) and one has none."""
    tmp, ref, eng, noise, variant = run
    seen: dict[str, bool] = {}
    here = _stats(tmp, "here", tiny_model_dir, ref, eng, variant, None)
    table = _stats(tmp, "table", tiny_model_dir, ref, eng, variant, noise, monkeypatch, seen)
    assert len(seen) == 24
    if "gelu_tanh" in variant:
        assert all(seen.values())
    else:
        assert any(seen.values()) and not all(seen.values()), seen
    for t in SHARD_TABLES:
        a, b = here[t], table[t]
        if t == "nodes":
            own = a["prompt_id"].map(lambda p: not seen[p]).to_numpy()
            np.testing.assert_array_equal(a["propagated_budget"][~own], b["propagated_budget"][~own])
            np.testing.assert_allclose(a["propagated_budget"][own], b["propagated_budget"][own], rtol=PROPAGATED_RTOL)
            a, b = a.drop(columns="propagated_budget"), b.drop(columns="propagated_budget")
        pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert (table["nodes"]["status"] == "fail").any()  # the fault is found either way


def test_a_run_shares_only_budgets_simulated_with_its_own(run, tiny_model_dir):
    """Another precision's policy, other budget overrides, another reference precision, or a table whose record of
    them was lost (rewritten by pandas): nothing is shared, and the noise is still read."""
    _, ref, _, noise, _ = run
    graph = build_graph(load_config_json(tiny_model_dir))
    with ActivationReader(ref) as r:
        ids = r.prompt_ids
    t = NoiseTable(noise, ids, graph, ref)
    assert t.shares("fp32", {}, "fp32") and t.shares("fp32", None, "fp32")
    assert not t.shares("fp16", {}, "fp32") and not t.shares("int8", {}, "fp32")
    assert not t.shares("fp32", {"*.attn.*": 1e-3}, "fp32") and not t.shares("fp32", {}, "tf32")
    rewritten = noise.parent / "rewritten.parquet"
    pd.read_parquet(noise).to_parquet(rewritten)
    lost = NoiseTable(rewritten, ids, graph, ref)
    assert not lost.shares("fp32", {}, "fp32")
    assert lost.of(ids[0], graph.names()[0]) == t.of(ids[0], graph.names()[0])


def test_the_table_holds_the_shared_simulation_of_every_prompt(run, tiny_model_dir):
    """The propagated budgets and expert choices in the table are a simulation that follows no engine run prompt
    by prompt (no stacking: within PROPAGATED_RTOL), NaN at index nodes, and the choices are top-k ids."""
    from actdiff.compare.stats import CheckpointTensors, NodeWeights64

    _, ref, _, noise, _ = run
    graph = build_graph(load_config_json(tiny_model_dir))
    w64 = NodeWeights64(CheckpointTensors(tiny_model_dir / "model.safetensors"), graph)
    table = pd.read_parquet(noise)
    with ActivationReader(ref) as r:
        for _, pid, values in list(r.iter_prompts(graph.names()))[:3]:
            prop = P.Propagation(graph, pid, values, {}, w64)
            budgets: dict[str, float] = {}
            for node in graph:
                w64.visit(node)
                budgets[node.name] = budget(node, "fp32", fp32_noise(graph, node, values, w64))
                prop.step(node, budgets)
            rows = table[table["prompt_id"] == pid]
            got = dict(zip(rows["node"], rows["propagated"], strict=True))
            want = np.array([prop.out[n] for n in graph.names()])
            np.testing.assert_allclose([got[n] for n in graph.names()], want, rtol=PROPAGATED_RTOL)
            for name, ids in prop.routed.items():
                stored = rows.loc[rows["node"] == name, "routed"].iloc[0]
                np.testing.assert_array_equal(np.asarray(stored).reshape(ids.shape), ids)
            assert (
                rows.loc[rows["routed"].isna(), "node"]
                .map(lambda n: graph[n].op != "TOPK" or graph[n].kind != "index")
                .all()
            )
    w64.visit(None)
    assert refnoise.SHARED_PRECISION == "fp32"


def _routing_case(tiny_model_dir):
    """The tiny model's first MoE block and a reference/engine pair of router probabilities over 4 tokens: token 0
    a near tie (experts 1 and 2 within the engine's error), the others clear."""
    graph = build_graph(load_config_json(tiny_model_dir))
    block = graph.moe_blocks()[0]
    E, k = graph.dims.experts, graph.dims.top_k
    ref = np.full((4, E), 0.1 / (E - k - 1))
    ref[:, 0] = 0.5
    ref[0, 1:3] = [0.2, 0.2 - 1e-6]  # a near tie between experts 1 and 2 for the second slot
    ref[1:, 1], ref[1:, 2] = 0.3, 0.1 - 0.1 / (E - k - 1)
    ref /= ref.sum(axis=1, keepdims=True)
    eng = ref + 1e-5 * np.random.default_rng(0).standard_normal(ref.shape)
    own = np.argsort(-ref, axis=1, kind="stable")[:, :k]  # the shared simulation's choice
    return graph, block, ref, eng, own


def test_shared_routing_holds_unless_the_engine_chose_otherwise_at_a_near_tie(tiny_model_dir):
    """Equal choices everywhere: it holds. Another expert at the near tie: it does not (the run's simulation
    follows the engine there). Another expert at a clear margin: it holds (that is a failing top-k node, not a
    choice a budget follows). Without the engine's ids or probabilities it holds; without the shared choice it
    does not."""
    graph, block, ref, eng, own = _routing_case(tiny_model_dir)
    budgets = {block.probs: 1e-7}
    refs, engs = {block.probs: ref}, {block.probs: eng, block.topk_indices: own.copy()}
    routed = {b.topk_indices: own for b in graph.moe_blocks()}
    others = [b for b in graph.moe_blocks() if b is not block]
    holds = lambda e: P.shared_routing_holds(graph, refs, e, routed, {**budgets, **{b.probs: 1e-7 for b in others}})  # noqa: E731
    assert holds(engs)
    at_tie = own.copy()
    at_tie[0, 1] = 2 if own[0, 1] == 1 else 1
    assert not holds({**engs, block.topk_indices: at_tie})
    clear = own.copy()
    clear[2, 1] = 3
    assert holds({**engs, block.topk_indices: clear})
    assert holds({block.probs: eng})
    assert not P.shared_routing_holds(graph, refs, engs, {}, budgets)


def test_the_simulated_engine_takes_the_engine_s_experts_only_where_they_differ(tiny_model_dir):
    """_route_like_engine: an engine that chose the simulation's own experts at the near tie leaves both top-k
    values as the spec op gave them (the same objects); one that chose another expert there gets its ids and the
    simulation's probabilities at them at that token only."""
    graph, block, ref, eng, own = _routing_case(tiny_model_dir)
    budgets = {block.probs: 1e-7}
    vals = {block.probs: ref}
    w_node, i_node = graph[block.topk_weights], graph[block.topk_indices]
    y_w = np.take_along_axis(ref, own, axis=1)
    for ids, changed in ((own.copy(), False), (own.copy(), True)):
        if changed:
            ids[0, 1] = 2 if own[0, 1] == 1 else 1
        e = {block.probs: eng, block.topk_indices: ids}
        out_i = P._route_like_engine(graph, i_node, own, vals, {block.probs: ref}, e, budgets)
        out_w = P._route_like_engine(graph, w_node, y_w, vals, {block.probs: ref}, e, budgets)
        if not changed:
            assert out_i is own and out_w is y_w
            continue
        np.testing.assert_array_equal(out_i[0], ids[0])
        np.testing.assert_array_equal(out_i[1:], own[1:])
        np.testing.assert_array_equal(out_w[0], ref[0, ids[0]])
        np.testing.assert_array_equal(out_w[1:], y_w[1:])


def test_float32_products_only_where_the_budget_dwarfs_float32_rounding(tiny_model_dir):
    """propagation.float32_product_ok: a MATMUL whose run budget is at least FLOAT32_PRODUCT_MARGIN times its fp32
    budget (reduced-precision weights), never at fp32 budgets, at another op, or without a measured noise."""
    graph = build_graph(load_config_json(tiny_model_dir))
    mm = next(n for n in graph if n.op == "MATMUL")
    other = next(n for n in graph if n.op == "LAYERNORM")
    noise = Noise(3e-7)
    fp16 = budget(mm, "fp16", noise)
    assert P.float32_product_ok(mm, fp16, noise)
    assert not P.float32_product_ok(mm, budget(mm, "fp32", noise), noise)
    assert not P.float32_product_ok(mm, P.FLOAT32_PRODUCT_MARGIN * budget(mm, "fp32", noise) * 0.99, noise)
    assert not P.float32_product_ok(other, fp16, noise)
    assert not P.float32_product_ok(mm, fp16, Noise(float("nan")))
    assert not P.float32_product_ok(mm, float("inf"), noise)


def test_float32_products_move_reduced_precision_budgets_within_the_margin(tiny_model_dir, tmp_path, monkeypatch):
    """A bf16 run's statistics with the simulation's MATMUL products in float32 and with every product in float64
    (the margin set to infinity): every table equal but the propagated budgets, which move by at most
    1/FLOAT32_PRODUCT_MARGIN relatively (the added rounding is at most that fraction of the perturbation it
    accompanies, module comment), and not at all before the first product taken in float32."""
    ref, eng = _dump_pair(tmp_path, tiny_model_dir, "bf16", 1, n_prompts=12)
    taken = []
    real = P.float32_products

    def counted(on: bool = True):
        if on:  # the products taken in float32 (off, the block changes nothing)
            taken.append(1)
        return real(on)

    monkeypatch.setattr(P, "float32_products", counted)
    margin = P.FLOAT32_PRODUCT_MARGIN
    f32 = _stats(tmp_path, "f32", tiny_model_dir, ref, eng, "bf16", None)
    monkeypatch.setattr(P, "FLOAT32_PRODUCT_MARGIN", float("inf"))
    n_taken = len(taken)
    f64 = _stats(tmp_path, "f64", tiny_model_dir, ref, eng, "bf16", None)
    assert n_taken > 0 and len(taken) == n_taken, (n_taken, len(taken))
    for t in SHARD_TABLES:
        a, b = f32[t], f64[t]
        if t == "nodes":
            x, y = a["propagated_budget"].to_numpy(), b["propagated_budget"].to_numpy()
            first = min(n.index for n in build_graph(load_config_json(tiny_model_dir)) if n.op == "MATMUL")
            before = a["node_index"].to_numpy() < first
            np.testing.assert_array_equal(x[before], y[before])
            np.testing.assert_allclose(x, y, rtol=1.0 / margin, atol=0)
            assert not np.array_equal(x, y)
            a, b = a.drop(columns="propagated_budget"), b.drop(columns="propagated_budget")
        pd.testing.assert_frame_equal(a, b, check_exact=True)
