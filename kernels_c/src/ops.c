/* ops.c -- row and elementwise ops: exp/softmax, gelu, layernorm, add, embedding,
 * rotary, mean pooling, L2 normalisation. */
#include "ak_internal.h"
#include <math.h>
#include <immintrin.h>

/* ---------------- exp ----------------
 * Cephes-style expf: x = n ln2 + r (ln2 split in two), degree-6 polynomial, 2^n applied as
 * two factors so n = 128 does not overflow the exponent field.  ~1 ulp on [-87.3, 88.7];
 * x > 88.7228 -> +inf, x < -87.3365 -> 0 (true result would be subnormal), NaN -> NaN.
 * The scalar, AVX2 and AVX-512 versions perform the same operations. */
#define EXP_HI 88.72283935546875f
#define EXP_LO -87.33654475f
#define EXP_LOG2E 1.44269504088896341f
#define EXP_C1 0.693359375f
#define EXP_C2 -2.12194440e-4f
#define EXP_P0 1.9875691500E-4f
#define EXP_P1 1.3981999507E-3f
#define EXP_P2 8.3334519073E-3f
#define EXP_P3 4.1665795894E-2f
#define EXP_P4 1.6666665459E-1f
#define EXP_P5 5.0000001201E-1f

static inline float pow2i(int n) {
    uint32_t bits = (uint32_t)(n + 127) << 23;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float exp_scalar(float x) {
    if (x != x) return x + x;
    if (x > EXP_HI) return INFINITY;
    if (x < EXP_LO) return 0.0f;
    float n = nearbyintf(x * EXP_LOG2E);
    float r = fmaf(n, -EXP_C1, x);
    r = fmaf(n, -EXP_C2, r);
    float p = EXP_P0;
    p = fmaf(p, r, EXP_P1);
    p = fmaf(p, r, EXP_P2);
    p = fmaf(p, r, EXP_P3);
    p = fmaf(p, r, EXP_P4);
    p = fmaf(p, r, EXP_P5);
    float r2 = r * r;
    p = fmaf(p, r2, r);
    p = p + 1.0f;
    int ni = (int)n;
    int n1 = ni >> 1, n2 = ni - n1;
    return p * pow2i(n1) * pow2i(n2);
}

__attribute__((target("avx512f"))) static inline __m512 exp512(__m512 x) {
    __m512 xc = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(EXP_LO)), _mm512_set1_ps(EXP_HI));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(EXP_LOG2E)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-EXP_C1), xc);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(-EXP_C2), r);
    __m512 p = _mm512_set1_ps(EXP_P0);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P5));
    __m512 r2 = _mm512_mul_ps(r, r);
    p = _mm512_fmadd_ps(p, r2, r);
    p = _mm512_add_ps(p, _mm512_set1_ps(1.0f));
    __m512i ni = _mm512_cvtps_epi32(n);
    __m512i n1 = _mm512_srai_epi32(ni, 1);
    __m512i n2 = _mm512_sub_epi32(ni, n1);
    __m512i b = _mm512_set1_epi32(127);
    __m512 f1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(n1, b), 23));
    __m512 f2 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(n2, b), 23));
    __m512 res = _mm512_mul_ps(_mm512_mul_ps(p, f1), f2);
    res = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(EXP_LO), _CMP_LT_OQ), res, _mm512_setzero_ps());
    res = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(EXP_HI), _CMP_GT_OQ), res,
                               _mm512_set1_ps(INFINITY));
    res = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), res, _mm512_add_ps(x, x));
    return res;
}

__attribute__((target("avx2,fma"))) static inline __m256 exp256(__m256 x) {
    __m256 xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(EXP_LO)), _mm256_set1_ps(EXP_HI));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(EXP_LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-EXP_C1), xc);
    r = _mm256_fmadd_ps(n, _mm256_set1_ps(-EXP_C2), r);
    __m256 p = _mm256_set1_ps(EXP_P0);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P1));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P5));
    __m256 r2 = _mm256_mul_ps(r, r);
    p = _mm256_fmadd_ps(p, r2, r);
    p = _mm256_add_ps(p, _mm256_set1_ps(1.0f));
    __m256i ni = _mm256_cvtps_epi32(n);
    __m256i n1 = _mm256_srai_epi32(ni, 1);
    __m256i n2 = _mm256_sub_epi32(ni, n1);
    __m256i b = _mm256_set1_epi32(127);
    __m256 f1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, b), 23));
    __m256 f2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, b), 23));
    __m256 res = _mm256_mul_ps(_mm256_mul_ps(p, f1), f2);
    res = _mm256_blendv_ps(res, _mm256_setzero_ps(), _mm256_cmp_ps(x, _mm256_set1_ps(EXP_LO), _CMP_LT_OQ));
    res = _mm256_blendv_ps(res, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(x, _mm256_set1_ps(EXP_HI), _CMP_GT_OQ));
    res = _mm256_blendv_ps(res, _mm256_add_ps(x, x), _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    return res;
}

/* ---------------- softmax of one row ----------------
 * m = max (NaN-ignoring compare; a NaN still reaches the sum), e_i = exp(x_i - m),
 * s = sum e_i (fixed order per ISA), out_i = e_i / s. */
__attribute__((target("avx512f"))) static void softmax_row_avx512(float *out, const float *in, int n) {
    __m512 vm = _mm512_set1_ps(-INFINITY);
    __mmask16 nan = 0; /* lanes that met a NaN: the scan for the first one runs only then (a scalar loop over
                        * every row was a third of the softmax, 0.17 us of a 512-key row) */
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 x = _mm512_loadu_ps(in + i);
        vm = _mm512_max_ps(vm, x);
        nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    }
    if (i < n) {
        __mmask16 k = (__mmask16)((1u << (n - i)) - 1);
        __m512 x = _mm512_maskz_loadu_ps(k, in + i);
        vm = _mm512_mask_max_ps(vm, k, vm, x);
        nan |= _mm512_mask_cmp_ps_mask(k, x, x, _CMP_UNORD_Q);
    }
    float m = _mm512_reduce_max_ps(vm);
    if (nan)
        for (int j = 0; j < n; j++) if (in[j] != in[j]) { m = in[j]; break; }
    __m512 mm = _mm512_set1_ps(m), vs = _mm512_setzero_ps();
    for (i = 0; i + 16 <= n; i += 16) {
        __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(in + i), mm));
        _mm512_storeu_ps(out + i, e);
        vs = _mm512_add_ps(vs, e);
    }
    if (i < n) {
        __mmask16 k = (__mmask16)((1u << (n - i)) - 1);
        __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, in + i), mm));
        e = _mm512_maskz_mov_ps(k, e);
        _mm512_mask_storeu_ps(out + i, k, e);
        vs = _mm512_add_ps(vs, e);
    }
    float s = _mm512_reduce_add_ps(vs);
    __m512 ss = _mm512_set1_ps(s);
    for (i = 0; i + 16 <= n; i += 16) _mm512_storeu_ps(out + i, _mm512_div_ps(_mm512_loadu_ps(out + i), ss));
    for (; i < n; i++) out[i] = out[i] / s;
}

__attribute__((target("avx2,fma"))) static void softmax_row_avx2(float *out, const float *in, int n) {
    float m = -INFINITY;
    int i = 0;
    __m256 vm = _mm256_set1_ps(-INFINITY), un = _mm256_setzero_ps(); /* un: lanes that met a NaN (see avx512) */
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps(in + i);
        vm = _mm256_max_ps(vm, x);
        un = _mm256_or_ps(un, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    }
    float t[8];
    _mm256_storeu_ps(t, vm);
    for (int j = 0; j < 8; j++) if (t[j] > m) m = t[j];
    int nan = _mm256_movemask_ps(un) != 0;
    for (; i < n; i++) {
        if (in[i] > m) m = in[i];
        nan |= in[i] != in[i];
    }
    if (nan)
        for (int j = 0; j < n; j++) if (in[j] != in[j]) { m = in[j]; break; }
    __m256 mm = _mm256_set1_ps(m), vs = _mm256_setzero_ps();
    for (i = 0; i + 8 <= n; i += 8) {
        __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(in + i), mm));
        _mm256_storeu_ps(out + i, e);
        vs = _mm256_add_ps(vs, e);
    }
    _mm256_storeu_ps(t, vs);
    float s = ((t[0] + t[4]) + (t[2] + t[6])) + ((t[1] + t[5]) + (t[3] + t[7]));
    for (; i < n; i++) {
        out[i] = exp_scalar(in[i] - m);
        s += out[i];
    }
    __m256 ss = _mm256_set1_ps(s);
    for (i = 0; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_div_ps(_mm256_loadu_ps(out + i), ss));
    for (; i < n; i++) out[i] = out[i] / s;
}

static void softmax_row_scalar(float *out, const float *in, int n) {
    float m = -INFINITY;
    for (int i = 0; i < n; i++) if (in[i] > m) m = in[i];
    for (int j = 0; j < n; j++) if (in[j] != in[j]) { m = in[j]; break; }
    float s = 0.0f;
    for (int i = 0; i < n; i++) {
        out[i] = exp_scalar(in[i] - m);
        s += out[i];
    }
    for (int i = 0; i < n; i++) out[i] = out[i] / s;
}

void ak_softmax_row(float *out, const float *in, int n) {
    if (n <= 0) return;
    int isa = ak_isa();
    if (isa == AK_ISA_AVX512) softmax_row_avx512(out, in, n);
    else if (isa == AK_ISA_AVX2) softmax_row_avx2(out, in, n);
    else softmax_row_scalar(out, in, n);
}

__attribute__((target("avx512f"))) static void exp_avx512(float *x, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(x + i, exp512(_mm512_loadu_ps(x + i)));
    if (i < n) {
        __mmask16 k = (__mmask16)((1u << (n - i)) - 1);
        _mm512_mask_storeu_ps(x + i, k, exp512(_mm512_maskz_loadu_ps(k, x + i)));
    }
}
__attribute__((target("avx2,fma"))) static void exp_avx2(float *x, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, exp256(_mm256_loadu_ps(x + i)));
    for (; i < n; i++) x[i] = exp_scalar(x[i]);
}
void ak_exp_inplace(float *x, int64_t n) {
    int isa = ak_isa();
    if (isa == AK_ISA_AVX512) exp_avx512(x, n);
    else if (isa == AK_ISA_AVX2) exp_avx2(x, n);
    else for (int64_t i = 0; i < n; i++) x[i] = exp_scalar(x[i]);
}

typedef struct { float *out; const float *in; int T, C; } rows_job;
static void softmax_task(void *ctx, int tid, int nth) {
    rows_job *j = (rows_job *)ctx;
    int64_t b, e;
    ak_split(j->T, tid, nth, &b, &e);
    for (int64_t t = b; t < e; t++) ak_softmax_row(j->out + t * j->C, j->in + t * j->C, j->C);
}

int ak_softmax(float *out, const float *inp, int T, int C) {
    ak_count_call(AK_OP_SOFTMAX);
    AK_CHECK_PTR(out);
    AK_CHECK_PTR(inp);
    if (T < 0 || C < 0) return AK_ERR_INVALID_SIZE;
    rows_job j = {out, inp, T, C};
    ak_parallel(ak_threads_for(T, 20.0 * T * C), softmax_task, &j);
    return AK_OK;
}

/* ---------------- gelu ----------------
 * exact:  0.5 x (1 + erf(x / sqrt 2)) evaluated as 0.5 x erfc(-x / sqrt 2)
 * tanh:   0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), evaluated as x / (1 + exp(-2u))
 * Both rewritten forms are algebraically identical but avoid the cancellation of 1 + erf / 1 + tanh
 * for negative x (torch's fp32 formula loses up to ~1e-3 relative there, where |gelu| < 1e-5).
 * libm erfcf / expf.  gelu(-inf) = NaN (as torch), gelu(+inf) = +inf, NaN -> NaN. */
/* AVX-512 exact gelu: Phi(x) via erfc(t), t = |x|/sqrt2 >= 0, with the Numerical-Recipes
 * Chebyshev form erfc(t) = u exp(-t^2 - 1.26551223 + u P(u)), u = 1/(1 + t/2), relative error
 * < 1.2e-7 for all t >= 0.  x >= 0: Phi = 1 - erfc/2 ; x < 0: Phi = erfc/2 (no cancellation). */
__attribute__((target("avx512f"))) static void gelu_exact_avx512(float *out, const float *in, int64_t n) {
    const __m512 r2 = _mm512_set1_ps(0.70710678118654752440f), half = _mm512_set1_ps(0.5f),
                 one = _mm512_set1_ps(1.0f);
    static const float c[10] = {-1.26551223f, 1.00002368f, 0.37409196f, 0.09678418f, -0.18628806f,
                                0.27886807f, -1.13520398f, 1.48851587f, -0.82215223f, 0.17087277f};
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 k = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
        __m512 x = _mm512_maskz_loadu_ps(k, in + i);
        __m512 t = _mm512_mul_ps(_mm512_abs_ps(x), r2);
        __m512 u = _mm512_div_ps(one, _mm512_fmadd_ps(half, t, one));
        __m512 p = _mm512_set1_ps(c[9]);
        for (int j = 8; j >= 0; j--) p = _mm512_fmadd_ps(p, u, _mm512_set1_ps(c[j]));
        __m512 arg = _mm512_sub_ps(p, _mm512_mul_ps(t, t));
        __m512 ec = _mm512_mul_ps(u, exp512(arg));           /* erfc(t) */
        __m512 hc = _mm512_mul_ps(half, ec);
        __mmask16 neg = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
        __m512 phi = _mm512_mask_blend_ps(neg, _mm512_sub_ps(one, hc), hc);
        __m512 y = _mm512_mul_ps(x, phi);
        /* x = +inf: phi = 1 -> inf; x = -inf: -inf * 0 = NaN (as torch); NaN propagates */
        _mm512_mask_storeu_ps(out + i, k, y);
    }
}

/* AVX2 exact gelu: the same operations as gelu_exact_avx512 in 8 lanes (bitwise its results; exp256
 * mirrors exp512), instead of one libm erfcf per element, which made gelu a third of an MoE layer's time
 * on the AVX2 path.  The tail goes through an 8-float scratch so no lane reads past the input. */
__attribute__((target("avx2,fma"))) static inline __m256 gelu_exact8(__m256 x) {
    static const float c[10] = {-1.26551223f, 1.00002368f, 0.37409196f, 0.09678418f, -0.18628806f,
                                0.27886807f, -1.13520398f, 1.48851587f, -0.82215223f, 0.17087277f};
    const __m256 r2 = _mm256_set1_ps(0.70710678118654752440f), half = _mm256_set1_ps(0.5f),
                 one = _mm256_set1_ps(1.0f);
    __m256 t = _mm256_mul_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), x), r2);
    __m256 u = _mm256_div_ps(one, _mm256_fmadd_ps(half, t, one));
    __m256 p = _mm256_set1_ps(c[9]);
    for (int j = 8; j >= 0; j--) p = _mm256_fmadd_ps(p, u, _mm256_set1_ps(c[j]));
    __m256 arg = _mm256_sub_ps(p, _mm256_mul_ps(t, t));
    __m256 hc = _mm256_mul_ps(half, _mm256_mul_ps(u, exp256(arg))); /* erfc(t) / 2 */
    __m256 neg = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ);
    return _mm256_mul_ps(x, _mm256_blendv_ps(_mm256_sub_ps(one, hc), hc, neg));
}

__attribute__((target("avx2,fma"))) static void gelu_exact_avx2(float *out, const float *in, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, gelu_exact8(_mm256_loadu_ps(in + i)));
    if (i < n) {
        float tmp[8] = {0};
        memcpy(tmp, in + i, (size_t)(n - i) * sizeof(float));
        _mm256_storeu_ps(tmp, gelu_exact8(_mm256_loadu_ps(tmp)));
        memcpy(out + i, tmp, (size_t)(n - i) * sizeof(float));
    }
}

void ak_gelu_serial(float *out, const float *in, int64_t n, int approximate) {
    if (approximate) {
        const float k0 = 0.7978845608028654f, k1 = 0.044715f;
        for (int64_t i = 0; i < n; i++) {
            float x = in[i];
            float u = k0 * (x + k1 * x * x * x);
            out[i] = x / (1.0f + expf(-2.0f * u));
        }
    } else if (ak_isa() == AK_ISA_AVX512) {
        gelu_exact_avx512(out, in, n);
    } else if (ak_isa() == AK_ISA_AVX2) {
        gelu_exact_avx2(out, in, n);
    } else {
        const float r2 = 0.70710678118654752440f;
        for (int64_t i = 0; i < n; i++) {
            float x = in[i];
            out[i] = 0.5f * x * erfcf(-x * r2);
        }
    }
}

typedef struct { float *out; const float *in; int64_t n; int approx; } gelu_job;
static void gelu_task(void *ctx, int tid, int nth) {
    gelu_job *j = (gelu_job *)ctx;
    int64_t b, e;
    ak_split(j->n, tid, nth, &b, &e);
    ak_gelu_serial(j->out + b, j->in + b, e - b, j->approx);
}

int ak_gelu(float *out, const float *inp, int64_t n, int approximate) {
    ak_count_call(AK_OP_GELU);
    AK_CHECK_PTR(out);
    AK_CHECK_PTR(inp);
    if (n < 0) return AK_ERR_INVALID_SIZE;
    if (approximate != 0 && approximate != 1) return AK_ERR_INVALID_ARGUMENT;
    ak_gelu_par(out, inp, n, approximate);
    return AK_OK;
}

void ak_gelu_par(float *out, const float *in, int64_t n, int approximate) {
    gelu_job j = {out, in, n, approximate};
    ak_parallel(ak_threads_for(n, 30.0 * n), gelu_task, &j);
}

/* ---------------- add ---------------- */
typedef struct { float *out; const float *a, *b; int64_t n; } add_job;
static void add_task(void *ctx, int tid, int nth) {
    const add_job *j = (const add_job *)ctx;
    int64_t b, e;
    ak_split(j->n, tid, nth, &b, &e);
    for (int64_t i = b; i < e; i++) j->out[i] = j->a[i] + j->b[i];
}

/* element ranges over threads (a full-size residual add of 512 tokens is 393k values) */
int ak_add(float *out, const float *a, const float *b, int64_t n) {
    ak_count_call(AK_OP_ADD);
    AK_CHECK_PTR(out);
    AK_CHECK_PTR(a);
    AK_CHECK_PTR(b);
    if (n < 0) return AK_ERR_INVALID_SIZE;
    add_job j = {out, a, b, n};
    ak_parallel(ak_threads_for(n, (double)n), add_task, &j);
    return AK_OK;
}

/* ---------------- layernorm ----------------
 * mean and variance (biased, two-pass) accumulated in double, then
 * out = (x - mean) * rstd * w + b in fp32. */
typedef struct { float *out; const float *in, *w, *b; int T, C; float eps; } ln_job;
static void ln_task(void *ctx, int tid, int nth) {
    ln_job *j = (ln_job *)ctx;
    int64_t tb, te;
    ak_split(j->T, tid, nth, &tb, &te);
    for (int64_t t = tb; t < te; t++) {
        const float *x = j->in + t * j->C;
        float *o = j->out + t * j->C;
        double s = 0.0;
        for (int c = 0; c < j->C; c++) s += x[c];
        double mean = s / j->C;
        double v = 0.0;
        for (int c = 0; c < j->C; c++) {
            double d = x[c] - mean;
            v += d * d;
        }
        v /= j->C;
        float rstd = (float)(1.0 / sqrt(v + (double)j->eps));
        float m = (float)mean;
        for (int c = 0; c < j->C; c++) {
            float y = (x[c] - m) * rstd;
            if (j->w) y = y * j->w[c];
            if (j->b) y = y + j->b[c];
            o[c] = y;
        }
    }
}

int ak_layernorm(float *out, const float *inp, const float *weight, const float *bias, int T, int C, float eps) {
    ak_count_call(AK_OP_LAYERNORM);
    AK_CHECK_PTR(out);
    AK_CHECK_PTR(inp);
    if (T < 0 || C <= 0) return AK_ERR_INVALID_SIZE;
    if (!(eps >= 0.0f)) return AK_ERR_INVALID_ARGUMENT;
    ln_job j = {out, inp, weight, bias, T, C, eps};
    ak_parallel(ak_threads_for(T, 8.0 * T * C), ln_task, &j);
    return AK_OK;
}

/* ---------------- embedding ---------------- */
int ak_embedding(float *out, const int64_t *ids, const float *table, int T, int V, int C) {
    ak_count_call(AK_OP_EMBEDDING);
    AK_CHECK_PTR(out);
    AK_CHECK_PTR(ids);
    AK_CHECK_PTR(table);
    if (T < 0 || V <= 0 || C < 0) return AK_ERR_INVALID_SIZE;
    for (int t = 0; t < T; t++)
        if (ids[t] < 0 || ids[t] >= V) return AK_ERR_INDEX_OUT_OF_RANGE;
    for (int t = 0; t < T; t++) memcpy(out + (int64_t)t * C, table + ids[t] * C, (size_t)C * sizeof(float));
    return AK_OK;
}

/* ---------------- rotary ---------------- */
typedef struct {
    float *out;
    const float *inp;
    const int64_t *positions;
    const float *inv;
    int T, nh, hd, rot_dim, interleaved, status;
} rotary_job;

static void rotary_task(void *ctx, int tid, int nth) {
    rotary_job *j = (rotary_job *)ctx;
    int64_t tb, te;
    ak_split(j->T, tid, nth, &tb, &te);
    if (tb >= te) return;
    const int half = j->rot_dim / 2, hd = j->hd;
    float *cs = (float *)ak_aligned_alloc((size_t)(2 * half + 1) * sizeof(float));
    if (!cs) { __atomic_store_n(&j->status, AK_ERR_OUT_OF_MEMORY, __ATOMIC_RELAXED); return; }
    for (int64_t t = tb; t < te; t++) {
        float pos = (float)j->positions[t];
        for (int i = 0; i < half; i++) {
            float ang = pos * j->inv[i];
            cs[2 * i] = cosf(ang);
            cs[2 * i + 1] = sinf(ang);
        }
        for (int h = 0; h < j->nh; h++) {
            const float *x = j->inp + (t * j->nh + h) * hd;
            float *o = j->out + (t * j->nh + h) * hd;
            for (int i = 0; i < half; i++) {
                int i1 = j->interleaved ? 2 * i : i, i2 = j->interleaved ? 2 * i + 1 : i + half;
                float c = cs[2 * i], s = cs[2 * i + 1];
                float x1 = x[i1], x2 = x[i2];
                float a = x1 * c, b = x2 * s, d = x2 * c, e = x1 * s;
                o[i1] = a - b;
                o[i2] = d + e;
            }
            if (o != x)
                for (int i = j->rot_dim; i < hd; i++) o[i] = x[i];
        }
    }
    ak_aligned_free(cs);
}

int ak_rotary(float *out, const float *inp, const int64_t *positions, int T, int nh, int hd, int rot_dim, float base,
              int interleaved) {
    ak_count_call(AK_OP_ROTARY);
    AK_CHECK_PTR(out);
    AK_CHECK_PTR(inp);
    AK_CHECK_PTR(positions);
    if (T < 0 || nh < 0 || hd < 0) return AK_ERR_INVALID_SIZE;
    if (rot_dim < 0 || rot_dim > hd || (rot_dim & 1)) return AK_ERR_INVALID_SIZE;
    if (!(base > 0.0f)) return AK_ERR_INVALID_ARGUMENT;
    int half = rot_dim / 2;
    float *inv = (float *)ak_aligned_alloc((size_t)(half + 1) * sizeof(float));
    if (!inv) return AK_ERR_OUT_OF_MEMORY;
    for (int i = 0; i < half; i++) inv[i] = 1.0f / powf(base, (float)(2 * i) / (float)rot_dim);
    rotary_job j = {out, inp, positions, inv, T, nh, hd, rot_dim, interleaved, AK_OK};
    /* tokens over threads: the cosf/sinf of each (token, pair) are most of the op (16k of them at 512 tokens) */
    ak_parallel(ak_threads_for(T, 40.0 * T * (half + nh * hd)), rotary_task, &j);
    ak_aligned_free(inv);
    return j.status;
}

/* ---------------- mean pooling ---------------- */
int ak_mean_pool(float *out, const float *inp, const uint8_t *mask, int B, int T, int C) {
    ak_count_call(AK_OP_MEAN_POOL);
    AK_CHECK_PTR(out);
    AK_CHECK_PTR(inp);
    if (B < 0 || T < 0 || C < 0) return AK_ERR_INVALID_SIZE;
    for (int b = 0; b < B; b++) {
        float *o = out + (int64_t)b * C;
        for (int c = 0; c < C; c++) o[c] = 0.0f;
        float count = 0.0f;
        for (int t = 0; t < T; t++) {
            if (mask && !mask[(int64_t)b * T + t]) continue;
            const float *x = inp + ((int64_t)b * T + t) * C;
            for (int c = 0; c < C; c++) o[c] += x[c];
            count += 1.0f;
        }
        float denom = count > 1e-9f ? count : 1e-9f;
        for (int c = 0; c < C; c++) o[c] = o[c] / denom;
    }
    return AK_OK;
}

/* ---------------- L2 normalisation ---------------- */
int ak_l2_normalize(float *out, const float *inp, int T, int C, float eps) {
    ak_count_call(AK_OP_L2_NORMALIZE);
    AK_CHECK_PTR(out);
    AK_CHECK_PTR(inp);
    if (T < 0 || C < 0) return AK_ERR_INVALID_SIZE;
    if (!(eps >= 0.0f)) return AK_ERR_INVALID_ARGUMENT;
    for (int t = 0; t < T; t++) {
        const float *x = inp + (int64_t)t * C;
        float *o = out + (int64_t)t * C;
        double s = 0.0;
        for (int c = 0; c < C; c++) s += (double)x[c] * x[c];
        float nrm = (float)sqrt(s);
        float d = nrm > eps ? nrm : eps;
        if (nrm != nrm) d = nrm;
        for (int c = 0; c < C; c++) o[c] = x[c] / d;
    }
    return AK_OK;
}
