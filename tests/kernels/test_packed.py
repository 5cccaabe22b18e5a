"""fp32 weights packed once (kernels.pack_f32): exact round trip, and every op that reads a packed weight
is BIT-identical (tolerance 0) to the same op on the original float32 array, on every ISA path the CPU
runs and at 1, 2 and 3 threads, in both layouts (rows of 32 or 16 columns: every path reads either, so a
weight packed before ``set_isa`` stays valid). Odd sizes make the last 32-column panel partly padding."""

from __future__ import annotations

import numpy as np
import pytest

import actdiff.kernels as K

# (T, C, OC); at 260 and 300 rows the driver takes 3 and 2 packed K blocks a call (gemm.c KC_DEEP), then the rest
SHAPES = [(1, 1, 1), (3, 33, 47), (13, 64, 70), (25, 129, 100), (7, 768, 97), (30, 520, 400), (9, 1700, 40),
          (260, 1000, 70), (300, 600, 40)]  # fmt: skip
LAYOUTS = sorted(K.PACKED_LAYOUTS)


def _paths():
    for isa in K.supported_isas():
        for threads in (1, 2, 3):
            yield isa, threads


@pytest.mark.parametrize(
    "shape", [(1, 1), (5, 17), (47, 33), (32, 64), (100, 129), (65, 3), (70, 600), (33, 256), (40, 1700)]
)
@pytest.mark.parametrize("trans", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_pack_unpack_round_trip_exact(rng, shape, trans, layout):
    w = rng.standard_normal(shape).astype(np.float32)
    p = K.pack_f32(w, trans=trans, layout=layout)
    assert p.shape == w.shape and p.trans == trans and p.layout == layout
    K_, N = (shape[1], shape[0]) if trans else shape
    assert p.data.size == -(-N // 32) * 32 * K_  # ceil(N/32) panels of K x 32, either layout
    assert p.data.ctypes.data % 64 == 0  # one cache line / one AVX-512 load per panel row
    back = p.unpack()
    assert back.dtype == np.float32 and np.array_equal(back.view(np.uint32), w.view(np.uint32))


@pytest.mark.parametrize("T,C,OC", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matmul_packed_bitwise(rng, T, C, OC, layout):
    x = rng.standard_normal((T, C)).astype(np.float32)
    w = rng.standard_normal((OC, C)).astype(np.float32)
    b = rng.standard_normal(OC).astype(np.float32)
    p = K.pack_f32(w, layout=layout)
    ref = K.matmul_naive(x, w, b)
    assert np.array_equal(K.matmul_naive(x, p, b).view(np.uint32), ref.view(np.uint32))
    for isa, threads in _paths():
        K.set_isa(isa)
        K.set_num_threads(threads)
        for bias in (b, None):
            got, want = K.matmul(x, p, bias), K.matmul(x, w, bias)
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (isa, threads, bias is None)
        assert np.array_equal(K.matmul(x, p, b).view(np.uint32), ref.view(np.uint32)), (isa, threads)


@pytest.mark.parametrize("F,H", [(80, 48), (64, 96), (3072 // 32, 40)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_moe_and_expert_parts_packed_bitwise(rng, F, H, layout):
    T, E, k = 37, 5, 2
    x = rng.standard_normal((T, H)).astype(np.float32)
    rw = rng.standard_normal((E, H)).astype(np.float32)
    w1 = rng.standard_normal((E, F, H)).astype(np.float32) * 0.1
    w2 = rng.standard_normal((E, F, H)).astype(np.float32) * 0.1
    bias = rng.standard_normal(H).astype(np.float32)
    p1, p2 = K.pack_f32(w1, layout=layout), K.pack_f32(w2, trans=False, layout=layout)
    for isa, threads in _paths():
        K.set_isa(isa)
        K.set_num_threads(threads)
        want = K.moe(x, rw, w1, w2, bias, top_k=k, return_intermediates=True)
        got = K.moe(x, rw, p1, p2, bias, top_k=k, return_intermediates=True)
        for name in ("out", "fc1", "act", "expert_out", "weighted"):
            assert np.array_equal(getattr(got, name), getattr(want, name)), (name, isa, threads)
        idx = want.topk_indices.astype(np.int64)
        assert np.array_equal(K.expert_up(x, idx, p1), K.expert_up(x, idx, w1)), (isa, threads)
        assert np.array_equal(K.expert_down(want.act, idx, p2), K.expert_down(want.act, idx, w2)), (isa, threads)


def test_take_reorders_whole_experts(rng):
    w = rng.standard_normal((4, 40, 24)).astype(np.float32)
    perm = [2, 0, 3, 1]
    for trans in (True, False):
        for layout in LAYOUTS:
            taken = K.pack_f32(w, trans=trans, layout=layout).take(perm)
            assert taken.layout == layout and np.array_equal(taken.unpack(), w[perm])


def test_default_layout_is_the_one_the_isa_path_reads_fastest(rng):
    """AVX-512's kernel reads 32 columns a row, AVX2's 16 (kernels_c/README.md, Performance); the scalar
    kernel's 8 are contiguous in both, it gets 16."""
    w = rng.standard_normal((40, 24)).astype(np.float32)
    want = {"avx512": 4, "avx2": 5, "scalar": 5}
    try:
        for isa in K.supported_isas():
            K.set_isa(isa)
            assert K.pack_f32(w).layout == want[isa], isa
    finally:
        K.set_isa("auto")


def test_packed_misuse_is_refused(rng):
    w = rng.standard_normal((3, 16, 8)).astype(np.float32)
    x = rng.standard_normal((2, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="trans"):
        K.expert_up(x, np.zeros((2, 1), np.int64), K.pack_f32(w, trans=False))  # w1 must be packed transposed
    with pytest.raises(ValueError, match="2-dimensional"):
        K.matmul(x, K.pack_f32(w))
    with pytest.raises(TypeError, match="PackedF32"):
        K.moe(x, rng.standard_normal((3, 8)).astype(np.float32), K.pack_f32(w), w)
    with pytest.raises(TypeError, match="float32"):
        K.pack_f32(w.astype(np.float16))
    for bad in (0, 4.0, True, "4"):
        with pytest.raises(ValueError, match="layout"):
            K.pack_f32(w, layout=bad)
    rw = rng.standard_normal((3, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="one layout"):
        K.moe(x, rw, K.pack_f32(w, layout=4), K.pack_f32(w, trans=False, layout=5))
