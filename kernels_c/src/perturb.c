/*
 * perturb.c -- the propagated budget's perturbation of one node's float64 values (actdiff.compare.propagation).
 *
 * The propagation simulation adds, at every node of every prompt it simulates, an error of the node's budget to the
 * spec op's value and measures the result against the reference's: per-feature sums of squares of y, two norms,
 * the scaled sum of a shared and an independent part, and a relative L2. In numpy that was a dozen passes with
 * float64 temporaries per (prompt, node), a large one freshly page-faulted each time: 0.2-0.6 ms for 10^4-10^5
 * values, 7 % of the default report's CPU. Here it is two passes: the column sums, then the output with the error
 * sums against the reference.
 *
 * Arithmetic (what the Python definition computes, in this order):
 *   col[f] = sum_t y[t,f]^2 (t increasing), yn = sqrt(sum_f col[f]), sn = sqrt(sum_f col[f] * s[f]^2),
 *   gn = sqrt(sum_i (double)g[i]^2), c = budget * yn / sqrt(2);
 *   out[t,f] = y[t,f] * (1 + (c / sn) * s[f])          (out = y where sn is 0)
 *            + (double)(g[t*F+f] * (float)(c / gn))    (a float32 product, as the float32 draws; where gn > 0)
 * Every step is a plain double operation (no contraction: the library is built -std=c11, where GCC does not
 * fuse a * b + c), so each ISA path gives the same bits, which the test suite checks against the naive loop.
 * The sums over f and i use the 8 interleaved lanes of ak_internal.h (i % 8, as compare.c).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "actdiff_kernels.h"
#include "ak_internal.h"

/* col (F) = per-feature sums of squares of y (T,F), rows in order */
static inline __attribute__((always_inline)) void col_sumsq_body(double *col, const double *y, int64_t T, int64_t F) {
    for (int64_t f = 0; f < F; f++) col[f] = 0.0;
    for (int64_t t = 0; t < T; t++) {
        const double *row = y + t * F;
        for (int64_t f = 0; f < F; f++) col[f] += row[f] * row[f];
    }
}

AK_ISA_VARIANTS(col_sumsq, col_sumsq_body, (double *col, const double *y, int64_t T, int64_t F), (col, y, T, F))

/* sum over the 8 lanes (ak_internal.h) of the n values EXPR(i), lane i % 8, in blocks of 8 (the same sums on
 * explicit vectors, as compare.c's, were slower here: 10.2 against 8.5 us a 20x384 call) */
#define LANE_SUM(n, EXPR)                                                                                       \
    ({                                                                                                           \
        double l_[LANES] = {0};                                                                                  \
        int64_t full_ = (n) - (n) % LANES;                                                                       \
        for (int64_t i0 = 0; i0 < full_; i0 += LANES)                                                           \
            for (int l = 0; l < LANES; l++) {                                                                    \
                int64_t i = i0 + l;                                                                              \
                l_[l] += (EXPR);                                                                                 \
            }                                                                                                    \
        for (int64_t i = full_; i < (n); i++) l_[i % LANES] += (EXPR);                                          \
        lanes_total(l_);                                                                                         \
    })

/* sums (3) = sum col, sum col * s^2, sum (double)g^2 */
static inline __attribute__((always_inline)) void norms_body(double sums[3], const double *col, const float *s,
                                                             const float *g, int64_t F, int64_t n) {
    sums[0] = LANE_SUM(F, col[i]);
    sums[1] = LANE_SUM(F, col[i] * ((double)s[i] * (double)s[i]));
    sums[2] = LANE_SUM(n, (double)g[i] * (double)g[i]);
}

AK_ISA_VARIANTS(norms, norms_body, (double sums[3], const double *col, const float *s, const float *g, int64_t F,
                                    int64_t n),
                (sums, col, s, g, F, n))

/* out = y * factor[f] (+ g * gs as float32), and where ref: err = sums of (out - ref)^2 and ref^2 (lanes of the
 * flat position, as one loop over all T*F values) */
static inline __attribute__((always_inline)) void apply_body(double *out, double err[2], const double *y,
                                                             const double *factor, const float *g, float gs,
                                                             const float *ref, int64_t T, int64_t F) {
    for (int64_t t = 0; t < T; t++) {
        const double *yr = y + t * F;
        double *o = out + t * F;
        for (int64_t f = 0; f < F; f++) o[f] = yr[f] * factor[f];
        if (g) {
            const float *gr = g + t * F;
            for (int64_t f = 0; f < F; f++) o[f] = o[f] + (double)(gr[f] * gs);
        }
    }
    if (ref) {
        const int64_t n = T * F;
        err[0] = LANE_SUM(n, (out[i] - (double)ref[i]) * (out[i] - (double)ref[i]));
        err[1] = LANE_SUM(n, (double)ref[i] * (double)ref[i]);
    }
}

AK_ISA_VARIANTS(perturb_apply, apply_body,
                (double *out, double err[2], const double *y, const double *factor, const float *g, float gs,
                 const float *ref, int64_t T, int64_t F),
                (out, err, y, factor, g, gs, ref, T, F))

typedef void (*col_fn)(double *, const double *, int64_t, int64_t);
typedef void (*apply_fn)(double *, double[2], const double *, const double *, const float *, float, const float *,
                         int64_t, int64_t);
typedef void (*norms_fn)(double[3], const double *, const float *, const float *, int64_t, int64_t);

static int perturb_with(col_fn colf, norms_fn normsf, apply_fn applyf, double *out, double *err, int *done,
                        const double *y, const float *s, const float *g, const float *ref, double budget, int64_t T,
                        int64_t F) {
    if (!out || !done || ((!y || !s) && T * F > 0) || (ref && !err)) return AK_ERR_NULL_POINTER;
    if (T < 0 || F < 0) return AK_ERR_INVALID_SIZE;
    *done = 0;
    double *col = (double *)malloc((size_t)(2 * F + 1) * sizeof(double)), sums[3], e[2] = {0.0, 0.0};
    if (!col) return AK_ERR_OUT_OF_MEMORY;
    double *factor = col + F;
    colf(col, y, T, F);
    normsf(sums, col, s, g, F, g ? T * F : 0);
    double yn = sqrt(sums[0]), sn = sqrt(sums[1]), gn = sqrt(sums[2]);
    if (yn == 0.0 || !isfinite(yn)) {
        free(col);
        return AK_OK; /* nothing to scale: the caller keeps y */
    }
    double c = budget * yn / sqrt(2.0), k = sn > 0.0 ? c / sn : 0.0;
    for (int64_t f = 0; f < F; f++) factor[f] = sn > 0.0 ? 1.0 + k * (double)s[f] : 1.0;
    applyf(out, e, y, factor, gn > 0.0 ? g : NULL, gn > 0.0 ? (float)(c / gn) : 0.0f, ref, T, F);
    free(col);
    if (ref) {
        err[0] = e[0];
        err[1] = e[1];
    }
    *done = 1;
    return AK_OK;
}

int ak_perturb_f64(double *out, double *err, int *done, const double *y, const float *s, const float *g,
                   const float *ref, double budget, int64_t T, int64_t F) {
    return perturb_with(col_sumsq, norms, perturb_apply, out, err, done, y, s, g, ref, budget, T, F);
}

/* ---- reference: the same definition as one plain loop per quantity ---- */
static void col_naive(double *col, const double *y, int64_t T, int64_t F) {
    for (int64_t f = 0; f < F; f++) {
        double acc = 0.0;
        for (int64_t t = 0; t < T; t++) acc += y[t * F + f] * y[t * F + f];
        col[f] = acc;
    }
}

static void norms_naive(double sums[3], const double *col, const float *s, const float *g, int64_t F, int64_t n) {
    double a[LANES] = {0}, b[LANES] = {0}, c[LANES] = {0};
    for (int64_t f = 0; f < F; f++) {
        a[f % LANES] += col[f];
        b[f % LANES] += col[f] * ((double)s[f] * (double)s[f]);
    }
    for (int64_t i = 0; i < n; i++) c[i % LANES] += (double)g[i] * (double)g[i];
    sums[0] = lanes_total(a);
    sums[1] = lanes_total(b);
    sums[2] = lanes_total(c);
}

static void apply_naive(double *out, double err[2], const double *y, const double *factor, const float *g, float gs,
                        const float *ref, int64_t T, int64_t F) {
    double se[LANES] = {0}, sr[LANES] = {0};
    for (int64_t i = 0; i < T * F; i++) {
        double v = y[i] * factor[i % F];
        if (g) v = v + (double)(g[i] * gs);
        out[i] = v;
        if (ref) {
            double d = v - (double)ref[i];
            se[i % LANES] += d * d;
            sr[i % LANES] += (double)ref[i] * (double)ref[i];
        }
    }
    err[0] = lanes_total(se);
    err[1] = lanes_total(sr);
}

int ak_perturb_f64_naive(double *out, double *err, int *done, const double *y, const float *s, const float *g,
                         const float *ref, double budget, int64_t T, int64_t F) {
    return perturb_with(col_naive, norms_naive, apply_naive, out, err, done, y, s, g, ref, budget, T, F);
}
