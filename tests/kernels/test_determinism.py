"""Bitwise determinism across runs, thread counts and (for matmul) ISA paths."""

from __future__ import annotations

import numpy as np
import pytest

import actdiff.kernels as K


def _run_all(rng_seed=7):
    rng = np.random.default_rng(rng_seed)
    x = rng.standard_normal((70, 256)).astype(np.float32)
    w = rng.standard_normal((300, 256)).astype(np.float32)
    q, k, v = (rng.standard_normal((130, 4, 32)).astype(np.float32) for _ in range(3))
    mask = rng.random(130) > 0.2
    h = rng.standard_normal((50, 64)).astype(np.float32)
    rw = rng.standard_normal((8, 64)).astype(np.float32)
    w1 = rng.standard_normal((8, 128, 64)).astype(np.float32)
    w2 = rng.standard_normal((8, 128, 64)).astype(np.float32)
    big = rng.standard_normal((64, 3000)).astype(np.float32)
    rot = rng.standard_normal((300, 4, 64)).astype(np.float32)  # tokens split over threads
    moe = K.moe(h, rw, w1, w2, top_k=2, return_intermediates=True)  # rows gathered and scattered over threads
    return [
        K.rotary(rot, base=500.0),
        K.rotary(rot, interleaved=True),
        K.add(big, big[::-1].copy()),
        moe.fc1,
        moe.act,
        moe.expert_out,
        moe.weighted,
        K.matmul(x, w),
        K.matmul(x, w.astype(np.float16)),
        K.matmul(x, K.f32_to_bf16(w)),
        K.attention(q, k, v, mask),
        K.attention(q, k, v, None, causal=True),
        K.moe(h, rw, w1, w2, top_k=2),
        K.gelu(big),
        K.gelu(big, "tanh"),
        K.softmax(big),
        K.layernorm(big),
        K.l2_normalize(big),
    ]


def test_threads_1_vs_2_bitwise():
    K.set_num_threads(1)
    a = _run_all()
    K.set_num_threads(2)
    b = _run_all()
    c = _run_all()
    K.set_num_threads(3)  # more threads than cores: different partition, same bits
    d = _run_all()
    for i, (x, y, z, t) in enumerate(zip(a, b, c, d, strict=True)):
        assert np.array_equal(x, y, equal_nan=True), i
        assert np.array_equal(y, z, equal_nan=True), i
        assert np.array_equal(x, t, equal_nan=True), i


# every path this CPU runs (the session's header names those it lacks): a path the CPU cannot execute is not a
# skipped test but an untestable one, and the CI machine of the day decides which those are
@pytest.mark.parametrize("isa", K.supported_isas())
def test_matmul_bitwise_across_isa(isa):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((29, 300)).astype(np.float32)
    w = rng.standard_normal((45, 300)).astype(np.float32)
    b = rng.standard_normal(45).astype(np.float32)
    ref = K.matmul_naive(x, w, b)
    K.set_isa(isa)
    assert K.get_isa() == isa
    assert np.array_equal(K.matmul(x, w, b), ref)
    # the other ops run on every path too (checked loosely: exp differs in the last ulp)
    s = K.softmax(x)
    K.set_isa("auto")
    assert np.allclose(s, K.softmax(x), rtol=1e-6, atol=1e-9)
    assert np.allclose(K.attention(*(x[:, :300].reshape(29, 3, 100),) * 3), K.attention(*(x.reshape(29, 3, 100),) * 3))


def test_set_num_threads_validation():
    with pytest.raises(ValueError, match="n"):
        K.set_num_threads(0)
    with pytest.raises(TypeError, match="n"):
        K.set_num_threads(1.5)
    with pytest.raises(ValueError, match="isa"):
        K.set_isa("neon")


def test_forcing_a_path_by_environment_is_honoured_or_refused():
    """ACTDIFF_KERNELS_ISA: a path the CPU runs is the one used (also after set_isa('auto')); an unknown name
    or a path the CPU lacks fails at import with a message naming the paths it has, never a silent fallback."""
    import os
    import subprocess
    import sys

    probe = "import actdiff.kernels as K; a = K.get_isa(); K.set_isa('auto'); print(a, K.get_isa())"
    for isa in [*K.ISA_NAMES, "neon"]:
        env = dict(os.environ, ACTDIFF_KERNELS_ISA=isa)
        p = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
        if isa in K.ISA_NAMES and K.cpu_supports(isa):
            assert p.returncode == 0, p.stderr
            assert p.stdout.split() == [isa, isa]
        else:
            assert p.returncode != 0
            assert f"ACTDIFF_KERNELS_ISA={isa}" in p.stderr or f"ACTDIFF_KERNELS_ISA='{isa}'" in p.stderr, p.stderr
            assert str(K.supported_isas()) in p.stderr or "use one of" in p.stderr, p.stderr
