"""bench/kernel_speed.py's side-by-side timing (issue 19): rounds in a rotated order, the best round and the median
per side; the baselines' AVX2 settings only on the avx2 path; the numpy peer process answers one timing per
request. No timing assertion: the fake sides return fixed seconds, the real peer only a positive time."""

from __future__ import annotations

import sys

import pytest
from helpers import REPO

sys.path.insert(0, str(REPO / "bench"))
import kernel_speed as bench_kernels  # noqa: E402
import peak  # noqa: E402


def test_side_by_side_rotates_the_order_and_keeps_the_best_and_median(monkeypatch):
    monkeypatch.setattr(bench_kernels, "SETTLE_S", 0.0)
    calls, seconds = [], {"a": iter([3.0, 1.0, 2.0]), "b": iter([5.0, 4.0, 6.0])}

    def side(name):
        def run():
            calls.append(name)
            return next(seconds[name])

        return run

    t = bench_kernels.side_by_side({"a": side("a"), "b": side("b")}, rounds=3)
    assert calls == ["a", "b", "b", "a", "a", "b"]  # round r starts at side r mod 2
    assert t["a"] == {"best_s": 1.0, "median_s": 2.0, "rounds_s": [3.0, 1.0, 2.0]}
    assert t["b"] == {"best_s": 4.0, "median_s": 5.0, "rounds_s": [5.0, 4.0, 6.0]}


def test_avx2_peer_settings_only_on_the_avx2_path(monkeypatch):
    for k, v in peak.AVX2_PEERS.items():
        monkeypatch.setenv(k, v)  # left over from an avx2 run: must not leak into the native one
    native = peak.peers_env("avx512")
    assert not set(peak.AVX2_PEERS) & set(native)
    avx2 = peak.peers_env("avx2")
    assert {k: avx2[k] for k in peak.AVX2_PEERS} == peak.AVX2_PEERS


def test_numpy_peer_times_a_shape_per_request():
    peer = bench_kernels.NumpyPeer(1, "avx512")
    try:
        assert any(d["internal_api"] in ("openblas", "mkl", "blis") for d in peer.blas), peer.blas
        assert all(d["num_threads"] == 1 for d in peer.blas)
        for shape in ((4, 8, 16), (4, 8, 16), (3, 5, 7)):  # a repeated shape reuses its arrays
            assert peer.seconds(*shape, 0.001) > 0
    finally:
        peer.close()
    assert peer.proc.returncode == 0


def test_numpy_peer_that_died_is_reported():
    peer = bench_kernels.NumpyPeer(1, "avx512")
    peer.proc.kill()
    peer.proc.wait()
    with pytest.raises((RuntimeError, BrokenPipeError)):
        peer.seconds(4, 8, 16, 0.001)
