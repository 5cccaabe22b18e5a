/* moe_parts.c -- the MoE block's parts as separate ops.
 *
 * The engine replays single graph nodes on the reference's inputs (teacher forcing) and runs MoE
 * node by node when activations are rounded between ops, so every part of ak_moe is also an op of
 * its own. They use the same arithmetic as ak_moe (same gemm core, which is batch invariant, same
 * top-k ranking, same product-then-add weighted sum), so a part gives bitwise the value that the
 * fused kernel computes for the same inputs. */
#include "ak_internal.h"
#include <stdlib.h>


static inline int rank_gt(float a, float b) { /* a ranks strictly before b; NaN ranks first */
    if (a != a) return b == b;
    return a > b;
}

void ak_topk_rows(float *weights, int32_t *indices, const float *probs, int T, int E, int K, int renormalize) {
    for (int t = 0; t < T; t++) {
        const float *p = probs + (int64_t)t * E;
        int32_t *idx = indices + (int64_t)t * K;
        float *w = weights + (int64_t)t * K;
        for (int j = 0; j < K; j++) {
            int best = -1;
            for (int e = 0; e < E; e++) {
                int taken = 0;
                for (int jj = 0; jj < j; jj++) taken |= (idx[jj] == e);
                if (taken) continue;
                if (best < 0 || rank_gt(p[e], p[best])) best = e;
            }
            idx[j] = best;
            w[j] = p[best];
        }
        if (renormalize) {
            float s = 0.0f;
            for (int j = 0; j < K; j++) s += w[j];
            for (int j = 0; j < K; j++) w[j] = w[j] / s;
        }
    }
}

static void combine_rows_serial(float *out, float *weighted, const float *expert_out, const float *weights,
                                const float *bias, int T, int K, int H) {
    for (int t = 0; t < T; t++) {
        const float *w = weights + (int64_t)t * K;
        for (int h = 0; h < H; h++) {
            float acc = w[0] * expert_out[((int64_t)t * K) * H + h];
            for (int j = 1; j < K; j++) {
                float prod = w[j] * expert_out[((int64_t)t * K + j) * H + h];
                acc = acc + prod;
            }
            if (weighted) weighted[(int64_t)t * H + h] = acc;
            if (out) out[(int64_t)t * H + h] = bias ? acc + bias[h] : acc;
        }
    }
}

/* the weighted sum over slots, tokens split over threads (it ran on the calling thread alone): each row's arithmetic
 * is unchanged */
typedef struct {
    float *out, *weighted;
    const float *eo, *tw, *bias;
    int T, K, H;
} combine_job;

static void combine_task(void *ctx, int tid, int nth) {
    const combine_job *j = (const combine_job *)ctx;
    int64_t b, e;
    ak_split(j->T, tid, nth, &b, &e);
    if (e <= b) return;
    combine_rows_serial(j->out ? j->out + b * j->H : NULL, j->weighted ? j->weighted + b * j->H : NULL,
                        j->eo + b * j->K * j->H, j->tw + b * j->K, j->bias, (int)(e - b), j->K, j->H);
}

void ak_combine_rows(float *out, float *weighted, const float *expert_out, const float *weights, const float *bias,
                     int T, int K, int H) {
    combine_job j = {out, weighted, expert_out, weights, bias, T, K, H};
    ak_parallel(ak_threads_for(T, 2.0 * T * K * H), combine_task, &j);
}

/* One expert's rows moved between its contiguous block and their (token, slot) rows, split over threads: gathering
 * the inputs (src row rows[i] / div) or scattering the results (dst row rows[i]). Run on the calling thread alone,
 * the copies of a 512-token layer (fc1 and act 12.6 MB each when asked for) kept the second thread idle. */
typedef struct {
    float *dst;
    const float *src;
    const int32_t *rows;
    int64_t width; /* floats a row */
    int ne, div, scatter;
} rows_job;

static void rows_task(void *ctx, int tid, int nth) {
    const rows_job *j = (const rows_job *)ctx;
    int64_t b, e;
    ak_split(j->ne, tid, nth, &b, &e);
    const size_t bytes = (size_t)j->width * sizeof(float);
    for (int64_t i = b; i < e; i++) {
        if (j->scatter) memcpy(j->dst + (int64_t)j->rows[i] * j->width, j->src + i * j->width, bytes);
        else memcpy(j->dst + i * j->width, j->src + (int64_t)(j->rows[i] / j->div) * j->width, bytes);
    }
}

void ak_copy_rows(float *dst, const float *src, const int32_t *rows, int ne, int64_t width, int div, int scatter) {
    rows_job j = {dst, src, rows, width, ne, div, scatter};
    ak_parallel(ak_threads_for(ne, 4.0 * ne * width), rows_task, &j); /* a copied float counts as 4 flops */
}

int ak_topk(float *weights, int64_t *indices, const float *probs, int T, int E, int K, int renormalize) {
    ak_count_call(AK_OP_TOPK);
    AK_CHECK_PTR(weights);
    AK_CHECK_PTR(indices);
    AK_CHECK_PTR(probs);
    if (T < 0 || E <= 0) return AK_ERR_INVALID_SIZE;
    if (K < 1 || K > E) return AK_ERR_INVALID_ARGUMENT;
    int32_t *idx = (int32_t *)ak_aligned_alloc((size_t)(T > 0 ? T : 1) * K * sizeof(int32_t));
    if (!idx) return AK_ERR_OUT_OF_MEMORY;
    ak_topk_rows(weights, idx, probs, T, E, K, renormalize);
    for (int64_t i = 0; i < (int64_t)T * K; i++) indices[i] = idx[i];
    ak_aligned_free(idx);
    return AK_OK;
}

/* Shared driver of expert_up / expert_down: rows (t, j) grouped per expert, one gemm per expert. */
static int expert_gemm(float *out, const float *inp, int64_t in_row_stride_per_slot, const int64_t *indices, int T,
                       int K, int IN, int OUT, int E, const void *w, const float *scales, int64_t scale_stride,
                       int weight_dtype, int b_trans) {
    if (weight_dtype < AK_DTYPE_F32 || weight_dtype > AK_DTYPE_F32_PACKED16) return AK_ERR_INVALID_ARGUMENT;
    if (weight_dtype == AK_DTYPE_I8 && !scales) return AK_ERR_NULL_POINTER;
    for (int64_t r = 0; r < (int64_t)T * K; r++)
        if (indices[r] < 0 || indices[r] >= E) return AK_ERR_INDEX_OUT_OF_RANGE;
    if (T == 0) return AK_OK;
    /* the gathered rows, their products and the row list in one scratch block (kept between calls, as ak_moe) */
    size_t nrow = (size_t)T * K, n_xe = ak_round64(nrow * IN * sizeof(float));
    size_t n_ye = ak_round64(nrow * OUT * sizeof(float));
    char *block = (char *)ak_scratch_get(n_xe + n_ye + nrow * sizeof(int32_t));
    if (!block) return AK_ERR_OUT_OF_MEMORY;
    float *xe = (float *)block, *ye = (float *)(block + n_xe);
    int32_t *rows = (int32_t *)(block + n_xe + n_ye);
    int status = AK_OK;
    size_t w_bytes = ak_weight_block_bytes(weight_dtype, IN, OUT); /* one expert: IN deep, OUT wide */
    for (int e = 0; e < E; e++) {
        int ne = 0;
        for (int64_t r = 0; r < (int64_t)T * K; r++)
            if (indices[r] == e) rows[ne++] = (int32_t)r;
        if (ne == 0) continue;
        /* slot-wise input (act, T*K rows) or token-wise input (h, T rows) */
        ak_copy_rows(xe, inp, rows, ne, IN, in_row_stride_per_slot ? 1 : K, 0);
        const char *we = (const char *)w + (size_t)e * w_bytes;
        ak_gemm_args g = {ne, OUT, IN, xe, IN, we, b_trans ? IN : OUT, weight_dtype, b_trans,
                          weight_dtype == AK_DTYPE_I8 ? scales + (int64_t)e * scale_stride : NULL, NULL, ye, OUT};
        status = ak_gemm(&g);
        if (status) goto done;
        ak_copy_rows(out, ye, rows, ne, OUT, 1, 1);
    }
done:
    ak_scratch_put(block);
    return status;
}

int ak_expert_up(float *out, const float *inp, const int64_t *indices, const void *w1, const float *w1_scales, int T,
                 int K, int H, int F, int E, int weight_dtype) {
    ak_count_call(AK_OP_EXPERT_UP);
    AK_CHECK_PTR(out);
    AK_CHECK_PTR(inp);
    AK_CHECK_PTR(indices);
    AK_CHECK_PTR(w1);
    if (T < 0 || K < 1 || H <= 0 || F <= 0 || E <= 0) return AK_ERR_INVALID_SIZE;
    /* w1[e] is (F,H): out = x @ w1[e]^T */
    return expert_gemm(out, inp, 0, indices, T, K, H, F, E, w1, w1_scales, F, weight_dtype, 1);
}

int ak_expert_down(float *out, const float *act, const int64_t *indices, const void *w2, const float *w2_scales,
                   int T, int K, int F, int H, int E, int weight_dtype) {
    ak_count_call(AK_OP_EXPERT_DOWN);
    AK_CHECK_PTR(out);
    AK_CHECK_PTR(act);
    AK_CHECK_PTR(indices);
    AK_CHECK_PTR(w2);
    if (T < 0 || K < 1 || H <= 0 || F <= 0 || E <= 0) return AK_ERR_INVALID_SIZE;
    /* w2[e] is (F,H), used un-transposed: out = act @ w2[e] */
    return expert_gemm(out, act, 1, indices, T, K, F, H, E, w2, w2_scales, H, weight_dtype, 0);
}

int ak_moe_combine(float *out, const float *expert_out, const float *weights, const float *bias, int T, int K,
                   int H) {
    ak_count_call(AK_OP_MOE_COMBINE);
    AK_CHECK_PTR(out);
    AK_CHECK_PTR(expert_out);
    AK_CHECK_PTR(weights);
    if (T < 0 || K < 1 || H <= 0) return AK_ERR_INVALID_SIZE;
    ak_combine_rows(out, NULL, expert_out, weights, bias, T, K, H);
    return AK_OK;
}
