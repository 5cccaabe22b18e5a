"""bench/reference_gpu.py on a machine without CUDA: it refuses to measure (exit 2, a clear message), and its
comparison code runs on two CPU references of the tiny model (equal: every relative L2 is 0)."""

from __future__ import annotations

import csv
import json
import sys

import pytest
import torch
from helpers import REPO, ensure_tiny_model

sys.path.insert(0, str(REPO / "bench"))

import reference_gpu  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch has CUDA")
@pytest.mark.parametrize("device", ["cuda", "auto", "cpu"])
def test_without_cuda_it_exits_nonzero_and_says_why(device, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        reference_gpu.main(["--device", device, "--out", str(tmp_path / "r")])
    assert e.value.code == reference_gpu.NO_CUDA
    err = capsys.readouterr().err
    assert "needs a CUDA device" in err and "nothing was measured" in err
    assert not list(tmp_path.iterdir())


def test_comparison_of_two_cpu_references(tmp_path, capsys):
    from actdiff.models.record import ModelRecord

    d = ensure_tiny_model()
    record = ModelRecord.from_dir(d, "tiny")
    graph = record.graph()
    items = reference_gpu.prompt_ids(d, 2, graph.dims.vocab)
    assert [len(x) for _, x in items][-1] == reference_gpu.LONG and len(items) == 3
    runs = {k: reference_gpu.run_reference(record, "cpu", False, items) for k in ("a", "b")}
    assert runs["a"]["provenance"]["device"] == "cpu"
    rows = [{"model": "tiny", **r} for r in reference_gpu.node_errors(graph, runs, pairs=(("a", "b"),))]
    assert len(rows) == len(graph) and all(r["rel_l2_max"] == 0.0 and r["prompts"] == 3 for r in rows)
    reference_gpu.print_table("tiny", graph, rows)
    assert "embedding" in capsys.readouterr().out
    reference_gpu.write_outputs(tmp_path / "r", rows, {"device": "cpu"})
    with open(tmp_path / "r.csv") as f:
        assert len(list(csv.DictReader(f))) == len(graph)
    assert json.loads((tmp_path / "r.json").read_text())["rows"] == rows
