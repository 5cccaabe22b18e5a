"""ak_compare (the one-pass metric sums) against the numpy definition of the metrics.

The C kernel and numpy both accumulate in float64 but in a different order (sequential vs pairwise), so
sums agree to a few float64 ulps of the sum: relative 1e-12 is ~4500 ulps of slack for arrays of up to
~1e5 terms (error bound n * 2^-53 ~ 1e-11 worst case, ~sqrt(n) * 2^-53 typical). Counts, the argmax and
max_ulp are integers and must be equal.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actdiff.compare.metrics import FLOAT_METRICS, compare, compare_reference
from actdiff.compare.refops import QUANT_GRANULARITIES
from actdiff.kernels import compare_sums, rel_l2_f32

INT_KEYS = ("nan_ref", "inf_ref", "nan_eng", "inf_eng", "max_abs_token", "max_abs_channel", "max_ulp")


def _assert_same(fast: dict, ref: dict) -> None:
    assert fast.keys() == ref.keys()
    for k in INT_KEYS:
        same_nan = isinstance(ref[k], float) and math.isnan(ref[k]) and math.isnan(fast[k])
        assert same_nan or fast[k] == ref[k], k
    for k in FLOAT_METRICS:
        a, b = fast[k], ref[k]
        if math.isnan(b) or math.isinf(b):
            assert (math.isnan(a) and math.isnan(b)) or a == b, (k, a, b)
        else:
            assert a == pytest.approx(b, rel=1e-12, abs=1e-300), k


@pytest.mark.parametrize("shape", [(1, 1), (7, 128), (37, 2, 512), (513, 384)])
def test_compare_matches_numpy_definition(shape):
    rng = np.random.default_rng(sum(shape))
    ref = rng.standard_normal(shape).astype(np.float32)
    eng = (ref + rng.standard_normal(shape).astype(np.float32) * np.float32(1e-4)).astype(np.float32)
    _assert_same(compare(eng, ref), compare_reference(eng, ref))


def test_compare_non_finite_and_ties():
    rng = np.random.default_rng(3)
    ref = rng.standard_normal((5, 8)).astype(np.float32)
    eng = ref.copy()
    eng[1, 2], ref[3, 3], eng[4, 0], ref[4, 0] = np.nan, np.inf, -np.inf, -np.inf
    _assert_same(compare(eng, ref), compare_reference(eng, ref))
    # every position differs by the same amount: the first maximum wins, as numpy.argmax
    _assert_same(compare(ref + np.float32(1), ref), compare_reference(ref + np.float32(1), ref))
    allnan = np.full((2, 3), np.nan, np.float32)
    _assert_same(compare(allnan, ref[:2, :3].copy()), compare_reference(allnan, ref[:2, :3].copy()))


def test_compare_identical_and_zero():
    z = np.zeros((3, 4), np.float32)
    assert compare(z, z)["rel_l2"] == 0.0 and compare(z, z)["max_ulp"] == 0
    _assert_same(compare(z, z), compare_reference(z, z))


@settings(max_examples=50, deadline=None)
@given(
    st.integers(1, 40),
    st.integers(1, 40),
    st.integers(0, 2**32 - 1),
    st.sampled_from([0.0, 1e-7, 1e-3, 1.0]),
)
def test_compare_property(rows, cols, seed, scale):
    rng = np.random.default_rng(seed)
    ref = (rng.standard_normal((rows, cols)) * 10.0 ** rng.integers(-3, 4)).astype(np.float32)
    eng = (ref + rng.standard_normal((rows, cols)) * scale).astype(np.float32)
    _assert_same(compare(eng, ref), compare_reference(eng, ref))


def test_fast_and_naive_kernels_are_bitwise_equal():
    rng = np.random.default_rng(11)
    a = rng.standard_normal(10_000).astype(np.float32)
    b = (a * np.float32(1.0001)).astype(np.float32)
    a[17] = np.nan
    assert compare_sums(a, b) == compare_sums(a, b, naive=True)


def test_compare_sums_validates_inputs():
    a = np.zeros(4, np.float32)
    with pytest.raises(TypeError, match="eng must have dtype float32"):
        compare_sums(a.astype(np.float64), a)
    with pytest.raises(ValueError, match="ref must have shape"):
        compare_sums(a, np.zeros(5, np.float32))


def test_rel_l2_kernel_matches_numpy():
    from actdiff.compare.metrics import rel_l2

    rng = np.random.default_rng(5)
    for n in (1, 7, 8, 9, 1000, 40_001):
        b = rng.standard_normal(n).astype(np.float32)
        a = (b + rng.standard_normal(n).astype(np.float32) * np.float32(1e-3)).astype(np.float32)
        want = np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64))
        assert rel_l2_f32(a, b) == pytest.approx(want, rel=1e-12)
        assert rel_l2(a, b) == pytest.approx(want, rel=1e-12)
    z = np.zeros(5, np.float32)
    assert rel_l2(z, z) == 0.0 and rel_l2(z + 1, z) == math.inf
    nan = z.copy()
    nan[2] = np.nan
    assert math.isnan(rel_l2(nan, z + 1))


def _nonfinite_cases():
    """(a, b) pairs: finite float32, NaN/Inf on one side or both (same or other positions), every value
    non-finite, float64 against float32, an int array, empty."""
    rng = np.random.default_rng(11)
    b = rng.standard_normal((6, 10)).astype(np.float32)
    a = (b + np.float32(1e-4) * rng.standard_normal(b.shape)).astype(np.float32)
    cases = [(a, b), (a.astype(np.float64), b), (np.zeros(0, np.float32), np.zeros(0, np.float32))]
    for value in (np.nan, np.inf, -np.inf):
        for where in ("a", "b", "both", "both-elsewhere"):
            x, y = a.copy(), b.copy()
            if where in ("a", "both"):
                x[2, 3] = value
            if where in ("b", "both"):
                y[2, 3] = value
            if where == "both-elsewhere":
                x[1, 1], y[4, 7] = value, value
            cases.append((x, y))
    cases.append((np.full((3, 4), np.nan, np.float32), np.full((3, 4), np.nan, np.float32)))
    cases.append((np.arange(6).reshape(2, 3), np.arange(6).reshape(2, 3) + 1))
    return cases


@pytest.mark.parametrize("k", range(len(_nonfinite_cases())))
def test_local_error_is_nonfinite_match_and_rel_l2_finite(k):
    """local_error skips the finiteness passes when the float32 kernel's relative L2 is finite (it lets NaN/Inf
    propagate, so a finite value proves both arrays finite): on every case it returns exactly what the two
    functions return, NaN/Inf placements included."""
    from actdiff.compare.metrics import local_error, nonfinite_match, rel_l2_finite

    a, b = _nonfinite_cases()[k]
    same, diverged, rel = local_error(a, b)
    want_rel = rel_l2_finite(a, b)
    assert (same, diverged) == nonfinite_match(a, b)
    assert rel == want_rel or (math.isnan(rel) and math.isnan(want_rel))


def test_fletcher32_is_the_checksum_hdf5_stores(tmp_path):
    """ak_fletcher32 (on the ISA path this run uses) and HDF5's loop (the naive) give, for every stored chunk of
    datasets written by HDF5's fletcher32 filter, the 4 bytes HDF5 appended (little-endian): odd chunk lengths
    (uint8), one-word chunks, chunks of several 360-word blocks, all-0xff bytes (the largest words)."""
    import h5py

    from actdiff.kernels import fletcher32

    rng = np.random.default_rng(7)
    arrays = {
        "u8_odd": (rng.integers(0, 256, 1001).astype(np.uint8), (333,)),
        "u8_ff": (np.full(5000, 0xFF, np.uint8), (1441,)),
        "f16_word": (rng.standard_normal(9).astype(np.float16), (1,)),
        "f32": (rng.standard_normal((300, 37)).astype(np.float32), (64, 37)),
        "i64": (rng.integers(-(2**62), 2**62, 999), (100,)),
    }
    path = tmp_path / "sums.h5"
    with h5py.File(path, "w") as f:
        for name, (v, chunks) in arrays.items():
            f.create_dataset(name, data=v, chunks=chunks, fletcher32=True)
    checked = 0
    with h5py.File(path) as f:
        for name in arrays:
            d = f[name]
            for i in range(d.id.get_num_chunks()):
                mask, raw = d.id.read_direct_chunk(d.id.get_chunk_info(i).chunk_offset)
                stored = int.from_bytes(raw[-4:], "little")
                body = memoryview(raw)[:-4]
                assert mask == 0 and fletcher32(body) == fletcher32(body, naive=True) == stored, (name, i)
                checked += 1
    assert checked == 4 + 4 + 9 + 5 + 10
    assert fletcher32(b"") == 0


# ---------------------------------------------------------------- the propagated budget's perturbation
def _perturb_definition(y, s, g, budget):
    """actdiff.compare.propagation's perturbation written out in numpy: per-feature shared part, per-element part
    (the float32 product of the draws and their scale, as the kernel and the old numpy version took it)."""
    y = y.astype(np.float64)
    yn = np.linalg.norm(y)
    sn = np.linalg.norm(y * s.astype(np.float64))
    gn = np.linalg.norm(g.astype(np.float64))
    c = budget * yn / math.sqrt(2.0)
    return y * (1.0 + (c / sn) * s.astype(np.float64)) + (g.reshape(y.shape) * np.float32(c / gn)).astype(np.float64)


@pytest.mark.parametrize("shape", [(1, 1), (13, 37), (20, 384), (3, 1536)])
def test_perturb_is_its_definition_and_its_naive_loop_on_every_path(shape):
    """Bitwise the naive loops on every ISA path this CPU runs (the same double operations in the same order);
    within 1e-9 of the perturbation's per-element rms of the numpy definition (its norms summed in another
    order: ~1e-16 relative, so the float32 scale of the draws rounds alike here); the error sums against ``ref``
    within 1e-12 relative of numpy's (float64 sums of up to 6e3 terms in two orders)."""
    import actdiff.kernels as K

    rng = np.random.default_rng(sum(shape))
    y = rng.standard_normal(shape) * 3.0
    s = rng.standard_normal(shape[1]).astype(np.float32)
    g = rng.standard_normal(y.size).astype(np.float32)
    ref = (y + 1e-3 * rng.standard_normal(shape)).astype(np.float32)
    want, _ = K.perturb_f64(y, s, g, 1e-3, ref, naive=True)
    for isa in K.supported_isas():
        K.set_isa(isa)
        out, (num, den) = K.perturb_f64(y, s, g, 1e-3, ref)
        assert np.array_equal(out, want), isa
    rms = 1e-3 * np.linalg.norm(y) / math.sqrt(y.size)
    assert np.abs(out - _perturb_definition(y, s, g, 1e-3)).max() <= 1e-9 * rms
    d = out - ref.astype(np.float64)
    assert num == pytest.approx(float(np.sum(d * d)), rel=1e-12)
    assert den == pytest.approx(float(np.sum(ref.astype(np.float64) ** 2)), rel=1e-12)


def test_perturb_leaves_what_it_cannot_scale_and_checks_its_arguments():
    import actdiff.kernels as K

    s, g = np.ones(4, np.float32), np.ones(8, np.float32)
    assert K.perturb_f64(np.zeros((2, 4)), s, g, 1e-3) is None
    assert K.perturb_f64(np.full((2, 4), np.nan), s, g, 1e-3) is None
    out, sums = K.perturb_f64(np.ones((2, 4)), np.zeros(4, np.float32), g, 1e-3)  # no shared part: the draws only
    assert sums is None and np.allclose(out - 1.0, 1e-3 * math.sqrt(8) / math.sqrt(2) / math.sqrt(8), rtol=1e-6)
    with pytest.raises(TypeError, match="y must have dtype float64"):
        K.perturb_f64(np.ones((2, 4), np.float32), s, g, 1e-3)
    with pytest.raises(ValueError, match=r"s must have shape \(4\)"):
        K.perturb_f64(np.ones((2, 4)), np.ones(3, np.float32), g, 1e-3)
    with pytest.raises(ValueError, match=r"g must have shape \(8\)"):
        K.perturb_f64(np.ones((2, 4)), s, np.ones(7, np.float32), 1e-3)
    with pytest.raises(ValueError, match=r"ref must have shape \(2, 4\)"):
        K.perturb_f64(np.ones((2, 4)), s, g, 1e-3, np.ones((4, 2), np.float32))


# ------------------------------------------------------------------------------------ float64 erf
def _ulps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """ULPs between doubles of one sign (or zeros): the distance of their bits on a monotonic integer line."""
    ia, ib = a.view(np.int64), b.view(np.int64)
    line = lambda i: np.where(i < 0, np.iinfo(np.int64).min - i, i)  # noqa: E731
    return np.abs(line(ia) - line(ib))


def test_erf_within_5_ulp_of_libm_on_every_path_and_the_same_at_every_position():
    """ak_erf_f64 on every ISA path this CPU runs: within 5 ULP of libm's erf (math.erf), the bound glibc
    gives its vector functions (4 ULP) plus its scalar erf's (1); exactly +-0, +-1 beyond |x| = 6, NaN kept,
    any shape; each value's result the same alone as inside a longer array (a partial vector is padded), so a
    prompt's rows give the same bits alone or stacked with others'. The naive loop is libm's erf."""
    import actdiff.kernels as K

    rng = np.random.default_rng(7)
    special = np.array([0.0, -0.0, 5e-324, -1e-310, 1e-300, 1e-8, -0.5, 0.84375, 1.0, 1.25, -2.5, 3.5, 5.9, -6.0,
                        27.0, 1e300, np.inf, -np.inf])  # fmt: skip
    x = np.concatenate([special, rng.standard_normal(3000) * 3.0, rng.uniform(-0.7, 0.7, 1000)])
    want = np.array([math.erf(v) for v in x])
    assert np.array_equal(K.erf_f64(x, naive=True), want)
    for isa in K.supported_isas():
        K.set_isa(isa)
        got = K.erf_f64(x)
        assert _ulps(got, want).max() <= 5, (isa, K.erf_f64_path(), int(_ulps(got, want).max()))
        assert np.array_equal(got[:2], [0.0, -0.0]) and np.signbit(got[1])
        big = np.abs(x) >= 6.0
        assert np.array_equal(got[big], np.sign(x[big]))
        for start, n in [(0, 1), (3, 7), (17, 9), (40, 17), (4010, 8)]:  # tails of every vector width
            assert np.array_equal(K.erf_f64(x[start : start + n]), got[start : start + n]), (isa, start, n)
        assert np.array_equal(K.erf_f64(x.reshape(-1, 7)).ravel(), got)
    assert np.isnan(K.erf_f64(np.array([np.nan]))[0])
    assert K.erf_f64(np.float64(0.5)).shape == () and K.erf_f64(np.zeros((0, 3))).shape == (0, 3)
    assert np.array_equal(K.erf_f64(x[::2]), K.erf_f64(x)[::2])  # a strided view is copied, not misread


def test_round_f16_is_numpys_float16_round_trip_on_every_path():
    """ak_round_f16 (the fp16-act variant's activations) gives exactly ``astype(float16).astype(float32)`` on
    every ISA path this CPU runs, for every 251st float32 bit pattern (17 million values: every exponent, the
    float16 subnormals, the overflow to infinity, ties) besides the boundary values; a NaN stays a NaN of its
    sign, and every path gives the scalar code's bits, NaN payloads included. Any shape, strided views copied."""
    import actdiff.kernels as K

    x = np.arange(0, 1 << 32, 251, dtype=np.uint64).astype(np.uint32).view(np.float32)
    edges = np.array([65504.0, 65519.996, 65520.0, 2.0**-24, 2.0**-25, 3 * 2.0**-25, 1 + 2.0**-11, 2.0**-14],
                     np.float32)  # fmt: skip
    x = np.concatenate([edges, -edges, x])
    nan = np.isnan(x)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).astype(np.float32)
    naive = K.round_f16(x, naive=True)
    assert np.array_equal(naive[~nan], want[~nan]) and np.array_equal(np.signbit(naive), np.signbit(want))
    assert np.isnan(naive[nan]).all()
    for isa in K.supported_isas():
        K.set_isa(isa)
        assert np.array_equal(K.round_f16(x).view(np.uint32), naive.view(np.uint32)), isa
        assert np.array_equal(K.round_f16(x[:37].reshape(37, 1)).ravel(), naive[:37])
    assert np.array_equal(K.round_f16(x[:1000:3]), naive[:1000:3])
    assert K.round_f16(np.float32(1.0 + 2.0**-11)).shape == () and K.round_f16(np.zeros((0, 4))).shape == (0, 4)


def test_f16_storage_conversions_are_numpys_astype_on_every_path():
    """ak_convert_f32_f16 / ak_convert_f16_f32 (an ONNX Runtime float16 variant's values, actdiff.kernels.cast)
    give ``astype(float16)`` / ``astype(float32)`` bit for bit on every ISA path this CPU runs: every float16 bit
    pattern to float32, and every 251st float32 bit pattern (17 million: every exponent, NaN payloads quiet and
    signalling, the float16 subnormals, the overflow to infinity, ties) besides the boundary values, to float16.
    Exact: numpy's software conversion is the definition (NaN payloads kept, never quieted). Any shape, strided
    views copied, 0-d and empty arrays; f32_to_f16 takes float32 only, f16_to_f32 float16 only."""
    import actdiff.kernels as K

    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    x = np.arange(0, 1 << 32, 251, dtype=np.uint64).astype(np.uint32).view(np.float32)
    edges = np.array([65504.0, 65519.996, 65520.0, 2.0**-24, 2.0**-25, 3 * 2.0**-25, 1 + 2.0**-11, 2.0**-14],
                     np.float32)  # fmt: skip
    x = np.concatenate([edges, -edges, np.array([0x7F800001, 0x7F802000, 0xFFC00000], np.uint32).view(np.float32), x])
    with np.errstate(over="ignore", invalid="ignore"):
        want16, want32 = x.astype(np.float16).view(np.uint16), h.astype(np.float32).view(np.uint32)
    before = K.get_isa()
    try:
        for isa in K.supported_isas():
            K.set_isa(isa)
            assert np.array_equal(K.f32_to_f16(x).view(np.uint16), want16), isa
            assert np.array_equal(K.f16_to_f32(h).view(np.uint32), want32), isa
            assert np.array_equal(K.f32_to_f16(x[:37].reshape(37, 1)).ravel().view(np.uint16), want16[:37])
    finally:
        K.set_isa(before)
    assert np.array_equal(K.f32_to_f16(x, naive=True).view(np.uint16), want16)
    assert np.array_equal(K.f16_to_f32(h, naive=True).view(np.uint32), want32)
    assert np.array_equal(K.f32_to_f16(x[:1000:3]).view(np.uint16), want16[:1000:3])
    assert np.array_equal(K.f16_to_f32(h[::-7]).view(np.uint32), want32[::-7])
    assert K.f32_to_f16(np.float32(1.5)).shape == () and K.f16_to_f32(np.zeros((0, 4), np.float16)).shape == (0, 4)
    with pytest.raises(TypeError, match="float16"):
        K.f16_to_f32(np.zeros(3, np.float32))
    with pytest.raises(TypeError, match="float32"):  # float64 through float32 would round twice
        K.f32_to_f16(np.zeros(3))
    # cast: astype(dtype, copy=False) with these two in C; anything else as numpy does it
    assert np.array_equal(K.cast(x, np.float16).view(np.uint16), want16) and K.cast(x, np.float32) is x
    assert np.array_equal(K.cast(h, np.float32).view(np.uint32), want32)
    d = np.array([1 + 2.0**-11 + 2.0**-40, 0.1])  # float64 to float16 rounded once, as numpy does
    assert np.array_equal(K.cast(d, np.float16).view(np.uint16), d.astype(np.float16).view(np.uint16))
    assert K.cast(np.array([1.7]), np.int64).tolist() == [1]


def test_round_f64_is_numpys_float16_and_refops_bfloat16_on_every_path():
    """ak_round_f64 (the reference ops' rounding): "fp16" is exactly numpy's float64 -> float16 rounding (one
    rounding: the values just above a float16 tie that float32 would round onto the tie are the test), "bf16"
    is float32 then bfloat16, nearest even each time, as refops defines it (here against numpy's five passes);
    on random bit patterns, every float16 tie and its neighbours, values of every magnitude, infinities, the
    overflow edge; NaN stays NaN; every path gives the scalar code's bits."""
    import actdiff.kernels as K

    rng = np.random.default_rng(11)
    patterns = rng.integers(0, 2**64, 200_000, dtype=np.uint64, endpoint=False).view(np.float64)
    halves = np.unique(np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float64))
    halves = halves[np.isfinite(halves)]
    ties = (halves[1:] + halves[:-1]) / 2
    near = [ties, np.nextafter(ties, np.inf), np.nextafter(ties, -np.inf), ties * (1 + 2.0**-30), halves]
    scaled = rng.standard_normal(100_000) * np.exp(rng.uniform(-40, 15, 100_000))
    edges = np.array([0.0, -0.0, np.inf, -np.inf, 1e300, 65519.99999, 65520.0, 2.0**-25, 2.0**-25 * (1 + 2.0**-40)])
    x = np.concatenate([patterns, *near, scaled, edges])
    nan = np.isnan(x)
    with np.errstate(all="ignore"):
        f32 = x.astype(np.float32).view(np.uint32).astype(np.uint64)
        bf16 = ((f32 + 0x7FFF + ((f32 >> 16) & 1)) & 0xFFFF0000).astype(np.uint32).view(np.float32)
        want = {"fp16": x.astype(np.float16).astype(np.float64), "bf16": bf16.astype(np.float64)}
    for precision, w in want.items():
        naive = K.round_f64(x, precision, naive=True)
        assert np.array_equal(naive[~nan], w[~nan]) and np.isnan(naive[nan]).all(), precision
        assert np.array_equal(np.signbit(naive[~nan]), np.signbit(w[~nan]))
        for isa in K.supported_isas():
            K.set_isa(isa)
            assert np.array_equal(K.round_f64(x, precision).view(np.uint64), naive.view(np.uint64)), (isa, precision)
            assert np.array_equal(K.round_f64(x[3:40].reshape(37, 1), precision).ravel(), naive[3:40])
    assert np.array_equal(K.round_f64(x[:999:3], "fp16"), K.round_f64(x, "fp16")[:999:3])
    with pytest.raises(ValueError, match="precision 'fp8'"):
        K.round_f64(x, "fp8")


def _quantise_numpy(x, scale, zp, qmin, qmax):
    """ONNX QuantizeLinear as numpy passes (refops' definition before the kernel): a float32 division, rounded
    half to even, the zero point added in float64, then clipped."""
    return np.clip(np.rint(x.astype(np.float32) / scale).astype(np.float64) + zp, qmin, qmax)


def test_quantise_f64_is_onnx_quantize_linear_on_every_path():
    """ak_quantise_f64 (the search's quantisation of a sample, actdiff.compare.refops): q and (q - zp) * scale bit
    for bit the numpy passes, for a scale per tensor, row and column, signed and unsigned grids of 2-16 bits;
    on values at and beside every rounding tie of the grid (the float32 quotient decides: a float64 quotient of
    n + 0.5 - 1e-9 is a tie in float32), far outside the range (clipped), infinities and NaN (kept); every path
    gives the plain loop's bits, rows of every tail length."""
    import actdiff.kernels as K

    rng = np.random.default_rng(5)
    rows, cols = 37, 53
    for bits, symmetric in [(8, False), (8, True), (2, False), (4, True), (16, False)]:
        qmin, qmax = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
        for per, shape in [("tensor", (1, 1)), ("row", (rows, 1)), ("column", (1, cols))]:
            scale = (rng.uniform(0.01, 0.2, shape) * rng.choice([1.0, 2.0**-20, 2.0**10], shape)).astype(np.float32)
            zp = np.zeros(shape) if symmetric else np.rint(rng.uniform(0, qmax, shape))
            steps = rng.integers(-2 * qmax - 5, 2 * qmax + 5, (rows, cols)) + rng.choice([0.0, 0.5, 0.25], (rows, cols))
            x = steps * scale.astype(np.float64) * (1 + rng.choice([0.0, 1e-9, -1e-9, 3e-8], (rows, cols)))
            x[0, :6] = [np.inf, -np.inf, np.nan, -0.0, 1e300, -1e300]
            with np.errstate(all="ignore"):
                want = _quantise_numpy(x, scale, zp, qmin, qmax)
                want_dq = (want - zp) * scale.astype(np.float64)
            naive = K.quantise_f64(x, scale, zp, qmin, qmax, per, naive=True)
            naive_dq = K.quantise_f64(x, scale, zp, qmin, qmax, per, dequantise=True, naive=True)
            assert np.array_equal(naive, want, equal_nan=True) and np.isnan(naive[0, 2]), (bits, per)
            assert np.array_equal(naive_dq, want_dq, equal_nan=True), (bits, per)
            for isa in K.supported_isas():
                K.set_isa(isa)
                got = K.quantise_f64(x, scale, zp, qmin, qmax, per)
                got_dq = K.quantise_f64(x, scale, zp, qmin, qmax, per, dequantise=True)
                assert np.array_equal(got.view(np.uint64), naive.view(np.uint64)), (isa, bits, per)
                assert np.array_equal(got_dq.view(np.uint64), naive_dq.view(np.uint64)), (isa, bits, per)
                if per != "column":  # rows of every length from 1 to 17 (the vector loops' tails)
                    for n in range(1, 18):
                        part = K.quantise_f64(np.ascontiguousarray(x[:, :n]), scale, zp, qmin, qmax, per)
                        assert np.array_equal(part.view(np.uint64), naive[:, :n].view(np.uint64)), (isa, n)
    with pytest.raises(ValueError, match="needs 37"):
        K.quantise_f64(x, np.ones(3, np.float32), 0.0, 0, 255, "row")
    with pytest.raises(ValueError, match="per 'block'"):
        K.quantise_f64(x, np.ones(1, np.float32), 0.0, 0, 255, "block")
    assert K.quantise_f64(np.zeros((0, 4)), np.ones(1, np.float32), 0.0, 0, 255, "tensor").shape == (0, 4)


@pytest.mark.parametrize(("granularity", "static"), [(g, False) for g in QUANT_GRANULARITIES] + [("tensor", True)])
def test_refops_quantise_is_the_numpy_definition(granularity, static):
    """refops.quantise_int and quantise (the kernel where one scale spans a tensor, row or column; numpy for
    blocks) give the numpy definition's integers, scales and dequantised values bit for bit, with the ranges
    from the values themselves or from another tensor (``like``: an embedding's whole table)."""
    from actdiff.compare.refops import quantise, quantise_int

    rng = np.random.default_rng(6)
    x = rng.standard_normal((12, 40)) * np.exp(rng.uniform(-3, 3, (12, 1)))
    for symmetric in (False, True):
        spec = {"bits": 8, "symmetric": symmetric, "granularity": granularity, "blocks": 3,
                "range": [-1.5, 2.25] if static else "dynamic"}  # fmt: skip
        for like in (None, x * 1.5):
            q, scale, zp = quantise_int(x, spec, like)
            ref = x.reshape(3, 4, 40) if granularity.startswith("block") else x
            qmax = 127 if symmetric else 255
            want = _quantise_numpy(ref, scale.astype(np.float32), zp, -qmax if symmetric else 0, qmax)
            assert np.array_equal(q, want), (symmetric, like is None)
            dq = quantise(x, spec, like)
            assert np.array_equal(dq, ((want - zp) * scale).reshape(x.shape)), (symmetric, like is None)


@pytest.mark.parametrize("trans", [True, False])
@pytest.mark.parametrize("shape", [(48, 40), (17, 5), (3, 33, 20)])
def test_pack_f64_of_float32_is_the_float64_copy_packed(shape, trans):
    """kernels.pack_f64 of a float32 weight (ak_pack_weight_f64_of_f32) widens each value as it packs: the packed
    bits of its float64 copy, padding included, and the same products on every path."""
    from actdiff import kernels

    w = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    a, b = kernels.pack_f64(w, trans=trans), kernels.pack_f64(w.astype(np.float64), trans=trans)
    assert a.shape == b.shape and a.trans == b.trans
    assert np.array_equal(a.data.view(np.int64), b.data.view(np.int64))
    if len(shape) == 2:
        K = shape[1] if trans else shape[0]
        x = np.random.default_rng(6).standard_normal((7, K))
        assert np.array_equal(kernels.matmul_f64(x, a), kernels.matmul_f64(x, b))
    with pytest.raises(TypeError):
        kernels.pack_f64(w.astype(np.float16), trans=trans)
