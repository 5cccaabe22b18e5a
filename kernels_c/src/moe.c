/* moe.c -- mixture-of-experts layer.
 *
 *   logits (T,E) = inp @ router_w^T             (gemm core, fp32)
 *   probs  (T,E) = softmax(logits)               (fp32, max-subtracted)
 *   top-k per token: descending prob, ties -> lower expert index (NaN ranks highest)
 *   weights = selected probs [/ their sum if renormalize]
 *   tokens grouped per expert (token order), expert e on its n_e rows:
 *       fc1 = X_e @ w1[e]^T  (n_e,F); act = gelu(fc1); y = act @ w2[e]  (n_e,H)
 *   weighted[t] = sum_j w[t,j] * y[t,j]  (slot order j = 0..k-1; product then add)
 *   out = weighted + bias
 * Threads split output columns inside every gemm, element ranges in gelu, and rows in the gathers, the
 * scatters and the combine; each row's value does not depend on how many rows an expert got (gemm is batch
 * invariant). */
#include "ak_internal.h"
#include <math.h>
#include <stdlib.h>

int ak_moe(float *out, float *router_logits, float *probs, float *topk_weights, int32_t *topk_indices, float *fc1,
           float *act, float *expert_out, float *weighted, const float *inp, const float *router_w, const void *w1,
           const float *w1_scales, const void *w2, const float *w2_scales, const float *bias, int T, int H, int F,
           int E, int top_k, int weight_dtype, int renormalize, int gelu_approximate, int forced) {
    ak_count_call(AK_OP_MOE);
    AK_CHECK_PTR(out);
    AK_CHECK_PTR(inp);
    AK_CHECK_PTR(w1);
    AK_CHECK_PTR(w2);
    if (T < 0 || H <= 0 || F <= 0 || E <= 0) return AK_ERR_INVALID_SIZE;
    if (top_k < 1 || top_k > E) return AK_ERR_INVALID_ARGUMENT;
    if (weight_dtype < AK_DTYPE_F32 || weight_dtype > AK_DTYPE_F32_PACKED16) return AK_ERR_INVALID_ARGUMENT;
    if (weight_dtype == AK_DTYPE_I8 && (!w1_scales || !w2_scales)) return AK_ERR_NULL_POINTER;
    if (gelu_approximate != 0 && gelu_approximate != 1) return AK_ERR_INVALID_ARGUMENT;
    if (forced) {
        AK_CHECK_PTR(topk_weights);
        AK_CHECK_PTR(topk_indices);
        for (int64_t i = 0; i < (int64_t)T * top_k; i++)
            if (topk_indices[i] < 0 || topk_indices[i] >= E) return AK_ERR_INDEX_OUT_OF_RANGE;
    } else {
        AK_CHECK_PTR(router_w);
    }
    if (T == 0) return AK_OK;
    const int K = top_k;
    int status = AK_OK;
    int need_router = !forced || router_logits || probs;
    float *lg = router_logits, *pr = probs, *tw = topk_weights, *eo = expert_out;
    int32_t *ti = topk_indices;
    if (need_router) AK_CHECK_PTR(router_w); /* forced routing with logits or probs asked for */
    /* every temporary in one scratch block (ak_scratch_get: kept between calls); the activation overwrites
     * fc1's values in place unless the caller asks for both */
    size_t nrow = (size_t)T * K, sz[10], total = 0;
    size_t n_lg = need_router && !lg ? (size_t)T * E : 0, n_pr = need_router && !pr ? (size_t)T * E : 0;
    /* regions: logits, probs, top-k weights, top-k indices, expert outputs (each unless the caller gave it),
     * gathered rows, fc1, the activation (when fc1 is asked for), products, row list */
    const size_t want[10] = {n_lg, n_pr, tw ? 0 : nrow, ti ? 0 : nrow, eo ? 0 : nrow * H, nrow * H, nrow * F,
                             fc1 ? nrow * F : 0, nrow * H, nrow};
    for (int i = 0; i < 10; i++) total += sz[i] = ak_round64(want[i] * sizeof(float));
    char *block = (char *)ak_scratch_get(total), *at = block;
    float *region[10];
    if (!block) return AK_ERR_OUT_OF_MEMORY;
    for (int i = 0; i < 10; i++) {
        region[i] = sz[i] ? (float *)at : NULL;
        at += sz[i];
    }
    if (n_lg) lg = region[0];
    if (n_pr) pr = region[1];
    if (!tw) tw = region[2];
    if (!ti) ti = (int32_t *)region[3];
    if (!eo) eo = region[4];
    float *xe = region[5], *he = region[6], *ae = fc1 ? region[7] : region[6], *ye = region[8];
    int32_t *rows = (int32_t *)region[9];
    if (need_router) {
        ak_gemm_args g = {T, E, H, inp, H, router_w, H, AK_DTYPE_F32, 1, NULL, NULL, lg, E};
        status = ak_gemm(&g);
        if (status) goto done;
        for (int t = 0; t < T; t++) ak_softmax_row(pr + (int64_t)t * E, lg + (int64_t)t * E, E);
    }
    if (!forced) ak_topk_rows(tw, ti, pr, T, E, K, renormalize);
    /* w1[e] is H deep, F wide (transposed); w2[e] is F deep, H wide: packed blocks differ in padding */
    size_t w1_bytes = ak_weight_block_bytes(weight_dtype, H, F), w2_bytes = ak_weight_block_bytes(weight_dtype, F, H);
    for (int e = 0; e < E; e++) {
        int ne = 0;
        for (int64_t r = 0; r < (int64_t)T * K; r++)
            if (ti[r] == e) rows[ne++] = (int32_t)r;
        if (ne == 0) continue;
        ak_copy_rows(xe, inp, rows, ne, H, K, 0);
        const char *w1e = (const char *)w1 + (size_t)e * w1_bytes;
        const char *w2e = (const char *)w2 + (size_t)e * w2_bytes;
        ak_gemm_args g1 = {ne, F, H, xe, H, w1e, H, weight_dtype, 1,
                           weight_dtype == AK_DTYPE_I8 ? w1_scales + (int64_t)e * F : NULL, NULL, he, F};
        status = ak_gemm(&g1);
        if (status) goto done;
        ak_gelu_par(ae, he, (int64_t)ne * F, gelu_approximate);
        ak_gemm_args g2 = {ne, H, F, ae, F, w2e, H, weight_dtype, 0,
                           weight_dtype == AK_DTYPE_I8 ? w2_scales + (int64_t)e * H : NULL, NULL, ye, H};
        status = ak_gemm(&g2);
        if (status) goto done;
        ak_copy_rows(eo, ye, rows, ne, H, 1, 1);
        if (fc1) ak_copy_rows(fc1, he, rows, ne, F, 1, 1);
        if (act) ak_copy_rows(act, ae, rows, ne, F, 1, 1);
    }
    ak_combine_rows(out, weighted, eo, tw, bias, T, K, H);
done:
    ak_scratch_put(block);
    return status;
}
