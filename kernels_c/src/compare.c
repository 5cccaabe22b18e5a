/*
 * compare.c -- error sums between an engine array and a reference array (actdiff.compare.metrics).
 *
 * The comparison of two dumps computes a dozen metrics per (prompt, node); in numpy that is ~30 array
 * passes with float64 temporaries per call. Here it is one vectorised pass (the sums, the maxima, the first
 * position of the largest difference and the count of finite pairs) with double accumulators, and a count of
 * NaN/Inf only where there are any; the Python side derives max abs, mean abs, RMSE, relative L2, cosine, SQNR,
 * NMSE from them.
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

static inline int finite_bits(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return (u & 0x7f800000u) != 0x7f800000u;
}

/* The eight lanes as vectors (GCC vector extensions, ak_internal.h): lane l holds the positions i with i % 8 == l,
 * the lanes of ak_internal.h, so each ISA path adds the same numbers in the same order as the scalar loop. Two fours
 * on AVX2 and in portable C (four doubles are one AVX register; an eight-wide type would go through the stack on
 * AVX2), one eight on AVX-512 (one zmm register per accumulator: 1.85 -> 1.35 ns a position at 7680 positions,
 * Intel Xeon model 207). Non-finite positions are zeroed with bit masks (a select would need C++). Written as
 * scalar lanes the loops were not vectorised: 3-7 ns per position, about as long as the node's replayed matmul
 * at short prompts; ak_rel_l2's were not either, until it took the same vectors (0.92 -> 0.43 ns). A scalar
 * operand of a vector operation is broadcast. */
/* int32 lanes: -1 where both floats are finite */
#define FINITEV(VI, fe, fr) ((((VI)(fe) & 0x7f800000) != 0x7f800000) & (((VI)(fr) & 0x7f800000) != 0x7f800000))
/* ordered_int per lane, in int32 (a negative float's bits i map to INT32_MIN - i, which stays in range;
 * computed unsigned, where the wrap-around is defined) */
#define ORDEREDV(VI, VU, f)                                                                           \
    ({                                                                                                \
        VI i_ = (VI)(f), neg_ = i_ < 0;                                                               \
        ((VI)(0x80000000u - (VU)i_) & neg_) | (i_ & ~neg_);                                           \
    })

#define COUNT_FLUSH ((INT64_C(1) << 30) - 1) /* positions between flushes of the int32 count lanes */

/* One pass over the positions where both values are finite (non-finite positions add zeros and hold no maximum):
 * the five sums (sums[0..4]: |d|, d^2, ref^2, eng^2, eng*ref), the largest |d| and ULP distance, and their count.
 * The maxima are taken with compare-and-mask (|d| and ULP distances are never NaN or negative) and do not depend
 * on the order; the sums are the lanes' sums above. The body is compiled once per ISA path (AK_ISA_VARIANTS
 * below) and picked by ak_isa(), like every other kernel, so ACTDIFF_KERNELS_ISA / ak_set_isa() reach it and the
 * tests run each path on any CPU that has it (target_clones would pick the best path behind the dispatcher's
 * back and leave the others untested). */
#define DEFINE_COMPARE_BODY(NAME, W, VF, VI, VU, VD, VL, MASKED, CVT_PD, CVT_EPI64, TARGET)                         \
    static inline __attribute__((always_inline)) TARGET void NAME(double sums[5], double *best, int64_t *argmax, \
                                                           int64_t *max_ulp, int64_t *n_valid, const float *eng,  \
                                                           const float *ref, int64_t n) {                        \
        enum { H = LANES / (W) }; /* vectors per block of 8 positions; vector h holds lanes W*h .. W*h+W-1 */    \
        VD sa[H] = {{0}}, se[H] = {{0}}, sr[H] = {{0}}, sq[H] = {{0}}, dt[H] = {{0}}, mb[H] = {{0}}, mu[H] = {{0}}; \
        VI nv[H] = {{0}};                                                                                       \
        VL mi[H], iota = {0};                                                                                   \
        for (int l = 0; l < (W); l++) iota[l] = l;                                                              \
        for (int h = 0; h < H; h++) mi[h] = iota + (W) * h; /* each lane's first position */                    \
        int64_t full = n - n % LANES, valid = 0;                                                                \
        for (int64_t i0 = 0; i0 < full; i0 += LANES) {                                                          \
            for (int h = 0; h < H; h++) {                                                                       \
                VF fe = LOADV(VF, eng + i0 + (W) * h), fr = LOADV(VF, ref + i0 + (W) * h);                      \
                VI ok32 = (MASKED) ? FINITEV(VI, fe, fr) : ~(VI){0};                                            \
                VL ok = CVT_EPI64(ok32);                                                                        \
                VD e = (VD)((VL)CVT_PD(fe) & ok);                                                               \
                VD r = (VD)((VL)CVT_PD(fr) & ok), d = e - r;                                                    \
                VD ad = (VD)((VL)d & INT64_MAX);                                                                \
                sa[h] += ad;                                                                                    \
                se[h] += d * d;                                                                                 \
                sr[h] += r * r;                                                                                 \
                sq[h] += e * e;                                                                                 \
                dt[h] += e * r;                                                                                 \
                VL gt = ad > mb[h]; /* strictly: a lane keeps the first position of its largest |d| */          \
                mb[h] = (VD)(((VL)ad & gt) | ((VL)mb[h] & ~gt));                                                \
                mi[h] = ((iota + (i0 + (W) * h)) & gt) | (mi[h] & ~gt);                                         \
                /* the ULP distance in double: both ordered ints are exact there, and so is their difference */ \
                VD u = CVT_PD(ORDEREDV(VI, VU, fe)) - CVT_PD(ORDEREDV(VI, VU, fr));                             \
                u = (VD)((VL)u & INT64_MAX & ok);                                                               \
                VL ug = u > mu[h];                                                                              \
                mu[h] = (VD)(((VL)u & ug) | ((VL)mu[h] & ~ug));                                                 \
                nv[h] -= ok32; /* ok32 is -1 where both are finite */                                           \
            }                                                                                                   \
            if ((i0 & COUNT_FLUSH) == COUNT_FLUSH - (LANES - 1)) { /* int32 lanes: to the total before they fill */ \
                int32_t cl[LANES];                                                                              \
                memcpy(cl, nv, sizeof cl);                                                                      \
                for (int l = 0; l < LANES; l++) valid += cl[l];                                                 \
                for (int h = 0; h < H; h++) nv[h] = (VI){0};                                                    \
            }                                                                                                   \
        }                                                                                                       \
        double l[5][LANES], bl[LANES], ul[LANES];                                                               \
        int32_t cl[LANES];                                                                                      \
        int64_t il[LANES];                                                                                      \
        const VD *acc[5] = {sa, se, sr, sq, dt};                                                                \
        for (int q = 0; q < 5; q++) memcpy(l[q], acc[q], sizeof l[q]);                                          \
        memcpy(bl, mb, sizeof bl);                                                                              \
        memcpy(il, mi, sizeof il);                                                                              \
        memcpy(ul, mu, sizeof ul);                                                                              \
        memcpy(cl, nv, sizeof cl);                                                                              \
        compare_finish(sums, best, argmax, max_ulp, n_valid, l, bl, il, ul, cl, valid, eng, ref, full, n);      \
    }

/* the maxima and counts of the lanes, then the tail into lanes i % 8 as the scalar loop. The first position of the
 * largest |d| (numpy.argmax's): the smallest of the lanes' first positions of it (il), or a later tail position
 * holding a larger one. A scan for it after the pass took as long as the pass, up to where it stopped. */
static inline __attribute__((always_inline)) void compare_finish(double sums[5], double *best, int64_t *argmax,
                                                                 int64_t *max_ulp, int64_t *n_valid,
                                                                 double l[5][LANES], const double *bl,
                                                                 const int64_t *il, const double *ul,
                                                                 const int32_t *cl, int64_t valid, const float *eng,
                                                                 const float *ref, int64_t full, int64_t n) {
    *best = 0.0;
    *argmax = 0;
    *max_ulp = 0;
    for (int k = 0; k < LANES; k++) {
        if (bl[k] > *best) *best = bl[k];
        if ((int64_t)ul[k] > *max_ulp) *max_ulp = (int64_t)ul[k];
        valid += cl[k];
    }
    if (full > 0) {
        *argmax = full;
        for (int k = 0; k < LANES; k++)
            if (bl[k] == *best && il[k] < *argmax) *argmax = il[k];
    }
    for (int64_t i = full; i < n; i++) {
        float fe = eng[i], fr = ref[i];
        int ok = finite_bits(fe) & finite_bits(fr), k = (int)(i % LANES);
        double e = ok ? (double)fe : 0.0, r = ok ? (double)fr : 0.0, d = e - r;
        l[0][k] += fabs(d);
        l[1][k] += d * d;
        l[2][k] += r * r;
        l[3][k] += e * e;
        l[4][k] += e * r;
        if (fabs(d) > *best) {
            *best = fabs(d);
            *argmax = i;
        }
        if (!ok) continue;
        int64_t u = llabs(ordered_int(fe) - ordered_int(fr));
        if (u > *max_ulp) *max_ulp = u;
        valid++;
    }
    for (int q = 0; q < 5; q++) sums[q] = lanes_total(l[q]);
    *n_valid = valid;
}

DEFINE_COMPARE_BODY(compare_body4, 4, v4f, v4i, v4u, v4d, v4l, 1, CVT4_PD, CVT4_EPI64, )
DEFINE_COMPARE_BODY(compare_body8, 8, v8f, v8i, v8u, v8d, v8l, 1, CVT8_PD, CVT8_EPI64, AVX512_TARGET)
/* the same pass taking every position as finite (no masks: a quarter of the vector operations); where that holds,
 * every mask above is all ones and the results are the same bits. Where it does not, a NaN or Inf reaches one of
 * the sums (eng^2, ref^2 or |d|: finite floats squared and summed in double stay far from its range), which
 * ak_compare sees and runs the masked pass instead. */
DEFINE_COMPARE_BODY(compare_fast4, 4, v4f, v4i, v4u, v4d, v4l, 0, CVT4_PD, CVT4_EPI64, )
DEFINE_COMPARE_BODY(compare_fast8, 8, v8f, v8i, v8u, v8d, v8l, 0, CVT8_PD, CVT8_EPI64, AVX512_TARGET)

/* the AVX-512 path on eight-wide vectors, the others on two fours (an eight-wide type would go through the
 * stack on AVX2): the same lanes, so the same bits */
#define COMPARE_PARAMS                                                                                          \
    (double sums[5], double *best, int64_t *argmax, int64_t *max_ulp, int64_t *n_valid, const float *eng,         \
     const float *ref, int64_t n)
#define COMPARE_ARGS (sums, best, argmax, max_ulp, n_valid, eng, ref, n)
AK_ISA_VARIANTS_WIDE(compare_masked, compare_body8, compare_body4, COMPARE_PARAMS, COMPARE_ARGS)
AK_ISA_VARIANTS_WIDE(compare_fast, compare_fast8, compare_fast4, COMPARE_PARAMS, COMPARE_ARGS)
/* the unmasked pass, then the masked one where a sum shows a NaN or Inf among the values */
static void compare_pass COMPARE_PARAMS {
    compare_fast COMPARE_ARGS;
    int finite = isfinite(*best);
    for (int q = 0; q < 5; q++) finite &= isfinite(sums[q]) != 0;
    if (finite) return;
    compare_masked COMPARE_ARGS;
}

/* out is one ak_compare_result, eng is (n), ref is (n).
 * Sums run over the positions where both values are finite, in double. */
int ak_compare(ak_compare_result *out, const float *eng, const float *ref, int64_t n) {
    if (!out || ((!eng || !ref) && n > 0)) return AK_ERR_NULL_POINTER;
    if (n < 0) return AK_ERR_INVALID_SIZE;
    memset(out, 0, sizeof *out);
    double sums[5], best;
    compare_pass(sums, &best, &out->argmax, &out->max_ulp, &out->n_valid, eng, ref, n);
    if (out->n_valid < n) /* some value is NaN or Inf: count them (a finite pair adds nothing) */
        for (int64_t i = 0; i < n; i++) {
            float fe = eng[i], fr = ref[i];
            if (isnan(fe)) out->nan_eng++; else if (isinf(fe)) out->inf_eng++;
            if (isnan(fr)) out->nan_ref++; else if (isinf(fr)) out->inf_ref++;
        }
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
#define DEFINE_REL_L2_BODY(NAME, W, VF, VD, CVT_PD, TARGET)                                                      \
    static inline __attribute__((always_inline)) TARGET void NAME(double *num, double *den, const float *a,          \
                                                                  const float *b, int64_t n) {                     \
        enum { H = LANES / (W) }; /* the 8 lanes as compare's bodies hold them */                                    \
        VD sn[H] = {{0}}, sd[H] = {{0}};                                                                             \
        int64_t full = n - n % LANES;                                                                                \
        for (int64_t i0 = 0; i0 < full; i0 += LANES) {                                                               \
            for (int h = 0; h < H; h++) {                                                                            \
                VD x = CVT_PD(LOADV(VF, a + i0 + (W) * h)), y = CVT_PD(LOADV(VF, b + i0 + (W) * h)), d = x - y;      \
                sn[h] += d * d;                                                                                      \
                sd[h] += y * y;                                                                                      \
            }                                                                                                        \
        }                                                                                                            \
        double ln[LANES], ld[LANES];                                                                                 \
        memcpy(ln, sn, sizeof ln);                                                                                   \
        memcpy(ld, sd, sizeof ld);                                                                                   \
        for (int64_t i = full; i < n; i++) {                                                                         \
            double x = a[i], y = b[i], d = x - y;                                                                    \
            ln[i % LANES] += d * d;                                                                                  \
            ld[i % LANES] += y * y;                                                                                  \
        }                                                                                                            \
        *num = lanes_total(ln);                                                                                      \
        *den = lanes_total(ld);                                                                                      \
    }

/* the 8 lanes as two vectors of four (as compare_body4; written as scalar lanes GCC kept them scalar, 0.8 ns a
 * position), one of eight on AVX-512 */
DEFINE_REL_L2_BODY(rel_l2_body4, 4, v4f, v4d, CVT4_PD, )
DEFINE_REL_L2_BODY(rel_l2_body8, 8, v8f, v8d, CVT8_PD, AVX512_TARGET)
AK_ISA_VARIANTS_WIDE(rel_l2_sums, rel_l2_body8, rel_l2_body4,
                     (double *num, double *den, const float *a, const float *b, int64_t n), (num, den, a, b, n))

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
