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
