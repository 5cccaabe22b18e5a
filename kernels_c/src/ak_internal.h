/* ak_internal.h -- private helpers shared by the kernel sources (not part of the API). */
#ifndef AK_INTERNAL_H
#define AK_INTERNAL_H

#include "actdiff_kernels.h"
#include <immintrin.h>
#include <stdint.h>
#include <stddef.h>
#include <string.h>

/* op ids for the call counters; names in core.c must follow this order */
enum {
    AK_OP_MATMUL = 0, AK_OP_MATMUL_NAIVE, AK_OP_LAYERNORM, AK_OP_GELU, AK_OP_SOFTMAX, AK_OP_ADD,
    AK_OP_EMBEDDING, AK_OP_ROTARY, AK_OP_ATTENTION, AK_OP_ATTENTION_NAIVE, AK_OP_MOE,
    AK_OP_MEAN_POOL, AK_OP_L2_NORMALIZE, AK_OP_TOPK, AK_OP_EXPERT_UP, AK_OP_EXPERT_DOWN,
    AK_OP_MOE_COMBINE, AK_OP_MATMUL_F64, AK_OP_MATMUL_F64_NAIVE, AK_NUM_OPS
};

void ak_count_call(int op);

/* thread pool: fn(ctx, tid, nth) is called for tid = 0..nth-1 (tid 0 on the caller). */
typedef void (*ak_task_fn)(void *ctx, int tid, int nth);
void ak_parallel(int nth, ak_task_fn fn, void *ctx);
/* number of threads to use for a job of `work` units of roughly `unit_cost` flops */
int ak_threads_for(int64_t units, double flops);

int ak_isa(void); /* current ISA path */

/* even split of [0,n) into nth contiguous parts, part tid -> [*b,*e) */
static inline void ak_split(int64_t n, int tid, int nth, int64_t *b, int64_t *e) {
    int64_t q = n / nth, r = n % nth;
    *b = tid * q + (tid < r ? tid : r);
    *e = *b + q + (tid < r ? 1 : 0);
}

/* Whether a GEMM tile's rows, `stride` bytes apart, crowd into few L1 sets, so the tile is worth copying to rows
 * padded apart (gemm.c's A_LD, gemm64.c's A64_LD). At one k the kernel reads a line of each of its 12 rows; an L1D
 * of 64 sets of 64-byte lines (Intel's 48 KiB 12-way, AMD's 32 KiB 8-way) puts rows `stride` bytes apart in
 * 64 / gcd(stride / 64, 64) sets: 12 KiB (3072 floats) in 1, 6 KiB in 2, 3 KiB and 9 KiB in 4 (3 lines a set,
 * beside B's). So rows a multiple of 2 KiB apart are copied and others read in place: the copy of every tile, once
 * per column slab, was 3 % of the engine's full-size forward (12 rows x 768 floats copied per 384 columns), and
 * reading 768-float rows in place took the 512 x 768 x N products from 226-228 to 228-233 GFLOP/s (Xeon model 207,
 * kernels_c/README.md). The same bits either way. */
static inline int ak_rows_share_l1_sets(int64_t stride) { return stride % 2048 == 0; }

void *ak_aligned_alloc(size_t bytes);
void ak_aligned_free(void *p);
/* a 64-byte aligned block of at least `bytes`, the calling thread's kept scratch when free (see core.c); give
 * it back with ak_scratch_put before the thread's next ak_scratch_get. NULL when out of memory. */
void *ak_scratch_get(size_t bytes);
/* bytes rounded up to a whole 64-byte line: regions carved from one scratch block stay aligned */
static inline size_t ak_round64(size_t bytes) { return (bytes + 63) & ~(size_t)63; }
void ak_scratch_put(void *p);

/* ---- scalar conversions ---- */
static inline float ak_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            int e = -1;
            do { e++; man <<= 1; } while ((man & 0x400u) == 0);
            man &= 0x3ffu;
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | (man << 13);
        }
    } else if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13); /* inf / nan (payload kept) */
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}
static inline float ak_bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* ---- generic GEMM core: C = A @ op(B) (+ bias) ----
 * A is (M,K) with row stride lda (fp32).
 * b_trans = 1: B is stored (N,K) with row stride ldb (nn.Linear weight layout, op(B) = B^T)
 * b_trans = 0: B is stored (K,N) with row stride ldb.
 * B dtype is b_dtype (AK_DTYPE_*), scales (N) for int8: element = q * scales[n].
 * AK_DTYPE_F32_PACKED(16): B was packed by ak_pack_weight_f32 in that layout (K deep, N wide); b_trans and ldb
 * are unused.
 * C is (M,N) with row stride ldc.  Each C element = fma chain over k=0..K-1 from 0, then + bias[n]. */
typedef struct {
    int M, N, K;
    const float *A; int64_t lda;
    const void *B; int64_t ldb; int b_dtype; int b_trans;
    const float *scales;
    const float *bias;
    float *C; int64_t ldc;
} ak_gemm_args;

/* run on the calling thread for output columns [n_begin, n_end); returns status */
int ak_gemm_serial(const ak_gemm_args *g, int n_begin, int n_end);
/* run with the global thread count (threads split output columns) */
int ak_gemm(const ak_gemm_args *g);
/* reference: plain loops, same per-element arithmetic */
void ak_gemm_naive(const ak_gemm_args *g);

/* row softmax helpers (serial), exp implemented per ISA */
void ak_softmax_row(float *out, const float *in, int n);
/* exp of n values, out may equal in */
void ak_exp_inplace(float *x, int64_t n);
void ak_gelu_serial(float *out, const float *in, int64_t n, int approximate);
/* gelu split over the global threads (contiguous element ranges) */
void ak_gelu_par(float *out, const float *in, int64_t n, int approximate);

/* MoE parts shared by ak_moe and the separate part ops (moe_parts.c) */
/* weights is (T,K), indices is (T,K), probs is (T,E): descending prob, ties -> lower index, NaN first */
void ak_topk_rows(float *weights, int32_t *indices, const float *probs, int T, int E, int K, int renormalize);
/* out/weighted are (T,H) (either may be NULL), expert_out is (T,K,H), weights is (T,K), bias is (H) or NULL:
 * weighted = sum_j weights[:,j] * expert_out[:,j] in slot order (product then add), out = weighted + bias; tokens
 * split over threads */
void ak_combine_rows(float *out, float *weighted, const float *expert_out, const float *weights, const float *bias,
                     int T, int K, int H);
/* rows[i] of an expert's ne rows of width floats: gathered into a contiguous block (src row rows[i] / div) or
 * scattered from one (scatter: dst row rows[i]), split over threads */
void ak_copy_rows(float *dst, const float *src, const int32_t *rows, int ne, int64_t width, int div, int scatter);

static inline int ak_dtype_is_packed(int dtype) {
    return dtype == AK_DTYPE_F32_PACKED || dtype == AK_DTYPE_F32_PACKED16;
}

/* bytes of one expert's (K-deep, N-wide) weight block as stored in weight_dtype */
static inline size_t ak_weight_block_bytes(int dtype, int K, int N) {
    if (ak_dtype_is_packed(dtype)) return (size_t)ak_packed_size(K, N) * sizeof(float);
    size_t es = dtype == AK_DTYPE_F32 ? 4 : dtype == AK_DTYPE_I8 ? 1 : 2;
    return (size_t)K * N * es;
}

#define AK_CHECK_PTR(p) do { if ((p) == NULL) return AK_ERR_NULL_POINTER; } while (0)

/* Eight interleaved accumulator lanes (position i goes to lane i % 8; lanes are summed pairwise at the end,
 * lanes_total): the additions of one lane depend on each other, the lanes do not, so a reduction is not one long
 * chain of dependent double additions, and the lanes fit vector registers (no reassociation is needed, so every
 * ISA path gives the same bits). compare.c and perturb.c reduce this way, their naive loops too: bitwise equal. */
#define LANES 8

static inline double lanes_total(const double *l) {
    return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

/* GCC vector types for those lanes (compare.c): two fours on AVX2 and in portable C, one eight on AVX-512, the
 * same lanes so the same bits. VF/VI/VU: float, int32, uint32 vectors of one width; VD/VL: double and int64. */
typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));
typedef uint32_t v4u __attribute__((vector_size(16)));
typedef double v4d __attribute__((vector_size(32)));
typedef int64_t v4l __attribute__((vector_size(32)));
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef double v8d __attribute__((vector_size(64)));
typedef int64_t v8l __attribute__((vector_size(64)));
/* a macro, not a function: a function taking or returning a vector has an ABI that depends on the ISA it is
 * compiled for (GCC warns) */
#define LOADV(VT, p) ({ VT v_; memcpy(&v_, (p), sizeof v_); v_; })

/* Widening conversions, exact whatever instructions do them: GCC 12 lowers __builtin_convertvector from eight
 * floats or int32 to eight doubles or int64 as two halves and an insert (four instructions, not one), so the
 * AVX-512 bodies (compare.c) call the one instruction: ak_compare's pass 0.85 -> 0.70 ns a position at
 * 23040 positions, ak_rel_l2's 0.34 -> 0.17 with an eight-wide body (Xeon model 207). The CVT4_ forms are the
 * portable ones of the four-wide bodies; AVX512_TARGET marks a body that calls the eight-wide ones. */
#define CVT4_PD(x) __builtin_convertvector((x), v4d)
#define CVT4_EPI64(x) __builtin_convertvector((x), v4l)
static inline __attribute__((always_inline, target("avx512f"))) v8d cvt8_pd_ps(v8f x) {
    return (v8d)_mm512_cvtps_pd((__m256)x);
}
static inline __attribute__((always_inline, target("avx512f"))) v8d cvt8_pd_epi32(v8i x) {
    return (v8d)_mm512_cvtepi32_pd((__m256i)x);
}
static inline __attribute__((always_inline, target("avx512f"))) v8l cvt8_epi64(v8i x) {
    return (v8l)_mm512_cvtepi32_epi64((__m256i)x);
}
#define CVT8_PD(x) _Generic((x), v8f: cvt8_pd_ps, v8i: cvt8_pd_epi32)(x)
#define CVT8_EPI64(x) cvt8_epi64(x)
#define AVX512_TARGET __attribute__((target("avx512f,avx2,fma")))

/* NAME_avx512 compiling BODY8, NAME_avx2 and NAME_scalar compiling BODY4, and NAME choosing by ak_isa(): a kernel
 * whose AVX-512 body holds its 8 lanes in one vector and the others in two fours (compare.c), the same lanes so the
 * same bits */
#define AK_ISA_VARIANTS_WIDE(NAME, BODY8, BODY4, PARAMS, ARGS)                                       \
    AVX512_TARGET static void NAME##_avx512 PARAMS { BODY8 ARGS; }                                   \
    __attribute__((target("avx2,fma"))) static void NAME##_avx2 PARAMS { BODY4 ARGS; }                \
    static void NAME##_scalar PARAMS { BODY4 ARGS; }                                                  \
    static void NAME PARAMS {                                                                         \
        int isa_ = ak_isa();                                                                          \
        if (isa_ == AK_ISA_AVX512) NAME##_avx512 ARGS;                                                \
        else if (isa_ == AK_ISA_AVX2) NAME##_avx2 ARGS;                                               \
        else NAME##_scalar ARGS;                                                                      \
    }

/* NAME_avx512, NAME_avx2, NAME_scalar: the same body compiled for each path, and NAME choosing by ak_isa() */
#define AK_ISA_VARIANTS(NAME, BODY, PARAMS, ARGS) AK_ISA_VARIANTS_WIDE(NAME, BODY, BODY, PARAMS, ARGS)

#endif
