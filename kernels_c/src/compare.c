/*
 * compare.c -- error sums between an engine array and a reference array (actdiff.compare.metrics).
 *
 * The comparison of two dumps computes a dozen metrics per (prompt, node); in numpy that is ~30 array
 * passes with float64 temporaries per call. Here it is two passes (the sums; counts and maxima) with double
 * accumulators; the Python side derives max abs, mean abs, RMSE, relative L2, cosine, SQNR, NMSE from them.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "actdiff_kernels.h"
#include "ak_internal.h"

/* fp32 bit pattern -> integer ordered like the floats (adjacent floats differ by 1) */
static inline int64_t ordered_int(float x) {
    int32_t i;
    memcpy(&i, &x, sizeof i);
    return i < 0 ? (int64_t)INT32_MIN - (int64_t)i : (int64_t)i;
}

/* Eight interleaved accumulator lanes (position i goes to lane i % 8; lanes are summed pairwise at the end):
 * the additions of one lane depend on each other, the lanes do not, so the loop is not one long chain of
 * dependent double additions, and the compiler can keep the lanes in vector registers (no reassociation is
 * needed, so every ISA clone gives the same bits). ak_compare_naive uses the same lanes: bitwise equal. */
#define LANES 8

static inline int finite_bits(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return (u & 0x7f800000u) != 0x7f800000u;
}

static inline double lanes_total(const double *l) {
    return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

/* pass 1: the five sums over the positions where both values are finite (branch-free, vectorisable).
 * The body is compiled once per ISA path (AK_ISA_VARIANTS below) and picked by ak_isa(), like every other
 * kernel, so ACTDIFF_KERNELS_ISA / ak_set_isa() reach it and the tests run each path on any CPU that has it
 * (target_clones would pick the best path behind the dispatcher's back and leave the others untested). */
static inline __attribute__((always_inline)) void compare_sums_body(double out[5], const float *eng,
                                                                    const float *ref, int64_t n) {
    double sa[LANES] = {0}, se[LANES] = {0}, sr[LANES] = {0}, sq[LANES] = {0}, dt[LANES] = {0};
    int64_t full = n - n % LANES;
    /* one position into lane l: positions where either value is not finite add zeros */
#define COMPARE_ADD(l, fe, fr)                                                                        \
    do {                                                                                              \
        int ok_ = finite_bits(fe) & finite_bits(fr);                                                  \
        double e_ = ok_ ? (double)(fe) : 0.0, r_ = ok_ ? (double)(fr) : 0.0, d_ = e_ - r_;            \
        sa[l] += fabs(d_);                                                                            \
        se[l] += d_ * d_;                                                                             \
        sr[l] += r_ * r_;                                                                             \
        sq[l] += e_ * e_;                                                                             \
        dt[l] += e_ * r_;                                                                             \
    } while (0)
    for (int64_t i0 = 0; i0 < full; i0 += LANES)
        for (int l = 0; l < LANES; l++) COMPARE_ADD(l, eng[i0 + l], ref[i0 + l]);
    for (int64_t i = full; i < n; i++) COMPARE_ADD(i % LANES, eng[i], ref[i]);
#undef COMPARE_ADD
    out[0] = lanes_total(sa);
    out[1] = lanes_total(se);
    out[2] = lanes_total(sr);
    out[3] = lanes_total(sq);
    out[4] = lanes_total(dt);
}

/* NAME_avx512, NAME_avx2, NAME_scalar: the same body compiled for each path, and NAME choosing by ak_isa() */
#define AK_ISA_VARIANTS(NAME, BODY, PARAMS, ARGS)                                                     \
    __attribute__((target("avx512f,avx2,fma"))) static void NAME##_avx512 PARAMS { BODY ARGS; }      \
    __attribute__((target("avx2,fma"))) static void NAME##_avx2 PARAMS { BODY ARGS; }                 \
    static void NAME##_scalar PARAMS { BODY ARGS; }                                                   \
    static void NAME PARAMS {                                                                         \
        int isa_ = ak_isa();                                                                          \
        if (isa_ == AK_ISA_AVX512) NAME##_avx512 ARGS;                                                \
        else if (isa_ == AK_ISA_AVX2) NAME##_avx2 ARGS;                                               \
        else NAME##_scalar ARGS;                                                                      \
    }

AK_ISA_VARIANTS(compare_sums_pass, compare_sums_body,
                (double out[5], const float *eng, const float *ref, int64_t n), (out, eng, ref, n))

/* out is one ak_compare_result, eng is (n), ref is (n).
 * Sums run over the positions where both values are finite, in double. */
int ak_compare(ak_compare_result *out, const float *eng, const float *ref, int64_t n) {
    if (!out || ((!eng || !ref) && n > 0)) return AK_ERR_NULL_POINTER;
    if (n < 0) return AK_ERR_INVALID_SIZE;
    memset(out, 0, sizeof *out);
    double sums[5];
    compare_sums_pass(sums, eng, ref, n);
    /* pass 2 (scalar): counts, the first largest |eng - ref| (as numpy.argmax) and the largest ULP distance */
    double best = -1.0;
    for (int64_t i = 0; i < n; i++) {
        float fe = eng[i], fr = ref[i];
        double ad = 0.0; /* a position where either side is not finite counts as 0 for the argmax */
        if (finite_bits(fe) & finite_bits(fr)) {
            ad = fabs((double)fe - (double)fr);
            int64_t u = ordered_int(fe) - ordered_int(fr);
            if (u < 0) u = -u;
            if (u > out->max_ulp) out->max_ulp = u;
            out->n_valid++;
        } else {
            if (isnan(fe)) out->nan_eng++; else if (isinf(fe)) out->inf_eng++;
            if (isnan(fr)) out->nan_ref++; else if (isinf(fr)) out->inf_ref++;
        }
        if (ad > best) { best = ad; out->argmax = i; }
    }
    if (n == 0) best = 0.0;
    out->max_abs = best;
    out->sum_abs = sums[0];
    out->sum_sq_err = sums[1];
    out->sum_sq_ref = sums[2];
    out->sum_sq_eng = sums[3];
    out->dot = sums[4];
    return AK_OK;
}

/* reference: the same definition written as separate passes per quantity (tests compare the two bitwise) */
static double lane_sum(const float *eng, const float *ref, int64_t n, int what) {
    double lane[LANES] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t i = 0; i < n; i++) {
        if (!isfinite(eng[i]) || !isfinite(ref[i])) continue;
        double e = eng[i], r = ref[i], v;
        switch (what) {
        case 0: v = fabs(e - r); break;
        case 1: v = (e - r) * (e - r); break;
        case 2: v = r * r; break;
        case 3: v = e * e; break;
        default: v = e * r; break;
        }
        lane[i % LANES] += v;
    }
    return lanes_total(lane);
}

int ak_compare_naive(ak_compare_result *out, const float *eng, const float *ref, int64_t n) {
    if (!out || ((!eng || !ref) && n > 0)) return AK_ERR_NULL_POINTER;
    if (n < 0) return AK_ERR_INVALID_SIZE;
    memset(out, 0, sizeof *out);
    for (int64_t i = 0; i < n; i++) {
        out->nan_eng += isnan(eng[i]) != 0;
        out->inf_eng += isinf(eng[i]) != 0;
        out->nan_ref += isnan(ref[i]) != 0;
        out->inf_ref += isinf(ref[i]) != 0;
    }
    double best = -1.0;
    for (int64_t i = 0; i < n; i++) {
        int both = isfinite(eng[i]) && isfinite(ref[i]);
        double ad = both ? fabs((double)eng[i] - (double)ref[i]) : 0.0;
        if (ad > best) { best = ad; out->argmax = i; }
        if (!both) continue;
        out->n_valid++;
        int64_t u = llabs(ordered_int(eng[i]) - ordered_int(ref[i]));
        if (u > out->max_ulp) out->max_ulp = u;
    }
    out->max_abs = n > 0 ? best : 0.0;
    out->sum_abs = lane_sum(eng, ref, n, 0);
    out->sum_sq_err = lane_sum(eng, ref, n, 1);
    out->sum_sq_ref = lane_sum(eng, ref, n, 2);
    out->sum_sq_eng = lane_sum(eng, ref, n, 3);
    out->dot = lane_sum(eng, ref, n, 4);
    return AK_OK;
}

/* ||a - b|| / ||b|| accumulated in double (8 lanes, same order on every ISA path); NaN/Inf propagate as in
 * the arithmetic (no masking), as numpy's definition does. The statistics call this once per node and prompt
 * for the local error, where the full ak_compare would compute a dozen unused numbers. */
static inline __attribute__((always_inline)) void rel_l2_body(double *num, double *den, const float *a,
                                                              const float *b, int64_t n) {
    double sn[LANES] = {0}, sd[LANES] = {0};
    int64_t full = n - n % LANES;
    for (int64_t i0 = 0; i0 < full; i0 += LANES) {
        for (int l = 0; l < LANES; l++) {
            double x = a[i0 + l], y = b[i0 + l], d = x - y;
            sn[l] += d * d;
            sd[l] += y * y;
        }
    }
    for (int64_t i = full; i < n; i++) {
        double x = a[i], y = b[i], d = x - y;
        sn[i % LANES] += d * d;
        sd[i % LANES] += y * y;
    }
    *num = lanes_total(sn);
    *den = lanes_total(sd);
}

AK_ISA_VARIANTS(rel_l2_sums, rel_l2_body, (double *num, double *den, const float *a, const float *b, int64_t n),
                (num, den, a, b, n))

/* out is one double, a is (n), b is (n): out = ||a - b|| / ||b|| (0 when both norms are 0, inf when only b's) */
int ak_rel_l2(double *out, const float *a, const float *b, int64_t n) {
    if (!out || ((!a || !b) && n > 0)) return AK_ERR_NULL_POINTER;
    if (n < 0) return AK_ERR_INVALID_SIZE;
    double num, den;
    rel_l2_sums(&num, &den, a, b, n);
    if (den == 0.0) *out = num == 0.0 ? 0.0 : INFINITY;
    else *out = sqrt(num) / sqrt(den);
    return AK_OK;
}
