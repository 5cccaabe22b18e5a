"""The reference noise measured once per shard (actdiff.compare.refnoise): the statistics read from the table are
the statistics measured in place, bit for bit; a table of another dump is refused by name; small models keep
their float64 weights across prompts (NodeWeights64.resident) without changing a value."""

from __future__ import annotations

import pandas as pd
import pytest
from helpers import shard_outputs
from test_stats import _dump_pair

from actdiff.compare.refnoise import NoiseTable, measure_reference_noise
from actdiff.compare.stats import CheckpointTensors, NodeWeights64, StatsConfig, compute_shard_stats
from actdiff.errors import DumpError
from actdiff.h5io import ActivationReader
from actdiff.nodes import build_graph, load_config_json
from actdiff.tables import SHARD_TABLES


@pytest.fixture(scope="module")
def faulty_pair(tiny_model_dir, tmp_path_factory):
    """Reference and a faulty engine dump of 10 corpus prompts, and the reference's noise table."""
    tmp = tmp_path_factory.mktemp("refnoise")
    ref, eng = _dump_pair(tmp, tiny_model_dir, "fp32+fault=gelu_tanh", 1, n_prompts=10)
    noise = tmp / "noise.parquet"
    measure_reference_noise(tiny_model_dir, ref, noise)
    return tmp, ref, eng, noise


def test_statistics_from_the_table_are_the_statistics_measured_in_place(faulty_pair, tiny_model_dir):
    tmp, ref, eng, noise = faulty_pair
    tables = {}
    for label, table in (("here", None), ("table", noise)):
        out = shard_outputs(tmp / label)
        (tmp / label).mkdir(exist_ok=True)
        cfg = StatsConfig(search_seconds=0)
        compute_shard_stats(tiny_model_dir, ref, eng, "actdiff", "fp32+fault=gelu_tanh", 0, out, cfg, noise=table)
        tables[label] = {t: pd.read_parquet(out[t]) for t in SHARD_TABLES}
    nodes = tables["table"]["nodes"]
    assert (nodes["status"] == "fail").any()  # the fault is found either way
    for t in SHARD_TABLES:  # every column of every table, NaN equal to NaN: tolerance 0
        pd.testing.assert_frame_equal(tables["here"][t], tables["table"][t], check_exact=True)
    measured = pd.read_parquet(noise)
    assert len(measured) == 10 * len(nodes["node"].unique())
    assert (measured["envelope"] >= 0).all()


def test_a_table_of_another_dump_is_refused_by_name(faulty_pair, tiny_model_dir, tmp_path):
    _, ref, _, noise = faulty_pair
    graph = build_graph(load_config_json(tiny_model_dir))
    t = pd.read_parquet(noise)
    short = tmp_path / "short.parquet"
    t[t["prompt_id"] != t["prompt_id"].iloc[0]].to_parquet(short)  # one prompt fewer
    with ActivationReader(ref) as r:
        ids = r.prompt_ids
    with pytest.raises(DumpError, match=r"short\.parquet.*lacks 1 prompt.*rerun"):
        NoiseTable(short, ids, graph, ref)
    shuffled = tmp_path / "shuffled.parquet"
    t.iloc[::-1].to_parquet(shuffled)  # nodes out of graph order: not this graph's table
    with pytest.raises(DumpError, match=r"shuffled\.parquet.*every node in graph order"):
        NoiseTable(shuffled, ids, graph, ref)
    assert NoiseTable(noise, ids, graph, ref).of(ids[0], graph.names()[0]).measured >= 0


def test_small_model_weights_stay_converted_across_prompts(tiny_model_dir):
    """The tiny model's float64 weights and squares fit RESIDENT_BYTES: every node's stay held after the next node
    is visited, and equal the per-node conversion bit for bit."""
    import numpy as np

    graph = build_graph(load_config_json(tiny_model_dir))
    raw = CheckpointTensors(tiny_model_dir / "model.safetensors")
    w64 = NodeWeights64(raw, graph)
    assert w64.resident
    matmuls = [n for n in graph if n.op == "MATMUL"][:2]
    w64.visit(matmuls[0])
    first = w64[matmuls[0].weights[0]]
    w64.visit(matmuls[1])
    w64.visit(None)
    assert w64[matmuls[0].weights[0]] is first  # held, not converted again
    np.testing.assert_array_equal(first, np.asarray(raw[matmuls[0].weights[0]], np.float64))
    np.testing.assert_array_equal(w64.squared(matmuls[0].weights[0]), np.square(first))
    assert not first.flags.writeable


def test_a_rule_pins_our_kernels_pool_to_its_threads():
    """pin_threads (every rule adapter) limits our C kernels' pool too, whether the kernels were loaded and asked
    for their pool before it or are loaded after: a one-thread statistics job's replays must not hand work to a
    second kernel thread. Subprocesses: the pool's size is process state."""
    import os
    import subprocess
    import sys

    before = "import actdiff.kernels as K; K.get_num_threads()\n"
    pin = "import actdiff.workflow_support as w\nw.pin_threads(1)\n"
    pin += "import actdiff.kernels as K\nprint(K.get_num_threads())"
    env = {k: v for k, v in os.environ.items() if k != "ACTDIFF_NUM_THREADS"}
    for code in (before + pin, pin):
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip() == "1", (code, p.stdout)


def test_a_rule_makes_openmp_workers_sleep_unless_the_environment_says_otherwise():
    """pin_threads sets OMP_WAIT_POLICY=PASSIVE for the libgomp torch loads later (its workers spinning at every
    barrier cost the reference dump 40 % more CPU time on a loaded machine: workflow_support.pin_threads), and
    leaves a policy the user set alone; torch is not loaded by the adapters' imports, or the setting would come
    too late. Subprocesses: the environment is process state."""
    import os
    import subprocess
    import sys

    code = ("import sys, os\nfrom actdiff.pipeline import dump\nimport actdiff.workflow_support as w\n"
            "w.pin_threads(2)\nprint(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    for given, expected in ((None, "PASSIVE False"), ("ACTIVE", "ACTIVE False")):
        run_env = env if given is None else {**env, "OMP_WAIT_POLICY": given}
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=run_env)
        assert p.returncode == 0, p.stderr
        assert p.stdout.strip() == expected, (given, p.stdout)


def test_weights_are_not_read_to_be_sized(tiny_model_dir):
    """Membership and NodeWeights64's size check come from the checkpoint's header: reading every tensor there
    (Mapping's own ``in`` does) raised the released model's statistics job's peak RSS by 1.1 GB."""
    graph = build_graph(load_config_json(tiny_model_dir))
    raw = CheckpointTensors(tiny_model_dir / "model.safetensors")
    read = []
    real = raw._file

    class Counting:
        def get_tensor(self, key):
            read.append(key)
            return real.get_tensor(key)

        def __getattr__(self, name):
            return getattr(real, name)

    raw._file = Counting()
    w = next(iter(raw))
    assert w in raw and "no such tensor" not in raw
    NodeWeights64(raw, graph)
    assert read == [], read
    assert raw[w] is not None and read == [w]  # reading is what reads


def test_the_sum_envelope_of_stacked_prompts_is_each_prompts_own(faulty_pair, tiny_model_dir):
    """fp32_noise_many runs the sum envelope's squared op once over the prompts' summed rows stacked
    (budgets._squared_op_sums): at every MATMUL, ROUTER and expert product of the tiny model, each prompt's sum and
    noise are the ones it gets alone, bit for bit (each row's float64 products are its own: kernels.matmul_f64)."""
    import numpy as np

    from actdiff.compare.budgets import SUM_OPS, _squared_op_sum, _squared_op_sums, fp32_noise, fp32_noise_many
    from actdiff.compare.refops import spec_params

    _, ref, _, _ = faulty_pair
    graph = build_graph(load_config_json(tiny_model_dir))
    weights = NodeWeights64(CheckpointTensors(tiny_model_dir / "model.safetensors"), graph)
    with ActivationReader(ref) as rr:
        prompts = [{k: np.array(v) for k, v in vals.items()} for _, _, vals in rr.iter_prompts(graph.names())][:6]
    checked = set()
    for node in (n for n in graph if n.op in SUM_OPS and n.op != "POOL"):
        weights.visit(node)
        sums = _squared_op_sums(graph, node, prompts, weights, spec_params(graph, node))
        assert all(q is not None for q in sums), node.name  # every product of the spec is linear in its rows
        alone = [_squared_op_sum(graph, node, p, weights, spec_params(graph, node)) for p in prompts]
        assert sums == alone, node.name
        assert fp32_noise_many(graph, node, prompts, weights) == [fp32_noise(graph, node, p, weights) for p in prompts]
        checked.add(node.op)
    assert checked == set(SUM_OPS) - {"POOL"}
