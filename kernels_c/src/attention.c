/* attention.c -- multi-head attention (bidirectional with key-padding mask, optional causal).
 *
 * Work units are (head, block of qb query rows); threads take contiguous ranges of units,
 * so no reduction is ever split.  qb = QB (64), or every query row of a head when the attention is not causal
 * and the head's T x T scores fit SCORES_WHOLE_HEAD, with heads enough to share among the threads: the gemm core
 * packs K_h and V_h once per call, so per block they were packed T / 64 times (9 % of a 512-token layer's
 * attention). The same bits either way: a score's chain runs over hd, an output's over the keys in order,
 * whatever rows share the call.  Per unit:
 *   S  (qb x nk) = Q_blk (qb x hd) @ K_h^T      (gemm core, chain over hd)
 *   S *= scale; masked keys -> weight 0; row softmax (max-subtracted)
 *   O  (qb x hd) = P (qb x nk) @ V_h            (gemm core, chain over keys in order)
 * where nk = T, or min(T, q0 + qb) when causal (keys past the block are all masked), cut at kend = 1 + the
 * last visible key of key_mask.  Keys at or past kend are never read: in a right-padded batch a sequence's
 * pad keys do not enter any sum (not even as zero weights), so every real query row of a padded sequence
 * runs exactly the arithmetic of the unpadded sequence (bitwise equal on every ISA path, whatever the pad
 * tokens hold, NaN included). */
#include "ak_internal.h"
#include <math.h>
#include <stdlib.h>

#define QB 64
#define SCORES_WHOLE_HEAD (1 << 18) /* floats: T <= 512, 1 MiB a thread (an L2 holds it between the products) */

typedef struct {
    float *out;
    const float *q, *k, *v;
    const uint8_t *mask;
    int T, nh, hd, causal;
    int qb;   /* query rows a unit */
    int kend; /* 1 + last visible key (T without a mask; 0 when every key is masked) */
    float scale;
    int64_t units;
    int status;
} attn_job;

static void attn_unit(attn_job *j, int64_t u, float *S) {
    int nqb = (j->T + j->qb - 1) / j->qb;
    int h = (int)(u / nqb), qbi = (int)(u % nqb);
    int q0 = qbi * j->qb, qb = j->T - q0 < j->qb ? j->T - q0 : j->qb;
    int64_t ld = (int64_t)j->nh * j->hd;
    int nk = j->causal ? (q0 + qb < j->T ? q0 + qb : j->T) : j->T;
    if (nk > j->kend) nk = j->kend;
    if (nk == 0) { /* no visible key for any row of the block: zeros, as the general rule below */
        for (int r = 0; r < qb; r++)
            for (int d = 0; d < j->hd; d++) j->out[(q0 + r) * ld + (int64_t)h * j->hd + d] = 0.0f;
        return;
    }
    ak_gemm_args g1 = {qb, nk, j->hd, j->q + q0 * ld + (int64_t)h * j->hd, ld, j->k + (int64_t)h * j->hd, ld,
                       AK_DTYPE_F32, 1, NULL, NULL, S, nk};
    int st = ak_gemm_serial(&g1, 0, nk);
    if (st) { j->status = st; return; }
    for (int r = 0; r < qb; r++) {
        float *s = S + (int64_t)r * nk;
        int i = q0 + r;
        int lim = j->causal && i + 1 < nk ? i + 1 : nk;
        int visible = 0;
        if (!j->mask) { /* no key masked: one multiply a score (a loop the compiler vectorises) */
            for (int c = 0; c < lim; c++) s[c] = s[c] * j->scale;
            visible = lim;
        } else {
            for (int c = 0; c < lim; c++) {
                if (!j->mask[c]) s[c] = -INFINITY;
                else { s[c] = s[c] * j->scale; visible++; }
            }
        }
        for (int c = lim; c < nk; c++) s[c] = -INFINITY;
        if (visible == 0) {
            for (int c = 0; c < nk; c++) s[c] = 0.0f; /* no visible key: output zeros */
        } else {
            ak_softmax_row(s, s, nk);
        }
    }
    ak_gemm_args g2 = {qb, j->hd, nk, S, nk, j->v + (int64_t)h * j->hd, ld, AK_DTYPE_F32, 0, NULL, NULL,
                       j->out + q0 * ld + (int64_t)h * j->hd, ld};
    st = ak_gemm_serial(&g2, 0, j->hd);
    if (st) j->status = st;
}

static void attn_task(void *ctx, int tid, int nth) {
    attn_job *j = (attn_job *)ctx;
    int64_t b, e;
    ak_split(j->units, tid, nth, &b, &e);
    if (b >= e) return;
    /* the thread's scratch block, kept between calls as the MoE's (a head's scores are 1 MiB at 512 tokens) */
    float *S = (float *)ak_scratch_get((size_t)j->qb * j->T * sizeof(float));
    if (!S) { __atomic_store_n(&j->status, AK_ERR_OUT_OF_MEMORY, __ATOMIC_RELAXED); return; }
    for (int64_t u = b; u < e; u++) attn_unit(j, u, S);
    ak_scratch_put(S);
}

static int attn_check(float *out, const float *q, const float *k, const float *v, int T, int nh, int hd) {
    AK_CHECK_PTR(out);
    AK_CHECK_PTR(q);
    AK_CHECK_PTR(k);
    AK_CHECK_PTR(v);
    if (T < 0 || nh < 0 || hd < 0) return AK_ERR_INVALID_SIZE;
    return AK_OK;
}

int ak_attention(float *out, const float *q, const float *k, const float *v, const uint8_t *key_mask, int T, int nh,
                 int hd, float scale, int causal) {
    ak_count_call(AK_OP_ATTENTION);
    int st = attn_check(out, q, k, v, T, nh, hd);
    if (st) return st;
    if (T == 0 || nh == 0) return AK_OK;
    if (hd == 0) return AK_OK;
    int kend = T;
    if (key_mask)
        while (kend > 0 && !key_mask[kend - 1]) kend--;
    int nth = ak_get_num_threads();
    int whole = !causal && (int64_t)T * T <= SCORES_WHOLE_HEAD && (nh % nth == 0 || nh >= 4 * nth);
    attn_job j = {out, q, k, v, key_mask, T, nh, hd, causal ? 1 : 0, whole ? T : QB, kend, scale, 0, AK_OK};
    j.units = (int64_t)nh * ((T + j.qb - 1) / j.qb);
    ak_parallel(ak_threads_for(j.units, 4.0 * nh * (double)T * T * hd), attn_task, &j);
    return j.status;
}

/* reference: plain loops, libm expf, one query row at a time; masked keys are skipped */
int ak_attention_naive(float *out, const float *q, const float *k, const float *v, const uint8_t *key_mask, int T,
                       int nh, int hd, float scale, int causal) {
    ak_count_call(AK_OP_ATTENTION_NAIVE);
    int st = attn_check(out, q, k, v, T, nh, hd);
    if (st) return st;
    if (T == 0) return AK_OK;
    float *p = (float *)malloc((size_t)T * sizeof(float));
    if (!p) return AK_ERR_OUT_OF_MEMORY;
    int64_t ld = (int64_t)nh * hd;
    for (int h = 0; h < nh; h++) {
        for (int i = 0; i < T; i++) {
            float m = -INFINITY;
            int visible = 0;
            for (int jj = 0; jj < T; jj++) {
                int vis = (!key_mask || key_mask[jj]) && (!causal || jj <= i);
                if (!vis) { p[jj] = -INFINITY; continue; }
                visible++;
                float acc = 0.0f;
                for (int d = 0; d < hd; d++) acc = fmaf(q[i * ld + h * hd + d], k[jj * ld + h * hd + d], acc);
                p[jj] = acc * scale;
                if (p[jj] > m || p[jj] != p[jj]) m = p[jj];
            }
            float sum = 0.0f;
            for (int jj = 0; jj < T; jj++) {
                p[jj] = visible ? expf(p[jj] - m) : 0.0f;
                sum += p[jj];
            }
            for (int d = 0; d < hd; d++) {
                float acc = 0.0f;
                for (int jj = 0; jj < T; jj++) {
                    /* a masked key contributes nothing, whatever its value holds (NaN in a pad row) */
                    if (!visible || (key_mask && !key_mask[jj]) || (causal && jj > i)) continue;
                    acc = fmaf(p[jj] / sum, v[jj * ld + h * hd + d], acc);
                }
                out[i * ld + h * hd + d] = acc;
            }
        }
    }
    free(p);
    return AK_OK;
}
