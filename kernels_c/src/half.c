/*
 * half.c -- float32 values rounded to float16 precision, kept in float32: the activations of the fp16-act variant
 * (actdiff.engine), at every node of its forward and of every replay of it.
 *
 * numpy's astype(float16).astype(float32) took 2.8 ns a value (a software conversion each way): 5.7 CPU-s of the
 * tiny model's fp16-act statistics job, which rounds every replayed node's inputs and output. The avx512 path
 * converts 16 values an instruction (VCVTPS2PH / VCVTPH2PS, AVX-512F), the avx2 path 8 (F16C; the scalar path where
 * the CPU lacks F16C), both rounding to nearest even as IEEE 754 and numpy do: overflow to infinity from 65520 up,
 * float16 subnormals kept. A NaN stays a NaN of the same sign, made quiet, its payload cut to float16's top bits (the
 * instruction's rule, which the scalar code follows, so every path gives the same bits for every input). The tail
 * of a vector path goes through the scalar code.
 */
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "actdiff_kernels.h"
#include "ak_internal.h"

/* float32 -> float16 bits, round to nearest even */
static inline uint16_t f32_to_f16_bits(float x) {
    uint32_t f;
    memcpy(&f, &x, sizeof f);
    uint16_t sign = (uint16_t)((f >> 16) & 0x8000u);
    uint32_t a = f & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00u | (uint16_t)((a & 0x007fffffu) >> 13); /* NaN: quiet */
    if (a >= 0x477ff000u) return sign | 0x7c00u; /* >= 65520 (and infinity): infinity */
    if (a >= 0x38800000u) {                         /* a normal float16 (>= 2^-14): exponent rebiased 127 -> 15 */
        uint32_t m = a - 0x38000000u;
        m += 0x0fffu + ((m >> 13) & 1u); /* the 13 dropped bits rounded to nearest even */
        return sign | (uint16_t)(m >> 13);
    }
    if (a < 0x33000000u) return sign; /* below 2^-25: zero */
    /* a float16 subnormal k * 2^-24: the 24-bit significand shifted right by 126 - exponent (14..24), rounded to
     * nearest even; k = 1024 is the smallest normal, encoded the same way */
    uint32_t e = a >> 23, shift = 126 - e, mant = (a & 0x007fffffu) | 0x00800000u;
    uint32_t k = mant >> shift, rest = mant & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rest > half || (rest == half && (k & 1u))) k++;
    return sign | (uint16_t)k;
}

static void round_scalar(float *out, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = ak_f16_to_f32(f32_to_f16_bits(x[i]));
}

/* out (n) = x (n) rounded through float16, W floats a vector (LOAD/STORE its float moves, TO_PH/FROM_PH its
 * conversions), the tail through the scalar code. A macro: the two paths differ in vector types and intrinsics. */
#define VECTOR_ROUND(W, LOAD, STORE, TO_PH, FROM_PH)                                                            \
    do {                                                                                                         \
        int64_t i = 0;                                                                                           \
        for (; i + (W) <= n; i += (W))                                                                           \
            STORE(out + i, FROM_PH(TO_PH(LOAD(x + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));          \
        round_scalar(out + i, x + i, n - i);                                                                     \
    } while (0)

__attribute__((target("avx512f"))) static void round_avx512(float *out, const float *x, int64_t n) {
    VECTOR_ROUND(16, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_cvtps_ph, _mm512_cvtph_ps);
}

__attribute__((target("avx2,f16c"))) static void round_avx2(float *out, const float *x, int64_t n) {
    VECTOR_ROUND(8, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_cvtps_ph, _mm256_cvtph_ps);
}

int ak_round_f16(float *out, const float *x, int64_t n) {
    AK_CHECK_PTR(out);
    AK_CHECK_PTR(x);
    if (n < 0) return AK_ERR_INVALID_SIZE;
    int isa = ak_isa();
    if (isa == AK_ISA_AVX512) round_avx512(out, x, n);
    else if (isa == AK_ISA_AVX2 && __builtin_cpu_supports("f16c")) round_avx2(out, x, n);
    else round_scalar(out, x, n);
    return AK_OK;
}

int ak_round_f16_naive(float *out, const float *x, int64_t n) {
    AK_CHECK_PTR(out);
    AK_CHECK_PTR(x);
    if (n < 0) return AK_ERR_INVALID_SIZE;
    round_scalar(out, x, n);
    return AK_OK;
}

/* ---- float32 <-> float16 storage, numpy's astype bit for bit (ONNX Runtime's float16 values, actdiff.onnxrt) ----
 *
 * numpy converts in software, value by value: 2.5 ns a value to float16 and 1.7 back into preallocated arrays (numpy
 * 2.4, Zen 4), for the float32 copy of every value of an ONNX Runtime float16 dump and each replayed node's inputs
 * and outputs. The avx512 path converts 16 values an instruction, the avx2 path 8 (F16C), as above: 0.084 ns a value
 * (bench/refops_products.py --conversions). NaN: numpy keeps a NaN's payload
 * bits that fit and never quiets it (to float16: the mantissa's top 10 bits, made nonzero where they are all zero;
 * to float32: shifted up by 13), where the instructions quiet a signalling NaN; so a vector holding a NaN goes
 * through the scalar code, which follows numpy (npy_floatbits_to_halfbits, npy_halfbits_to_floatbits). Every
 * other value converts exactly as the scalar code does (nearest even, overflow to infinity, subnormals kept). */

static inline uint16_t f32_to_f16_storage(float x) {
    uint32_t f;
    memcpy(&f, &x, sizeof f);
    uint32_t a = f & 0x7fffffffu;
    if (a <= 0x7f800000u) return f32_to_f16_bits(x);
    uint16_t h = (uint16_t)(0x7c00u + ((a & 0x007fffffu) >> 13)); /* NaN: its payload's top bits, kept a NaN */
    if (h == 0x7c00u) h++;
    return (uint16_t)(((f >> 16) & 0x8000u) | h);
}

static void to_f16_scalar(uint16_t *out, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = f32_to_f16_storage(x[i]);
}

static void from_f16_scalar(float *out, const uint16_t *h, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = ak_f16_to_f32(h[i]);
}

__attribute__((target("avx512f,avx512bw"))) static void to_f16_avx512(uint16_t *out, const float *x, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 v = _mm512_loadu_ps(x + i);
        if (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q)) to_f16_scalar(out + i, x + i, 16);
        else _mm256_storeu_si256((__m256i *)(out + i), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    to_f16_scalar(out + i, x + i, n - i);
}

__attribute__((target("avx2,f16c"))) static void to_f16_avx2(uint16_t *out, const float *x, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        if (_mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q))) to_f16_scalar(out + i, x + i, 8);
        else _mm_storeu_si128((__m128i *)(out + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    to_f16_scalar(out + i, x + i, n - i);
}

/* a float16 NaN: all exponent bits and a nonzero mantissa, i.e. its magnitude above infinity's 0x7c00 */
__attribute__((target("avx512f,avx512bw"))) static void from_f16_avx512(float *out, const uint16_t *h, int64_t n) {
    const __m256i mag = _mm256_set1_epi16(0x7fff), inf = _mm256_set1_epi16(0x7c00);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(h + i));
        if (_mm256_movemask_epi8(_mm256_cmpgt_epi16(_mm256_and_si256(v, mag), inf))) from_f16_scalar(out + i, h + i, 16);
        else _mm512_storeu_ps(out + i, _mm512_cvtph_ps(v));
    }
    from_f16_scalar(out + i, h + i, n - i);
}

__attribute__((target("avx2,f16c"))) static void from_f16_avx2(float *out, const uint16_t *h, int64_t n) {
    const __m128i mag = _mm_set1_epi16(0x7fff), inf = _mm_set1_epi16(0x7c00);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i v = _mm_loadu_si128((const __m128i *)(h + i));
        if (_mm_movemask_epi8(_mm_cmpgt_epi16(_mm_and_si128(v, mag), inf))) from_f16_scalar(out + i, h + i, 8);
        else _mm256_storeu_ps(out + i, _mm256_cvtph_ps(v));
    }
    from_f16_scalar(out + i, h + i, n - i);
}

int ak_convert_f32_f16(uint16_t *out, const float *x, int64_t n) {
    AK_CHECK_PTR(out);
    AK_CHECK_PTR(x);
    if (n < 0) return AK_ERR_INVALID_SIZE;
    int isa = ak_isa();
    if (isa == AK_ISA_AVX512 && __builtin_cpu_supports("avx512bw")) to_f16_avx512(out, x, n);
    else if (isa >= AK_ISA_AVX2 && __builtin_cpu_supports("f16c")) to_f16_avx2(out, x, n);
    else to_f16_scalar(out, x, n);
    return AK_OK;
}

int ak_convert_f32_f16_naive(uint16_t *out, const float *x, int64_t n) {
    AK_CHECK_PTR(out);
    AK_CHECK_PTR(x);
    if (n < 0) return AK_ERR_INVALID_SIZE;
    to_f16_scalar(out, x, n);
    return AK_OK;
}

int ak_convert_f16_f32(float *out, const uint16_t *h, int64_t n) {
    AK_CHECK_PTR(out);
    AK_CHECK_PTR(h);
    if (n < 0) return AK_ERR_INVALID_SIZE;
    int isa = ak_isa();
    if (isa == AK_ISA_AVX512 && __builtin_cpu_supports("avx512bw")) from_f16_avx512(out, h, n);
    else if (isa >= AK_ISA_AVX2 && __builtin_cpu_supports("f16c")) from_f16_avx2(out, h, n);
    else from_f16_scalar(out, h, n);
    return AK_OK;
}

int ak_convert_f16_f32_naive(float *out, const uint16_t *h, int64_t n) {
    AK_CHECK_PTR(out);
    AK_CHECK_PTR(h);
    if (n < 0) return AK_ERR_INVALID_SIZE;
    from_f16_scalar(out, h, n);
    return AK_OK;
}

/* ---- float64 values rounded to float16 or bfloat16 precision, kept in float64 (the reference ops' rounding,
 * actdiff.compare.refops.round_to) ----
 *
 * numpy rounds float64 to float16 in software (4.9 ns a value) and the bfloat16 rounding took five array passes
 * (11.5 ns). float16: straight from float64, as numpy does, without a second rounding: the value is first cut to
 * float32 toward zero with its last bit set where anything was cut ("round to odd"), then rounded to float16 to
 * nearest even. Rounding to odd at a precision with at least two more bits than the target's gives the target's
 * correctly rounded value (Boldo and Melquiond, "Emulation of FMA and correctly rounded sums: proved algorithms
 * using rounding to odd", 2008); float32's 24 bits are 13 more than float16's 11, and its range covers
 * float16's subnormals. bfloat16: as refops defines it, the value rounded to float32 (nearest even) and then to
 * bfloat16 (nearest even on the upper 16 bits); a NaN stays a NaN. */

/* float64 -> float32 toward zero, the last bit set where the conversion was inexact */
static inline float f64_to_f32_odd(double x) {
    float f = (float)x; /* nearest even */
    if (isnan(x) || (double)f == x) return f;
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if (fabs((double)f) > fabs(x)) u -= 1u; /* rounded away from zero: one step back (|f| > 0 here) */
    u |= 1u;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline double f64_to_bf16(double x) {
    uint32_t u = f32_bits((float)x);
    if ((u & 0x7fffffffu) > 0x7f800000u) u |= 0x00400000u; /* NaN: quiet, so the cut below keeps it a NaN */
    else u += 0x7fffu + ((u >> 16) & 1u); /* nearest even on the upper 16 bits (overflow to infinity) */
    u &= 0xffff0000u;
    float f;
    memcpy(&f, &u, sizeof f);
    return (double)f;
}

static void round64_scalar(double *out, const double *x, int64_t n, int format) {
    if (format == AK_ROUND_F16)
        for (int64_t i = 0; i < n; i++) out[i] = (double)ak_f16_to_f32(f32_to_f16_bits(f64_to_f32_odd(x[i])));
    else
        for (int64_t i = 0; i < n; i++) out[i] = f64_to_bf16(x[i]);
}

__attribute__((target("avx512f,avx512vl,f16c"))) static void round64_f16_avx512(double *out, const double *x, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m512d v = _mm512_loadu_pd(x + i);
        __m256 t = _mm512_cvt_roundpd_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
        /* inexact (and not NaN): set the last bit */
        __mmask8 cut = _mm512_cmp_pd_mask(_mm512_cvtps_pd(t), v, _CMP_NEQ_OQ);
        __m256i ti = _mm256_castps_si256(t);
        ti = _mm256_mask_or_epi32(ti, cut, ti, _mm256_set1_epi32(1));
        __m128i h = _mm256_cvtps_ph(_mm256_castsi256_ps(ti), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm512_storeu_pd(out + i, _mm512_cvtps_pd(_mm256_cvtph_ps(h)));
    }
    round64_scalar(out + i, x + i, n - i, AK_ROUND_F16);
}

/* the same on AVX2 + F16C, which has no conversion toward zero: rounded to nearest, then one step back toward zero
 * where that went away from it, and the last bit set where the conversion was inexact */
__attribute__((target("avx2,f16c"))) static void round64_f16_avx2(double *out, const double *x, int64_t n) {
    const __m256d abs_mask = _mm256_castsi256_pd(_mm256_set1_epi64x(0x7fffffffffffffffLL));
    const __m256i low_halves = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6); /* each 64-bit lane's low 32 bits */
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        __m256d v = _mm256_loadu_pd(x + i);
        __m128 f = _mm256_cvtpd_ps(v);
        __m256d back = _mm256_cvtps_pd(f);
        __m256d away = _mm256_cmp_pd(_mm256_and_pd(back, abs_mask), _mm256_and_pd(v, abs_mask), _CMP_GT_OQ);
        __m256d cut = _mm256_cmp_pd(back, v, _CMP_NEQ_OQ); /* false for NaN */
        __m128i away32 = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(_mm256_castpd_si256(away), low_halves));
        __m128i cut32 = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(_mm256_castpd_si256(cut), low_halves));
        __m128i t = _mm_add_epi32(_mm_castps_si128(f), away32); /* -1 where it went away from zero */
        t = _mm_or_si128(t, _mm_and_si128(cut32, _mm_set1_epi32(1)));
        __m128i h = _mm_cvtps_ph(_mm_castsi128_ps(t), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm256_storeu_pd(out + i, _mm256_cvtps_pd(_mm_cvtph_ps(h)));
    }
    round64_scalar(out + i, x + i, n - i, AK_ROUND_F16);
}

int ak_round_f64(double *out, const double *x, int64_t n, int format) {
    AK_CHECK_PTR(out);
    AK_CHECK_PTR(x);
    if (n < 0) return AK_ERR_INVALID_SIZE;
    if (format != AK_ROUND_F16 && format != AK_ROUND_BF16) return AK_ERR_INVALID_ARGUMENT;
    int isa = format == AK_ROUND_F16 ? ak_isa() : AK_ISA_SCALAR;
    if (isa == AK_ISA_AVX512 && __builtin_cpu_supports("avx512vl")) round64_f16_avx512(out, x, n);
    else if (isa >= AK_ISA_AVX2 && __builtin_cpu_supports("f16c")) round64_f16_avx2(out, x, n);
    else round64_scalar(out, x, n, format);
    return AK_OK;
}

int ak_round_f64_naive(double *out, const double *x, int64_t n, int format) {
    AK_CHECK_PTR(out);
    AK_CHECK_PTR(x);
    if (n < 0) return AK_ERR_INVALID_SIZE;
    if (format != AK_ROUND_F16 && format != AK_ROUND_BF16) return AK_ERR_INVALID_ARGUMENT;
    round64_scalar(out, x, n, format);
    return AK_OK;
}
