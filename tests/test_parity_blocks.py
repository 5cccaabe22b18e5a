"""Weight parity reads the checkpoint's side of each tensor in blocks into memory of their own, never a map of the
file (a map keeps every page it has read resident: the released word table's, beside the engine's own map of it,
made the parity job 1.55x the weights; 2.77 -> 2.19 GB read in blocks).

Asserted: the parity rows are the same read in blocks of 997 values (odd: blocks end inside rows, and inside the
NaN/Inf runs) as in one block, at fp32 (every rel_l2 0) and at fp16, int8 (errors); the planted NaN and Inf are
counted once each on both sides (fp32, fp16); and the checkpoint is never mapped."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import model_copy

import actdiff
import actdiff.compare.parity as parity
from actdiff.compare.stats import CheckpointTensors

PLANTED = "encoder.layers.1.mlp.experts.mlp.w1"  # a 3-D expert tensor: blocks cross its experts and rows


@pytest.fixture(scope="module")
def nonfinite_model(tiny_model_dir, tmp_path_factory):
    def plant(w):
        assert PLANTED in w, sorted(w)[:8]
        flat = w[PLANTED].reshape(-1)
        flat[1000], flat[5000] = np.nan, np.inf

    return model_copy(tiny_model_dir, tmp_path_factory.mktemp("parity") / "m", plant)


@pytest.mark.parametrize("variant", ["fp32", "fp16", "int8"])
def test_parity_rows_are_the_same_read_in_blocks(nonfinite_model, monkeypatch, variant):
    def no_map(self, key):
        raise AssertionError(f"weight parity mapped {key}")

    monkeypatch.setattr(CheckpointTensors, "mapped", no_map)
    with actdiff.load(nonfinite_model, side="actdiff", variant=variant) as m:
        whole, _ = parity.weight_parity(nonfinite_model, m.side)
        monkeypatch.setattr(parity, "BLOCK_VALUES", 997)
        blocks, _ = parity.weight_parity(nonfinite_model, m.side)
    assert len(blocks) == len(whole) > 40
    for a, b in zip(whole, blocks, strict=True):
        assert {k: v for k, v in a.items() if k != "rel_l2"} == {k: v for k, v in b.items() if k != "rel_l2"}
        # double sums over another split of the same values: equal to ~1e-15 relative
        assert a["rel_l2"] == pytest.approx(b["rel_l2"], rel=1e-12, abs=0), a["tensor"]
        if variant == "fp32" and a["source"] != PLANTED:
            assert a["rel_l2"] == 0.0
    planted = [r for r in blocks if r["source"] == PLANTED]
    assert planted and all(r["nonfinite_checkpoint"] == 2 for r in planted)
    if variant != "int8":  # int8 scales each channel by its largest value: the Inf's channel is all NaN there
        assert all(r["nonfinite_engine"] == 2 for r in planted)
        assert all(math.isfinite(r["rel_l2"]) for r in planted)  # the NaN and Inf at the same places on both sides
    if variant != "fp32":
        assert max(r["rel_l2"] for r in blocks) > 1e-4
