"""Statistics computed for groups of prompts (actdiff.compare.grouped): the engine's replay of stacked prompts is
its per-prompt replay bit for bit, and a shard's tables are the same whether its prompts are judged in groups or
one by one."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from helpers import engine_dump, shard_outputs

from actdiff.compare import grouped
from actdiff.compare.grouped import same_bits
from actdiff.compare.refnoise import measure_reference_noise
from actdiff.compare.stats import compute_shard_stats
from actdiff.engine.core import Engine
from actdiff.engine.faults import runnable_faults
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


def test_groups_are_bounded_in_bytes_and_keep_the_order():
    items = [(f"p{i}", {"a": np.zeros(n, np.float32)}, {"a": np.zeros(n, np.float32)}) for i, n in
             enumerate([10, 10, 10, 100, 10, 1])]  # fmt: skip
    groups = list(grouped.grouped(items, max_bytes=160))
    assert [[p for p, _, _ in g] for g in groups] == [["p0", "p1"], ["p2", "p3"], ["p4", "p5"]]
    assert [len(g) for g in grouped.grouped(items, max_bytes=1)] == [1] * 6


@pytest.mark.e2e
def test_tables_are_the_same_judged_in_groups_or_one_by_one(ci_run, tiny_model_dir, tmp_path, monkeypatch):
    """A fault (failing nodes, hypotheses, the search's sample) judged in the default groups and in groups of one
    prompt (the path of a long prompt): every table equal; the propagated budgets, a float64 simulation whose
    stacked products may round differently in the last bits, within 1e-8 relative (they are compared with
    errors at 1e-7 and beyond)."""
    ref = ci_run.results / "tiny-nomic-moe/reference/fp32/activations/shard-0.h5"
    noise = tmp_path / "noise.parquet"
    measure_reference_noise(tiny_model_dir, ref, noise)
    variant = resolve_variant("fp32+fault=f1", {"f1": "gelu_tanh"})
    eng = tmp_path / "eng.h5"
    engine_dump(tiny_model_dir, ref, eng, variant)
    tables = {}
    for label, max_bytes in (("grouped", grouped.GROUP_BYTES), ("alone", 1)):
        monkeypatch.setattr(grouped, "GROUP_BYTES", max_bytes)
        out = shard_outputs(tmp_path / label)
        compute_shard_stats(tiny_model_dir, ref, eng, "actdiff", variant, 0, out, noise=noise)
        tables[label] = {t: pd.read_parquet(out[t]) for t in SHARD_TABLES}
    assert len(tables["grouped"]["nodes"]) > 0 and (tables["grouped"]["nodes"]["status"] == "fail").any()
    for t in SHARD_TABLES:
        a, b = tables["grouped"][t], tables["alone"][t]
        assert list(a.columns) == list(b.columns) and len(a) == len(b), t
        for c in a.columns:
            if c == "propagated_budget":
                np.testing.assert_allclose(a[c], b[c], rtol=1e-8, atol=0, err_msg=t)
            else:
                pd.testing.assert_series_equal(a[c], b[c], check_exact=True, obj=f"{t}.{c}")
