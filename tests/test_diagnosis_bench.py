"""The diagnosis generalises beyond its catalogue: bench/diagnosis.py's fast subset (five planted engine
bugs that are not catalogue entries: fused path only, no effect on outputs, a continuous parameter between
catalogue values, a wrong axis, an expert permutation) plus the unpatched fp32 engine (false positives).

Runs in-process through the benchmark's Python API, on a 16-prompt corpus (3 long prompts) in a temporary
folder (~60-90 s on a shared 2-core machine)."""

from __future__ import annotations

import sys

import pytest
from helpers import REPO

sys.path.insert(0, str(REPO / "bench"))

import diagnosis  # noqa: E402
import diagnosis_bugs  # noqa: E402
import numpy as np  # noqa: E402


@pytest.fixture(scope="module")
def fast_results(tmp_path_factory):
    return diagnosis.run_benchmark(tmp_path_factory.mktemp("diagnosis-bench"), n_prompts=16, fast=True)


@pytest.mark.diagnosis_bench
def test_fast_subset_is_diagnosed(fast_results):
    totals, table = fast_results["totals"], diagnosis.table(fast_results)
    assert len(fast_results["bugs"]) == len(diagnosis.FAST_BUGS)
    assert totals["missed"] == 0, table
    assert totals["wrong"] == 0, table
    assert fast_results["false_positive_runs"] == 0, table
    assert totals["caught"] >= 4, table


@pytest.mark.diagnosis_bench
def test_bug_catalogue_is_new(fast_results):
    """Every planted bug is neither a catalogue entry nor a deliberate engine fault, and its expected node
    is a node of the graph."""
    from actdiff.compare.hypotheses import load_catalogue
    from actdiff.engine.faults import runnable_faults
    from actdiff.nodes import graph_for_model_dir

    names = {h.name for h in load_catalogue()} | set(runnable_faults())
    assert len(diagnosis.BUGS) >= 22
    assert not names & {b.id for b in diagnosis.BUGS}
    graph = graph_for_model_dir(fast_results["model_dir"])
    for bug in diagnosis.BUGS:
        assert bug.node(graph) in graph.names(), bug.id


@pytest.fixture(scope="module")
def tiny_graph():
    from actdiff.models.released import released_config
    from actdiff.models.tiny import SPM_VOCAB_SIZE, tiny_config
    from actdiff.nodes import build_graph

    return build_graph(tiny_config(released_config(), SPM_VOCAB_SIZE + 32))


def _bug(bug_id):
    return next(b for b in diagnosis.BUGS if b.id == bug_id)


def _verdict(status, node, cause=None, **extra):
    causes = [] if cause is None else [{"nodes": [node], **cause}]
    return {"status": status, "first_divergence": node, "causes": causes, **extra}


def test_scoring_rules_on_new_schema_verdicts(tiny_graph):
    """The scoring rules and the adapter on verdicts of the schema the diagnosis is moving to (no pipeline)."""
    base = _bug("rope_base_5000")
    q_rot = base.node(tiny_graph)
    fit = {"hypothesis": "rotary_base", "kind": "fit", "params": {"base": 4960.0}, "says": "rotary base ~4960"}
    assert diagnosis.score(base, tiny_graph, _verdict("fail", q_rot, fit)) == "caught"
    far = {**fit, "params": {"base": 10000.0}, "says": "rotary base 1e4"}
    assert diagnosis.score(base, tiny_graph, _verdict("fail", q_rot, far)) == "wrong"
    assert diagnosis.score(base, tiny_graph, _verdict("fail", q_rot, {"hypothesis": "unexplained"})) == "unexplained"
    assert diagnosis.score(base, tiny_graph, _verdict("fail", q_rot)) == "unexplained"
    assert diagnosis.score(base, tiny_graph, _verdict("pass", None)) == "missed"
    assert diagnosis.score(base, tiny_graph, _verdict("fail", "emb_ln", fit)) == "wrong"
    assert diagnosis.score(base, tiny_graph, _verdict("fail", "emb_ln", {"hypothesis": "unexplained"})) == "missed"
    offset = _bug("rope_offset_3")
    shift = {"hypothesis": "rotary_positions", "kind": "fit", "params": {"offset": 3}, "says": "positions + 3"}
    assert diagnosis.score(offset, tiny_graph, _verdict("deviates", q_rot, shift)) == "caught"
    assert diagnosis.score(offset, tiny_graph, _verdict("fail", q_rot, shift)) == "wrong"


def test_adapter_prefers_replay_mismatch_and_predicates(tiny_graph):
    fused, perm = _bug("fused_w1_rolled"), _bug("expert_permuted")
    fc1 = fused.node(tiny_graph)
    cause = {"hypothesis": "fused_path", "kind": "structure", "says": "the fused forward differs from its replay"}
    v = _verdict("fail", None, None, replay_mismatches=[{"node": fc1}], causes=[{"nodes": [fc1], **cause}])
    assert diagnosis.reported(v) == (fc1, {"nodes": [fc1], **cause})
    assert diagnosis.score(fused, tiny_graph, v) == "caught"
    v = _verdict("fail", None, None, outputs={"diverge": True, "grows_most": "pooled"})
    assert diagnosis.reported(v) == ("pooled", None)
    inverse = [int(i) for i in np.argsort(diagnosis_bugs.PERM)]
    for ids in (list(diagnosis_bugs.PERM), inverse):
        c = {"hypothesis": "expert_permutation", "kind": "recovered", "params": {"map": ids}}
        assert diagnosis.score(perm, tiny_graph, _verdict("fail", fc1, c)) == "caught"
    c = {"hypothesis": "expert_index_off_by_one", "kind": "catalogue", "params": {}}
    assert diagnosis.score(perm, tiny_graph, _verdict("fail", fc1, c)) == "wrong"
