/*
 * actdiff_kernels.h -- the public C API of the actdiff kernel library.
 *
 * This header is the single source of truth for the Python binding: the build
 * script (src/actdiff/kernels/_build.py) hands the text between the CFFI_BEGIN
 * and CFFI_END markers verbatim to cffi's cdef(), so that region must stay
 * plain C declarations: no preprocessor directives, no macros, no inline code.
 *
 * Conventions (llm.c style):
 *   - every op returns an int status code (AK_OK == 0); ak_status_string()
 *     turns it into text;
 *   - argument order: outputs first, then inputs, then weights, then sizes and
 *     scalar options;
 *   - all tensors are dense, C-contiguous, fp32 unless the comment says
 *     otherwise; the comment above each function gives every shape;
 *   - optional pointers (bias, masks, intermediate outputs) may be NULL where
 *     the comment says "or NULL";
 *   - threads split output rows / output columns / heads, never a reduction
 *     dimension, so results are bitwise identical across runs and thread
 *     counts (and, for matmul, across ISA paths and batch sizes).
 */
#ifndef ACTDIFF_KERNELS_H
#define ACTDIFF_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define AK_VERSION "0.3.0"
#define AK_MAX_THREADS 64
#define AK_PACK_NR 32  /* columns per panel of a packed fp32 weight */
#define AK_PACK_KC 256 /* rows per K block of a packed fp32 weight */
#define AK_PACK64_KC 256 /* rows per K block of a packed float64 weight (ak_pack_weight_f64) */

/* CFFI_BEGIN */

/* ---- status codes ---- */
enum {
    AK_OK = 0,
    AK_ERR_NULL_POINTER = 1,     /* a required pointer was NULL */
    AK_ERR_INVALID_SIZE = 2,     /* a size was negative / zero where not allowed / too large */
    AK_ERR_INVALID_ARGUMENT = 3, /* a scalar option is out of range (dtype, top_k, eps ...) */
    AK_ERR_INDEX_OUT_OF_RANGE = 4, /* an index (token id, expert id) is outside its table */
    AK_ERR_OUT_OF_MEMORY = 5,    /* scratch allocation failed */
    AK_ERR_UNSUPPORTED = 6,      /* e.g. requested ISA not supported by this CPU */
    AK_ERR_THREAD = 7            /* thread creation failed */
};

/* ---- weight storage dtypes for matmul / moe weights ---- */
enum {
    AK_DTYPE_F32 = 0,  /* float */
    AK_DTYPE_F16 = 1,  /* IEEE binary16 stored as uint16_t */
    AK_DTYPE_BF16 = 2, /* bfloat16 stored as uint16_t (upper half of a float) */
    AK_DTYPE_I8 = 3,   /* int8 with a per-output-channel fp32 scale: w = q * scale[oc] */
    AK_DTYPE_F32_PACKED = 4,  /* fp32 packed once by ak_pack_weight_f32, rows of 32 (each expert block on its own) */
    AK_DTYPE_F32_PACKED16 = 5 /* the same, each 32-column panel stored as two 16-column halves (see below) */
};

/* ---- instruction-set paths ---- */
enum {
    AK_ISA_AUTO = -1,   /* ACTDIFF_KERNELS_ISA if set and supported, else the best the CPU supports */
    AK_ISA_SCALAR = 0,  /* portable C (fmaf) */
    AK_ISA_AVX2 = 1,    /* AVX2 + FMA */
    AK_ISA_AVX512 = 2   /* AVX-512F */
};

/* ---- library info / runtime configuration ---- */
const char *ak_version(void);                  /* "MAJOR.MINOR.PATCH", must equal actdiff.__version__ */
const char *ak_status_string(int status);      /* never NULL */
int ak_set_num_threads(int n);                 /* 1 <= n <= AK_MAX_THREADS (64) */
int ak_get_num_threads(void);
int ak_set_isa(int isa);                       /* AK_ISA_*; AK_ERR_UNSUPPORTED if the CPU lacks it */
int ak_get_isa(void);                          /* the ISA path currently in use (never AUTO) */
int ak_cpu_supports_isa(int isa);              /* 1 if usable on this CPU */
const char *ak_isa_name(int isa);

/* ---- per-op call counters (incremented on every call of a public op) ---- */
int ak_num_ops(void);
const char *ak_op_name(int op);                /* NULL if op out of range */
int ak_get_call_counts(uint64_t *out, int n);  /* out is (n), n >= ak_num_ops() */
void ak_reset_call_counts(void);

/* ---- matmul: out = inp @ W^T + bias ----
 * out is (T,OC), inp is (T,C), weight is (OC,C) stored as weight_dtype,
 * scales is (OC) for AK_DTYPE_I8 (else NULL), bias is (OC) or NULL.
 * Each output element is the fp32 fma chain over c = 0..C-1 (starting from 0)
 * followed by "+ bias": identical for every thread count, T, tile and ISA. */
int ak_matmul(float *out, const float *inp, const void *weight, const float *scales,
              const float *bias, int T, int C, int OC, int weight_dtype);
/* naive triple loop with the same per-element arithmetic (reference) */
int ak_matmul_naive(float *out, const float *inp, const void *weight, const float *scales,
                    const float *bias, int T, int C, int OC, int weight_dtype);

/* ---- fp32 weights packed once (at load) for the matmul core ----
 * Two layouts (the `layout` arguments below), the same size: K in blocks of 256 rows (the last one
 * shorter); in each block, the columns (zero past N, up to ceil32(N)) in runs of W, each run (block
 * rows) x W contiguous floats, row-major: element (k, n) is at k0*ceil32(N) + (n/W)*kb*W + (k-k0)*W + n%W, k0 = k - k%256, kb = that block's
 * rows; W = 32 for AK_DTYPE_F32_PACKED, 16 for AK_DTYPE_F32_PACKED16. Every ISA path reads either
 * layout (ak_set_isa never invalidates a packed weight); ak_packed_layout() names the one the current
 * path reads fastest (the AVX-512 kernel's 32 columns a row, the AVX2 kernel's 16). Values are copied
 * exactly: any matmul on the packed weight (weight_dtype = its layout in ak_matmul, ak_matmul_naive,
 * ak_moe, ak_expert_up, ak_expert_down) is bit-identical to the same call on the fp32 original.
 * The packed matmul weight of an (OC,C) nn.Linear weight is K = C, N = OC, trans = 1;
 * expert w1[e] (F,H): K = H, N = F, trans = 1; expert w2[e] (F,H) un-transposed: K = F, N = H, trans = 0. */
/* number of floats of a packed (K,N) weight (either layout); -1 for a negative size */
int64_t ak_packed_size(int K, int N);
/* the layout (AK_DTYPE_F32_PACKED or AK_DTYPE_F32_PACKED16) the current ISA path reads fastest */
int ak_packed_layout(void);
/* packed is (ak_packed_size(K,N)); w is (N,K) when trans = 1, (K,N) when trans = 0; layout as above */
int ak_pack_weight_f32(float *packed, const float *w, int K, int N, int trans, int layout);
/* the inverse: w is (N,K) when trans = 1, (K,N) when trans = 0; packed is (ak_packed_size(K,N)) in layout */
int ak_unpack_weight_f32(float *w, const float *packed, int K, int N, int trans, int layout);
/* out is (T,OC), inp is (T,C), packed from an (OC,C) weight (K = C, N = OC, trans = 1) in layout, bias is
 * (OC) or NULL. Same as ak_matmul(..., layout) (counted as a matmul call). */
int ak_matmul_packed(float *out, const float *inp, const float *packed, const float *bias, int T, int C, int OC,
                     int layout);

/* ---- elementwise / row ops ---- */
/* out is (T,C), inp is (T,C), weight is (C) or NULL (=1), bias is (C) or NULL (=0) */
int ak_layernorm(float *out, const float *inp, const float *weight, const float *bias,
                 int T, int C, float eps);
/* out is (n), inp is (n); approximate: 0 = exact erf, 1 = tanh approximation. out may equal inp. */
int ak_gelu(float *out, const float *inp, int64_t n, int approximate);
/* out is (T,C), inp is (T,C); row softmax with max subtraction. out may equal inp. */
int ak_softmax(float *out, const float *inp, int T, int C);
/* out is (n), a is (n), b is (n). out may alias a or b. */
int ak_add(float *out, const float *a, const float *b, int64_t n);
/* out is (T,C), ids is (T) int64 in [0,V), table is (V,C) */
int ak_embedding(float *out, const int64_t *ids, const float *table, int T, int V, int C);
/* out is (T,nh,hd), inp is (T,nh,hd), positions is (T) int64.
 * Rotates the first rot_dim (even, <= hd) channels of every head; the rest is copied.
 * interleaved = 0: half-split "NeoX" pairs (i, i+rot_dim/2); 1: "GPT-J" pairs (2i, 2i+1).
 * inv_freq_i = 1 / base^(2i/rot_dim), angle = position * inv_freq_i (fp32, like HF). out may equal inp. */
int ak_rotary(float *out, const float *inp, const int64_t *positions, int T, int nh, int hd,
              int rot_dim, float base, int interleaved);

/* ---- attention ----
 * out is (T, nh*hd) context, q, k, v are (T,nh,hd), key_mask is (T) uint8 (nonzero = attend) or NULL.
 * scores = (q_h k_h^T) * scale, masked keys (and keys j > i when causal) get zero weight,
 * softmax with max subtraction, out_h = P @ v_h. A query row with no visible key gets zeros. */
int ak_attention(float *out, const float *q, const float *k, const float *v,
                 const uint8_t *key_mask, int T, int nh, int hd, float scale, int causal);
int ak_attention_naive(float *out, const float *q, const float *k, const float *v,
                       const uint8_t *key_mask, int T, int nh, int hd, float scale, int causal);

/* ---- mixture of experts ----
 * out is (T,H); inp is (T,H); router_w is (E,H) fp32; w1 is (E,F,H) and w2 is (E,F,H), both
 * stored as weight_dtype (w1_scales (E,F) and w2_scales (E,H) for AK_DTYPE_I8, else NULL);
 * bias is (H) or NULL.  Expert e: y = gelu(x @ w1[e]^T) @ w2[e]  (w2[e] is (F,H), un-transposed).
 * Routing: logits = inp @ router_w^T; probs = softmax(logits) in fp32; top_k experts in
 * descending probability, ties to the lower expert index; weights = their probs, divided by
 * their sum when renormalize != 0.  out = sum_j weight_j * y_{e_j} (slot order) + bias.
 * forced != 0: topk_indices (T,K) and topk_weights (T,K) are INPUTS (routing skipped; the
 * logits/probs outputs are still computed if requested).
 * Optional outputs (NULL to skip): router_logits (T,E), probs (T,E), topk_weights (T,K),
 * topk_indices (T,K) int32, fc1 (T,K,F), act (T,K,F), expert_out (T,K,H), weighted (T,H)
 * (weighted sum before bias).  Slot j is the j-th selected expert. */
int ak_moe(float *out, float *router_logits, float *probs, float *topk_weights,
           int32_t *topk_indices, float *fc1, float *act, float *expert_out, float *weighted,
           const float *inp, const float *router_w, const void *w1, const float *w1_scales,
           const void *w2, const float *w2_scales, const float *bias,
           int T, int H, int F, int E, int top_k, int weight_dtype, int renormalize,
           int gelu_approximate, int forced);

/* ---- MoE parts as separate ops (node replay and the node-by-node path), same arithmetic as ak_moe ----
 * weights is (T,K), indices is (T,K) int64, probs is (T,E): top-K per row in descending probability,
 * ties to the lower expert index; weights = the selected probs [/ their sum if renormalize]. */
int ak_topk(float *weights, int64_t *indices, const float *probs, int T, int E, int K, int renormalize);
/* out is (T,K,F), inp is (T,H), indices is (T,K) int64 in [0,E), w1 is (E,F,H) as weight_dtype,
 * w1_scales (E,F) for AK_DTYPE_I8: out[t,j] = inp[t] @ w1[indices[t,j]]^T */
int ak_expert_up(float *out, const float *inp, const int64_t *indices, const void *w1, const float *w1_scales,
                 int T, int K, int H, int F, int E, int weight_dtype);
/* out is (T,K,H), act is (T,K,F), indices is (T,K) int64, w2 is (E,F,H) as weight_dtype,
 * w2_scales (E,H) for AK_DTYPE_I8: out[t,j] = act[t,j] @ w2[indices[t,j]]  (w2[e] is (F,H), un-transposed) */
int ak_expert_down(float *out, const float *act, const int64_t *indices, const void *w2, const float *w2_scales,
                   int T, int K, int F, int H, int E, int weight_dtype);
/* out is (T,H), expert_out is (T,K,H), weights is (T,K), bias is (H) or NULL:
 * out = sum_j weights[:,j] * expert_out[:,j] (slot order, product then add) + bias */
int ak_moe_combine(float *out, const float *expert_out, const float *weights, const float *bias, int T, int K,
                   int H);

/* ---- pooling / normalisation ---- */
/* out is (B,C), inp is (B,T,C), mask is (B,T) uint8 or NULL (all ones).
 * out = sum_t mask*inp / max(count, 1e-9)  (zeros when no token is set). */
int ak_mean_pool(float *out, const float *inp, const uint8_t *mask, int B, int T, int C);
/* out is (T,C), inp is (T,C); out = x / max(||x||_2, eps) per row. out may equal inp. */
int ak_l2_normalize(float *out, const float *inp, int T, int C, float eps);

/* ---- comparison (actdiff.compare.metrics) ---- */
/* Error sums of eng against ref over the positions where both are finite (double accumulators, index order). */
typedef struct {
    int64_t n_valid;                        /* positions where both values are finite */
    int64_t nan_eng, inf_eng, nan_ref, inf_ref;
    int64_t argmax;                         /* flat index of the first largest |eng-ref| (0 when n == 0) */
    int64_t max_ulp;                        /* largest fp32 ULP distance over the valid positions */
    double max_abs, sum_abs, sum_sq_err, sum_sq_ref, sum_sq_eng, dot;
} ak_compare_result;
/* out is one result, eng is (n), ref is (n) */
int ak_compare(ak_compare_result *out, const float *eng, const float *ref, int64_t n);
/* the same, written as separate passes (reference) */
int ak_compare_naive(ak_compare_result *out, const float *eng, const float *ref, int64_t n);
/* out is one double, a is (n), b is (n): ||a - b|| / ||b|| in double (0 if both norms are 0, inf if only b's);
 * NaN/Inf propagate */
int ak_rel_l2(double *out, const float *a, const float *b, int64_t n);

/* ---- HDF5's Fletcher-32 checksum (its fletcher32 filter's, appended to each stored chunk) ----
 * out is one uint32, data is (nbytes) bytes: HDF5's H5_checksum_fletcher32 of them, bit for bit; _naive is
 * HDF5's loop verbatim */
int ak_fletcher32(uint32_t *out, const void *data, int64_t nbytes);
int ak_fletcher32_naive(uint32_t *out, const void *data, int64_t nbytes);

/* ---- the propagated budget's perturbation (actdiff.compare.propagation._perturb) ----
 * out is (T,F), y is (T,F), s is (F), g is (T*F) or NULL, ref is (T,F) or NULL, err is 2 doubles (when ref);
 * s, g and ref are float32 (the draws and the dump), y and out double.
 * col[f] = sum_t y[t,f]^2, yn = sqrt(sum col), sn = sqrt(sum col * s^2), gn = sqrt(sum g^2) (double sums),
 * c = budget * yn / sqrt(2); out = y * (1 + (c / sn) * s[f]) (y where sn = 0) + (double)(g * (float)(c / gn))
 * (the float32 product; none where gn = 0); err = sum (out - ref)^2, sum ref^2. *done = 0 and out untouched
 * where yn is 0 or not finite (nothing to scale), else 1. _naive: the same as plain loops (bitwise equal). */
int ak_perturb_f64(double *out, double *err, int *done, const double *y, const float *s, const float *g,
                   const float *ref, double budget, int64_t T, int64_t F);
int ak_perturb_f64_naive(double *out, double *err, int *done, const double *y, const float *s, const float *g,
                         const float *ref, double budget, int64_t T, int64_t F);

/* ---- float64 erf (the reference ops' exact-erf GELU, actdiff.compare.refops) ----
 * y is (n), x is (n), double; y may be x. glibc's vector erf (libmvec, found at the first call) on the avx512 and
 * avx2 paths, libm's erf on the scalar path or without libmvec: within a few ULP of erf, each value's result
 * independent of its position (kernels_c/src/erf.c). _impl: the path whose erf runs now (AK_ISA_*: AK_ISA_SCALAR
 * where libmvec is missing); _naive: libm's erf in a plain loop. */
int ak_erf_f64(double *y, const double *x, int64_t n);
int ak_erf_f64_naive(double *y, const double *x, int64_t n);
int ak_erf_f64_impl(int *isa);

/* ---- float32 rounded to float16 precision (the fp16-act variant's activations, actdiff.engine) ----
 * out and x are (n) float32; out may be x. Each value to the nearest float16 (ties to even; 65520 and up: infinity;
 * float16 subnormals kept), returned as float32; a NaN stays a NaN of its sign, quiet, its payload cut to float16's.
 * The avx512 path converts with AVX-512F, the avx2 path with F16C (the scalar code where the CPU lacks it): the same
 * bits as the scalar code on every input (kernels_c/src/half.c). _naive: the scalar code. */
int ak_round_f16(float *out, const float *x, int64_t n);
int ak_round_f16_naive(float *out, const float *x, int64_t n);

/* ---- float32 <-> float16 storage (ONNX Runtime's float16 values, actdiff.onnxrt) ----
 * convert_f32_f16: out (n) float16 bits of x (n) float32, nearest even (65520 and up: infinity; subnormals kept);
 * convert_f16_f32: out (n) float32 of h (n) float16 bits, exact. numpy's astype bit for bit on every input and path,
 * NaN included (its payload's bits that fit kept, never quieted). F16C on the avx2 path, AVX-512 (F, BW) on the
 * avx512 path, the scalar code otherwise or where a vector holds a NaN (kernels_c/src/half.c). _naive: the scalar
 * code. */
int ak_convert_f32_f16(uint16_t *out, const float *x, int64_t n);
int ak_convert_f32_f16_naive(uint16_t *out, const float *x, int64_t n);
int ak_convert_f16_f32(float *out, const uint16_t *h, int64_t n);
int ak_convert_f16_f32_naive(float *out, const uint16_t *h, int64_t n);

/* ---- float64 rounded to float16 or bfloat16 precision (the reference ops' rounding, actdiff.compare.refops) ----
 * out and x are (n) double; out may be x. AK_ROUND_F16: to the nearest float16 straight from float64, as numpy
 * rounds (no double rounding: float32 rounded to odd on the way); AK_ROUND_BF16: to float32, then to bfloat16,
 * nearest even each time. A NaN stays a NaN. AVX-512 (F, VL) on the avx512 path for float16; the scalar code otherwise,
 * with the same bits (kernels_c/src/half.c). _naive: the scalar code. AK_ERR_INVALID_ARGUMENT for another format. */
enum { AK_ROUND_F16 = 1, AK_ROUND_BF16 = 2 };
int ak_round_f64(double *out, const double *x, int64_t n, int format);
int ak_round_f64_naive(double *out, const double *x, int64_t n, int format);

/* ---- uniform affine quantisation of float64 values (the reference ops' quantise, actdiff.compare.refops) ----
 * out and x are (rows, cols) double, row-major; out may be x. scale (float32) and zp (double, whole numbers) hold one
 * value for the tensor (AK_QUANT_TENSOR: [0]), per row ([rows]) or per column ([cols]), as per says.
 * q = clip((double)rintf((float)x / scale) + zp, qmin, qmax) (ONNX QuantizeLinear: a float32 division, rounded half
 * to even); out = q, or (q - zp) * (double)scale where dequantise (DequantizeLinear). A NaN stays a NaN. The same
 * bits on every ISA path (kernels_c/src/quant.c). _naive: one plain loop. AK_ERR_INVALID_ARGUMENT for another per,
 * or qmin > qmax. */
enum { AK_QUANT_TENSOR = 0, AK_QUANT_ROW = 1, AK_QUANT_COLUMN = 2 };
int ak_quantise_f64(double *out, const double *x, const float *scale, const double *zp, int64_t rows, int64_t cols,
                    int per, double qmin, double qmax, int dequantise);
int ak_quantise_f64_naive(double *out, const double *x, const float *scale, const double *zp, int64_t rows,
                          int64_t cols, int per, double qmin, double qmax, int dequantise);

/* ---- float64 matmul on a weight packed once (the reference ops' products, actdiff.compare.refops) ----
 * out (T,N) = inp (T,K) @ W with no bias: each element the double fma chain over k = 0..K-1 from 0.0, the same
 * bits on every ISA path, thread count and row count (kernels_c/src/gemm64.c). The packed layout: K in blocks of
 * AK_PACK64_KC rows (the last one shorter); in each block the columns, zero past N up to a multiple of 16, in runs
 * of 8, each run (block rows) x 8 contiguous doubles: element (k, n) at k0 * ceil16(N) + (n / 8) * kb * 8 +
 * (k - k0) * 8 + n % 8, k0 = k - k % AK_PACK64_KC, kb = that block's rows. Every path reads it. */
/* number of doubles of a packed (K,N) weight; -1 for a negative size */
int64_t ak_packed64_size(int K, int N);
/* packed is (ak_packed64_size(K,N)); w is (N,K) when trans = 1 (an nn.Linear weight), (K,N) when trans = 0 */
int ak_pack_weight_f64(double *packed, const double *w, int K, int N, int trans);
/* the same from a float32 weight w, each value widened exactly: the packed bits of its float64 copy, without the
 * copy (a float32 checkpoint's tensor packed straight for the float64 products) */
int ak_pack_weight_f64_of_f32(double *packed, const float *w, int K, int N, int trans);
/* out is (T,N), inp is (T,K), packed by ak_pack_weight_f64; out must not overlap inp or packed */
int ak_matmul_f64_packed(double *out, const double *inp, const double *packed, int T, int K, int N);
/* the same on the unpacked weight w (N,K), its blocks packed per call as they come: the same bits (for a weight
 * used once, where packing it whole first would cost more) */
int ak_matmul_f64(double *out, const double *inp, const double *w, int T, int K, int N);
/* the same per-element arithmetic in plain loops on the unpacked weight w (N,K) */
int ak_matmul_f64_naive(double *out, const double *inp, const double *w, int T, int K, int N);

/* CFFI_END */

#ifdef __cplusplus
}
#endif

#endif /* ACTDIFF_KERNELS_H */
