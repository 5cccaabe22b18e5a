/* test_kernels.c -- plain C tests of the kernel library (no framework).
 * Every output buffer is followed by a guard region of sentinel values that must
 * stay untouched; every library call goes through CHECK(), which reports file:line. */
#define _DEFAULT_SOURCE /* mmap, mprotect, sysconf: the guard page of test_prefetch_past_the_weight */
#include "actdiff_kernels.h"
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static int g_fail = 0, g_pass = 0;

#define CHECK(call)                                                                              \
    do {                                                                                         \
        int st_ = (call);                                                                        \
        if (st_ != AK_OK) {                                                                      \
            fprintf(stderr, "%s:%d: %s -> %s\n", __FILE__, __LINE__, #call, ak_status_string(st_)); \
            exit(1);                                                                             \
        }                                                                                        \
    } while (0)
#define EXPECT(cond, ...)                                                                        \
    do {                                                                                         \
        if (!(cond)) {                                                                           \
            fprintf(stderr, "%s:%d: FAILED %s: ", __FILE__, __LINE__, #cond);                    \
            fprintf(stderr, __VA_ARGS__);                                                        \
            fprintf(stderr, "\n");                                                               \
            g_fail++;                                                                            \
        } else {                                                                                 \
            g_pass++;                                                                            \
        }                                                                                        \
    } while (0)

#define GUARD 64
static const uint32_t SENTINEL = 0x7fc0dead; /* a NaN pattern */

/* allocate n floats followed by GUARD sentinel floats */
static float *galloc(size_t n) {
    float *p = (float *)malloc((n + GUARD) * sizeof(float));
    for (size_t i = 0; i < GUARD; i++) memcpy(p + n + i, &SENTINEL, 4);
    return p;
}
static int guard_ok(const float *p, size_t n) {
    for (size_t i = 0; i < GUARD; i++)
        if (memcmp(p + n + i, &SENTINEL, 4) != 0) return 0;
    return 1;
}

static uint64_t rng = 88172645463325252ull;
static float frand(void) { /* uniform in [-1, 1) */
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
    return (float)((rng >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f;
}
static float *rand_buf(size_t n) {
    float *p = galloc(n);
    for (size_t i = 0; i < n; i++) p[i] = frand();
    return p;
}
static double nmse(const float *a, const float *ref, size_t n) {
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - ref[i];
        num += d * d;
        den += (double)ref[i] * ref[i];
    }
    return den > 0 ? num / den : num;
}
static uint16_t f32_to_bf16(float f) {
    uint32_t b;
    memcpy(&b, &f, 4);
    b += 0x7fff + ((b >> 16) & 1);
    return (uint16_t)(b >> 16);
}

static void test_matmul(void) {
    const int shapes[][3] = {{1, 1, 1},     {1, 17, 5},   {3, 33, 47}, {13, 64, 70},
                             {25, 129, 100}, {40, 300, 33}, {7, 768, 97}, {5, 1000, 70},
                             {14, 512, 70}}; /* 512: rows a multiple of 512 floats apart, copied (gemm.c A_LD) */
    int nisa = 0, isas[3];
    for (int isa = 0; isa < 3; isa++) if (ak_cpu_supports_isa(isa)) isas[nisa++] = isa;
    for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++) {
        int T = shapes[s][0], C = shapes[s][1], OC = shapes[s][2];
        float *inp = rand_buf((size_t)T * C), *w = rand_buf((size_t)OC * C), *b = rand_buf(OC);
        uint16_t *wbf = malloc((size_t)OC * C * 2);
        int8_t *wq = malloc((size_t)OC * C);
        float *sc = rand_buf(OC);
        for (size_t i = 0; i < (size_t)OC * C; i++) { wbf[i] = f32_to_bf16(w[i]); wq[i] = (int8_t)(127 * w[i]); }
        for (int dt = 0; dt < 4; dt++) {
            if (dt == AK_DTYPE_F16) continue; /* f16 covered by the Python suite (numpy float16) */
            const void *W = dt == AK_DTYPE_F32 ? (const void *)w : dt == AK_DTYPE_I8 ? (const void *)wq : (const void *)wbf;
            float *ref = galloc((size_t)T * OC), *out = galloc((size_t)T * OC);
            CHECK(ak_matmul_naive(ref, inp, W, sc, b, T, C, OC, dt));
            for (int ii = 0; ii < nisa; ii++) {
                CHECK(ak_set_isa(isas[ii]));
                for (int nt = 1; nt <= 2; nt++) {
                    CHECK(ak_set_num_threads(nt));
                    memset(out, 0, (size_t)T * OC * 4);
                    CHECK(ak_matmul(out, inp, W, sc, b, T, C, OC, dt));
                    /* same fma chain per element: bitwise identical to the naive loop */
                    EXPECT(memcmp(out, ref, (size_t)T * OC * 4) == 0, "matmul T=%d C=%d OC=%d dt=%d isa=%d nt=%d nmse=%g",
                           T, C, OC, dt, isas[ii], nt, nmse(out, ref, (size_t)T * OC));
                    EXPECT(guard_ok(out, (size_t)T * OC), "guard matmul");
                }
            }
            CHECK(ak_set_isa(AK_ISA_AUTO));
            free(ref); free(out);
        }
        free(inp); free(w); free(b); free(wbf); free(wq); free(sc);
    }
}

static void test_attention(void) {
    /* 100 x 3 heads: every query row of a head in one unit at 1 thread, blocks of 64 at 2 (3 heads do not share
     * out over 2 threads), compared bit for bit below */
    const int cases[][4] = {{1, 1, 8, 0}, {5, 2, 16, 0}, {70, 3, 24, 1}, {130, 4, 32, 0}, {65, 2, 64, 1},
                            {100, 3, 16, 0}};
    for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
        int T = cases[c][0], nh = cases[c][1], hd = cases[c][2], causal = cases[c][3];
        size_t n = (size_t)T * nh * hd;
        float *q = rand_buf(n), *k = rand_buf(n), *v = rand_buf(n);
        uint8_t *mask = malloc(T);
        for (int t = 0; t < T; t++) mask[t] = (t % 5 != 3) || t == 0;
        float *ref = galloc(n), *o1 = galloc(n), *o2 = galloc(n);
        float scale = 1.0f / sqrtf((float)hd);
        CHECK(ak_attention_naive(ref, q, k, v, mask, T, nh, hd, scale, causal));
        CHECK(ak_set_num_threads(1));
        CHECK(ak_attention(o1, q, k, v, mask, T, nh, hd, scale, causal));
        CHECK(ak_set_num_threads(2));
        CHECK(ak_attention(o2, q, k, v, mask, T, nh, hd, scale, causal));
        EXPECT(memcmp(o1, o2, n * 4) == 0, "attention threads differ T=%d", T);
        /* fp32 softmax + two length<=T dot chains: error ~ sqrt(T) 2^-24 relative; 1e-10 NMSE is loose */
        double e = nmse(o1, ref, n);
        EXPECT(e < 1e-10, "attention nmse %g T=%d nh=%d hd=%d causal=%d", e, T, nh, hd, causal);
        EXPECT(guard_ok(o1, n) && guard_ok(o2, n) && guard_ok(ref, n), "guard attention");
        free(q); free(k); free(v); free(mask); free(ref); free(o1); free(o2);
    }
}

/* a sequence of L tokens right-padded to S (pad rows NaN, pad keys huge) with its key mask: the real query
 * rows equal the unpadded call bit for bit on every ISA path (keys past the last visible one are never read) */
static void test_attention_padded(void) {
    const int cases[][5] = {{1, 4, 2, 8, 0}, {37, 64, 3, 24, 1}, {65, 130, 2, 32, 0}, {100, 103, 4, 64, 1}};
    const int isas[] = {AK_ISA_SCALAR, AK_ISA_AVX2, AK_ISA_AVX512};
    const float nan = NAN;
    for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
        int L = cases[c][0], S = cases[c][1], nh = cases[c][2], hd = cases[c][3], causal = cases[c][4];
        size_t row = (size_t)nh * hd, n = (size_t)S * row, nl = (size_t)L * row;
        float *q = rand_buf(n), *k = rand_buf(n), *v = rand_buf(n);
        for (size_t i = nl; i < n; i++) { q[i] = nan; k[i] = 1e30f; v[i] = nan; }
        uint8_t *mask = calloc(S, 1);
        for (int t = 0; t < L; t++) mask[t] = (t % 7 != 5) || t == 0;
        float *pad = galloc(n), *one = galloc(nl), *ref = galloc(nl);
        float scale = 1.0f / sqrtf((float)hd);
        CHECK(ak_attention_naive(ref, q, k, v, mask, L, nh, hd, scale, causal));
        for (size_t ii = 0; ii < 3; ii++) {
            if (!ak_cpu_supports_isa(isas[ii])) continue;
            CHECK(ak_set_isa(isas[ii]));
            CHECK(ak_attention(pad, q, k, v, mask, S, nh, hd, scale, causal));
            CHECK(ak_attention(one, q, k, v, mask, L, nh, hd, scale, causal));
            EXPECT(memcmp(pad, one, nl * 4) == 0, "padded attention differs L=%d S=%d isa=%d", L, S, isas[ii]);
            double e = nmse(one, ref, nl);
            EXPECT(e < 1e-10, "padded attention nmse %g L=%d isa=%d", e, L, isas[ii]);
            EXPECT(guard_ok(pad, n) && guard_ok(one, nl), "guard padded attention");
        }
        CHECK(ak_set_isa(AK_ISA_AUTO));
        free(q); free(k); free(v); free(mask); free(pad); free(one); free(ref);
    }
}

static void test_moe(void) {
    int T = 37, H = 48, F = 80, E = 5, K = 2;
    float *x = rand_buf((size_t)T * H), *rw = rand_buf((size_t)E * H), *w1 = rand_buf((size_t)E * F * H),
          *w2 = rand_buf((size_t)E * F * H), *b = rand_buf(H);
    float *o1 = galloc((size_t)T * H), *o2 = galloc((size_t)T * H), *pr = galloc((size_t)T * E),
          *lg = galloc((size_t)T * E), *tw = galloc((size_t)T * K), *eo = galloc((size_t)T * K * H);
    int32_t *ti = malloc((size_t)T * K * 4);
    CHECK(ak_set_num_threads(1));
    CHECK(ak_moe(o1, lg, pr, tw, ti, NULL, NULL, eo, NULL, x, rw, w1, NULL, w2, NULL, b, T, H, F, E, K, AK_DTYPE_F32, 1, 0, 0));
    CHECK(ak_set_num_threads(2));
    CHECK(ak_moe(o2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, x, rw, w1, NULL, w2, NULL, b, T, H, F, E, K, AK_DTYPE_F32, 1, 0, 0));
    EXPECT(memcmp(o1, o2, (size_t)T * H * 4) == 0, "moe threads differ");
    /* reference for token 0 with plain loops */
    int ok = 1;
    for (int t = 0; t < T; t++) {
        EXPECT(ti[t * K] != ti[t * K + 1], "distinct experts");
        EXPECT(pr[t * E + ti[t * K]] >= pr[t * E + ti[t * K + 1]], "descending");
        EXPECT(fabsf(tw[t * K] + tw[t * K + 1] - 1.0f) < 1e-6f, "renormalised");
        for (int j = 0; j < K; j++) {
            int e = ti[t * K + j];
            float *hbuf = malloc(F * 4);
            for (int f = 0; f < F; f++) {
                double a = 0;
                for (int h = 0; h < H; h++) a += (double)x[t * H + h] * w1[((size_t)e * F + f) * H + h];
                hbuf[f] = (float)(0.5 * a * (1.0 + erf(a / sqrt(2.0))));
            }
            for (int h = 0; h < H; h++) {
                double a = 0;
                for (int f = 0; f < F; f++) a += (double)hbuf[f] * w2[((size_t)e * F + f) * H + h];
                if (fabs(a - eo[((size_t)t * K + j) * H + h]) > 1e-4 * (1 + fabs(a))) ok = 0;
            }
            free(hbuf);
        }
    }
    EXPECT(ok, "moe expert outputs match double reference");
    EXPECT(guard_ok(o1, (size_t)T * H) && guard_ok(o2, (size_t)T * H) && guard_ok(pr, (size_t)T * E) &&
           guard_ok(lg, (size_t)T * E) && guard_ok(tw, (size_t)T * K) && guard_ok(eo, (size_t)T * K * H), "guard moe");
    /* forced routing with the same indices/weights reproduces the routed result bitwise */
    float *o3 = galloc((size_t)T * H);
    CHECK(ak_moe(o3, NULL, NULL, tw, ti, NULL, NULL, NULL, NULL, x, NULL, w1, NULL, w2, NULL, b, T, H, F, E, K, AK_DTYPE_F32, 0, 0, 1));
    EXPECT(memcmp(o1, o3, (size_t)T * H * 4) == 0, "forced routing");
    ti[0] = E;
    EXPECT(ak_moe(o3, NULL, NULL, tw, ti, NULL, NULL, NULL, NULL, x, NULL, w1, NULL, w2, NULL, b, T, H, F, E, K, 0, 0, 0, 1) ==
           AK_ERR_INDEX_OUT_OF_RANGE, "bad index");
    ti[0] = 0;
    EXPECT(ak_moe(o3, lg, NULL, tw, ti, NULL, NULL, NULL, NULL, x, NULL, w1, NULL, w2, NULL, b, T, H, F, E, K, 0, 0, 0, 1) ==
           AK_ERR_NULL_POINTER, "forced routing asking for the logits needs router_w");
    free(x); free(rw); free(w1); free(w2); free(b); free(o1); free(o2); free(o3); free(pr); free(lg); free(tw); free(eo); free(ti);
}

/* ak_moe's temporaries live in a per-thread scratch block kept between calls (core.c): a block grown by a
 * larger call, left full of its values, or in use on another thread changes no bit of any result; with fc1
 * not asked for the activation is taken in place, and act still equals gelu(fc1). */
typedef struct {
    const float *x, *rw, *w1, *w2, *b;
    float *out;
    int T, H, F, E, K;
    int status;
} moe_call;
static void *moe_call_run(void *arg) {
    moe_call *c = (moe_call *)arg;
    for (int it = 0; it < 20 && c->status == AK_OK; it++)
        c->status = ak_moe(c->out, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, c->x, c->rw, c->w1, NULL, c->w2,
                           NULL, c->b, c->T, c->H, c->F, c->E, c->K, AK_DTYPE_F32, 0, 0, 0);
    return NULL;
}
static void test_moe_scratch(void) {
    int T = 37, TL = 300, H = 48, F = 80, E = 5, K = 2;
    float *x = rand_buf((size_t)TL * H), *rw = rand_buf((size_t)E * H), *w1 = rand_buf((size_t)E * F * H),
          *w2 = rand_buf((size_t)E * F * H), *b = rand_buf(H);
    float *o1 = galloc((size_t)T * H), *o2 = galloc((size_t)T * H), *big = galloc((size_t)TL * H);
    float *fc1 = galloc((size_t)T * K * F), *act = galloc((size_t)T * K * F), *act2 = galloc((size_t)T * K * F),
          *g = galloc((size_t)T * K * F);
    CHECK(ak_set_num_threads(1));
    CHECK(ak_moe(o1, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, x, rw, w1, NULL, w2, NULL, b, T, H, F, E, K,
                 AK_DTYPE_F32, 0, 0, 0));
    CHECK(ak_moe(big, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, x, rw, w1, NULL, w2, NULL, b, TL, H, F, E, K,
                 AK_DTYPE_F32, 0, 0, 0)); /* grows the block and leaves it full */
    CHECK(ak_moe(o2, NULL, NULL, NULL, NULL, fc1, act, NULL, NULL, x, rw, w1, NULL, w2, NULL, b, T, H, F, E, K,
                 AK_DTYPE_F32, 0, 0, 0));
    EXPECT(memcmp(o1, o2, (size_t)T * H * 4) == 0, "moe after a larger call, with fc1 and act asked for");
    CHECK(ak_moe(o2, NULL, NULL, NULL, NULL, NULL, act2, NULL, NULL, x, rw, w1, NULL, w2, NULL, b, T, H, F, E, K,
                 AK_DTYPE_F32, 0, 0, 0));
    EXPECT(memcmp(o1, o2, (size_t)T * H * 4) == 0, "moe with the activation taken in place");
    EXPECT(memcmp(act, act2, (size_t)T * K * F * 4) == 0, "act with and without fc1");
    CHECK(ak_gelu(g, fc1, (int64_t)T * K * F, 0));
    EXPECT(memcmp(g, act, (size_t)T * K * F * 4) == 0, "act = gelu(fc1)");
    moe_call c[2];
    pthread_t th[2];
    for (int i = 0; i < 2; i++) {
        c[i] = (moe_call){x, rw, w1, w2, b, galloc((size_t)(i ? T : TL) * H), i ? T : TL, H, F, E, K, AK_OK};
        if (pthread_create(&th[i], NULL, moe_call_run, &c[i]) != 0) {
            fprintf(stderr, "%s:%d: pthread_create failed\n", __FILE__, __LINE__);
            exit(1);
        }
    }
    for (int i = 0; i < 2; i++) pthread_join(th[i], NULL);
    CHECK(c[0].status);
    CHECK(c[1].status);
    EXPECT(memcmp(c[1].out, o1, (size_t)T * H * 4) == 0, "moe on two threads at once");
    EXPECT(guard_ok(o1, (size_t)T * H) && guard_ok(o2, (size_t)T * H) && guard_ok(act, (size_t)T * K * F) &&
           guard_ok(act2, (size_t)T * K * F) && guard_ok(fc1, (size_t)T * K * F), "guard moe scratch");
    free(x); free(rw); free(w1); free(w2); free(b); free(o1); free(o2); free(big); free(fc1); free(act); free(act2);
    free(g); free(c[0].out); free(c[1].out);
}

static void test_small_ops(void) {
    int T = 9, C = 37;
    size_t n = (size_t)T * C;
    float *x = rand_buf(n), *o = galloc(n), *w = rand_buf(C), *b = rand_buf(C);
    x[5] = 30.0f;
    CHECK(ak_softmax(o, x, T, C));
    for (int t = 0; t < T; t++) {
        double s = 0;
        for (int c = 0; c < C; c++) s += o[t * C + c];
        EXPECT(fabs(s - 1.0) < 1e-5, "softmax row sum %g", s);
    }
    EXPECT(guard_ok(o, n), "guard softmax");
    CHECK(ak_layernorm(o, x, w, b, T, C, 1e-5f));
    for (int t = 0; t < T; t++) {
        double m = 0, v = 0;
        for (int c = 0; c < C; c++) m += x[t * C + c];
        m /= C;
        for (int c = 0; c < C; c++) v += (x[t * C + c] - m) * (x[t * C + c] - m);
        v /= C;
        for (int c = 0; c < C; c++) {
            double r = (x[t * C + c] - m) / sqrt(v + 1e-5) * w[c] + b[c];
            EXPECT(fabs(r - o[t * C + c]) < 1e-5, "layernorm");
        }
    }
    EXPECT(guard_ok(o, n), "guard layernorm");
    CHECK(ak_gelu(o, x, (int64_t)n, 0));
    for (size_t i = 0; i < n; i++) EXPECT(fabs(o[i] - 0.5 * x[i] * (1 + erf(x[i] / sqrt(2.0)))) < 1e-6, "gelu");
    EXPECT(guard_ok(o, n), "guard gelu");
    int64_t ids[3] = {2, 0, 8};
    CHECK(ak_embedding(o, ids, x, 3, T, C));
    EXPECT(memcmp(o + C, x, C * 4) == 0, "embedding");
    ids[1] = 9;
    EXPECT(ak_embedding(o, ids, x, 3, T, C) == AK_ERR_INDEX_OUT_OF_RANGE, "embedding range");
    EXPECT(ak_matmul(NULL, x, w, NULL, NULL, 1, 1, 1, 0) == AK_ERR_NULL_POINTER, "null");
    EXPECT(ak_matmul(o, x, w, NULL, NULL, -1, 1, 1, 0) == AK_ERR_INVALID_SIZE, "size");
    EXPECT(strcmp(ak_version(), AK_VERSION) == 0, "version");
    EXPECT(strlen(ak_status_string(12345)) > 0, "status string");
    uint64_t counts[64];
    CHECK(ak_get_call_counts(counts, 64));
    EXPECT(counts[0] > 0, "call counts");
    ak_reset_call_counts();
    CHECK(ak_get_call_counts(counts, 64));
    EXPECT(counts[0] == 0, "reset call counts");
    free(x); free(o); free(w); free(b);
}

/* argmax, the first position of the largest |e - r|, taken from the lanes' own first positions and the tail: values
 * from a set of four, so ties are everywhere (in one lane, across lanes, between the lanes and the tail, all equal),
 * with NaN/Inf among them, at every length up to four blocks of 8; the naive loop's result bitwise on every path */
static void test_compare_argmax_ties(void) {
    const float vals[6] = {0.0f, 0.5f, -0.5f, 1.0f, NAN, INFINITY};
    float e[40], r[40];
    uint32_t s = 12345u;
    const int isas[3] = {AK_ISA_SCALAR, AK_ISA_AVX2, AK_ISA_AVX512};
    for (int trial = 0; trial < 400; trial++) {
        int n = trial % 41, nonfinite = trial % 3 == 0;
        for (int i = 0; i < n; i++) {
            s = s * 1664525u + 1013904223u;
            e[i] = vals[(s >> 8) % (nonfinite ? 6u : 4u)];
            r[i] = vals[(s >> 16) % 4u];
        }
        if (trial % 5 == 1) memcpy(r, e, sizeof(float) * (size_t)n); /* every difference 0: argmax 0 */
        ak_compare_result want, got;
        CHECK(ak_compare_naive(&want, e, r, n));
        for (int k = 0; k < 3; k++) {
            if (!ak_cpu_supports_isa(isas[k])) continue;
            CHECK(ak_set_isa(isas[k]));
            CHECK(ak_compare(&got, e, r, n));
            EXPECT(memcmp(&got, &want, sizeof got) == 0, "compare ties isa %d n %d: argmax %lld, naive %lld",
                   isas[k], n, (long long)got.argmax, (long long)want.argmax);
        }
        CHECK(ak_set_isa(AK_ISA_AUTO));
    }
}

static void test_compare(void) {
    size_t n = 1001;
    float *e = rand_buf(n), *r = rand_buf(n);
    ak_compare_result a, b;
    CHECK(ak_compare(&a, e, r, (int64_t)n));
    CHECK(ak_compare_naive(&b, e, r, (int64_t)n));
    EXPECT(memcmp(&a, &b, sizeof a) == 0, "compare equals its naive reference bitwise");
    double err = 0, ref = 0;
    for (size_t i = 0; i < n; i++) {
        err += ((double)e[i] - r[i]) * ((double)e[i] - r[i]);
        ref += (double)r[i] * r[i];
    }
    /* a different summation order: equal to ~n ulps of the sum */
    EXPECT(fabs(a.sum_sq_err - err) <= 1e-12 * err && fabs(a.sum_sq_ref - ref) <= 1e-12 * ref, "compare sums");
    EXPECT(a.n_valid == (int64_t)n, "compare count");
    /* adjacent floats are 1 ULP apart, also across zero (+0 and -0 are the same place) */
    float x[4] = {1.0f, -0.0f, 0.0f, INFINITY}, y[4] = {1.0f, 0.0f, 0.0f, 1.0f};
    x[0] = nextafterf(1.0f, 2.0f);
    CHECK(ak_compare(&a, x, y, 3));
    EXPECT(a.max_ulp == 1 && a.argmax == 0, "ulp %lld argmax %lld", (long long)a.max_ulp, (long long)a.argmax);
    CHECK(ak_compare(&a, x, y, 4));
    EXPECT(a.inf_eng == 1 && a.n_valid == 3 && a.nan_ref == 0, "non-finite positions are counted, not summed");
    double rl;
    CHECK(ak_rel_l2(&rl, e, r, (int64_t)n));
    EXPECT(fabs(rl - sqrt(err) / sqrt(ref)) <= 1e-12 * rl, "rel_l2 %g vs %g", rl, sqrt(err) / sqrt(ref));
    CHECK(ak_rel_l2(&rl, y, y, 3));
    EXPECT(rl == 0.0, "rel_l2 of equal arrays");
    EXPECT(ak_rel_l2(NULL, x, y, 4) == AK_ERR_NULL_POINTER, "rel_l2 null");
    EXPECT(ak_compare(NULL, x, y, 4) == AK_ERR_NULL_POINTER, "null result");
    EXPECT(ak_compare(&a, x, y, -1) == AK_ERR_INVALID_SIZE, "negative n");
    /* NaN/Inf on either side in every lane, and the largest |e - r| held by several positions in different lanes:
     * the lanes of the max pass give the naive loop's bits, argmax its first position */
    for (size_t i = 3; i < n; i += 97) e[i] = (i % 2) ? NAN : -INFINITY;
    for (size_t i = 5; i < n; i += 89) r[i] = (i % 2) ? INFINITY : NAN;
    size_t ties[3] = {700, 301, 999};
    for (int t = 0; t < 3; t++) e[ties[t]] = 4.5f, r[ties[t]] = 0.5f; /* |e - r| = 4 exactly, above every other */
    CHECK(ak_compare_naive(&b, e, r, (int64_t)n));
    const int isas[3] = {AK_ISA_SCALAR, AK_ISA_AVX2, AK_ISA_AVX512}; /* fours on two paths, eights on AVX-512 */
    for (int k = 0; k < 3; k++) {
        if (!ak_cpu_supports_isa(isas[k])) continue;
        CHECK(ak_set_isa(isas[k]));
        for (size_t m = n - 9; m <= n; m++) { /* every tail length after the blocks of 8 */
            ak_compare_result c, d;
            CHECK(ak_compare(&c, e, r, (int64_t)m));
            CHECK(ak_compare_naive(&d, e, r, (int64_t)m));
            EXPECT(memcmp(&c, &d, sizeof c) == 0, "compare isa %d n %zu: bitwise its naive reference", isas[k], m);
        }
        CHECK(ak_compare(&a, e, r, (int64_t)n));
        EXPECT(memcmp(&a, &b, sizeof a) == 0, "compare with NaN/Inf and tied maxima, isa %d, equals its naive "
               "reference bitwise", isas[k]);
        /* finite arrays: ak_rel_l2's sums are the naive compare's, bit for bit, on every path */
        float *f = rand_buf(n), *g = rand_buf(n);
        ak_compare_result d;
        double rl2;
        CHECK(ak_compare_naive(&d, f, g, (int64_t)n - 3));
        CHECK(ak_rel_l2(&rl2, f, g, (int64_t)n - 3));
        EXPECT(rl2 == sqrt(d.sum_sq_err) / sqrt(d.sum_sq_ref), "rel_l2 isa %d: the naive sums' ratio bitwise", isas[k]);
        free(f);
        free(g);
    }
    CHECK(ak_set_isa(AK_ISA_AUTO));
    EXPECT(a.argmax == 301 && a.nan_eng > 0 && a.inf_ref > 0 && a.n_valid < (int64_t)n,
           "argmax %lld (first of the tied maxima: 301)", (long long)a.argmax);
    free(e); free(r);
    test_compare_argmax_ties();
}

static const int packed_layouts[2] = {AK_DTYPE_F32_PACKED, AK_DTYPE_F32_PACKED16};

/* pack each of E (N,K) [trans=1] or (K,N) [trans=0] blocks of w into one buffer with guard */
static float *pack_blocks(const float *w, int E, int K, int N, int trans, int layout) {
    int64_t per = ak_packed_size(K, N);
    float *p = galloc((size_t)(E * per));
    for (int e = 0; e < E; e++) CHECK(ak_pack_weight_f32(p + e * per, w + (size_t)e * K * N, K, N, trans, layout));
    EXPECT(guard_ok(p, (size_t)(E * per)), "guard pack K=%d N=%d", K, N);
    return p;
}

static void test_pack_roundtrip(void) {
    const int shapes[][2] = {{1, 1},   {17, 5}, {33, 47},  {64, 32},  {129, 100},
                             {3, 65},  {600, 70}, {256, 33}, {1700, 40}, {300, 777}}; /* 1700: three K blocks; 777: 25 runs */
    for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++) {
        int K = shapes[s][0], N = shapes[s][1];
        EXPECT(ak_packed_size(K, N) == (int64_t)((N + 31) / 32) * 32 * K, "packed size K=%d N=%d", K, N);
        for (int trans = 0; trans < 2; trans++)
            for (int li = 0; li < 2; li++) {
                const int layout = packed_layouts[li], W = layout == AK_DTYPE_F32_PACKED ? 32 : 16;
                float *w = rand_buf((size_t)K * N), *back = galloc((size_t)K * N);
                float *p = pack_blocks(w, 1, K, N, trans, layout);
                /* the documented address of (k, n) in the first K block, checked for every column */
                for (int n = 0; n < (N + 31) / 32 * 32; n++) { /* padding is zero: padded lanes stay finite */
                    float v = p[(int64_t)(n / W) * (K < AK_PACK_KC ? K : AK_PACK_KC) * W + n % W];
                    EXPECT(n < N ? v == w[trans ? (int64_t)n * K : n] : v == 0.0f, "address/zero pad n=%d W=%d", n, W);
                }
                CHECK(ak_unpack_weight_f32(back, p, K, N, trans, layout));
                EXPECT(memcmp(back, w, (size_t)K * N * 4) == 0, "unpack K=%d N=%d trans=%d W=%d", K, N, trans, W);
                EXPECT(guard_ok(back, (size_t)K * N), "guard unpack");
                free(w); free(back); free(p);
            }
    }
    float x = 0;
    EXPECT(ak_pack_weight_f32(NULL, &x, 1, 1, 1, AK_DTYPE_F32_PACKED) == AK_ERR_NULL_POINTER, "pack null");
    EXPECT(ak_pack_weight_f32(&x, &x, -1, 1, 1, AK_DTYPE_F32_PACKED) == AK_ERR_INVALID_SIZE, "pack negative");
    EXPECT(ak_pack_weight_f32(&x, &x, 1, 1, 2, AK_DTYPE_F32_PACKED) == AK_ERR_INVALID_ARGUMENT, "pack trans");
    EXPECT(ak_pack_weight_f32(&x, &x, 1, 1, 1, AK_DTYPE_F32) == AK_ERR_INVALID_ARGUMENT, "pack layout");
    EXPECT(ak_unpack_weight_f32(&x, &x, 1, 1, 1, AK_DTYPE_F16) == AK_ERR_INVALID_ARGUMENT, "unpack layout");
    EXPECT(ak_matmul_packed(&x, &x, &x, NULL, 1, 1, 1, AK_DTYPE_F32) == AK_ERR_INVALID_ARGUMENT, "matmul layout");
    EXPECT(ak_packed_size(-1, 3) == -1, "packed size negative");
    /* the layout the path reads fastest: 32-column rows for AVX-512's 32-wide tile, 16 for the others */
    for (int isa = 0; isa < 3; isa++) {
        if (!ak_cpu_supports_isa(isa)) continue;
        CHECK(ak_set_isa(isa));
        EXPECT(ak_packed_layout() == (isa == AK_ISA_AVX512 ? AK_DTYPE_F32_PACKED : AK_DTYPE_F32_PACKED16),
               "packed layout of isa %d", isa);
    }
    CHECK(ak_set_isa(AK_ISA_AUTO));
}

/* the matmul on a packed weight is bitwise the naive loop on the original, every layout, ISA and thread count */
static void test_matmul_packed(void) {
    const int shapes[][3] = {{1, 1, 1}, {1, 17, 5}, {3, 33, 47}, {13, 64, 70}, {25, 129, 100},
                             {40, 300, 33}, {7, 768, 97}, {30, 520, 400}, {12, 256, 48}, {9, 1700, 40},
                             {260, 1000, 70}, {300, 600, 40},  /* 260, 300 rows: 3 and 2 blocks a call (KC_DEEP) */
                             {14, 1024, 70}, {270, 1536, 40}}; /* tiles copied (A_LD): rows 2 KiB-multiples apart */
    int nisa = 0, isas[3];
    for (int isa = 0; isa < 3; isa++) if (ak_cpu_supports_isa(isa)) isas[nisa++] = isa;
    for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++) {
        int T = shapes[s][0], C = shapes[s][1], OC = shapes[s][2];
        float *inp = rand_buf((size_t)T * C), *w = rand_buf((size_t)OC * C), *b = rand_buf(OC);
        float *ref = galloc((size_t)T * OC), *out = galloc((size_t)T * OC);
        for (int li = 0; li < 2; li++) {
            const int layout = packed_layouts[li];
            float *p = pack_blocks(w, 1, C, OC, 1, layout);
            CHECK(ak_matmul_naive(ref, inp, w, NULL, b, T, C, OC, AK_DTYPE_F32));
            CHECK(ak_matmul_naive(out, inp, p, NULL, b, T, C, OC, layout));
            EXPECT(memcmp(out, ref, (size_t)T * OC * 4) == 0, "naive packed T=%d C=%d OC=%d layout=%d", T, C, OC, layout);
            for (int ii = 0; ii < nisa; ii++) {
                CHECK(ak_set_isa(isas[ii]));
                for (int nt = 1; nt <= 3; nt++) {
                    CHECK(ak_set_num_threads(nt));
                    memset(out, 0, (size_t)T * OC * 4);
                    CHECK(ak_matmul_packed(out, inp, p, nt == 2 ? NULL : b, T, C, OC, layout));
                    if (nt == 2) CHECK(ak_matmul_naive(ref, inp, w, NULL, NULL, T, C, OC, AK_DTYPE_F32));
                    EXPECT(memcmp(out, ref, (size_t)T * OC * 4) == 0,
                           "matmul_packed T=%d C=%d OC=%d layout=%d isa=%d nt=%d nmse=%g", T, C, OC, layout, isas[ii],
                           nt, nmse(out, ref, (size_t)T * OC));
                    EXPECT(guard_ok(out, (size_t)T * OC), "guard matmul_packed");
                    if (nt == 2) CHECK(ak_matmul_naive(ref, inp, w, NULL, b, T, C, OC, AK_DTYPE_F32));
                }
            }
            CHECK(ak_set_isa(AK_ISA_AUTO));
            free(p);
        }
        free(inp); free(w); free(b); free(ref); free(out);
    }
}

/* The kernels prefetch B PF_ROWS (32) rows past the row they read, past the weight's end on its last rows: a packed
 * weight that ends where an inaccessible page begins gives the naive loop's bits on every path, layout and thread
 * count, and no fault (a fault ends the test binary). */
static void test_prefetch_past_the_weight(void) {
    const int shapes[][3] = {{13, 64, 70}, {40, 300, 33}, {260, 1000, 70}};
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    int nisa = 0, isas[3];
    for (int isa = 0; isa < 3; isa++) if (ak_cpu_supports_isa(isa)) isas[nisa++] = isa;
    for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++) {
        int T = shapes[s][0], C = shapes[s][1], OC = shapes[s][2];
        float *inp = rand_buf((size_t)T * C), *w = rand_buf((size_t)OC * C);
        float *ref = galloc((size_t)T * OC), *out = galloc((size_t)T * OC);
        CHECK(ak_matmul_naive(ref, inp, w, NULL, NULL, T, C, OC, AK_DTYPE_F32));
        const size_t bytes = (size_t)ak_packed_size(C, OC) * sizeof(float);
        const size_t span = (bytes + page - 1) / page * page;
        char *map = (char *)mmap(NULL, span + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        EXPECT(map != MAP_FAILED && mprotect(map + span, page, PROT_NONE) == 0, "guard page mapping");
        if (map == MAP_FAILED) continue;
        float *p = (float *)(map + span - bytes); /* its last float touches the inaccessible page */
        for (int li = 0; li < 2; li++) {
            CHECK(ak_pack_weight_f32(p, w, C, OC, 1, packed_layouts[li]));
            for (int ii = 0; ii < nisa; ii++) {
                CHECK(ak_set_isa(isas[ii]));
                for (int nt = 1; nt <= 2; nt++) {
                    CHECK(ak_set_num_threads(nt));
                    memset(out, 0, (size_t)T * OC * 4);
                    CHECK(ak_matmul_packed(out, inp, p, NULL, T, C, OC, packed_layouts[li]));
                    EXPECT(memcmp(out, ref, (size_t)T * OC * 4) == 0, "weight before a guard page T=%d C=%d OC=%d "
                           "layout=%d isa=%d nt=%d", T, C, OC, packed_layouts[li], isas[ii], nt);
                }
            }
            CHECK(ak_set_isa(AK_ISA_AUTO));
        }
        munmap(map, span + page);
        free(inp); free(w); free(ref); free(out);
    }
}

/* ak_moe and the expert part ops on packed expert weights in a layout (F, H not multiples of 32: w1 and
 * w2 blocks have different padded sizes) are bitwise the unpacked calls */
static void test_moe_packed_layout(int layout) {
    int T = 37, H = 48, F = 80, E = 5, K = 2;
    float *x = rand_buf((size_t)T * H), *rw = rand_buf((size_t)E * H), *w1 = rand_buf((size_t)E * F * H),
          *w2 = rand_buf((size_t)E * F * H), *b = rand_buf(H);
    float *p1 = pack_blocks(w1, E, H, F, 1, layout), *p2 = pack_blocks(w2, E, F, H, 0, layout);
    float *o1 = galloc((size_t)T * H), *o2 = galloc((size_t)T * H), *tw = galloc((size_t)T * K);
    float *f1 = galloc((size_t)T * K * F), *f2 = galloc((size_t)T * K * F), *a1 = galloc((size_t)T * K * F);
    float *e1 = galloc((size_t)T * K * H), *e2 = galloc((size_t)T * K * H);
    int32_t *ti = malloc((size_t)T * K * 4);
    int64_t *ti64 = malloc((size_t)T * K * 8);
    int nisa = 0, isas[3];
    for (int isa = 0; isa < 3; isa++) if (ak_cpu_supports_isa(isa)) isas[nisa++] = isa;
    for (int ii = 0; ii < nisa; ii++) {
        CHECK(ak_set_isa(isas[ii])); /* gelu and softmax are per-ISA code: the reference is per ISA too */
        CHECK(ak_moe(o1, NULL, NULL, tw, ti, f1, a1, e1, NULL, x, rw, w1, NULL, w2, NULL, b, T, H, F, E, K,
                     AK_DTYPE_F32, 1, 0, 0));
        for (int i = 0; i < T * K; i++) ti64[i] = ti[i];
        for (int nt = 1; nt <= 2; nt++) {
            CHECK(ak_set_num_threads(nt));
            CHECK(ak_moe(o2, NULL, NULL, NULL, NULL, f2, NULL, e2, NULL, x, rw, p1, NULL, p2, NULL, b, T, H, F, E, K,
                         layout, 1, 0, 0));
            EXPECT(memcmp(o1, o2, (size_t)T * H * 4) == 0, "moe packed %d isa=%d nt=%d", layout, isas[ii], nt);
            EXPECT(memcmp(f1, f2, (size_t)T * K * F * 4) == 0, "moe packed %d fc1 isa=%d nt=%d", layout, isas[ii], nt);
            CHECK(ak_expert_up(f2, x, ti64, p1, NULL, T, K, H, F, E, layout));
            EXPECT(memcmp(f1, f2, (size_t)T * K * F * 4) == 0, "expert_up packed %d isa=%d nt=%d", layout, isas[ii], nt);
            CHECK(ak_expert_down(e2, a1, ti64, p2, NULL, T, K, F, H, E, layout));
            EXPECT(memcmp(e1, e2, (size_t)T * K * H * 4) == 0, "expert_down packed %d isa=%d nt=%d", layout, isas[ii],
                   nt);
        }
    }
    CHECK(ak_set_isa(AK_ISA_AUTO));
    EXPECT(guard_ok(o2, (size_t)T * H) && guard_ok(f2, (size_t)T * K * F) && guard_ok(e2, (size_t)T * K * H),
           "guard moe packed");
    EXPECT(ak_matmul(o2, x, p1, NULL, NULL, 1, 1, 1, 6) == AK_ERR_INVALID_ARGUMENT, "dtype 6 refused");
    EXPECT(ak_moe(o2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, x, rw, p1, NULL, p2, NULL, b, T, H, F, E, K, 6, 1,
                  0, 0) == AK_ERR_INVALID_ARGUMENT, "moe dtype 6 refused");
    EXPECT(ak_expert_up(f2, x, ti64, p1, NULL, T, K, H, F, E, 6) == AK_ERR_INVALID_ARGUMENT, "expert_up dtype 6");
    EXPECT(ak_expert_down(e2, a1, ti64, p2, NULL, T, K, F, H, E, 6) == AK_ERR_INVALID_ARGUMENT, "expert_down dtype 6");
    free(x); free(rw); free(w1); free(w2); free(b); free(p1); free(p2); free(o1); free(o2); free(tw);
    free(f1); free(f2); free(a1); free(e1); free(e2); free(ti); free(ti64);
}

static void test_moe_packed(void) {
    for (int li = 0; li < 2; li++) test_moe_packed_layout(packed_layouts[li]);
}

/* the AVX2 exact gelu performs the AVX-512 one's operations: bitwise the same values, tails included */
static void test_gelu_avx2_matches_avx512(void) {
    if (!ak_cpu_supports_isa(AK_ISA_AVX512) || !ak_cpu_supports_isa(AK_ISA_AVX2)) return;
    const int n = 1000 + 13;
    float *x = rand_buf(n), *a = galloc(n), *b = galloc(n);
    for (int i = 0; i < n; i++) x[i] *= (float)(1 + i % 9);  /* |x| up to 9: both tails of Phi */
    const float special[] = {0.0f, -0.0f, INFINITY, -INFINITY, NAN, 1e-30f, -1e-30f, 30.0f, -30.0f, 88.0f, -88.0f};
    memcpy(x, special, sizeof(special));
    CHECK(ak_set_num_threads(1));
    for (int len = 1; len <= n; len += len < 20 ? 1 : 331) {
        CHECK(ak_set_isa(AK_ISA_AVX512));
        CHECK(ak_gelu(a, x, len, 0));
        CHECK(ak_set_isa(AK_ISA_AVX2));
        CHECK(ak_gelu(b, x, len, 0));
        EXPECT(memcmp(a, b, (size_t)len * 4) == 0, "gelu avx2 vs avx512 len=%d", len);
    }
    EXPECT(guard_ok(b, n), "guard gelu avx2");
    CHECK(ak_set_isa(AK_ISA_AUTO));
    free(x); free(a); free(b);
}

/* HDF5's Fletcher-32: the closed-form block sums on every ISA path the CPU runs equal HDF5's loop (the naive)
 * bit for bit, at every length around the 360-word blocks, odd lengths (the high-byte tail), unaligned starts,
 * and all-0xff bytes (the largest words). The input is not written. */
static void test_fletcher32(void) {
    const int n = 4 * 720 + 9;
    uint8_t *buf = (uint8_t *)malloc((size_t)n + 4), *copy = (uint8_t *)malloc((size_t)n + 4);
    for (int i = 0; i < n + 4; i++) buf[i] = (uint8_t)(frand() * 127.0f + 128.0f);
    memcpy(copy, buf, (size_t)n + 4);
    const int isas[3] = {AK_ISA_SCALAR, AK_ISA_AVX2, AK_ISA_AVX512};
    for (int fill = 0; fill < 2; fill++) {
        if (fill) memset(buf, 0xff, (size_t)n + 4), memcpy(copy, buf, (size_t)n + 4);
        for (int k = 0; k < 3; k++) {
            if (!ak_cpu_supports_isa(isas[k])) continue;
            CHECK(ak_set_isa(isas[k]));
            int bad = 0, cases = 0;
            for (int off = 0; off < 4; off++)
                for (int len = 0; len <= n - 4; len += len < 800 ? 1 : 97) {
                    uint32_t a, b;
                    CHECK(ak_fletcher32(&a, buf + off, len));
                    CHECK(ak_fletcher32_naive(&b, buf + off, len));
                    bad += a != b;
                    cases++;
                }
            EXPECT(bad == 0, "fletcher32 isa %d fill %d: %d of %d lengths differ from HDF5's loop", isas[k], fill, bad,
                   cases);
        }
    }
    EXPECT(memcmp(buf, copy, (size_t)n + 4) == 0, "fletcher32 left its input as it was");
    uint32_t v = 1;
    CHECK(ak_fletcher32(&v, NULL, 0));
    EXPECT(v == 0, "fletcher32 of nothing is 0, got %u", v);
    EXPECT(ak_fletcher32(NULL, buf, 4) == AK_ERR_NULL_POINTER, "fletcher32 null out");
    EXPECT(ak_fletcher32(&v, NULL, 4) == AK_ERR_NULL_POINTER, "fletcher32 null data");
    EXPECT(ak_fletcher32(&v, buf, -1) == AK_ERR_INVALID_SIZE, "fletcher32 negative size");
    CHECK(ak_set_isa(AK_ISA_AUTO));
    free(buf);
    free(copy);
}

/* The propagated budget's perturbation (perturb.c): on every ISA path the CPU runs, bitwise the naive loops (also
 * at sizes that leave a row tail of the 8 lanes and with one token); within 1e-12 of the plain definition (other
 * orders of the double sums); its error sums those of out against ref; no draws where gn = 0 (g NULL), out = y
 * plus the draws where sn = 0 (s all zero); nothing done where y is 0 or NaN; argument errors. */
static double perturb_definition_gap(const double *out, const double *y, const float *s, const float *g,
                                     double budget, int64_t T, int64_t F) {
    double yy = 0, ys = 0, gg = 0, worst = 0;
    for (int64_t i = 0; i < T * F; i++) {
        yy += y[i] * y[i];
        ys += y[i] * y[i] * s[i % F] * s[i % F];
        gg += (double)g[i] * g[i];
    }
    double c = budget * sqrt(yy) / sqrt(2.0);
    for (int64_t i = 0; i < T * F; i++) {
        /* the draws' term as the kernel's float32 product (its scale from these sums, equal to the kernel's
         * float32 scale unless c / gn sits within 1e-15 of a float32 rounding boundary, not so for this seed) */
        double want = y[i] * (1.0 + c / sqrt(ys) * s[i % F]) + (double)(g[i] * (float)(c / sqrt(gg)));
        double gap = fabs(out[i] - want) / (c / sqrt((double)(T * F)));
        if (gap > worst) worst = gap;
    }
    return worst; /* in units of the perturbation's rms per element: ~1e-15 from the sums' orders */
}

static void test_perturb(void) {
    const int64_t sizes[][2] = {{13, 37}, {1, 384}, {20, 64}, {3, 2}, {7, 5}}; /* blocks of 8 and tails, tails alone */
    const int isas[3] = {AK_ISA_SCALAR, AK_ISA_AVX2, AK_ISA_AVX512};
    for (int z = 0; z < 5; z++) {
        int64_t T = sizes[z][0], F = sizes[z][1], n = T * F;
        double *y = (double *)malloc((size_t)n * 8);
        float *s = (float *)malloc((size_t)F * 4);
        double *a = (double *)malloc((size_t)n * 8), *b = (double *)malloc((size_t)n * 8);
        float *g = (float *)malloc((size_t)n * 4), *r = (float *)malloc((size_t)n * 4);
        for (int64_t i = 0; i < n; i++) y[i] = frand() * 3.0, g[i] = frand(), r[i] = (float)(y[i] + 1e-3 * frand());
        for (int64_t f = 0; f < F; f++) s[f] = frand();
        double ea[2], eb[2];
        int da = 0, db = 0;
        CHECK(ak_perturb_f64_naive(b, eb, &db, y, s, g, r, 1e-3, T, F));
        for (int k = 0; k < 3; k++) {
            if (!ak_cpu_supports_isa(isas[k])) continue;
            CHECK(ak_set_isa(isas[k]));
            memset(a, 0, (size_t)n * 8);
            CHECK(ak_perturb_f64(a, ea, &da, y, s, g, r, 1e-3, T, F));
            EXPECT(da == 1 && db == 1 && memcmp(a, b, (size_t)n * 8) == 0 && memcmp(ea, eb, sizeof ea) == 0,
                   "perturb %lldx%lld isa %d: bitwise its naive loops", (long long)T, (long long)F, isas[k]);
        }
        CHECK(ak_set_isa(AK_ISA_AUTO));
        double gap = perturb_definition_gap(a, y, s, g, 1e-3, T, F), se = 0, sr = 0;
        EXPECT(gap <= 1e-9, "perturb %lldx%lld: %g of the perturbation's rms from its definition", (long long)T,
               (long long)F, gap);
        for (int64_t i = 0; i < n; i++) se += (a[i] - r[i]) * (a[i] - r[i]), sr += (double)r[i] * r[i];
        EXPECT(fabs(ea[0] - se) <= 1e-12 * se && fabs(ea[1] - sr) <= 1e-12 * sr, "perturb error sums");
        CHECK(ak_perturb_f64(a, NULL, &da, y, s, NULL, NULL, 1e-3, T, F)); /* no per-element draws */
        for (int64_t f = 0; f < F; f++) s[f] = 0.0f;
        CHECK(ak_perturb_f64(b, NULL, &db, y, s, g, NULL, 1e-3, T, F)); /* no shared part */
        int ok = 1;
        double yy = 0, gg = 0;
        for (int64_t i = 0; i < n; i++) yy += y[i] * y[i], gg += (double)g[i] * g[i];
        float gs = (float)(1e-3 * sqrt(yy) / sqrt(2.0) / sqrt(gg));
        for (int64_t i = 0; i < n; i++) ok &= fabs(b[i] - (y[i] + (double)(g[i] * gs))) <= 1e-15 * fabs(y[i]) + 1e-18;
        EXPECT(da == 1 && db == 1 && ok, "perturb: one part where the other has no draws");
        free(y); free(s); free(a); free(b); free(g); free(r);
    }
    double y0[4] = {0, 0, 0, 0}, out[4] = {7, 7, 7, 7}, e[2];
    float s0[2] = {1, 1};
    float g0[4] = {1, 1, 1, 1};
    int done = 5;
    CHECK(ak_perturb_f64(out, e, &done, y0, s0, g0, NULL, 1e-3, 2, 2));
    EXPECT(done == 0 && out[0] == 7, "perturb: y = 0 has nothing to scale, out untouched");
    y0[1] = NAN;
    CHECK(ak_perturb_f64(out, e, &done, y0, s0, g0, NULL, 1e-3, 2, 2));
    EXPECT(done == 0 && out[1] == 7, "perturb: a NaN norm has nothing to scale");
    EXPECT(ak_perturb_f64(NULL, e, &done, y0, s0, g0, NULL, 1e-3, 2, 2) == AK_ERR_NULL_POINTER, "perturb null out");
    EXPECT(ak_perturb_f64(out, NULL, &done, y0, s0, g0, g0, 1e-3, 2, 2) == AK_ERR_NULL_POINTER, "perturb ref, no err");
    EXPECT(ak_perturb_f64(out, e, &done, y0, s0, g0, NULL, 1e-3, -1, 2) == AK_ERR_INVALID_SIZE, "perturb size");
}

/* ULPs between two doubles of one sign (or both zero): the distance of their bit patterns */
static int64_t ulp_distance(double a, double b) {
    int64_t ia, ib;
    memcpy(&ia, &a, 8);
    memcpy(&ib, &b, 8);
    if (ia < 0) ia = INT64_MIN - ia; /* sign-magnitude to a monotonic integer line */
    if (ib < 0) ib = INT64_MIN - ib;
    return ia > ib ? ia - ib : ib - ia;
}

/* ak_erf_f64 on every path this CPU runs against libm's erf (the naive loop): within 5 ULP, as glibc bounds its
 * vector functions within 4 ULP and its scalar erf within 1 on x86_64; special values exact; each value's result
 * the same at every position (a partial last vector is padded) and in place. */
static void test_erf(void) {
    enum { N = 4099 };
    static double x[N], want[N], got[N], one[N];
    const double special[] = {0.0, -0.0, 4.9e-324, -1e-310, 1e-300, 1e-8, -0.5, 0.84375, 1.0, 1.25, -2.5, 3.5,
                              5.9, -6.0, 27.0, 1e300, INFINITY, -INFINITY, NAN};
    const int ns = (int)(sizeof special / sizeof special[0]);
    for (int i = 0; i < N; i++) x[i] = i < ns ? special[i] : frand() * (i % 3 == 0 ? 8.0 : i % 3 == 1 ? 2.0 : 0.6);
    CHECK(ak_erf_f64_naive(want, x, N));
    const int isas[3] = {AK_ISA_SCALAR, AK_ISA_AVX2, AK_ISA_AVX512};
    for (int k = 0; k < 3; k++) {
        if (!ak_cpu_supports_isa(isas[k])) continue;
        CHECK(ak_set_isa(isas[k]));
        int impl = -1;
        CHECK(ak_erf_f64_impl(&impl));
        CHECK(ak_erf_f64(got, x, N));
        int64_t worst = 0;
        int specials_ok = 1, nan_ok = isnan(got[ns - 1]);
        for (int i = 0; i < N; i++)
            if (!isnan(x[i]) && ulp_distance(got[i], want[i]) > worst) worst = ulp_distance(got[i], want[i]);
        for (int i = 0; i < ns - 1; i++) specials_ok &= fabs(special[i]) >= 6.0 ? got[i] == want[i] : 1;
        specials_ok &= signbit(got[1]) && got[0] == 0.0 && got[1] == 0.0;
        EXPECT(worst <= 5 && specials_ok && nan_ok && impl <= isas[k],
               "erf isa %d (impl %d): %lld ULP from libm's (at most 5), +-0, +-1 beyond 6, NaN", isas[k], impl,
               (long long)worst);
        int same = 1;
        for (int len = 1; len <= 17; len++) /* each tail length: the values alone give the array's bits */
            for (int at = 0; at + len <= 64; at += 7) {
                CHECK(ak_erf_f64(one, x + at, len));
                same &= memcmp(one, got + at, (size_t)len * 8) == 0;
            }
        memcpy(one, x, sizeof x);
        CHECK(ak_erf_f64(one, one, N));
        EXPECT(same && memcmp(one, got, sizeof got) == 0, "erf isa %d: position-independent, in place", isas[k]);
    }
    CHECK(ak_set_isa(AK_ISA_AUTO));
    EXPECT(ak_erf_f64(NULL, x, 1) == AK_ERR_NULL_POINTER && ak_erf_f64(got, x, -1) == AK_ERR_INVALID_SIZE &&
               ak_erf_f64(got, x, 0) == AK_OK && ak_erf_f64_impl(NULL) == AK_ERR_NULL_POINTER,
           "erf argument checks");
}

static float f32_of_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* float32 rounded to float16 precision: hand-derived values at every boundary (ties to even between normals and
 * between subnormals, the overflow to infinity at 65520, 2^-25 to zero, the largest subnormal up to the smallest
 * normal, signed zeros, infinities, NaN), then every path bit for bit the scalar code on random values of every
 * magnitude (NaN payloads too), every tail length and in place. Exact: no tolerance. */
static void test_round_f16(void) {
    const float in[] = {0.0f, -0.0f, 1.0f, 65504.0f, f32_of_bits(0x477fefffu), 65520.0f, -1e10f, INFINITY,
                        0x1p-24f, 0x1p-25f, f32_of_bits(0x33000001u), 0x3p-25f, 1.0f + 0x1p-11f, 1.0f + 0x3p-11f,
                        0x1p-14f, f32_of_bits(0x387fffffu), -0x1.8p-20f, 3.14159265f};
    const float want[] = {0.0f, -0.0f, 1.0f, 65504.0f, 65504.0f, INFINITY, -INFINITY, INFINITY,
                          0x1p-24f, 0.0f, 0x1p-24f, 0x2p-24f, 1.0f, 1.0f + 0x2p-10f,
                          0x1p-14f, 0x1p-14f, -0x1.8p-20f, 3.140625f};
    enum { NS = sizeof in / sizeof in[0], N = 4099 };
    static float x[N], ref[N], got[N], one[N];
    for (int i = 0; i < N; i++) { /* random bits: every exponent, NaN payloads and signs among them */
        uint32_t u = (uint32_t)(frand() * 2147483648.0f) * 2u + (uint32_t)(i & 1);
        x[i] = i < NS ? in[i] : i % 4 == 0 ? f32_of_bits(u) : frand() * (float)(1 << (i % 20));
    }
    x[NS] = NAN, x[NS + 1] = -NAN, x[NS + 2] = f32_of_bits(0x7f800001u); /* quiet, negative, signalling NaN */
    CHECK(ak_round_f16_naive(ref, x, N));
    int exact = 1;
    for (int i = 0; i < NS; i++) exact &= memcmp(&ref[i], &want[i], 4) == 0;
    EXPECT(exact && isnan(ref[NS]) && isnan(ref[NS + 1]) && signbit(ref[NS + 1]) && isnan(ref[NS + 2]),
           "round_f16: boundary values and NaN");
    const int isas[3] = {AK_ISA_SCALAR, AK_ISA_AVX2, AK_ISA_AVX512};
    for (int k = 0; k < 3; k++) {
        if (!ak_cpu_supports_isa(isas[k])) continue;
        CHECK(ak_set_isa(isas[k]));
        CHECK(ak_round_f16(got, x, N));
        int same = memcmp(got, ref, sizeof ref) == 0;
        for (int len = 1; len <= 33; len++) /* each tail length */
            for (int at = 0; at + len <= 96; at += 11) {
                CHECK(ak_round_f16(one, x + at, len));
                same &= memcmp(one, ref + at, (size_t)len * 4) == 0;
            }
        memcpy(one, x, sizeof x);
        CHECK(ak_round_f16(one, one, N));
        EXPECT(same && memcmp(one, ref, sizeof ref) == 0, "round_f16 isa %d: the scalar code's bits, in place",
               isas[k]);
    }
    CHECK(ak_set_isa(AK_ISA_AUTO));
    EXPECT(ak_round_f16(NULL, x, 1) == AK_ERR_NULL_POINTER && ak_round_f16(got, NULL, 1) == AK_ERR_NULL_POINTER &&
               ak_round_f16(got, x, -1) == AK_ERR_INVALID_SIZE && ak_round_f16(got, x, 0) == AK_OK,
           "round_f16 argument checks");
}

/* float32 <-> float16 storage: float16 -> float32 on all 65536 bit patterns, exact, each one checked against its
 * value built from its fields (sign, exponent, mantissa; a NaN's payload shifted up by 13, never quieted); float32
 * -> float16 on the round_f16 boundary values above, NaN payloads (quiet, signalling, one whose top 10 mantissa
 * bits are zero: it stays a NaN, 0x7c01) and random bits of every exponent, the naive code against round_f16's
 * values for non-NaN; then every path bit for bit the scalar code, with a NaN inside a vector, every tail length.
 * Exact: no tolerance. */
static void test_convert_f16(void) {
    enum { NH = 65536, N = 4099 };
    static uint16_t h[NH], h2[N], hg[N];
    static float f[NH], fg[NH], x[N], r[N];
    for (int i = 0; i < NH; i++) h[i] = (uint16_t)i;
    CHECK(ak_convert_f16_f32_naive(f, h, NH));
    int exact = 1;
    for (int i = 0; i < NH; i++) {
        uint32_t s = (uint32_t)(i & 0x8000) << 16, e = (uint32_t)(i >> 10) & 0x1fu, m = (uint32_t)i & 0x3ffu, u;
        if (e == 0x1f) u = s | 0x7f800000u | (m << 13);
        else {
            float v = ldexpf((float)(e ? (m | 0x400u) : m), (e ? (int)e : 1) - 25);
            memcpy(&u, &v, 4);
            u |= s;
        }
        exact &= memcmp(&f[i], &u, 4) == 0;
    }
    EXPECT(exact, "convert_f16_f32: every float16 bit pattern exactly, NaN payloads kept");
    for (int i = 0; i < N; i++) {
        uint32_t u = (uint32_t)(frand() * 2147483648.0f) * 2u + (uint32_t)(i & 1);
        x[i] = i % 3 == 0 ? f32_of_bits(u) : frand() * (float)(1 << (i % 20)) * (i & 2 ? 1.0f : 0x1p-20f);
    }
    x[5] = f32_of_bits(0x7f800001u), x[6] = f32_of_bits(0xffc00000u), x[7] = f32_of_bits(0x7fbfe000u);
    x[8] = 65520.0f, x[9] = f32_of_bits(0x477fefffu), x[10] = 0x3p-25f, x[11] = 0x1p-25f;
    x[40] = f32_of_bits(0x7f802000u); /* a NaN inside the third vector of either path */
    CHECK(ak_convert_f32_f16_naive(h2, x, N));
    CHECK(ak_round_f16_naive(r, x, N));
    int same = h2[5] == 0x7c01u && h2[6] == 0xfe00u && h2[7] == 0x7dffu && h2[8] == 0x7c00u && h2[9] == 0x7bffu &&
               h2[10] == 0x0002u && h2[11] == 0x0000u && h2[40] == 0x7c01u;
    for (int i = 0; i < N; i++) {
        if (isnan(x[i])) continue;
        float back = 0.0f;
        CHECK(ak_convert_f16_f32_naive(&back, &h2[i], 1));
        same &= memcmp(&back, &r[i], 4) == 0;
    }
    EXPECT(same, "convert_f32_f16: nearest even as round_f16 for non-NaN, NaN payloads as numpy");
    const int isas[3] = {AK_ISA_SCALAR, AK_ISA_AVX2, AK_ISA_AVX512};
    for (int k = 0; k < 3; k++) {
        if (!ak_cpu_supports_isa(isas[k])) continue;
        CHECK(ak_set_isa(isas[k]));
        CHECK(ak_convert_f16_f32(fg, h, NH));
        CHECK(ak_convert_f32_f16(hg, x, N));
        int ok = memcmp(fg, f, sizeof f) == 0 && memcmp(hg, h2, sizeof hg) == 0;
        for (int len = 1; len <= 33; len++) /* each tail length */
            for (int at = 0; at + len <= 96; at += 11) {
                CHECK(ak_convert_f32_f16(hg, x + at, len));
                CHECK(ak_convert_f16_f32(fg, h + 0x7bf0 + at, len)); /* the largest finite values, infinity, NaNs */
                ok &= memcmp(hg, h2 + at, (size_t)len * 2) == 0 && memcmp(fg, f + 0x7bf0 + at, (size_t)len * 4) == 0;
            }
        EXPECT(ok, "convert_f16 isa %d: the scalar code's bits both ways", isas[k]);
    }
    CHECK(ak_set_isa(AK_ISA_AUTO));
    EXPECT(ak_convert_f32_f16(NULL, x, 1) == AK_ERR_NULL_POINTER && ak_convert_f32_f16(hg, NULL, 1) == AK_ERR_NULL_POINTER &&
               ak_convert_f16_f32(NULL, h, 1) == AK_ERR_NULL_POINTER && ak_convert_f16_f32(fg, NULL, 1) == AK_ERR_NULL_POINTER &&
               ak_convert_f32_f16(hg, x, -1) == AK_ERR_INVALID_SIZE && ak_convert_f16_f32(fg, h, -1) == AK_ERR_INVALID_SIZE &&
               ak_convert_f32_f16(hg, x, 0) == AK_OK && ak_convert_f16_f32(fg, h, 0) == AK_OK,
           "convert_f16 argument checks");
}

static double f64_of_bits(uint64_t u) {
    double d;
    memcpy(&d, &u, sizeof d);
    return d;
}

/* float64 rounded to float16 and bfloat16 precision: hand-derived values, among them the ones a rounding through
 * float32 gets wrong for float16 (just above a tie between two float16 values, within float32's last bit of it)
 * and bfloat16's defined double rounding (a float64 just above a bfloat16 tie that float32 rounds onto the tie);
 * then every path bit for bit the scalar code on random bit patterns and values, every tail length, in place. */
static void test_round_f64(void) {
    const double in16[] = {0.0, -0.0, 1.0 + 0x1p-11 + 0x1p-40, 1.0 + 0x1p-11, 1.0 + 0x3p-11, 65519.99999, 65520.0,
                           0x1p-25, 0x1p-25 + 0x1p-60, -0x3p-25, 1e300, -INFINITY, 0x1.ffep-15};
    const double want16[] = {0.0, -0.0, 1.0 + 0x1p-10, 1.0, 1.0 + 0x2p-10, 65504.0, INFINITY,
                             0.0, 0x1p-24, -0x2p-24, INFINITY, -INFINITY, 0x1p-14};
    const double inb[] = {1.0 + 0x1p-8 + 0x1p-40, 1.0 + 0x1p-8 + 0x1p-20, 1.0 + 0x3p-8, 3.4e38, -2.5};
    const double wantb[] = {1.0, 1.0 + 0x1p-7, 1.0 + 0x4p-8, INFINITY, -2.5};
    enum { N16 = sizeof in16 / sizeof in16[0], NB = sizeof inb / sizeof inb[0], N = 2053 };
    static double x[N], ref[2][N], got[N], one[N];
    double w[N16 > NB ? N16 : NB];
    CHECK(ak_round_f64_naive(w, in16, N16, AK_ROUND_F16));
    int exact = memcmp(w, want16, sizeof want16) == 0;
    CHECK(ak_round_f64_naive(w, inb, NB, AK_ROUND_BF16));
    exact &= memcmp(w, wantb, sizeof wantb) == 0;
    EXPECT(exact, "round_f64: boundary values of float16 and bfloat16");
    for (int i = 0; i < N; i++) {
        uint64_t u = ((uint64_t)(uint32_t)(frand() * 2147483648.0f) << 33) ^ (uint64_t)(uint32_t)(frand() * 2e9f);
        x[i] = i % 3 == 0 ? f64_of_bits(u) : (double)frand() * ldexp(1.0, i % 40 - 24);
    }
    x[5] = NAN, x[6] = -NAN;
    const int formats[2] = {AK_ROUND_F16, AK_ROUND_BF16};
    for (int f = 0; f < 2; f++) {
        CHECK(ak_round_f64_naive(ref[f], x, N, formats[f]));
        EXPECT(isnan(ref[f][5]) && isnan(ref[f][6]), "round_f64 format %d: NaN stays NaN", formats[f]);
    }
    const int isas[3] = {AK_ISA_SCALAR, AK_ISA_AVX2, AK_ISA_AVX512};
    for (int k = 0; k < 3; k++) {
        if (!ak_cpu_supports_isa(isas[k])) continue;
        CHECK(ak_set_isa(isas[k]));
        for (int f = 0; f < 2; f++) {
            CHECK(ak_round_f64(got, x, N, formats[f]));
            int same = memcmp(got, ref[f], sizeof got) == 0;
            for (int len = 1; len <= 17; len++)
                for (int at = 0; at + len <= 64; at += 7) {
                    CHECK(ak_round_f64(one, x + at, len, formats[f]));
                    same &= memcmp(one, ref[f] + at, (size_t)len * 8) == 0;
                }
            memcpy(one, x, sizeof x);
            CHECK(ak_round_f64(one, one, N, formats[f]));
            EXPECT(same && memcmp(one, ref[f], sizeof one) == 0, "round_f64 isa %d format %d: the scalar bits",
                   isas[k], formats[f]);
        }
    }
    CHECK(ak_set_isa(AK_ISA_AUTO));
    EXPECT(ak_round_f64(NULL, x, 1, AK_ROUND_F16) == AK_ERR_NULL_POINTER &&
               ak_round_f64(got, x, -1, AK_ROUND_F16) == AK_ERR_INVALID_SIZE &&
               ak_round_f64(got, x, 1, 3) == AK_ERR_INVALID_ARGUMENT && ak_round_f64(got, x, 0, AK_ROUND_BF16) == AK_OK,
           "round_f64 argument checks");
}

/* The pool's hand-over (spin, then sleep; see AK_SPIN_NS in core.c) under changing thread counts: jobs back to
 * back (workers still spinning), after a pause longer than the spin (workers asleep), and with fewer
 * participants than workers (tid >= nth must skip a job without reading it).  Every result is bitwise the
 * one-thread result, and no job is lost or run twice (a lost job hangs, a repeated one would race on C). */
static void test_pool_handover(void) {
    enum { T = 24, C = 96, OC = 256 }; /* 2*T*C*OC = 1.2 MFLOP: above the threshold, so every call dispatches */
    float *x = rand_buf(T * C), *w = rand_buf(OC * C), *b = rand_buf(OC);
    float *ref = galloc(T * OC), *out = galloc(T * OC);
    CHECK(ak_set_num_threads(1));
    CHECK(ak_matmul(ref, x, w, NULL, b, T, C, OC, AK_DTYPE_F32));
    int bad = 0;
    for (int i = 0; i < 600; i++) {
        CHECK(ak_set_num_threads(1 + i % 4));
        if (i % 50 == 49) { /* longer than the spin: the workers go to sleep and must be woken */
            struct timespec ts = {0, 1000000};
            nanosleep(&ts, NULL);
        }
        for (int j = 0; j < T * OC; j++) out[j] = -1.0f;
        CHECK(ak_matmul(out, x, w, NULL, b, T, C, OC, AK_DTYPE_F32));
        bad += memcmp(out, ref, (size_t)T * OC * 4) != 0;
    }
    EXPECT(bad == 0, "%d of 600 pooled matmuls differ from the one-thread result", bad);
    EXPECT(guard_ok(out, T * OC), "pool: guard overwritten");
    CHECK(ak_set_num_threads(2));
    free(x); free(w); free(b); free(ref); free(out);
}

/* ak_set_isa from another thread while ak_matmul runs on a packed weight with 2 threads: every result still
 * equals the naive loop. ak_gemm splits the columns among its workers in units of its kernel's width and
 * the workers must use that same kernel: a worker that read the ISA again could start mid-panel (a 16-wide
 * split under a 32-wide kernel reads across two panels of the packed weight). Flips between the two widest
 * paths the CPU has, so the test means the same on an AVX2-only machine (avx2/scalar). */
static int g_flip_stop;
static int g_flip_isas[2];
static void *isa_flipper(void *arg) {
    (void)arg;
    while (!__atomic_load_n(&g_flip_stop, __ATOMIC_RELAXED)) {
        ak_set_isa(g_flip_isas[0]);
        ak_set_isa(g_flip_isas[1]);
    }
    return NULL;
}
static void test_isa_switch_during_matmul(void) {
    int n = 0;
    for (int isa = AK_ISA_AVX512; isa >= AK_ISA_SCALAR && n < 2; isa--)
        if (ak_cpu_supports_isa(isa)) g_flip_isas[n++] = isa;
    if (n < 2) return;
    enum { T = 24, C = 64, OC = 544 }; /* 34 units of 16 split 17/17 at column 272, not a multiple of 32 */
    float *inp = rand_buf((size_t)T * C), *w = rand_buf((size_t)OC * C), *b = rand_buf(OC);
    float *ref = galloc((size_t)T * OC), *out = galloc((size_t)T * OC);
    float *pk = malloc((size_t)ak_packed_size(C, OC) * sizeof(float));
    CHECK(ak_set_isa(g_flip_isas[0]));
    int layout = ak_packed_layout(); /* the widest path's layout */
    CHECK(ak_pack_weight_f32(pk, w, C, OC, 1, layout));
    CHECK(ak_matmul_naive(ref, inp, w, NULL, b, T, C, OC, AK_DTYPE_F32));
    CHECK(ak_set_num_threads(2));
    pthread_t th;
    __atomic_store_n(&g_flip_stop, 0, __ATOMIC_RELAXED);
    if (pthread_create(&th, NULL, isa_flipper, NULL) != 0) { /* no flipping thread: the test would prove nothing */
        fprintf(stderr, "%s:%d: pthread_create failed\n", __FILE__, __LINE__);
        exit(1);
    }
    int bad = 0;
    for (int it = 0; it < 2000; it++) {
        CHECK(ak_matmul(out, inp, pk, NULL, b, T, C, OC, layout));
        bad += memcmp(out, ref, (size_t)T * OC * 4) != 0;
    }
    __atomic_store_n(&g_flip_stop, 1, __ATOMIC_RELAXED);
    pthread_join(th, NULL);
    EXPECT(bad == 0, "%d of 2000 matmuls differ from the naive loop while the ISA switched (%s/%s)", bad,
           ak_isa_name(g_flip_isas[0]), ak_isa_name(g_flip_isas[1]));
    EXPECT(guard_ok(out, (size_t)T * OC), "guard isa switch");
    CHECK(ak_set_isa(AK_ISA_AUTO));
    CHECK(ak_set_num_threads(1));
    free(inp); free(w); free(b); free(ref); free(out); free(pk);
}

/* float64 matmul on a packed weight (gemm64.c): the naive chain's bits on every path, thread count and tile, from
 * either orientation; the naive chain itself within the fma chain's bound of the exact sum (|error| <= K u sum
 * |x w| to first order, u = 2^-53: each of the K roundings is at most u times a partial sum, itself at most the
 * sum of |x w|, so 1.01 K u covers the second-order terms for K u << 1); NaN and Inf rows; argument checks. */
static double *rand_buf64(size_t n) {
    double *p = (double *)galloc(2 * n); /* the guard: GUARD floats past 2n floats */
    for (size_t i = 0; i < n; i++) p[i] = (double)frand() + (double)frand() * 0x1p-24; /* all 53 bits in use */
    return p;
}

static void test_matmul_f64_values(const double *x, const double *w, const double *out, int T, int K, int N) {
    int bad = 0;
    for (int t = 0; t < T; t++)
        for (int n = 0; n < N; n++) {
            long double exact = 0, mag = 0;
            for (int k = 0; k < K; k++) {
                exact += (long double)x[(int64_t)t * K + k] * w[(int64_t)n * K + k];
                mag += fabsl((long double)x[(int64_t)t * K + k] * w[(int64_t)n * K + k]);
            }
            bad += fabsl(out[(int64_t)t * N + n] - exact) > 1.01L * K * 0x1p-53L * mag;
        }
    EXPECT(bad == 0, "matmul_f64_naive T=%d K=%d N=%d: %d elements beyond K u sum|x w|", T, K, N, bad);
}

static void test_matmul_f64(void) {
    const int shapes[][3] = {{1, 1, 1},    {1, 384, 1536}, {5, 17, 7},   {12, 64, 16},  {13, 100, 9},
                             {30, 384, 384}, {25, 257, 40}, {7, 600, 24}, {30, 512, 33}, {29, 1536, 48},
                             {260, 300, 70}, {3, 0, 20}};
    int nisa = 0, isas[3];
    for (int isa = 0; isa < 3; isa++) if (ak_cpu_supports_isa(isa)) isas[nisa++] = isa;
    for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); s++) {
        const int T = shapes[s][0], K = shapes[s][1], N = shapes[s][2];
        const size_t no = (size_t)T * N, np = (size_t)ak_packed64_size(K, N);
        double *x = rand_buf64((size_t)T * K + 1), *w = rand_buf64((size_t)N * K + 1), *wt = rand_buf64((size_t)N * K + 1);
        double *ref = rand_buf64(no), *out = rand_buf64(no), *p = rand_buf64(np + 1), *pt = rand_buf64(np + 1);
        for (int n = 0; n < N; n++)
            for (int k = 0; k < K; k++) wt[(int64_t)k * N + n] = w[(int64_t)n * K + k];
        CHECK(ak_pack_weight_f64(p, w, K, N, 1));
        CHECK(ak_pack_weight_f64(pt, wt, K, N, 0));
        EXPECT(memcmp(p, pt, np * sizeof(double)) == 0, "pack_f64 trans=1 and trans=0 differ K=%d N=%d", K, N);
        { /* from float32: the packed bits of its float64 copy, either orientation (padding zeros included) */
            float *w32 = rand_buf((size_t)N * K + 1), *wt32 = rand_buf((size_t)N * K + 1);
            double *w32x = rand_buf64((size_t)N * K + 1), *p32 = rand_buf64(np + 1), *p64 = rand_buf64(np + 1);
            for (int64_t i = 0; i < (int64_t)N * K; i++) w32x[i] = (double)w32[i];
            for (int n = 0; n < N; n++)
                for (int k = 0; k < K; k++) wt32[(int64_t)k * N + n] = w32[(int64_t)n * K + k];
            CHECK(ak_pack_weight_f64(p64, w32x, K, N, 1));
            CHECK(ak_pack_weight_f64_of_f32(p32, w32, K, N, 1));
            EXPECT(memcmp(p32, p64, np * sizeof(double)) == 0, "pack_f64_of_f32 trans=1 K=%d N=%d", K, N);
            memset(p32, 0x7f, np * sizeof(double));
            CHECK(ak_pack_weight_f64_of_f32(p32, wt32, K, N, 0));
            EXPECT(memcmp(p32, p64, np * sizeof(double)) == 0, "pack_f64_of_f32 trans=0 K=%d N=%d", K, N);
            free(w32); free(wt32); free(w32x); free(p32); free(p64);
        }
        CHECK(ak_matmul_f64_naive(ref, x, w, T, K, N));
        test_matmul_f64_values(x, w, ref, T, K, N);
        for (int ii = 0; ii < nisa; ii++) {
            CHECK(ak_set_isa(isas[ii]));
            for (int nt = 1; nt <= 3; nt++) {
                CHECK(ak_set_num_threads(nt));
                memset(out, 0x7f, no * sizeof(double)); /* no zero left from the last call can pass */
                CHECK(ak_matmul_f64_packed(out, x, p, T, K, N));
                EXPECT(memcmp(out, ref, no * sizeof(double)) == 0, "matmul_f64 T=%d K=%d N=%d isa=%d nt=%d", T, K, N,
                       isas[ii], nt);
                EXPECT(guard_ok((float *)out, 2 * no), "guard matmul_f64 T=%d K=%d N=%d", T, K, N);
                memset(out, 0x7f, no * sizeof(double));
                CHECK(ak_matmul_f64(out, x, w, T, K, N)); /* the unpacked weight, packed per call */
                EXPECT(memcmp(out, ref, no * sizeof(double)) == 0, "matmul_f64 unpacked T=%d K=%d N=%d isa=%d nt=%d",
                       T, K, N, isas[ii], nt);
                EXPECT(guard_ok((float *)out, 2 * no), "guard matmul_f64 unpacked T=%d K=%d N=%d", T, K, N);
            }
        }
        CHECK(ak_set_isa(AK_ISA_AUTO));
        CHECK(ak_set_num_threads(1));
        free(x); free(w); free(wt); free(ref); free(out); free(p); free(pt);
    }
}

static void test_matmul_f64_nan_and_arguments(void) {
    enum { T = 14, K = 300, N = 21 };
    double *x = rand_buf64(T * K), *w = rand_buf64(N * K), *p = rand_buf64((size_t)ak_packed64_size(K, N));
    double *out = rand_buf64(T * N), *ref = rand_buf64(T * N);
    x[3 * K + 299] = NAN;    /* row 3, at the last k: every output NaN */
    x[5 * K + 7] = INFINITY; /* row 5: every weight at k = 7 is nonzero (frand), so every output +-Inf */
    CHECK(ak_pack_weight_f64(p, w, K, N, 1));
    CHECK(ak_matmul_f64_naive(ref, x, w, T, K, N));
    int nan3 = 0, inf5 = 0;
    for (int n = 0; n < N; n++) nan3 += isnan(ref[3 * N + n]) != 0, inf5 += isinf(ref[5 * N + n]) != 0;
    EXPECT(nan3 == N && inf5 == N, "naive: %d NaN in row 3, %d Inf in row 5 of %d", nan3, inf5, N);
    for (int isa = 0; isa < 3; isa++) {
        if (!ak_cpu_supports_isa(isa)) continue;
        CHECK(ak_set_isa(isa));
        CHECK(ak_matmul_f64_packed(out, x, p, T, K, N));
        EXPECT(memcmp(out, ref, sizeof(double) * T * N) == 0, "matmul_f64 NaN/Inf rows isa=%d", isa);
        CHECK(ak_matmul_f64(out, x, w, T, K, N));
        EXPECT(memcmp(out, ref, sizeof(double) * T * N) == 0, "matmul_f64 unpacked NaN/Inf rows isa=%d", isa);
    }
    CHECK(ak_set_isa(AK_ISA_AUTO));
    EXPECT(ak_packed64_size(-1, 3) == -1 && ak_packed64_size(3, 17) == 3 * 32, "packed64_size");
    EXPECT(ak_pack_weight_f64(NULL, w, K, N, 1) == AK_ERR_NULL_POINTER, "pack NULL");
    EXPECT(ak_pack_weight_f64(p, w, K, N, 2) == AK_ERR_INVALID_ARGUMENT, "pack trans=2");
    EXPECT(ak_pack_weight_f64(p, w, -1, N, 1) == AK_ERR_INVALID_SIZE, "pack K<0");
    EXPECT(ak_pack_weight_f64_of_f32(p, NULL, K, N, 1) == AK_ERR_NULL_POINTER, "pack_of_f32 NULL w");
    EXPECT(ak_pack_weight_f64_of_f32(NULL, (const float *)w, K, N, 1) == AK_ERR_NULL_POINTER, "pack_of_f32 NULL");
    EXPECT(ak_pack_weight_f64_of_f32(p, (const float *)w, K, N, 2) == AK_ERR_INVALID_ARGUMENT, "pack_of_f32 trans=2");
    EXPECT(ak_pack_weight_f64_of_f32(p, (const float *)w, K, -1, 1) == AK_ERR_INVALID_SIZE, "pack_of_f32 N<0");
    EXPECT(ak_matmul_f64_packed(out, NULL, p, T, K, N) == AK_ERR_NULL_POINTER, "matmul_f64 NULL");
    EXPECT(ak_matmul_f64_packed(out, x, p, T, K, -1) == AK_ERR_INVALID_SIZE, "matmul_f64 N<0");
    EXPECT(ak_matmul_f64_naive(NULL, x, w, T, K, N) == AK_ERR_NULL_POINTER, "naive NULL");
    EXPECT(ak_matmul_f64(out, x, NULL, T, K, N) == AK_ERR_NULL_POINTER, "unpacked NULL");
    EXPECT(ak_matmul_f64(out, x, w, -1, K, N) == AK_ERR_INVALID_SIZE, "unpacked T<0");
    free(x); free(w); free(p); free(out); free(ref);
}

/* uniform affine quantisation (ONNX QuantizeLinear / DequantizeLinear): hand-derived values with scale 0.1f and
 * zero point 10 on [0, 255]: 0.35 is 3.5 steps in float32 (0.35f / 0.1f rounds up to the tie, which goes to the
 * even 4), 3.4999999 in float64 (which would give 3); 0.25 is the tie 2.5 (to 2); the clip at both ends, infinities
 * clipped, NaN kept; then every path bit for bit the plain loop on random values, a scale per tensor, row and
 * column, every row length from 1 to 19 (the vector loops' tails), and in place. */
static void test_quantise_f64(void) {
    const double in[] = {0.25, 0.35, 0.45, 100.0, -100.0, INFINITY, -INFINITY, 0.0, -0.0, NAN};
    const double want[] = {12.0, 14.0, 14.0, 255.0, 0.0, 255.0, 0.0, 10.0, 10.0};
    enum { NH = sizeof in / sizeof in[0], R = 23, C = 19 };
    const float s1 = 0.1f;
    const double z1 = 10.0;
    double q[NH], dq[NH];
    CHECK(ak_quantise_f64_naive(q, in, &s1, &z1, 1, NH, AK_QUANT_TENSOR, 0.0, 255.0, 0));
    CHECK(ak_quantise_f64_naive(dq, in, &s1, &z1, 1, NH, AK_QUANT_TENSOR, 0.0, 255.0, 1));
    int exact = memcmp(q, want, sizeof want) == 0 && isnan(q[NH - 1]) && isnan(dq[NH - 1]);
    for (int i = 0; i < NH - 1; i++) exact &= dq[i] == (want[i] - 10.0) * (double)0.1f;
    EXPECT(exact, "quantise_f64: hand-derived values (float32 quotient, ties to even, clip, NaN)");
    static double x[R * C], ref[R * C], got[R * C];
    float scale[R > C ? R : C];
    double zp[R > C ? R : C];
    for (int i = 0; i < R * C; i++) x[i] = (double)frand() * 40.0 + (i % 11 == 0 ? 0.5 : 0.0);
    x[3] = NAN, x[4] = INFINITY, x[5] = -INFINITY;
    for (int i = 0; i < (R > C ? R : C); i++) scale[i] = 0.05f + 0.01f * (float)(i % 7), zp[i] = (double)(i % 200);
    const int pers[3] = {AK_QUANT_TENSOR, AK_QUANT_ROW, AK_QUANT_COLUMN};
    const int isas[3] = {AK_ISA_SCALAR, AK_ISA_AVX2, AK_ISA_AVX512};
    for (int p = 0; p < 3; p++)
        for (int dequantise = 0; dequantise < 2; dequantise++) {
            CHECK(ak_quantise_f64_naive(ref, x, scale, zp, R, C, pers[p], 0.0, 255.0, dequantise));
            for (int k = 0; k < 3; k++) {
                if (!ak_cpu_supports_isa(isas[k])) continue;
                CHECK(ak_set_isa(isas[k]));
                CHECK(ak_quantise_f64(got, x, scale, zp, R, C, pers[p], 0.0, 255.0, dequantise));
                int same = memcmp(got, ref, sizeof got) == 0;
                for (int len = 1; len <= C && pers[p] != AK_QUANT_COLUMN; len++) {
                    CHECK(ak_quantise_f64(got, x, scale, zp, 1, len, pers[p], 0.0, 255.0, dequantise));
                    same &= memcmp(got, ref, (size_t)len * sizeof(double)) == 0;
                }
                memcpy(got, x, sizeof x);
                CHECK(ak_quantise_f64(got, got, scale, zp, R, C, pers[p], 0.0, 255.0, dequantise));
                EXPECT(same && memcmp(got, ref, sizeof got) == 0, "quantise_f64 isa %d per %d dequantise %d: the "
                       "plain loop's bits", isas[k], pers[p], dequantise);
            }
            CHECK(ak_set_isa(AK_ISA_AUTO));
        }
    EXPECT(ak_quantise_f64(NULL, x, scale, zp, 1, 1, AK_QUANT_TENSOR, 0.0, 255.0, 0) == AK_ERR_NULL_POINTER &&
               ak_quantise_f64(got, x, scale, zp, -1, 1, AK_QUANT_TENSOR, 0.0, 255.0, 0) == AK_ERR_INVALID_SIZE &&
               ak_quantise_f64(got, x, scale, zp, 1, 1, 3, 0.0, 255.0, 0) == AK_ERR_INVALID_ARGUMENT &&
               ak_quantise_f64(got, x, scale, zp, 1, 1, AK_QUANT_ROW, 5.0, 1.0, 0) == AK_ERR_INVALID_ARGUMENT &&
               ak_quantise_f64(NULL, NULL, NULL, NULL, 0, 4, AK_QUANT_ROW, 0.0, 1.0, 0) == AK_OK,
           "quantise_f64 argument checks");
}

int main(void) {
    test_matmul();
    test_attention();
    test_attention_padded();
    test_moe();
    test_moe_scratch();
    test_pack_roundtrip();
    test_matmul_packed();
    test_prefetch_past_the_weight();
    test_moe_packed();
    test_small_ops();
    test_gelu_avx2_matches_avx512();
    test_compare();
    test_fletcher32();
    test_perturb();
    test_erf();
    test_round_f16();
    test_convert_f16();
    test_round_f64();
    test_quantise_f64();
    test_matmul_f64();
    test_matmul_f64_nan_and_arguments();
    test_pool_handover();
    test_isa_switch_during_matmul();
    printf("%d passed, %d failed\n", g_pass, g_fail);
    return g_fail ? 1 : 0;
}
