/* gemm64.c -- float64 matmul on a weight packed once: the reference ops' float64 products (actdiff.compare.refops:
 * the reference noise, the statistics' spec ops and hypotheses, the search's fits).
 *
 * out (T,N) = inp (T,K) @ W, each element the fma chain over k = 0..K-1 from 0.0 in double precision: the same bits
 * on every ISA path, thread count, tile and row count (a prompt's rows alone or stacked with others'), like the fp32
 * core (gemm.c). Why our own: numpy's dgemm (OpenBLAS) packs W again on every call, and the reference ops' products
 * are mostly a prompt's 20-60 rows against a weight it has just packed (384 x 384 doubles: 1.2 MB, beyond a Zen 4's
 * 1 MiB L2), so they ran at 31-36 GFLOP/s of a 58 GFLOP/s float64 peak (bench/README.md, 2026-12-07).
 *
 * Packed layout (ak_pack_weight_f64): K in blocks of AK_PACK64_KC rows (the last one shorter); in each block the
 * columns, zero past N up to a multiple of 16, in runs of 8, each run (block rows) x 8 contiguous doubles,
 * row-major: element (k, n) at k0 * ceil16(N) + (n / 8) * kb * 8 + (k - k0) * 8 + n % 8, k0 = k - k % AK_PACK64_KC,
 * kb = that block's rows. One layout for every path: the AVX-512 kernel reads two runs (16 columns, two zmm), the
 * AVX2 kernel one (8 columns, two ymm), the scalar code one. */
#include "ak_internal.h"
#include <math.h>
#include <stdlib.h>

#define KC64 AK_PACK64_KC
#define RUN64 8 /* columns per run of the packed layout */
/* columns per slab: a K block of the slab (256 x 256 doubles, 512 KiB) is read once per row tile from L2 */
#define NC64 256
/* row stride of a copied A tile: 264 doubles (33 cache lines), so its rows fall in different L1 sets; rows of A
 * itself a multiple of 2 KiB apart (K = 512, 1536, 3072 doubles) would share a few (ak_rows_share_l1_sets) */
#define A64_LD (KC64 + 8)
_Static_assert(NC64 % 16 == 0, "a slab holds whole 16-column pairs of runs");

static inline int64_t padded_n(int N) { return (int64_t)(N + 15) / 16 * 16; }

int64_t ak_packed64_size(int K, int N) {
    if (K < 0 || N < 0) return -1;
    return padded_n(N) * K;
}

/* ---------------- kernels ----------------
 * C tile (mr x NR) at C with stride ldc; A (mr x kc) with stride lda; B row k of the tile's first 8 columns at
 * Bp + 8k, of the next 8 (AVX-512: NR = 16) at Bp + boff + 8k. first: chains start from 0, else from C. */
AVX512_TARGET static inline __attribute__((always_inline)) void
ukr64_512_body(const int MR, int kc, const double *A, int64_t lda, const double *Bp, int64_t boff, double *C,
               int64_t ldc, int first) {
    __m512d acc[12][2];
#pragma GCC unroll 12
    for (int m = 0; m < MR; m++) {
        acc[m][0] = first ? _mm512_setzero_pd() : _mm512_loadu_pd(C + m * ldc);
        acc[m][1] = first ? _mm512_setzero_pd() : _mm512_loadu_pd(C + m * ldc + 8);
    }
#pragma GCC unroll 4
    for (int k = 0; k < kc; k++) {
        __m512d b0 = _mm512_loadu_pd(Bp + 8 * k), b1 = _mm512_loadu_pd(Bp + boff + 8 * k);
#pragma GCC unroll 12
        for (int m = 0; m < MR; m++) {
            __m512d a = _mm512_set1_pd(A[m * lda + k]);
            acc[m][0] = _mm512_fmadd_pd(a, b0, acc[m][0]);
            acc[m][1] = _mm512_fmadd_pd(a, b1, acc[m][1]);
        }
    }
#pragma GCC unroll 12
    for (int m = 0; m < MR; m++) {
        _mm512_storeu_pd(C + m * ldc, acc[m][0]);
        _mm512_storeu_pd(C + m * ldc + 8, acc[m][1]);
    }
}

#define UKR64_ARGS kc, A, lda, Bp, boff, C, ldc, first
AVX512_TARGET static void ukr64_512(int mr, int kc, const double *A, int64_t lda, const double *Bp, int64_t boff,
                                    double *C, int64_t ldc, int first) {
    switch (mr) {
    case 12: ukr64_512_body(12, UKR64_ARGS); break;
    case 11: ukr64_512_body(11, UKR64_ARGS); break;
    case 10: ukr64_512_body(10, UKR64_ARGS); break;
    case 9: ukr64_512_body(9, UKR64_ARGS); break;
    case 8: ukr64_512_body(8, UKR64_ARGS); break;
    case 7: ukr64_512_body(7, UKR64_ARGS); break;
    case 6: ukr64_512_body(6, UKR64_ARGS); break;
    case 5: ukr64_512_body(5, UKR64_ARGS); break;
    case 4: ukr64_512_body(4, UKR64_ARGS); break;
    case 3: ukr64_512_body(3, UKR64_ARGS); break;
    case 2: ukr64_512_body(2, UKR64_ARGS); break;
    default: ukr64_512_body(1, UKR64_ARGS); break;
    }
}

__attribute__((target("avx2,fma"))) static inline __attribute__((always_inline)) void
ukr64_256_body(const int MR, int kc, const double *A, int64_t lda, const double *Bp, double *C, int64_t ldc,
               int first) {
    __m256d acc[6][2];
#pragma GCC unroll 6
    for (int m = 0; m < MR; m++) {
        acc[m][0] = first ? _mm256_setzero_pd() : _mm256_loadu_pd(C + m * ldc);
        acc[m][1] = first ? _mm256_setzero_pd() : _mm256_loadu_pd(C + m * ldc + 4);
    }
#pragma GCC unroll 4
    for (int k = 0; k < kc; k++) {
        __m256d b0 = _mm256_loadu_pd(Bp + 8 * k), b1 = _mm256_loadu_pd(Bp + 8 * k + 4);
#pragma GCC unroll 6
        for (int m = 0; m < MR; m++) {
            __m256d a = _mm256_broadcast_sd(A + m * lda + k);
            acc[m][0] = _mm256_fmadd_pd(a, b0, acc[m][0]);
            acc[m][1] = _mm256_fmadd_pd(a, b1, acc[m][1]);
        }
    }
#pragma GCC unroll 6
    for (int m = 0; m < MR; m++) {
        _mm256_storeu_pd(C + m * ldc, acc[m][0]);
        _mm256_storeu_pd(C + m * ldc + 4, acc[m][1]);
    }
}

__attribute__((target("avx2,fma"))) static void ukr64_256(int mr, int kc, const double *A, int64_t lda,
                                                          const double *Bp, int64_t boff, double *C, int64_t ldc,
                                                          int first) {
    (void)boff; /* its 8 columns are one run */
    switch (mr) {
    case 6: ukr64_256_body(6, kc, A, lda, Bp, C, ldc, first); break;
    case 5: ukr64_256_body(5, kc, A, lda, Bp, C, ldc, first); break;
    case 4: ukr64_256_body(4, kc, A, lda, Bp, C, ldc, first); break;
    case 3: ukr64_256_body(3, kc, A, lda, Bp, C, ldc, first); break;
    case 2: ukr64_256_body(2, kc, A, lda, Bp, C, ldc, first); break;
    default: ukr64_256_body(1, kc, A, lda, Bp, C, ldc, first); break;
    }
}

static void ukr64_scalar(int mr, int kc, const double *A, int64_t lda, const double *Bp, int64_t boff, double *C,
                         int64_t ldc, int first) {
    (void)boff;
    double acc[4][RUN64];
    for (int m = 0; m < mr; m++)
        for (int j = 0; j < RUN64; j++) acc[m][j] = first ? 0.0 : C[m * ldc + j];
    for (int k = 0; k < kc; k++)
        for (int m = 0; m < mr; m++)
            for (int j = 0; j < RUN64; j++) acc[m][j] = fma(A[m * lda + k], Bp[RUN64 * k + j], acc[m][j]);
    for (int m = 0; m < mr; m++)
        for (int j = 0; j < RUN64; j++) C[m * ldc + j] = acc[m][j];
}

typedef void (*ukr64_fn)(int, int, const double *, int64_t, const double *, int64_t, double *, int64_t, int);
typedef struct {
    int MR, NR;
    ukr64_fn ukr;
} ukr64_desc;

static ukr64_desc ukr64_for_isa(int isa) {
    if (isa == AK_ISA_AVX512) return (ukr64_desc){12, 16, ukr64_512};
    if (isa == AK_ISA_AVX2) return (ukr64_desc){6, 8, ukr64_256};
    return (ukr64_desc){4, 8, ukr64_scalar};
}

/* ---------------- driver ---------------- */
typedef struct {
    double *out;
    const double *inp, *w; /* w: packed by ak_pack_weight_f64 (packed = 1), or the (N,K) weight itself */
    int T, K, N, isa, packed;
    int64_t units; /* 16-column units the threads split */
} gemm64_job;

/* One K block (rows k0.., kb deep) of the output columns [n0, n0 + nc) for every row; blk: that block of a packed
 * weight from column col0 on. Columns past N (the last tile's) go through a scratch tile, so the padding never
 * reaches out. */
static void gemm64_block(const gemm64_job *j, ukr64_desc u, const double *blk, int col0, int k0, int kb, int n0,
                         int nc) {
    double tmp[12 * 16] __attribute__((aligned(64)));
    double Apack[12 * A64_LD] __attribute__((aligned(64)));
    const int first = k0 == 0, copy = nc > u.NR && ak_rows_share_l1_sets(j->K * (int64_t)sizeof(double));
    const int64_t boff = (int64_t)kb * RUN64;
    for (int m0 = 0; m0 < j->T; m0 += u.MR) {
        const int mr = j->T - m0 < u.MR ? j->T - m0 : u.MR;
        const double *A = j->inp + (int64_t)m0 * j->K + k0;
        int64_t lda = j->K;
        if (copy) { /* read by every tile of the slab: rows A64_LD apart */
            for (int m = 0; m < mr; m++)
                memcpy(Apack + m * A64_LD, A + (int64_t)m * j->K, (size_t)kb * sizeof(double));
            A = Apack;
            lda = A64_LD;
        }
        for (int c = 0; c < nc; c += u.NR) {
            const int ncols = nc - c < u.NR ? nc - c : u.NR;
            const double *Bp = blk + (int64_t)(n0 + c - col0) / RUN64 * boff;
            double *C = j->out + (int64_t)m0 * j->N + n0 + c;
            if (ncols == u.NR) {
                u.ukr(mr, kb, A, lda, Bp, boff, C, j->N, first);
                continue;
            }
            for (int m = 0; m < mr && !first; m++)
                memcpy(tmp + m * u.NR, C + (int64_t)m * j->N, ncols * sizeof(double));
            u.ukr(mr, kb, A, lda, Bp, boff, tmp, u.NR, first);
            for (int m = 0; m < mr; m++) memcpy(C + (int64_t)m * j->N, tmp + m * u.NR, ncols * sizeof(double));
        }
    }
}

/* One run of the packed layout: rows k0.. (kb of them) of columns n..n+7 of w, (N,K) when trans, else (K,N); zeros
 * past column N. Row by row, the run's 8 values contiguous: a transposed weight is read down its 8 rows at once
 * (8 streams through L1), where a column at a time wrote every 64th double (packing ran at 2 ns a value). One body
 * for a float64 weight and a float32 one (each value widened exactly: the same packed bits as its float64 copy's). */
#define PACK_RUN_F64(NAME, SRC)                                                                                      \
    static void NAME(double *run, const SRC *w, int K, int N, int trans, int k0, int kb, int n) {                    \
        const int valid = N - n >= RUN64 ? RUN64 : (N - n > 0 ? N - n : 0);                                         \
        if (valid == RUN64 && trans) {                                                                               \
            const SRC *src = w + (int64_t)n * K + k0;                                                                \
            for (int k = 0; k < kb; k++)                                                                             \
                for (int c = 0; c < RUN64; c++) run[k * RUN64 + c] = (double)src[(int64_t)c * K + k];                \
            return;                                                                                                  \
        }                                                                                                            \
        for (int k = 0; k < kb; k++)                                                                                 \
            for (int c = 0; c < RUN64; c++)                                                                          \
                run[k * RUN64 + c] = c >= valid ? 0.0                                                                \
                                     : trans    ? (double)w[(int64_t)(n + c) * K + k0 + k]                           \
                                                : (double)w[(int64_t)(k0 + k) * N + n + c];                          \
    }
PACK_RUN_F64(pack_run_f64, double)
PACK_RUN_F64(pack_run_f64_of_f32, float)

/* rows k0.. (kb of them) of the (N,K) weight w's columns [n0, n0 + nc), in the packed layout of a block from
 * column n0 on (zeros past N, up to a multiple of 16): what ak_pack_weight_f64 puts there */
static void pack_block_f64(double *dst, const double *w, int K, int N, int k0, int kb, int n0, int nc) {
    for (int c = 0; c < (nc + 15) / 16 * 16; c += RUN64)
        pack_run_f64(dst + (int64_t)c * kb, w, K, N, 1, k0, kb, n0 + c);
}

/* output columns [nb, ne) (nb a multiple of 16) on the calling thread; an unpacked weight's blocks are packed
 * into this thread's scratch as they come (the same layout, so the same kernels and bits) */
static int gemm64_columns(const gemm64_job *j, int nb, int ne) {
    const ukr64_desc u = ukr64_for_isa(j->isa);
    const int64_t np = padded_n(j->N);
    if (j->K == 0) {
        for (int t = 0; t < j->T; t++)
            for (int n = nb; n < ne; n++) j->out[(int64_t)t * j->N + n] = 0.0;
        return AK_OK;
    }
    double *buf = NULL;
    if (!j->packed && !(buf = (double *)ak_scratch_get((size_t)KC64 * NC64 * sizeof(double))))
        return AK_ERR_OUT_OF_MEMORY;
    for (int n0 = nb; n0 < ne; n0 += NC64) {
        const int nc = ne - n0 < NC64 ? ne - n0 : NC64;
        for (int k0 = 0; k0 < j->K; k0 += KC64) {
            const int kb = j->K - k0 < KC64 ? j->K - k0 : KC64;
            if (j->packed) {
                gemm64_block(j, u, j->w + (int64_t)k0 * np, 0, k0, kb, n0, nc);
                continue;
            }
            pack_block_f64(buf, j->w, j->K, j->N, k0, kb, n0, nc);
            gemm64_block(j, u, buf, n0, k0, kb, n0, nc);
        }
    }
    if (buf) ak_scratch_put(buf);
    return AK_OK;
}

typedef struct {
    const gemm64_job *j;
    int status;
} gemm64_run;

static void gemm64_task(void *ctx, int tid, int nth) {
    gemm64_run *r = (gemm64_run *)ctx;
    int64_t b, e;
    ak_split(r->j->units, tid, nth, &b, &e);
    const int nb = (int)(b * 16), ne = (int)(e * 16 < r->j->N ? e * 16 : r->j->N);
    const int st = ne > nb ? gemm64_columns(r->j, nb, ne) : AK_OK;
    if (st != AK_OK) __atomic_store_n(&r->status, st, __ATOMIC_RELAXED);
}

static int gemm64(const gemm64_job *j) {
    gemm64_run r = {j, AK_OK};
    ak_parallel(ak_threads_for(j->units, 2.0 * j->T * (double)j->N * j->K), gemm64_task, &r);
    return r.status;
}

static int matmul_f64_check(const double *out, const double *inp, const double *w, int T, int K, int N) {
    AK_CHECK_PTR(out);
    AK_CHECK_PTR(inp);
    AK_CHECK_PTR(w);
    if (T < 0 || K < 0 || N < 0) return AK_ERR_INVALID_SIZE;
    return AK_OK;
}

/* w: packed (ak_pack_weight_f64) when packed, else the (N,K) weight */
static int matmul_f64_on(double *out, const double *inp, const double *w, int T, int K, int N, int packed) {
    ak_count_call(AK_OP_MATMUL_F64);
    int st = matmul_f64_check(out, inp, w, T, K, N);
    if (st || T == 0 || N == 0) return st;
    const gemm64_job j = {out, inp, w, T, K, N, ak_isa(), packed, (N + 15) / 16};
    return gemm64(&j);
}

int ak_matmul_f64_packed(double *out, const double *inp, const double *packed, int T, int K, int N) {
    return matmul_f64_on(out, inp, packed, T, K, N, 1);
}

int ak_matmul_f64(double *out, const double *inp, const double *w, int T, int K, int N) {
    return matmul_f64_on(out, inp, w, T, K, N, 0);
}

int ak_matmul_f64_naive(double *out, const double *inp, const double *w, int T, int K, int N) {
    ak_count_call(AK_OP_MATMUL_F64_NAIVE);
    int st = matmul_f64_check(out, inp, w, T, K, N);
    if (st) return st;
    for (int t = 0; t < T; t++)
        for (int n = 0; n < N; n++) {
            double acc = 0.0;
            for (int k = 0; k < K; k++) acc = fma(inp[(int64_t)t * K + k], w[(int64_t)n * K + k], acc);
            out[(int64_t)t * N + n] = acc;
        }
    return AK_OK;
}

/* the whole weight in the packed layout, run by run; w64 or w32 (the other NULL: the public entries check theirs) */
static int pack_weight_f64(double *packed, const double *w64, const float *w32, int K, int N, int trans) {
    AK_CHECK_PTR(packed);
    if (K < 0 || N < 0) return AK_ERR_INVALID_SIZE;
    if (trans != 0 && trans != 1) return AK_ERR_INVALID_ARGUMENT;
    const int64_t np = padded_n(N);
    for (int k0 = 0; k0 < K; k0 += KC64) {
        const int kb = K - k0 < KC64 ? K - k0 : KC64;
        for (int64_t n = 0; n < np; n += RUN64) {
            double *run = packed + k0 * np + n * kb;
            if (w64)
                pack_run_f64(run, w64, K, N, trans, k0, kb, (int)n);
            else
                pack_run_f64_of_f32(run, w32, K, N, trans, k0, kb, (int)n);
        }
    }
    return AK_OK;
}

/* w is (N,K) when trans = 1 (an nn.Linear weight), (K,N) when trans = 0; packed is (ak_packed64_size(K,N)) */
int ak_pack_weight_f64(double *packed, const double *w, int K, int N, int trans) {
    AK_CHECK_PTR(w);
    return pack_weight_f64(packed, w, NULL, K, N, trans);
}

/* the same from a float32 w, each value widened exactly */
int ak_pack_weight_f64_of_f32(double *packed, const float *w, int K, int N, int trans) {
    AK_CHECK_PTR(w);
    return pack_weight_f64(packed, NULL, w, K, N, trans);
}
