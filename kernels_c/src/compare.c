/*
 * compare.c -- one-pass error sums between an engine array and a reference array (actdiff.compare.metrics).
 *
 * The comparison of two dumps computes a dozen metrics per (prompt, node); in numpy that is ~30 array
 * passes with float64 temporaries per call. Here it is one pass with double accumulators; the Python side
 * derives max abs, mean abs, RMSE, relative L2, cosine, SQNR, NMSE from these sums.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "actdiff_kernels.h"

/* fp32 bit pattern -> integer ordered like the floats (adjacent floats differ by 1) */
static inline int64_t ordered_int(float x) {
    int32_t i;
    memcpy(&i, &x, sizeof i);
    return i < 0 ? (int64_t)INT32_MIN - (int64_t)i : (int64_t)i;
}

/* Four interleaved accumulator lanes (position i goes to lane i % 4, lanes summed 0+1+2+3 at the end):
 * the additions of one lane depend on each other, the lanes do not, so the loop is not bound by the
 * latency of one long chain of dependent double additions. The order is fixed, so results are
 * deterministic; ak_compare_naive uses the same lanes and is bitwise equal. */
#define LANES 4

/* out is one ak_compare_result, eng is (n), ref is (n).
 * Sums run over the positions where both values are finite, in double. */
int ak_compare(ak_compare_result *out, const float *eng, const float *ref, int64_t n) {
    if (!out || ((!eng || !ref) && n > 0)) return AK_ERR_NULL_POINTER;
    if (n < 0) return AK_ERR_INVALID_SIZE;
    memset(out, 0, sizeof *out);
    double sum_abs[LANES] = {0}, sq_err[LANES] = {0}, sq_ref[LANES] = {0}, sq_eng[LANES] = {0}, dot[LANES] = {0};
    double max_abs = -1.0;
    int64_t argmax = 0, max_ulp = 0, valid = 0;
    for (int64_t i0 = 0; i0 < n; i0 += LANES) {
        int64_t m = n - i0 < LANES ? n - i0 : LANES;
        for (int64_t l = 0; l < m; l++) {
            int64_t i = i0 + l;
            float fe = eng[i], fr = ref[i];
            double ad = 0.0; /* a position where either side is not finite counts as 0 for the argmax */
            if (isfinite(fe) && isfinite(fr)) {
                double e = fe, r = fr, d = e - r;
                ad = fabs(d);
                sum_abs[l] += ad;
                sq_err[l] += d * d;
                sq_ref[l] += r * r;
                sq_eng[l] += e * e;
                dot[l] += e * r;
                int64_t u = ordered_int(fe) - ordered_int(fr);
                if (u < 0) u = -u;
                if (u > max_ulp) max_ulp = u;
                valid++;
            } else {
                if (isnan(fe)) out->nan_eng++; else if (isinf(fe)) out->inf_eng++;
                if (isnan(fr)) out->nan_ref++; else if (isinf(fr)) out->inf_ref++;
            }
            if (ad > max_abs) { max_abs = ad; argmax = i; } /* strict: the first maximum, as numpy.argmax */
        }
    }
    out->n_valid = valid;
    out->argmax = argmax;
    out->max_ulp = max_ulp;
    out->max_abs = n > 0 ? max_abs : 0.0;
    out->sum_abs = (sum_abs[0] + sum_abs[1]) + (sum_abs[2] + sum_abs[3]);
    out->sum_sq_err = (sq_err[0] + sq_err[1]) + (sq_err[2] + sq_err[3]);
    out->sum_sq_ref = (sq_ref[0] + sq_ref[1]) + (sq_ref[2] + sq_ref[3]);
    out->sum_sq_eng = (sq_eng[0] + sq_eng[1]) + (sq_eng[2] + sq_eng[3]);
    out->dot = (dot[0] + dot[1]) + (dot[2] + dot[3]);
    return AK_OK;
}

/* reference: the same definition written as separate passes per quantity (tests compare the two bitwise) */
static double lane_sum(const float *eng, const float *ref, int64_t n, int what) {
    double lane[LANES] = {0};
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
    return (lane[0] + lane[1]) + (lane[2] + lane[3]);
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
