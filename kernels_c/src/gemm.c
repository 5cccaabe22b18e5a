/* gemm.c -- the matmul core: packed-B, register-blocked micro-kernels for
 * AVX-512 (12x32), AVX2/FMA (6x16) and portable C (4x8), plus the naive reference.
 *
 * Arithmetic contract (what makes results deterministic):
 *   C[m,n] = fl(chain) + bias[n], chain = fma(A[m,K-1], B[K-1,n], ... fma(A[m,0], B[0,n], 0))
 * i.e. one fp32 accumulator per output element, k in increasing order, fused multiply-add.
 * Partial chains are spilled to C between K blocks (exact), the vector lanes run along n,
 * so the value of an element depends neither on the tile it falls in, nor the thread that
 * computes it, nor M, nor the ISA path (the scalar path uses fmaf).
 */
#include "ak_internal.h"
#include <math.h>
#include <stdlib.h>
#include <immintrin.h>

/* K blocks. KC: the driver's K block, a packed weight's (AK_PACK_KC) and a B packed per call (an unpacked or
 * reduced-precision weight). From PACKED_DEEP_ROWS rows on, a packed weight's consecutive whole blocks are taken
 * KC_DEEP deep in one kernel call, the kernel stepping from one block's panel to the next's (a constant stride):
 * C's partial sums then make a third of the round trips, 4-5 % of the AVX-512 path's rate at 256-512 rows. Blocks
 * packed 768 deep instead did as well there but lost 3-4 % below 256 rows, where a 256-deep panel (32 KiB, the next
 * one contiguous) stays in L1 across the row tiles (kernels_c/README.md, 2026-12-06). Every choice gives the same
 * bits: each element's chain runs over k in order, spilled to C exactly between calls. */
#define KC AK_PACK_KC
#define KC_DEEP (3 * KC)
#define PACKED_DEEP_ROWS 256
#define NC_COLS 384
/* every slab, and every thread's column range (units of NR), starts on a packed panel: the kernels'
 * second-half offsets (ak_gemm_serial) assume it */
_Static_assert(NC_COLS % AK_PACK_NR == 0, "a slab of NC_COLS columns must hold whole packed panels");
/* row stride of the copied A tile: KC_DEEP + 16 floats (784: 49 cache lines, so its 12 rows fall in different L1
 * sets; rows of A itself are lda apart, and lda = 3072 floats = 12 KiB puts all 12 in one 4 KiB-periodic set) */
#define A_LD (KC_DEEP + 16)

/* The kernels prefetch B PF_ROWS rows ahead of the row they read (both halves of their NR columns). Past a panel's
 * end that is the next panel of the block, contiguous, which the next kernel call reads (a slab's first row tile
 * meets each panel before anything else has). An MoE layer's expert weights (9 MiB each) are in no cache when an
 * expert's turn comes, and there the hardware prefetchers fell behind: 128 x 3072 x 768 products cycling over eight
 * weights ran at 178 GFLOP/s against 212 on one (Xeon model 207, 1 thread, avx512), 191 with B prefetched 32 rows
 * (4 KiB of the AVX-512 layout) ahead; 4 and 8 rows did less, 64 and 128 no better; an MoE layer 10-50 % faster
 * (kernels_c/README.md, 2026-12-06). A prefetch changes no value and cannot fault; its address is computed as an
 * integer, so one past the weight's end is no pointer arithmetic out of bounds. */
#define PF_ROWS 32
static inline __attribute__((always_inline)) void prefetch_b(const float *row, int64_t ldp) {
    __builtin_prefetch((const void *)((uintptr_t)row + (uintptr_t)(PF_ROWS * ldp * (int64_t)sizeof(float))), 0, 3);
}


/* ---------------- B packing ----------------
 * dst holds ceil(nc/NR) panels, each kc x NR (row k contiguous), zero padded. */
static inline float load_b(const ak_gemm_args *g, int64_t idx, int n) {
    switch (g->b_dtype) {
    case AK_DTYPE_F16: return ak_f16_to_f32(((const uint16_t *)g->B)[idx]);
    case AK_DTYPE_BF16: return ak_bf16_to_f32(((const uint16_t *)g->B)[idx]);
    case AK_DTYPE_I8: return (float)((const int8_t *)g->B)[idx] * g->scales[n];
    default: return ((const float *)g->B)[idx];
    }
}

/* ---------------- B values converted to fp32, a run at a time ----------------
 * b_convert: dst[i] = load_b(g, idx + i, n + i * per_column) for i < count, the same values: the dtype's switch
 * is taken once per run instead of per value, and on the AVX2 and AVX-512 paths 8 or 16 values are converted
 * at once with integer ops. per_column: 0 for a run along k of a transposed B (one output channel n, one int8
 * scale), 1 for a run along n (consecutive output channels, a scale each). Converting value by value was most
 * of a reduced-precision matmul's time at a few hundred rows (fp16 0.5x fp32 at 170 rows, Zen 4).
 *
 * fp16 -> fp32 without branches (exact, as ak_f16_to_f32): the exponent and mantissa shifted into place and the
 * exponent rebiased by 112; an Inf/NaN exponent (31) rebiased by 112 more to 255, payload kept; a zero or
 * subnormal exponent (0) given one more and the magic 2^-14 subtracted in fp32 (exact: the result is a
 * multiple of 2^-24 below 2^-14), which normalises it; the sign ORed back last. */
#define F16_EXP_SHIFTED (0x7c00u << 13)
#define F16_REBIAS (112u << 23)
#define F16_MAGIC (113u << 23) /* 2^-14 as fp32 bits */

static void b_convert_scalar(float *dst, const ak_gemm_args *g, int64_t idx, int n, int count, int per_column) {
    switch (g->b_dtype) {
    case AK_DTYPE_F16: {
        const uint16_t *s = (const uint16_t *)g->B + idx;
        for (int i = 0; i < count; i++) dst[i] = ak_f16_to_f32(s[i]);
        return;
    }
    case AK_DTYPE_BF16: {
        const uint16_t *s = (const uint16_t *)g->B + idx;
        for (int i = 0; i < count; i++) dst[i] = ak_bf16_to_f32(s[i]);
        return;
    }
    case AK_DTYPE_I8: {
        const int8_t *s = (const int8_t *)g->B + idx;
        for (int i = 0; i < count; i++) dst[i] = (float)s[i] * g->scales[n + i * per_column];
        return;
    }
    default:
        memcpy(dst, (const float *)g->B + idx, (size_t)count * sizeof(float));
    }
}

__attribute__((target("avx2"))) static inline __m256 f16x8_to_f32(__m128i h) {
    const __m256i x = _mm256_cvtepu16_epi32(h);
    __m256i o = _mm256_slli_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0x7fff)), 13);
    const __m256i e = _mm256_and_si256(o, _mm256_set1_epi32((int)F16_EXP_SHIFTED));
    o = _mm256_add_epi32(o, _mm256_set1_epi32((int)F16_REBIAS));
    const __m256i inf = _mm256_cmpeq_epi32(e, _mm256_set1_epi32((int)F16_EXP_SHIFTED));
    o = _mm256_add_epi32(o, _mm256_and_si256(inf, _mm256_set1_epi32((int)F16_REBIAS)));
    const __m256i den = _mm256_cmpeq_epi32(e, _mm256_setzero_si256());
    const __m256 sub = _mm256_sub_ps(_mm256_castsi256_ps(_mm256_add_epi32(o, _mm256_set1_epi32(1 << 23))),
                                     _mm256_castsi256_ps(_mm256_set1_epi32((int)F16_MAGIC)));
    __m256 f = _mm256_blendv_ps(_mm256_castsi256_ps(o), sub, _mm256_castsi256_ps(den));
    const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0x8000)), 16);
    return _mm256_or_ps(f, _mm256_castsi256_ps(sign));
}

__attribute__((target("avx2"))) static void b_convert_avx2(float *dst, const ak_gemm_args *g, int64_t idx, int n,
                                                          int count, int per_column) {
    int i = 0;
    if (g->b_dtype == AK_DTYPE_F16) {
        const uint16_t *s = (const uint16_t *)g->B + idx;
        for (; i + 8 <= count; i += 8) _mm256_storeu_ps(dst + i, f16x8_to_f32(_mm_loadu_si128((const __m128i *)(s + i))));
    } else if (g->b_dtype == AK_DTYPE_BF16) {
        const uint16_t *s = (const uint16_t *)g->B + idx;
        for (; i + 8 <= count; i += 8) {
            __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(s + i)));
            _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(x, 16)));
        }
    } else if (g->b_dtype == AK_DTYPE_I8) {
        const int8_t *s = (const int8_t *)g->B + idx;
        for (; i + 8 <= count; i += 8) {
            __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(s + i))));
            __m256 sc = per_column ? _mm256_loadu_ps(g->scales + n + i) : _mm256_set1_ps(g->scales[n]);
            _mm256_storeu_ps(dst + i, _mm256_mul_ps(q, sc));
        }
    }
    if (i < count) b_convert_scalar(dst + i, g, idx + i, n + i * per_column, count - i, per_column);
}

__attribute__((target("avx512f"))) static void b_convert_avx512(float *dst, const ak_gemm_args *g, int64_t idx, int n,
                                                               int count, int per_column) {
    int i = 0;
    if (g->b_dtype == AK_DTYPE_F16) {
        const uint16_t *s = (const uint16_t *)g->B + idx;
        for (; i + 16 <= count; i += 16) {
            const __m512i x = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(s + i)));
            __m512i o = _mm512_slli_epi32(_mm512_and_si512(x, _mm512_set1_epi32(0x7fff)), 13);
            const __m512i e = _mm512_and_si512(o, _mm512_set1_epi32((int)F16_EXP_SHIFTED));
            o = _mm512_add_epi32(o, _mm512_set1_epi32((int)F16_REBIAS));
            const __mmask16 inf = _mm512_cmpeq_epi32_mask(e, _mm512_set1_epi32((int)F16_EXP_SHIFTED));
            o = _mm512_mask_add_epi32(o, inf, o, _mm512_set1_epi32((int)F16_REBIAS));
            const __mmask16 den = _mm512_cmpeq_epi32_mask(e, _mm512_setzero_si512());
            const __m512 sub = _mm512_sub_ps(_mm512_castsi512_ps(_mm512_add_epi32(o, _mm512_set1_epi32(1 << 23))),
                                             _mm512_castsi512_ps(_mm512_set1_epi32((int)F16_MAGIC)));
            __m512 f = _mm512_mask_blend_ps(den, _mm512_castsi512_ps(o), sub);
            const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(x, _mm512_set1_epi32(0x8000)), 16);
            _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(f), sign)));
        }
    } else if (g->b_dtype == AK_DTYPE_BF16) {
        const uint16_t *s = (const uint16_t *)g->B + idx;
        for (; i + 16 <= count; i += 16) {
            __m512i x = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(s + i)));
            _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(x, 16)));
        }
    } else if (g->b_dtype == AK_DTYPE_I8) {
        const int8_t *s = (const int8_t *)g->B + idx;
        for (; i + 16 <= count; i += 16) {
            __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(s + i))));
            __m512 sc = per_column ? _mm512_loadu_ps(g->scales + n + i) : _mm512_set1_ps(g->scales[n]);
            _mm512_storeu_ps(dst + i, _mm512_mul_ps(q, sc));
        }
    }
    if (i < count) b_convert_scalar(dst + i, g, idx + i, n + i * per_column, count - i, per_column);
}

static void b_convert(int isa, float *dst, const ak_gemm_args *g, int64_t idx, int n, int count, int per_column) {
    if (isa == AK_ISA_AVX512) b_convert_avx512(dst, g, idx, n, count, per_column);
    else if (isa == AK_ISA_AVX2) b_convert_avx2(dst, g, idx, n, count, per_column);
    else b_convert_scalar(dst, g, idx, n, count, per_column);
}

static void pack_b_generic(float *dst, const ak_gemm_args *g, int n0, int nc, int k0, int kc, int NR, int isa) {
    int np = (nc + NR - 1) / NR;
    float conv[KC > AK_PACK_NR ? KC : AK_PACK_NR]; /* one converted run: kc <= KC values along k, or NR along n */
    for (int p = 0; p < np; p++) {
        float *panel = dst + (int64_t)p * kc * NR;
        int valid = nc - p * NR;
        if (valid > NR) valid = NR;
        if (g->b_trans) {
            for (int j = 0; j < NR; j++) {
                if (j >= valid) {
                    for (int k = 0; k < kc; k++) panel[k * NR + j] = 0.0f;
                    continue;
                }
                int n = n0 + p * NR + j;
                int64_t base = (int64_t)n * g->ldb + k0;
                const float *row = (const float *)g->B + base;
                if (g->b_dtype != AK_DTYPE_F32) {
                    b_convert(isa, conv, g, base, n, kc, 0);
                    row = conv;
                }
                for (int k = 0; k < kc; k++) panel[k * NR + j] = row[k];
            }
        } else {
            for (int k = 0; k < kc; k++) {
                int64_t base = (int64_t)(k0 + k) * g->ldb + n0 + p * NR;
                float *d = panel + k * NR;
                if (g->b_dtype == AK_DTYPE_F32) {
                    const float *row = (const float *)g->B + base;
                    for (int j = 0; j < valid; j++) d[j] = row[j];
                } else {
                    b_convert(isa, d, g, base, n0 + p * NR, valid, 1);
                }
                for (int j = valid; j < NR; j++) d[j] = 0.0f;
            }
        }
    }
}

/* AVX-512 packing of fp32 (N,K) weights: 16x16 transposes */
__attribute__((target("avx512f"))) static void transpose16_store(const float *src, int64_t ld, float *dst, int dld) {
    __m512 r[16], t[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(src + i * ld);
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        __m512d a0 = _mm512_castps_pd(t[4 * i]), a1 = _mm512_castps_pd(t[4 * i + 1]);
        __m512d a2 = _mm512_castps_pd(t[4 * i + 2]), a3 = _mm512_castps_pd(t[4 * i + 3]);
        r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a0, a2));
        r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a0, a2));
        r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(a1, a3));
        r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(a1, a3));
    }
    /* now r[4i+c] holds, for rows 4i..4i+3, column c of each 128-bit lane: lanes L0..L3 */
    for (int i = 0; i < 2; i++) {
        for (int c = 0; c < 4; c++) {
            __m512 x = r[8 * i + c], y = r[8 * i + 4 + c];
            t[8 * i + c] = _mm512_shuffle_f32x4(x, y, 0x88);     /* lanes 0,2 of x, 0,2 of y */
            t[8 * i + 4 + c] = _mm512_shuffle_f32x4(x, y, 0xdd); /* lanes 1,3 of x, 1,3 of y */
        }
    }
    for (int c = 0; c < 4; c++) {
        for (int h = 0; h < 2; h++) {
            __m512 x = t[4 * h + c], y = t[8 + 4 * h + c];
            __m512 lo = _mm512_shuffle_f32x4(x, y, 0x88);
            __m512 hi = _mm512_shuffle_f32x4(x, y, 0xdd);
            /* column index: 128-bit lane L, element c -> col 4L + c */
            int L0 = h, L1 = h + 2; /* lo holds lane (h,h+2) ordering after two 0x88/0xdd steps */
            (void)L1;
            _mm512_storeu_ps(dst + (int64_t)(4 * (2 * 0 + L0) + c) * dld, lo);
            _mm512_storeu_ps(dst + (int64_t)(4 * (2 * 1 + L0) + c) * dld, hi);
        }
    }
}

/* verify-or-fallback: the transpose above is checked once at first use against
 * the generic code (cheap) so a wrong lane mapping can never produce wrong results. */
static int g_t16_ok = -1;

__attribute__((target("avx512f"))) static int transpose16_selftest(void) {
    float src[16 * 16], dst[16 * 16];
    for (int i = 0; i < 256; i++) src[i] = (float)i;
    transpose16_store(src, 16, dst, 16);
    for (int i = 0; i < 16; i++)
        for (int j = 0; j < 16; j++)
            if (dst[j * 16 + i] != src[i * 16 + j]) return 0;
    return 1;
}

typedef void (*transpose_fn)(const float *src, int64_t ld, float *dst, int dld);
typedef void (*convert_fn)(float *dst, const ak_gemm_args *g, int64_t idx, int n, int count, int per_column);

/* A transposed B packed into NR-column panels through TB x TB transposes (tr: TB rows of B, TB values each, to TB
 * panel rows), TB rows of a reduced-precision B converted to fp32 first (cv); a partial panel by pack_b_generic.
 * The AVX-512 (NR 32, TB 16) and AVX2 (NR 16, TB 8) packers, once their transpose passed its self-test. */
static void pack_b_transposed(float *dst, const ak_gemm_args *g, int n0, int nc, int k0, int kc, int NR, int TB,
                              transpose_fn tr, convert_fn cv, int isa) {
    const int f32 = g->b_dtype == AK_DTYPE_F32;
    float conv[16 * KC]; /* a reduced-precision B: TB (<= 16) of its rows converted to fp32, then transposed */
    int np = (nc + NR - 1) / NR;
    for (int p = 0; p < np; p++) {
        float *panel = dst + (int64_t)p * kc * NR;
        int valid = nc - p * NR;
        if (valid > NR) valid = NR;
        if (valid < NR) {
            pack_b_generic(panel, g, n0 + p * NR, valid, k0, kc, NR, isa);
            continue;
        }
        int kfull = kc - kc % TB;
        for (int jb = 0; jb < NR; jb += TB) {
            const int n = n0 + p * NR + jb;
            const float *src = (const float *)g->B + (int64_t)n * g->ldb + k0;
            int64_t ld = g->ldb;
            if (!f32) {
                for (int j = 0; j < TB; j++) cv(conv + j * kc, g, (int64_t)(n + j) * g->ldb + k0, n + j, kc, 0);
                src = conv, ld = kc;
            }
            for (int k = 0; k < kfull; k += TB) tr(src + k, ld, panel + (int64_t)k * NR + jb, NR);
            for (int j = 0; j < TB; j++)
                for (int k = kfull; k < kc; k++) panel[(int64_t)k * NR + jb + j] = src[(int64_t)j * ld + k];
        }
    }
}

static void pack_b_avx512(float *dst, const ak_gemm_args *g, int n0, int nc, int k0, int kc) {
    if (g_t16_ok < 0) g_t16_ok = transpose16_selftest();
    if (g->b_trans && g_t16_ok == 1)
        pack_b_transposed(dst, g, n0, nc, k0, kc, 32, 16, transpose16_store, b_convert_avx512, AK_ISA_AVX512);
    else
        pack_b_generic(dst, g, n0, nc, k0, kc, 32, AK_ISA_AVX512);
}

/* AVX2 packing of a transposed B (the 16-column panels of the AVX2 kernel): 8x8 transposes, as pack_b_avx512
 * does with 16x16 ones; the per-value scatter of pack_b_generic wrote each panel column by column (fp32 at 64
 * rows: 0.66x the packed weight's speed on the AVX2 path). Checked once against plain indexing before use. */
__attribute__((target("avx2"))) static void transpose8_store(const float *src, int64_t ld, float *dst, int dld) {
    __m256 r[8], t[8], u[8];
    for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(src + i * ld);
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);     /* r0[0] r1[0] r0[1] r1[1] | [4] [5] */
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]); /* r0[2] r1[2] r0[3] r1[3] | [6] [7] */
    }
    for (int h = 0; h < 2; h++) { /* rows 0-3 (h = 0) and 4-7 (h = 1) */
        u[4 * h + 0] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], _MM_SHUFFLE(1, 0, 1, 0));     /* col 0 | col 4 */
        u[4 * h + 1] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], _MM_SHUFFLE(3, 2, 3, 2));     /* col 1 | col 5 */
        u[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], _MM_SHUFFLE(1, 0, 1, 0)); /* col 2 | col 6 */
        u[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], _MM_SHUFFLE(3, 2, 3, 2)); /* col 3 | col 7 */
    }
    for (int c = 0; c < 4; c++) {
        _mm256_storeu_ps(dst + (int64_t)c * dld, _mm256_permute2f128_ps(u[c], u[4 + c], 0x20));
        _mm256_storeu_ps(dst + (int64_t)(c + 4) * dld, _mm256_permute2f128_ps(u[c], u[4 + c], 0x31));
    }
}

static int g_t8_ok = -1;

__attribute__((target("avx2"))) static int transpose8_selftest(void) {
    float src[8 * 11], dst[8 * 9];
    for (int i = 0; i < 8 * 11; i++) src[i] = (float)i;
    transpose8_store(src, 11, dst, 9);
    for (int i = 0; i < 8; i++)
        for (int j = 0; j < 8; j++)
            if (dst[j * 9 + i] != src[i * 11 + j]) return 0;
    return 1;
}

static void pack_b_avx2(float *dst, const ak_gemm_args *g, int n0, int nc, int k0, int kc) {
    if (g_t8_ok < 0) g_t8_ok = transpose8_selftest();
    if (g->b_trans && g_t8_ok == 1)
        pack_b_transposed(dst, g, n0, nc, k0, kc, 16, 8, transpose8_store, b_convert_avx2, AK_ISA_AVX2);
    else
        pack_b_generic(dst, g, n0, nc, k0, kc, 16, AK_ISA_AVX2);
}

/* ---------------- micro-kernels ----------------
 * C tile (mr x NR) at C with stride ldc.  first: start chains from 0, else continue from C.
 * B row k of the tile: its first NR/2 columns at Bp + k*ldp, the other NR/2 at Bp + k*ldp + boff
 * (one row of a panel, or two halves stored apart: see the packed layouts).
 * bias: NULL, or NR values added after the chain (last K block only). */

__attribute__((target("avx512f,avx2,fma"))) static inline __attribute__((always_inline)) void
ukr512_body(const int MR, int kc, const float *A, int64_t lda, const float *Bp, int64_t ldp, int64_t boff, float *C,
            int64_t ldc, int first, const float *bias, int seg, int64_t sstride) {
    __m512 acc[12][2];
#pragma GCC unroll 12
    for (int m = 0; m < MR; m++) {
        if (first) {
            acc[m][0] = _mm512_setzero_ps();
            acc[m][1] = _mm512_setzero_ps();
        } else {
            acc[m][0] = _mm512_loadu_ps(C + m * ldc);
            acc[m][1] = _mm512_loadu_ps(C + m * ldc + 16);
        }
    }
    for (int ks = 0; ks < kc; ks += seg) { /* segments of seg rows, sstride floats apart in B (one block each) */
        const float *Bk = Bp + (int64_t)(ks / seg) * sstride, *Ak = A + ks;
        const int ke = kc - ks < seg ? kc - ks : seg;
#pragma GCC unroll 4
        for (int k = 0; k < ke; k++) {
            __m512 b0 = _mm512_loadu_ps(Bk + k * ldp);
            __m512 b1 = _mm512_loadu_ps(Bk + k * ldp + boff);
            prefetch_b(Bk + k * ldp, ldp);
            prefetch_b(Bk + k * ldp + boff, ldp);
#pragma GCC unroll 12
            for (int m = 0; m < MR; m++) {
                __m512 a = _mm512_set1_ps(Ak[m * lda + k]);
                acc[m][0] = _mm512_fmadd_ps(a, b0, acc[m][0]);
                acc[m][1] = _mm512_fmadd_ps(a, b1, acc[m][1]);
            }
        }
    }
    if (bias) {
        __m512 bb0 = _mm512_loadu_ps(bias), bb1 = _mm512_loadu_ps(bias + 16);
#pragma GCC unroll 12
        for (int m = 0; m < MR; m++) {
            acc[m][0] = _mm512_add_ps(acc[m][0], bb0);
            acc[m][1] = _mm512_add_ps(acc[m][1], bb1);
        }
    }
#pragma GCC unroll 12
    for (int m = 0; m < MR; m++) {
        _mm512_storeu_ps(C + m * ldc, acc[m][0]);
        _mm512_storeu_ps(C + m * ldc + 16, acc[m][1]);
    }
}

/* the 32-column-row layouts (boff 16: the per-call buffer, AK_DTYPE_F32_PACKED; also a 1-row K block of
 * 16-column halves, where the next half is 16 on too) get their own copy with the offset a constant:
 * passed at run time it cost ~1 % on a Zen 4 (one more register in the loop) */
#define UKR512_ARGS(BOFF) kc, A, lda, Bp, ldp, BOFF, C, ldc, first, bias, seg, sstride
#define UKR512_CASES(BOFF)                                                                                             \
    switch (mr) {                                                                                                      \
    case 12: ukr512_body(12, UKR512_ARGS(BOFF)); break;                                                                \
    case 11: ukr512_body(11, UKR512_ARGS(BOFF)); break;                                                                \
    case 10: ukr512_body(10, UKR512_ARGS(BOFF)); break;                                                                \
    case 9: ukr512_body(9, UKR512_ARGS(BOFF)); break;                                                                  \
    case 8: ukr512_body(8, UKR512_ARGS(BOFF)); break;                                                                  \
    case 7: ukr512_body(7, UKR512_ARGS(BOFF)); break;                                                                  \
    case 6: ukr512_body(6, UKR512_ARGS(BOFF)); break;                                                                  \
    case 5: ukr512_body(5, UKR512_ARGS(BOFF)); break;                                                                  \
    case 4: ukr512_body(4, UKR512_ARGS(BOFF)); break;                                                                  \
    case 3: ukr512_body(3, UKR512_ARGS(BOFF)); break;                                                                  \
    case 2: ukr512_body(2, UKR512_ARGS(BOFF)); break;                                                                  \
    default: ukr512_body(1, UKR512_ARGS(BOFF)); break;                                                                 \
    }

__attribute__((target("avx512f,avx2,fma"))) static void ukr512(int mr, int kc, const float *A, int64_t lda,
                                                               const float *Bp, int64_t ldp, int64_t boff, float *C,
                                                               int64_t ldc, int first, const float *bias, int seg,
                                                               int64_t sstride) {
    if (boff == 16) UKR512_CASES(16) else UKR512_CASES(boff)
}
#undef UKR512_CASES
#undef UKR512_ARGS

__attribute__((target("avx2,fma"))) static inline __attribute__((always_inline)) void
ukr256_body(const int MR, int kc, const float *A, int64_t lda, const float *Bp, int64_t ldp, int64_t boff, float *C,
            int64_t ldc, int first, const float *bias, int seg, int64_t sstride) {
    __m256 acc[6][2];
#pragma GCC unroll 6
    for (int m = 0; m < MR; m++) {
        if (first) {
            acc[m][0] = _mm256_setzero_ps();
            acc[m][1] = _mm256_setzero_ps();
        } else {
            acc[m][0] = _mm256_loadu_ps(C + m * ldc);
            acc[m][1] = _mm256_loadu_ps(C + m * ldc + 8);
        }
    }
    for (int ks = 0; ks < kc; ks += seg) { /* segments of seg rows, sstride floats apart in B (one block each) */
        const float *Bk = Bp + (int64_t)(ks / seg) * sstride, *Ak = A + ks;
        const int ke = kc - ks < seg ? kc - ks : seg;
#pragma GCC unroll 4
        for (int k = 0; k < ke; k++) {
            __m256 b0 = _mm256_loadu_ps(Bk + k * ldp);
            __m256 b1 = _mm256_loadu_ps(Bk + k * ldp + boff);
            prefetch_b(Bk + k * ldp, ldp);
            prefetch_b(Bk + k * ldp + boff, ldp);
#pragma GCC unroll 6
            for (int m = 0; m < MR; m++) {
                __m256 a = _mm256_broadcast_ss(Ak + m * lda + k);
                acc[m][0] = _mm256_fmadd_ps(a, b0, acc[m][0]);
                acc[m][1] = _mm256_fmadd_ps(a, b1, acc[m][1]);
            }
        }
    }
    if (bias) {
        __m256 bb0 = _mm256_loadu_ps(bias), bb1 = _mm256_loadu_ps(bias + 8);
#pragma GCC unroll 6
        for (int m = 0; m < MR; m++) {
            acc[m][0] = _mm256_add_ps(acc[m][0], bb0);
            acc[m][1] = _mm256_add_ps(acc[m][1], bb1);
        }
    }
#pragma GCC unroll 6
    for (int m = 0; m < MR; m++) {
        _mm256_storeu_ps(C + m * ldc, acc[m][0]);
        _mm256_storeu_ps(C + m * ldc + 8, acc[m][1]);
    }
}

__attribute__((target("avx2,fma"))) static void ukr256(int mr, int kc, const float *A, int64_t lda, const float *Bp,
                                                       int64_t ldp, int64_t boff, float *C, int64_t ldc, int first,
                                                       const float *bias, int seg, int64_t sstride) {
    switch (mr) {
    case 6: ukr256_body(6, kc, A, lda, Bp, ldp, boff, C, ldc, first, bias, seg, sstride); break;
    case 5: ukr256_body(5, kc, A, lda, Bp, ldp, boff, C, ldc, first, bias, seg, sstride); break;
    case 4: ukr256_body(4, kc, A, lda, Bp, ldp, boff, C, ldc, first, bias, seg, sstride); break;
    case 3: ukr256_body(3, kc, A, lda, Bp, ldp, boff, C, ldc, first, bias, seg, sstride); break;
    case 2: ukr256_body(2, kc, A, lda, Bp, ldp, boff, C, ldc, first, bias, seg, sstride); break;
    default: ukr256_body(1, kc, A, lda, Bp, ldp, boff, C, ldc, first, bias, seg, sstride); break;
    }
}

static void ukr_scalar(int mr, int kc, const float *A, int64_t lda, const float *Bp, int64_t ldp, int64_t boff,
                       float *C, int64_t ldc, int first, const float *bias, int seg, int64_t sstride) {
    enum { NR = 8 };
    (void)boff; /* its 8 columns are one run of a row in every layout */
    float acc[4][NR];
    for (int m = 0; m < mr; m++)
        for (int j = 0; j < NR; j++) acc[m][j] = first ? 0.0f : C[m * ldc + j];
    for (int k = 0; k < kc; k++) {
        const float *b = Bp + (int64_t)(k / seg) * sstride + (k % seg) * ldp;
        for (int m = 0; m < mr; m++) {
            float a = A[m * lda + k];
            for (int j = 0; j < NR; j++) acc[m][j] = fmaf(a, b[j], acc[m][j]);
        }
    }
    for (int m = 0; m < mr; m++)
        for (int j = 0; j < NR; j++) C[m * ldc + j] = bias ? acc[m][j] + bias[j] : acc[m][j];
}

typedef void (*ukr_fn)(int, int, const float *, int64_t, const float *, int64_t, int64_t, float *, int64_t, int,
                       const float *, int, int64_t);

/* ---------------- driver ---------------- */
typedef struct {
    int MR, NR;
    ukr_fn ukr;
} ukr_desc;

static ukr_desc ukr_for_isa(int isa) {
    if (isa == AK_ISA_AVX512) return (ukr_desc){12, 32, ukr512};
    if (isa == AK_ISA_AVX2) return (ukr_desc){6, 16, ukr256};
    return (ukr_desc){4, 8, ukr_scalar};
}

/* One kc-deep slab of C's columns [n0, n0+nc) for all M rows.  Panel p (NR columns from n0 + p*NR)
 * starts at panel_of[p] with row stride ldp and its second half boff floats on (see the kernels): the
 * per-call packed buffer or a slice of a pre-packed weight.  Edge panels (fewer than NR valid
 * columns) run the full-width kernel on a scratch tile so padded columns never reach C. */
static void gemm_slab(const ak_gemm_args *g, ukr_desc u, int n0, int nc, int k0, int kc,
                      const float *const *panel_of, int64_t ldp, int64_t boff, int seg, int64_t sstride) {
    float tmpC[12 * 32] __attribute__((aligned(64)));
    float tmpBias[32] __attribute__((aligned(64)));
    float Apack[12 * A_LD] __attribute__((aligned(64)));
    const int MR = u.MR, NR = u.NR, np = (nc + NR - 1) / NR;
    const int first = (k0 == 0), last = (k0 + kc == g->K);
    for (int m0 = 0; m0 < g->M; m0 += MR) {
        int mr = g->M - m0 < MR ? g->M - m0 : MR;
        const float *Ab = g->A + (int64_t)m0 * g->lda + k0;
        int64_t lda = g->lda;
        /* copied once, read by np panels: rows A_LD apart */
        if (np > 1 && ak_rows_share_l1_sets(lda * (int64_t)sizeof(float))) {
            for (int m = 0; m < mr; m++) memcpy(Apack + m * A_LD, Ab + (int64_t)m * lda, (size_t)kc * sizeof(float));
            Ab = Apack;
            lda = A_LD;
        }
        for (int p = 0; p < np; p++) {
            int ncols = nc - p * NR < NR ? nc - p * NR : NR;
            int ncol0 = n0 + p * NR;
            float *Cp = g->C + (int64_t)m0 * g->ldc + ncol0;
            const float *bp = (last && g->bias) ? g->bias + ncol0 : NULL;
            if (ncols == NR) {
                u.ukr(mr, kc, Ab, lda, panel_of[p], ldp, boff, Cp, g->ldc, first, bp, seg, sstride);
                continue;
            }
            if (!first)
                for (int m = 0; m < mr; m++)
                    for (int j = 0; j < ncols; j++) tmpC[m * NR + j] = Cp[(int64_t)m * g->ldc + j];
            if (bp) {
                for (int j = 0; j < NR; j++) tmpBias[j] = j < ncols ? bp[j] : 0.0f;
                bp = tmpBias;
            }
            u.ukr(mr, kc, Ab, lda, panel_of[p], ldp, boff, tmpC, NR, first, bp, seg, sstride);
            for (int m = 0; m < mr; m++)
                for (int j = 0; j < ncols; j++) Cp[(int64_t)m * g->ldc + j] = tmpC[m * NR + j];
        }
    }
}

/* columns a row of a packed layout holds contiguously */
static inline int packed_run(int layout) { return layout == AK_DTYPE_F32_PACKED16 ? AK_PACK_NR / 2 : AK_PACK_NR; }

/* address of row k, column n of a pre-packed (K deep, N wide) weight in a layout whose rows hold W
 * contiguous columns (see ak_pack_weight_f32) */
static inline const float *packed_at(const float *P, int K, int N, int k, int n, int W) {
    int k0 = k / AK_PACK_KC * AK_PACK_KC, kcb = K - k0 < AK_PACK_KC ? K - k0 : AK_PACK_KC;
    int64_t npad = (int64_t)(N + AK_PACK_NR - 1) / AK_PACK_NR * AK_PACK_NR;
    return P + (int64_t)k0 * npad + (int64_t)(n / W) * kcb * W + (int64_t)(k - k0) * W + n % W;
}

static void fill_bias_only(const ak_gemm_args *g, int n_begin, int n_end) {
    for (int m = 0; m < g->M; m++)
        for (int n = n_begin; n < n_end; n++) g->C[m * g->ldc + n] = g->bias ? 0.0f + g->bias[n] : 0.0f;
}

/* columns [n_begin, n_end) on one ISA path; a multi-threaded caller passes the path its split was made for
 * (ak_gemm), so an ak_set_isa from another thread mid-call cannot start a worker mid-panel */
static int gemm_serial_on(const ak_gemm_args *g, int isa, int n_begin, int n_end) {
    if (n_end <= n_begin || g->M <= 0) return AK_OK;
    if (g->K == 0) {
        fill_bias_only(g, n_begin, n_end);
        return AK_OK;
    }
    const int K = g->K, NC = NC_COLS; /* NC: a multiple of every NR */
    const ukr_desc u = ukr_for_isa(isa);
    const int packed = ak_dtype_is_packed(g->b_dtype), W = packed_run(g->b_dtype);
    const int64_t npad = (int64_t)(g->N + AK_PACK_NR - 1) / AK_PACK_NR * AK_PACK_NR; /* a packed block's width */
    const float *panel_of[NC_COLS / 8];
    float *buf = NULL;
    if (!packed && !(buf = (float *)ak_aligned_alloc((size_t)KC * NC * sizeof(float)))) return AK_ERR_OUT_OF_MEMORY;
    for (int n0 = n_begin; n0 < n_end; n0 += NC) {
        int nc = n_end - n0 < NC ? n_end - n0 : NC;
        int np = (nc + u.NR - 1) / u.NR;
        for (int k0 = 0, kc; k0 < K; k0 += kc) {
            kc = K - k0 < KC ? K - k0 : KC;
            if (packed) { /* the weight was packed at load: point into it, nothing to copy */
                /* from PACKED_DEEP_ROWS rows on, up to KC_DEEP / KC whole blocks at once (see KC_DEEP) */
                int whole = (K - k0) / KC < KC_DEEP / KC ? (K - k0) / KC : KC_DEEP / KC;
                if (g->M >= PACKED_DEEP_ROWS && whole > 1) kc = whole * KC;
                for (int p = 0; p < np; p++)
                    panel_of[p] = packed_at((const float *)g->B, K, g->N, k0, n0 + p * u.NR, W);
                /* a kernel's second half: in the same row, or (32 columns from 16-column runs) in the next run,
                 * after the block's every row */
                int kcb = kc < KC ? kc : KC;
                int64_t boff = u.NR / 2 < W ? u.NR / 2 : (int64_t)kcb * W;
                gemm_slab(g, u, n0, nc, k0, kc, panel_of, W, boff, KC, KC * npad);
                continue;
            }
            if (isa == AK_ISA_AVX512) pack_b_avx512(buf, g, n0, nc, k0, kc);
            else if (isa == AK_ISA_AVX2) pack_b_avx2(buf, g, n0, nc, k0, kc);
            else pack_b_generic(buf, g, n0, nc, k0, kc, u.NR, isa);
            for (int p = 0; p < np; p++) panel_of[p] = buf + (int64_t)p * kc * u.NR;
            gemm_slab(g, u, n0, nc, k0, kc, panel_of, u.NR, u.NR / 2, KC, 0);
        }
    }
    ak_aligned_free(buf);
    return AK_OK;
}

int ak_gemm_serial(const ak_gemm_args *g, int n_begin, int n_end) {
    return gemm_serial_on(g, ak_isa(), n_begin, n_end);
}

typedef struct {
    const ak_gemm_args *g;
    int isa, nr; /* read once by ak_gemm: the workers' kernel and the unit of their split */
    int64_t units;
    int status;
} gemm_job;

static void gemm_task(void *ctx, int tid, int nth) {
    gemm_job *j = (gemm_job *)ctx;
    int64_t b, e;
    ak_split(j->units, tid, nth, &b, &e);
    int nb = (int)(b * j->nr), ne = (int)(e * j->nr);
    if (ne > j->g->N) ne = j->g->N;
    int st = gemm_serial_on(j->g, j->isa, nb, ne);
    if (st != AK_OK) __atomic_store_n(&j->status, st, __ATOMIC_RELAXED);
}

int ak_gemm(const ak_gemm_args *g) {
    if (g->M <= 0 || g->N <= 0) return AK_OK;
    int isa = ak_isa();
    int nr = ukr_for_isa(isa).NR;
    gemm_job j = {g, isa, nr, (g->N + nr - 1) / nr, AK_OK};
    int nth = ak_threads_for(j.units, 2.0 * g->M * (double)g->N * g->K);
    ak_parallel(nth, gemm_task, &j);
    return j.status;
}

void ak_gemm_naive(const ak_gemm_args *g) {
    for (int m = 0; m < g->M; m++) {
        for (int n = 0; n < g->N; n++) {
            float acc = 0.0f;
            for (int k = 0; k < g->K; k++) {
                float b;
                if (ak_dtype_is_packed(g->b_dtype)) {
                    b = *packed_at((const float *)g->B, g->K, g->N, k, n, packed_run(g->b_dtype));
                } else {
                    int64_t idx = g->b_trans ? (int64_t)n * g->ldb + k : (int64_t)k * g->ldb + n;
                    b = load_b(g, idx, n);
                }
                acc = fmaf(g->A[(int64_t)m * g->lda + k], b, acc);
            }
            g->C[(int64_t)m * g->ldc + n] = g->bias ? acc + g->bias[n] : acc;
        }
    }
}

/* ---------------- public matmul ops ---------------- */
static int matmul_check(float *out, const float *inp, const void *weight, const float *scales, int T, int C, int OC,
                        int weight_dtype) {
    AK_CHECK_PTR(out);
    AK_CHECK_PTR(inp);
    AK_CHECK_PTR(weight);
    if (T < 0 || C < 0 || OC < 0) return AK_ERR_INVALID_SIZE;
    if (weight_dtype < AK_DTYPE_F32 || weight_dtype > AK_DTYPE_F32_PACKED16) return AK_ERR_INVALID_ARGUMENT;
    if (weight_dtype == AK_DTYPE_I8 && scales == NULL) return AK_ERR_NULL_POINTER;
    return AK_OK;
}

int ak_matmul(float *out, const float *inp, const void *weight, const float *scales, const float *bias, int T, int C,
              int OC, int weight_dtype) {
    ak_count_call(AK_OP_MATMUL);
    int st = matmul_check(out, inp, weight, scales, T, C, OC, weight_dtype);
    if (st) return st;
    ak_gemm_args g = {T, OC, C, inp, C, weight, C, weight_dtype, 1, scales, bias, out, OC};
    return ak_gemm(&g);
}

int ak_matmul_naive(float *out, const float *inp, const void *weight, const float *scales, const float *bias, int T,
                    int C, int OC, int weight_dtype) {
    ak_count_call(AK_OP_MATMUL_NAIVE);
    int st = matmul_check(out, inp, weight, scales, T, C, OC, weight_dtype);
    if (st) return st;
    ak_gemm_args g = {T, OC, C, inp, C, weight, C, weight_dtype, 1, scales, bias, out, OC};
    ak_gemm_naive(&g);
    return AK_OK;
}

/* ---------------- weights packed once ----------------
 * Layouts (every ISA path reads both, so ak_set_isa never invalidates a packed weight): K in blocks of
 * AK_PACK_KC (256) rows, the driver's K blocks; in each block, the columns (zero past N, up to a
 * multiple of 32) in runs of (block rows) x W, row-major: W = 32 (AK_DTYPE_F32_PACKED) or 16
 * (AK_DTYPE_F32_PACKED16).  So the (256 x NC) B block a slab reads is one contiguous range (panels
 * K*32 floats apart would fall in the same L2 sets when K*128 bytes is a multiple of 64 KiB, e.g.
 * K = 3072).  Why two: the AVX-512 kernel (32 columns) reads a W = 32 run as one 128-byte stream a row,
 * and W = 16 as two streams; the AVX2 kernel (16 columns) reads W = 16 contiguously and W = 32 as every
 * other 64-byte line.  Measured side by side on a Zen 4 (2026-12-04, kernels_c/README.md): the AVX2
 * kernel runs 2-9 % faster on W = 16, the AVX-512 one 1-5 % slower, so ak_packed_layout() follows the
 * ISA path in use at packing.  Values are copied bit for bit: a matmul on the packed weight is
 * identical to one on w, in either layout, on every path. */
int ak_packed_layout(void) { return ak_isa() == AK_ISA_AVX512 ? AK_DTYPE_F32_PACKED : AK_DTYPE_F32_PACKED16; }

int64_t ak_packed_size(int K, int N) {
    if (K < 0 || N < 0) return -1;
    return (int64_t)((N + AK_PACK_NR - 1) / AK_PACK_NR) * AK_PACK_NR * K;
}

/* One K block of a packed weight (kcb rows from k0): run p (columns p*W to p*W+W-1) holds its kcb rows of W
 * values contiguously, (k, j) at blk + (p*kcb + k)*W + j; columns past N are zero. Packing went column by column
 * of a run (kcb values, W floats apart), which for an untransposed w read kcb rows N floats apart per value: 1.2
 * ns a value for a 3072 x 768 expert w2 against 0.31 row by row; a transposed w (768 x 768 to 768 x 3072) 0.64-0.82
 * against 0.51-0.66 tiled by cache lines (Intel Xeon 6/167, warm buffers; the same bytes, kernels_c/README.md).
 * Unpacking (ak_unpack_weight_f32, element by element at its documented address) stays the reference. */
static void pack_block_rows(float *blk, const float *w, int N, int k0, int kcb, int W, int nrun) {
    /* w is (K, N): row k's W-column stretches are copied as they lie, one after the other */
    for (int k = 0; k < kcb; k++) {
        const float *src = w + (int64_t)(k0 + k) * N;
        for (int p = 0; p < nrun; p++) {
            float *dst = blk + ((int64_t)p * kcb + k) * W;
            int n0 = p * W, cnt = N - n0 >= W ? W : (N > n0 ? N - n0 : 0);
            for (int j = 0; j < cnt; j++) dst[j] = src[n0 + j];
            for (int j = cnt; j < W; j++) dst[j] = 0.0f;
        }
    }
}

#define PACK_TILE_K 16 /* one cache line of a row of w, read whole */
static void pack_block_transposed(float *blk, const float *w, int K, int N, int k0, int kcb, int W, int nrun) {
    /* w is (N, K): tiles of PACK_TILE_K rows of the run, each column's PACK_TILE_K values contiguous in w */
    for (int p = 0; p < nrun; p++) {
        float *run = blk + (int64_t)p * kcb * W;
        for (int kt = 0; kt < kcb; kt += PACK_TILE_K) {
            int kn = kcb - kt < PACK_TILE_K ? kcb - kt : PACK_TILE_K;
            for (int j = 0; j < W; j++) {
                int n = p * W + j;
                float *d = run + (int64_t)kt * W + j;
                if (n >= N) { /* padding: no row of w to point at */
                    for (int k = 0; k < kn; k++) d[(int64_t)k * W] = 0.0f;
                    continue;
                }
                const float *s = w + (int64_t)n * K + k0 + kt;
                for (int k = 0; k < kn; k++) d[(int64_t)k * W] = s[k];
            }
        }
    }
}

int ak_pack_weight_f32(float *packed, const float *w, int K, int N, int trans, int layout) {
    AK_CHECK_PTR(packed);
    AK_CHECK_PTR(w);
    if (K < 0 || N < 0) return AK_ERR_INVALID_SIZE;
    if ((trans != 0 && trans != 1) || !ak_dtype_is_packed(layout)) return AK_ERR_INVALID_ARGUMENT;
    const int W = packed_run(layout), nrun = (N + AK_PACK_NR - 1) / AK_PACK_NR * (AK_PACK_NR / W);
    for (int k0 = 0; k0 < K; k0 += AK_PACK_KC) {
        int kcb = K - k0 < AK_PACK_KC ? K - k0 : AK_PACK_KC;
        float *blk = (float *)packed_at(packed, K, N, k0, 0, W);
        if (trans) pack_block_transposed(blk, w, K, N, k0, kcb, W, nrun);
        else pack_block_rows(blk, w, N, k0, kcb, W, nrun);
    }
    return AK_OK;
}

int ak_unpack_weight_f32(float *w, const float *packed, int K, int N, int trans, int layout) {
    AK_CHECK_PTR(w);
    AK_CHECK_PTR(packed);
    if (K < 0 || N < 0) return AK_ERR_INVALID_SIZE;
    if ((trans != 0 && trans != 1) || !ak_dtype_is_packed(layout)) return AK_ERR_INVALID_ARGUMENT;
    for (int n = 0; n < N; n++)
        for (int k = 0; k < K; k++) {
            float v = *packed_at(packed, K, N, k, n, packed_run(layout));
            if (trans) w[(int64_t)n * K + k] = v;
            else w[(int64_t)k * N + n] = v;
        }
    return AK_OK;
}

int ak_matmul_packed(float *out, const float *inp, const float *packed, const float *bias, int T, int C, int OC,
                     int layout) {
    if (!ak_dtype_is_packed(layout)) { /* ak_matmul would take 0-3 for other dtypes */
        ak_count_call(AK_OP_MATMUL);
        return AK_ERR_INVALID_ARGUMENT;
    }
    return ak_matmul(out, inp, packed, NULL, bias, T, C, OC, layout);
}
