/*
 * quant.c -- uniform affine quantisation of float64 values (the reference ops' quantise, actdiff.compare.refops).
 *
 * The search for a quantisation (actdiff.compare.search_quant) scores hundreds of candidate ranges per node, each
 * one quantising the node's input sample again: in numpy that was seven passes with float64 and float32
 * temporaries (to float32, divide, round, to float64, add the zero point, clip, dequantise), 3.3 ms for 256 x 1536
 * values against 2.4 ms for the float64 product that follows it. Here it is one pass.
 *
 * Arithmetic (ONNX QuantizeLinear then DequantizeLinear, as refops.quantise_int defines it, in this order):
 *   q   = clip((double)rintf((float)x / s) + zp, qmin, qmax)   (a float32 division, rounded half to even)
 *   out = q, or (q - zp) * (double)s where dequantise
 * with s (float32) and zp (double, a whole number) one per tensor, row or column. The clip keeps a NaN (the
 * comparisons are false for it), as numpy's clip does. Every step is a plain IEEE operation with no contraction
 * (the library is built -std=c11), so each ISA path gives the scalar code's bits, which the tests check.
 */
#include <math.h>

#include "actdiff_kernels.h"
#include "ak_internal.h"

static inline __attribute__((always_inline)) double quant_one(double x, float s, double zp, double qmin, double qmax,
                                                              int dequantise) {
    double q = (double)rintf((float)x / s) + zp;
    q = q < qmin ? qmin : (q > qmax ? qmax : q);
    return dequantise ? (q - zp) * (double)s : q;
}

/* out (rows, cols) = x (rows, cols) quantised with scale/zp [0], [row] or [col] (per) */
static inline __attribute__((always_inline)) void quant_body(double *out, const double *x, const float *scale,
                                                             const double *zp, int64_t rows, int64_t cols, int per,
                                                             double qmin, double qmax, int dequantise) {
    for (int64_t r = 0; r < rows; r++) {
        const double *xr = x + r * cols;
        double *o = out + r * cols;
        if (per == AK_QUANT_COLUMN) {
            for (int64_t c = 0; c < cols; c++) o[c] = quant_one(xr[c], scale[c], zp[c], qmin, qmax, dequantise);
        } else {
            const int64_t at = per == AK_QUANT_ROW ? r : 0;
            const float s = scale[at];
            const double z = zp[at];
            for (int64_t c = 0; c < cols; c++) o[c] = quant_one(xr[c], s, z, qmin, qmax, dequantise);
        }
    }
}

AK_ISA_VARIANTS(quant_rows, quant_body,
                (double *out, const double *x, const float *scale, const double *zp, int64_t rows, int64_t cols,
                 int per, double qmin, double qmax, int dequantise),
                (out, x, scale, zp, rows, cols, per, qmin, qmax, dequantise))

static int quant_check(double *out, const double *x, const float *scale, const double *zp, int64_t rows, int64_t cols,
                       int per, double qmin, double qmax) {
    if (rows < 0 || cols < 0) return AK_ERR_INVALID_SIZE;
    if (rows * cols > 0 && (!out || !x || !scale || !zp)) return AK_ERR_NULL_POINTER;
    if (per != AK_QUANT_TENSOR && per != AK_QUANT_ROW && per != AK_QUANT_COLUMN) return AK_ERR_INVALID_ARGUMENT;
    if (!(qmin <= qmax)) return AK_ERR_INVALID_ARGUMENT;
    return AK_OK;
}

int ak_quantise_f64(double *out, const double *x, const float *scale, const double *zp, int64_t rows, int64_t cols,
                    int per, double qmin, double qmax, int dequantise) {
    int st = quant_check(out, x, scale, zp, rows, cols, per, qmin, qmax);
    if (st != AK_OK) return st;
    if (rows * cols > 0) quant_rows(out, x, scale, zp, rows, cols, per, qmin, qmax, dequantise != 0);
    return AK_OK;
}

/* ---- reference: one plain loop over every value, its scale and zero point looked up by position ---- */
int ak_quantise_f64_naive(double *out, const double *x, const float *scale, const double *zp, int64_t rows,
                          int64_t cols, int per, double qmin, double qmax, int dequantise) {
    int st = quant_check(out, x, scale, zp, rows, cols, per, qmin, qmax);
    if (st != AK_OK) return st;
    for (int64_t i = 0; i < rows * cols; i++) {
        int64_t at = per == AK_QUANT_TENSOR ? 0 : per == AK_QUANT_ROW ? i / cols : i % cols;
        float d = (float)x[i] / scale[at];
        double q = (double)rintf(d) + zp[at];
        if (q < qmin) q = qmin;
        if (q > qmax) q = qmax;
        out[i] = dequantise ? (q - zp[at]) * (double)scale[at] : q;
    }
    return AK_OK;
}
