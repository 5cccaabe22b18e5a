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

__attribute__((target("avx512f"))) static void round_avx512(float *out, const float *x, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256i h = _mm512_cvtps_ph(_mm512_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm512_storeu_ps(out + i, _mm512_cvtph_ps(h));
    }
    round_scalar(out + i, x + i, n - i);
}

__attribute__((target("avx2,f16c"))) static void round_avx2(float *out, const float *x, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm256_storeu_ps(out + i, _mm256_cvtph_ps(h));
    }
    round_scalar(out + i, x + i, n - i);
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
