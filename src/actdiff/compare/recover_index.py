"""Index mappings recovered from the data: which position, which keys, which tokens an op actually used.

Some ops are defined by an index mapping rather than by a weight: the position each token is rotated by
(ROPE), the keys each query attends to (ATTENTION), the tokens a pooling averages (POOL). A bug there (a
position cache that wraps, a mask that drops keys past a limit, a pooling that leaves a token out) moves
no continuous parameter, so the fits cannot see it; but the sample determines the mapping itself:

- ROPE: for every token, the position whose rotation of the input best reproduces the target (all integer
  candidates at once: a rotation keeps the norm, so the residual is linear in cos/sin of the angles);
- ATTENTION: for every query, the number of leading keys (then of trailing keys) that best reproduces the
  target row, for every limit at once from cumulative sums over the keys;
- POOL: the per-token weights, by least squares (the output is linear in them).

The recovered mapping is then described by the simplest family that reproduces it on EVERY prompt (an
offset, a wrap, a clamp, a key limit, a window, tokens left out), with the family's numbers fitted from the
data, never assumed. Every finding's error is the op re-run exactly on the sample with the recovered mapping
(the spec's own op for ROPE, token by token; the spec's scores with the recovered mask; the recovered weights),
so it is directly comparable with the baseline.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np

from .findings import Finding
from .refops import NotApplicable, _rope_angles, attention_scale, run_op
from .search import SearchContext, register

log = logging.getLogger(__name__)

TOKEN_FIT = 0.05  # a token's mapping is "recovered" when it leaves at most this share of the token's norm
POSITION_TOL = 1e-3  # recovered positions within this of a family's are reproduced by it
FINE_STEPS = 64  # ROPE: sub-integer refinement resolution (1/64 of a position)
WEIGHT_TOL = 0.05  # POOL: a weight within this share of 1/T of a family's weight is reproduced by it


def _examples(pairs, limit: int = 6) -> str:
    return ", ".join(f"{a}->{b}" for a, b in pairs[:limit]) + (" ..." if len(pairs) > limit else "")


def _num(x: float):
    """A JSON-safe number: an int when it is one."""
    return int(round(x)) if abs(x - round(x)) < POSITION_TOL else float(x)


# ------------------------------------------------------------------------------------------ ROPE
def _pair_products(ctx: SearchContext, a: np.ndarray, y: np.ndarray):
    """(A, B, rest) with <y, rotate(a, angles)> = A @ cos(angles) + B @ sin(angles) + rest, per token:
    A = sum over heads of y1*x1 + y2*x2, B of y2*x1 - y1*x2 for each rotated pair (the spec's layout)."""
    hd = a.shape[-1]
    half = hd // 2
    if ctx.spec["layout"] == "neox":
        i1, i2 = np.arange(half), np.arange(half, 2 * half)
    else:  # gptj: interleaved pairs
        i1, i2 = np.arange(0, 2 * half, 2), np.arange(1, 2 * half, 2)
    x1, x2, y1, y2 = a[..., i1], a[..., i2], y[..., i1], y[..., i2]
    A = np.sum(y1 * x1 + y2 * x2, axis=1)  # [T, half]
    B = np.sum(y2 * x1 - y1 * x2, axis=1)
    rest = np.sum(y[..., 2 * half :] * a[..., 2 * half :], axis=(1, 2))  # odd head dim: an unrotated tail
    return A, B, rest


def _angles(ctx: SearchContext, positions: np.ndarray, hd: int) -> np.ndarray:
    """The spec's angles [len(positions), hd/2] for consecutive integer positions."""
    p = {**ctx.spec, "round_at": {}, "position_offset": float(positions[0])}
    return _rope_angles(len(positions), hd, p)


def _fit_positions(ctx: SearchContext, a: np.ndarray, y: np.ndarray):
    """(position per token, relative residual per token): the best integer candidate in [-T-16, 2T+16],
    refined to 1/FINE_STEPS when that fits clearly better (a scaled position is not an integer)."""
    T, _, hd = a.shape
    A, B, rest = _pair_products(ctx, a, y)
    norms = np.sum(a * a, axis=(1, 2)) + np.sum(y * y, axis=(1, 2))
    cand = np.arange(-T - 16, 2 * T + 17, dtype=np.float64)
    ang = _angles(ctx, cand, hd)
    dot = A @ np.cos(ang).T + B @ np.sin(ang).T  # [T, candidates]
    best = np.argmax(dot, axis=1)
    pos = cand[best]
    res = norms - 2.0 * (dot[np.arange(T), best] + rest)
    # sub-integer refinement (a scaled position is not an integer): every token at once, fp64 angles
    c = pos[:, None] + np.arange(-FINE_STEPS, FINE_STEPS + 1)[None, :] / FINE_STEPS  # [T, steps]
    inv = float(ctx.spec["base"]) ** (-np.arange(0, 2 * (hd // 2), 2, dtype=np.float64) / hd)
    fa = c[..., None] * inv  # [T, steps, half]
    d = np.einsum("th,tsh->ts", A, np.cos(fa)) + np.einsum("th,tsh->ts", B, np.sin(fa))
    k = np.argmax(d, axis=1)
    r = norms - 2.0 * (d[np.arange(T), k] + rest)
    better = r < 0.5 * res  # only when clearly better: noise never moves an integer position
    pos[better] = _newton(A[better], B[better], c[np.arange(T), k][better], inv)
    fa = pos[better, None] * inv
    res[better] = norms[better] - 2.0 * (np.sum(A[better] * np.cos(fa) + B[better] * np.sin(fa), axis=1) + rest[better])
    scale = np.maximum(np.sum(y * y, axis=(1, 2)), 1e-300)
    return pos, np.sqrt(np.maximum(res, 0.0) / scale)


def _newton(A: np.ndarray, B: np.ndarray, p: np.ndarray, inv: np.ndarray, steps: int = 4) -> np.ndarray:
    """Real positions maximising sum_i A_i cos(p w_i) + B_i sin(p w_i) near ``p`` (the grid's 1/64 is too
    coarse for a family check at 1e-3): Newton steps, each bounded by the grid spacing."""
    for _ in range(steps):
        ang = p[:, None] * inv
        cs, sn = np.cos(ang), np.sin(ang)
        g = np.sum(inv * (B * cs - A * sn), axis=1)
        h = -np.sum(inv * inv * (A * cs + B * sn), axis=1)
        p = p - np.clip(np.where(h < 0, g / np.where(h < 0, h, 1.0), 0.0), -1.0 / FINE_STEPS, 1.0 / FINE_STEPS)
    return p


def _position_family(ts: list[np.ndarray], ps: list[np.ndarray]):
    """(params, words) of the simplest family reproducing every recovered position on every prompt, its
    numbers fitted from the data (the median offset, the largest position, the smallest period, ...)."""
    t, p = np.concatenate(ts).astype(np.float64), np.concatenate(ps)
    last = np.concatenate([np.full(len(x), len(x) - 1.0) for x in ts])  # each prompt's last token
    c, m = _num(float(np.median(p - t))), _num(float(p.max()))
    s = float(f"{float(t @ p) / max(float(t @ t), 1e-300):.6g}")
    families = [
        (t + c, {"positions": "offset", "offset": c}, f"position t is rotated as t{c:+g}"),
        (np.full_like(p, p[0]), {"positions": "constant", "value": _num(p[0])},
         f"every token is rotated by position {_num(p[0]):g}"),
        (np.minimum(t, m), {"positions": "clamp", "limit": m}, f"positions are clamped at {m:g} (min(t, {m:g}))"),
        (last - t, {"positions": "reversed"}, "positions are reversed (token t is rotated as T-1-t)"),
        (s * t, {"positions": "scaled", "scale": s}, f"positions are scaled by {s:g} (t * {s:g})"),
    ]  # fmt: skip
    for q, params, words in families:
        if np.all(np.abs(q - p) <= POSITION_TOL):
            return params, words
    wrap = _wrap_period(t, p)
    if wrap is not None:
        period, c = wrap
        t_c = f"(t{c:+d})" if c else "t"
        return ({"positions": "mod", "period": period, "offset": c},
                f"rotary positions wrap at {period} (position t is rotated as {t_c} mod {period})")  # fmt: skip
    return None


def _wrap_period(t: np.ndarray, p: np.ndarray):
    """(period M, offset c) with p = (t + c) mod M on every token, M the smallest consistent period."""
    if np.any(np.abs(p - np.round(p)) > POSITION_TOL) or p.min() < -POSITION_TOL:
        return None
    ti, pi = t.astype(np.int64), np.round(p).astype(np.int64)
    c = int(pi[np.argmin(ti)] - ti.min())  # the first token is not wrapped yet
    diffs = np.abs(ti + c - pi)
    g = int(np.gcd.reduce(diffs[diffs > 0])) if np.any(diffs > 0) else 0
    if g == 0 or g <= pi.max():
        return None
    return g, c


def _rotated(ctx: SearchContext, x: dict, positions: np.ndarray) -> np.ndarray:
    """The spec's ROPE with token t rotated by positions[t]: the spec op run on each run of tokens whose
    position advances by one per token, with that run's position offset (exact, any spec parameters)."""
    node = ctx.node
    a = x[node.inputs[0]]
    out = np.empty(np.shape(a), np.float64)
    start = 0
    T = len(positions)
    while start < T:
        end = start + 1
        while end < T and positions[end] - positions[end - 1] == 1.0:
            end += 1
        sub = {**x, node.inputs[0]: a[start:end]}
        out[start:end] = run_op(ctx.graph, node, sub, ctx.weights, {**ctx.spec, "position_offset": positions[start]})
        start = end
    return out


@register
def recover_rope_positions(ctx: SearchContext) -> Iterator[Finding]:
    """ROPE: the position each token was rotated by, and the family (offset, wrap, clamp, ...) they follow."""
    node = ctx.node
    if node.op != "ROPE" or ctx.spec.get("layout") not in ("neox", "gptj"):
        return
    ts, ps, worst = [], [], 0.0
    for x, y in zip(ctx.inputs, ctx.targets, strict=True):
        if ctx.deadline.expired():
            return
        a, yy = (
            np.asarray(x[node.inputs[0]], np.float64),
            np.asarray(y, np.float64).reshape(np.shape(x[node.inputs[0]])),
        )
        pos, res = _fit_positions(ctx, a, yy)
        ts.append(np.arange(len(pos)))
        ps.append(pos)
        worst = max(worst, float(res.max()))
    if worst > TOKEN_FIT:
        log.info("%s: no single rotation reproduces every token (worst token residual %.2g)", node.name, worst)
        return
    if all(np.all(np.abs(p - t) <= POSITION_TOL) for t, p in zip(ts, ps, strict=True)):
        return  # the spec's positions
    try:
        err = ctx.error_of([_rotated(ctx, x, p) for x, p in zip(ctx.inputs, ps, strict=True)])
    except (NotApplicable, KeyError, ValueError):
        return
    yield _rope_finding(ctx, ts, ps, err, worst)


def _rope_finding(ctx: SearchContext, ts, ps, err: float, worst: float) -> Finding:
    fam = _position_family(ts, ps)
    moved = [(i, [(int(t), _num(p)) for t, p in zip(tt, pp, strict=True) if abs(p - t) > POSITION_TOL])
             for i, (tt, pp) in enumerate(zip(ts, ps, strict=True))]  # fmt: skip
    moved = [(i, m) for i, m in moved if m]
    first = min(m[0][0] for _, m in moved)
    where = f"tokens {first}+ differ from the spec on {len(moved)} of {len(ts)} prompts"
    if fam is not None:
        params, words = fam
        name = f"ROPE.positions={params['positions']}"
    else:
        params = {"positions": "recovered"}
        words = "positions follow no simple family (first mismatches t->p: " + _examples(moved[0][1]) + ")"
        name = "ROPE.positions"
    params = {**params, "mismatches": {str(i): [list(pair) for pair in m[:8]] for i, m in moved[:4]},
              "worst_token_residual": worst}  # fmt: skip
    says = (f"{ctx.node.name}: {words}; {where}; re-run with the recovered positions: residual {err:.2e} "
            f"(spec {ctx.err0:.2e})")  # fmt: skip
    return Finding("recovered", name, says, err, params)


# ------------------------------------------------------------------------------------------ ATTENTION
ROUNDS = 3  # ATTENTION: alternations of "last key given the first" and "first key given the last"
MAX_EXHAUSTIVE = 16  # ATTENTION: at most this many queries per prompt get every key range tried (T*T each)


def _heads(ctx: SearchContext, x: dict, y: np.ndarray):
    """(exp scores [nh, T, T] (row max subtracted), v [nh, T, hd], target [nh, T, hd]) under the spec."""
    q, k, v = (np.asarray(x[n], np.float64) for n in ctx.node.inputs[:3])
    T, nh, hd = q.shape
    s = (q.transpose(1, 0, 2) @ k.transpose(1, 2, 0)) * attention_scale(ctx.spec["scale"], hd)
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    y = np.asarray(y, np.float64)
    yh = y.reshape(T, nh, hd) if ctx.spec["output_layout"] == "heads_outer" else y.reshape(T, hd, nh).transpose(0, 2, 1)
    return e, v.transpose(1, 0, 2), yh.transpose(1, 0, 2)


def _prefix_errors(e: np.ndarray, G: np.ndarray, tv: np.ndarray, tt: np.ndarray) -> np.ndarray:
    """err[q, K-1]: squared residual (summed over heads) of query q attending to keys 0..K-1 only, for every
    K at once: ||t - N_K/D_K||^2 = ||t||^2 - 2 t.N_K/D_K + ||N_K||^2/D_K^2 with N_K = sum_{j<K} e_j v_j, whose
    squared norm grows by e_k (2 sum_{l<k} e_l v_l.v_k + e_k v_k.v_k) at key k (memory nh*T*T, not *hd)."""
    err = np.zeros(e.shape[1:])
    for h in range(e.shape[0]):  # one head at a time: memory T*T, the errors summed over heads
        eh, Gh = e[h], G[h]
        D = np.cumsum(eh, axis=1)
        TN = np.cumsum(eh * tv[h], axis=1)
        R = eh @ np.tril(Gh, -1).T  # [q, k] = sum_{l<k} e_ql G_kl
        NN = np.cumsum(eh * (2.0 * R + eh * np.diagonal(Gh)[None, :]), axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            err += tt[h][:, None] - 2.0 * TN / D + NN / (D * D)
    return np.where(np.isfinite(err), err, np.inf)


def _key_ranges(e: np.ndarray, v: np.ndarray, yh: np.ndarray):
    """(first key L_q, end K_q, relative residual per query): the key range [L_q, K_q) each query used, by
    alternating the best end given the first key and the best first key given the end (from [0, T))."""
    T = e.shape[1]
    G, tv = v @ v.transpose(0, 2, 1), yh @ v.transpose(0, 2, 1)
    tt = np.sum(yh * yh, axis=2)
    keys, rows = np.arange(T), np.arange(T)
    L, K = np.zeros(T, np.int64), np.full(T, T)
    for _ in range(ROUNDS):
        # the end given the first key: keys before L_q carry no weight
        err = _prefix_errors(np.where(keys[None, None, :] >= L[None, :, None], e, 0.0), G, tv, tt)
        K = np.argmin(err, axis=1) + 1
        # the first key given the end: the same sums over the keys in reverse order
        masked = np.where(keys[None, None, :] < K[None, :, None], e, 0.0)[:, :, ::-1]
        rev = _prefix_errors(masked, G[:, ::-1, ::-1], tv[:, :, ::-1], tt)
        L_new = T - (np.argmin(rev, axis=1) + 1)
        if np.array_equal(L_new, L):
            break
        L = L_new
    err = _prefix_errors(np.where(keys[None, None, :] >= L[None, :, None], e, 0.0), G, tv, tt)
    K = np.argmin(err, axis=1) + 1
    res = np.sqrt(np.maximum(err[rows, K - 1], 0.0) / np.maximum(np.sum(tt, axis=0), 1e-300))
    # the alternation can stop at a local optimum: a few queries it leaves unexplained get every range tried
    # (many: the target is no key range of these scores, and trying them all would only cost time)
    bad = np.flatnonzero(res > TOKEN_FIT)
    for q in bad if len(bad) <= MAX_EXHAUSTIVE else []:
        lo, hi, r = _best_range(e[:, q], G, tv[:, q], tt[:, q])
        if r < res[q]:
            L[q], K[q], res[q] = lo, hi, r
    return L, K, res


def _best_range(e: np.ndarray, G: np.ndarray, tv: np.ndarray, tt: np.ndarray) -> tuple[int, int, float]:
    """(L, K, relative residual) of the best key range [L, K) for ONE query (e, tv: [nh, T]; tt: [nh]), over
    every range at once: sums over [L, K) are differences of prefix sums (2-D ones for ||N||^2)."""
    nh, T = e.shape
    err = np.zeros((T + 1, T + 1))
    for h in range(nh):
        S = np.concatenate([[0.0], np.cumsum(e[h])])
        TN = np.concatenate([[0.0], np.cumsum(e[h] * tv[h])])
        P = np.zeros((T + 1, T + 1))
        P[1:, 1:] = np.cumsum(np.cumsum(np.outer(e[h], e[h]) * G[h], axis=0), axis=1)
        NN = np.diagonal(P)[None, :] - P - P.T + np.diagonal(P)[:, None]  # [L, K]: sum over j, l in [L, K)
        D = S[None, :] - S[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            err += tt[h] - 2.0 * (TN[None, :] - TN[:, None]) / D + NN / (D * D)
    err = np.where(np.isfinite(err) & (np.arange(T + 1)[None, :] > np.arange(T + 1)[:, None]), err, np.inf)
    lo, hi = np.unravel_index(int(np.argmin(err)), err.shape)
    return int(lo), int(hi), float(np.sqrt(max(err[lo, hi], 0.0) / max(float(np.sum(tt)), 1e-300)))


def _masked_attention(ctx: SearchContext, x: dict, L: np.ndarray, K: np.ndarray) -> np.ndarray:
    """The spec's attention with query q attending to keys L_q..K_q-1 only (float64)."""
    q, k, v = (np.asarray(x[n], np.float64) for n in ctx.node.inputs[:3])
    T, nh, hd = q.shape
    s = (q.transpose(1, 0, 2) @ k.transpose(1, 2, 0)) * attention_scale(ctx.spec["scale"], hd)
    j = np.arange(T)[None, :]
    keep = (j >= L[:, None]) & (j < K[:, None])
    s = np.where(keep[None], s, -np.inf)
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    out = ((e / e.sum(axis=-1, keepdims=True)) @ v.transpose(1, 0, 2)).transpose(1, 0, 2)
    return (out if ctx.spec["output_layout"] == "heads_outer" else out.transpose(0, 2, 1)).reshape(T, nh * hd)


def _constant(values: np.ndarray):
    u = np.unique(values)
    return int(u[0]) if len(u) == 1 else None


def _upper_family(Ks, Ts):
    """(params, words) for the end K_q: all keys, a constant limit C, or q+1+b (causal when b = 0)."""
    q = np.concatenate([np.arange(T) for T in Ts])
    K, T = np.concatenate(Ks), np.concatenate([np.full(T, T) for T in Ts])
    short = K < T
    if not np.any(short):
        return {"upper": "all"}, None
    b = _constant(K[short] - q[short] - 1)
    if b is not None and np.array_equal(K, np.minimum(T, q + 1 + b)):
        return {"upper": "window", "ahead": b}, ("query q sees keys up to q" + (f"+{b}" if b else "") +
                                                 (" (causal)" if b == 0 else ""))  # fmt: skip
    C = _constant(K[short])
    if C is not None and np.array_equal(K, np.minimum(T, C)):
        return {"upper": "limit", "key_limit": C}, f"keys at positions >= {C} are dropped"
    return None


def _lower_family(Ls, Ts):
    """(params, words) for the first key L_q: 0, a constant C, or q-a."""
    q = np.concatenate([np.arange(T) for T in Ts])
    L = np.concatenate(Ls)
    if not np.any(L > 0):
        return {"lower": "none"}, None
    a = _constant(q[L > 0] - L[L > 0])
    if a is not None and np.array_equal(L, np.maximum(0, q - a)):
        return {"lower": "window", "behind": a}, f"query q sees keys from q-{a}" if a else "query q sees keys from q"
    C = _constant(L[L > 0])
    if C is not None and np.all(L == C):
        return {"lower": "limit", "first_key": C}, f"keys at positions < {C} are dropped"
    return None


def _attention_params(Ls, Ks, Ts):
    """(name, params, words) describing the recovered key ranges (None: they are the spec's, no mask)."""
    up, low = _upper_family(Ks, Ts), _lower_family(Ls, Ts)
    if up is not None and low is not None:
        if up[1] is None and low[1] is None:
            return None
        kind = "key_start" if up[1] is None and low[0]["lower"] == "limit" else "key_window"
        if low[1] is None:
            kind = {"limit": "key_limit", "window": "causal" if up[0].get("ahead") == 0 else "key_window"}[
                up[0]["upper"]
            ]
        words = "; ".join(w for w in (low[1], up[1]) if w)
        if low[0]["lower"] == up[0]["upper"] == "window":  # one phrase for a sliding window
            a, b = low[0]["behind"], up[0]["ahead"]
            words = f"a sliding window: query q sees keys q-{a}..q+{b} only"
        return f"ATTENTION.{kind}", {"mask": kind, **low[0], **up[0]}, words
    pairs = [(q, int(L[q]), int(K[q])) for L, K in zip(Ls, Ks, strict=True) for q in range(len(K))
             if L[q] > 0 or K[q] < len(K)]  # fmt: skip
    words = (
        "the keys each query used follow no simple family (q: first..last key: "
        + ", ".join(f"{q}: {lo}..{hi - 1}" for q, lo, hi in pairs[:6])
        + (" ..." if len(pairs) > 6 else "")
        + ")"
    )
    return "ATTENTION.key_ranges", {"mask": "recovered", "ranges": [list(p) for p in pairs[:40]]}, words


@register
def recover_attention_keys(ctx: SearchContext) -> Iterator[Finding]:
    """ATTENTION: the range of keys each query attended to (head-agnostic), and the mask family it follows."""
    node = ctx.node
    if node.op != "ATTENTION" or ctx.spec.get("mask") != "bidirectional" or len(node.inputs) < 3:
        return  # the families below are described relative to no mask (the spec of the supported models)
    Ls, Ks, Ts, worst = [], [], [], 0.0
    for x, y in zip(ctx.inputs, ctx.targets, strict=True):
        if ctx.deadline.expired():
            return
        e, v, yh = _heads(ctx, x, y)
        L, K, res = _key_ranges(e, v, yh)
        Ls.append(L)
        Ks.append(K)
        Ts.append(len(K))
        worst = max(worst, float(res.max()))
    if worst > TOKEN_FIT:
        log.info("%s: no key range reproduces every query (worst query residual %.2g)", node.name, worst)
        return
    described = _attention_params(Ls, Ks, Ts)
    if described is None:
        return
    name, params, words = described
    err = ctx.error_of([_masked_attention(ctx, x, L, K) for x, L, K in zip(ctx.inputs, Ls, Ks, strict=True)])
    hit = [i for i, (L, K) in enumerate(zip(Ls, Ks, strict=True)) if np.any(L > 0) or np.any(K < len(K))]
    says = (f"{node.name}: {words} (recovered per query; {len(hit)} of {len(Ts)} prompts affected, "
            f"{max(Ts[i] for i in hit)} tokens the longest); re-run with that mask: residual {err:.2e} "
            f"(spec {ctx.err0:.2e})")  # fmt: skip
    yield Finding("recovered", name, says, err, {**params, "worst_query_residual": worst})


# ------------------------------------------------------------------------------------------ POOL
def _spec_weights(mode: str, T: int) -> np.ndarray | None:
    """The per-token weights of the spec's pooling (None: the spec is not a weighted sum of tokens)."""
    w = np.zeros(T)
    if mode == "mean":
        w[:] = 1.0 / T
    elif mode == "sum":
        w[:] = 1.0
    elif mode in ("cls", "last"):
        w[0 if mode == "cls" else -1] = 1.0
    else:
        return None
    return w


def _token_weights(a: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, bool]:
    """(w, determined): least squares for y = sum_t w_t a_t. With more tokens than features (or repeated
    rows) the weights are not determined: any target is reproduced, so only a family can be tested there."""
    w, _, rank, _ = np.linalg.lstsq(a.T, y.reshape(-1), rcond=None)
    return w, rank == a.shape[0]


def _family_weights(T: int, a: int, b: int, norm: str) -> np.ndarray:
    """Weights with the first ``a`` and last ``b`` tokens left out, the rest 1/kept (``norm`` "kept") or 1/T."""
    w = np.zeros(T)
    if T - a - b <= 0:  # nothing left to pool: an engine keeps the tokens (a one-token prompt keeps its own)
        a, b = 0, 0
    w[a : T - b] = 1.0 / ((T - a - b) if norm == "kept" else T)
    return w


def _close(w: np.ndarray, f: np.ndarray) -> bool:
    return bool(np.all(np.abs(w - f) <= WEIGHT_TOL / len(w)))


def _exclusions(ws: list[np.ndarray], determined: list[bool]) -> list[tuple[int, int]]:
    """Candidate (first a, last b) exclusions: the leading and trailing near-zero weights of each prompt
    whose weights are determined (one token at either end when none is)."""
    out = []
    for w, det in zip(ws, determined, strict=True):
        zero = np.abs(w) <= WEIGHT_TOL / len(w)
        if det and not zero.all() and (c := (int(np.argmin(zero)), int(np.argmin(zero[::-1])))) not in out:
            out.append(c)
    return out or [(0, 0), (1, 0), (0, 1), (1, 1)]


def _pool_family(ctx: SearchContext, ws: list[np.ndarray], determined: list[bool]):
    """(a, b, norm): the same exclusion and normalisation on every prompt, matching the recovered weights
    where they are determined and reproducing the target (TOKEN_FIT) where they are not; None if none fits."""
    for a, b in _exclusions(ws, determined):
        for norm in ("kept", "all"):
            ok = True
            for w, det, x, y in zip(ws, determined, ctx.inputs, ctx.targets, strict=True):
                f = _family_weights(len(w), a, b, norm)
                if det:
                    ok = _close(w, f)
                else:
                    yy = np.asarray(y, np.float64).reshape(-1)
                    d = f @ np.asarray(x[ctx.node.inputs[0]], np.float64) - yy
                    ok = np.linalg.norm(d) <= TOKEN_FIT * max(np.linalg.norm(yy), 1e-300)
                if not ok:
                    break
            if ok:
                return a, b, norm
    return None


def _pool_words(a: int, b: int, norm: str) -> str:
    ends = [(a, "first"), (b, "last")]
    left = [f"the {end} token" if n == 1 else f"the {end} {n} tokens" for n, end in ends if n]
    what = (" and ".join(left) + (" are" if a + b > 1 else " is") + " left out") if left else "every token is kept"
    return what + (
        ", the rest averaged (weights 1/kept)" if norm == "kept" else ", weights 1/T (divided by all tokens)"
    )


@register
def recover_pool_weights(ctx: SearchContext) -> Iterator[Finding]:
    """POOL: the weight each token got (least squares per prompt), and the tokens left out (a family)."""
    node = ctx.node
    if node.op != "POOL" or ctx.spec.get("axis", "tokens") != "tokens":
        return
    ws, det = [], []
    for x, y in zip(ctx.inputs, ctx.targets, strict=True):
        if ctx.deadline.expired():
            return
        w, d = _token_weights(np.asarray(x[node.inputs[0]], np.float64), np.asarray(y, np.float64))
        ws.append(w)
        det.append(d)
    specs = [_spec_weights(ctx.spec.get("mode"), len(w)) for w in ws]
    if all(s is not None and (not d or _close(w, s)) for w, d, s in zip(ws, det, specs, strict=True)):
        return  # the spec's weights (or none determined)
    fam = _pool_family(ctx, ws, det)
    if fam is not None:
        a, b, norm = fam
        ws = [_family_weights(len(w), a, b, norm) for w in ws]
        params, words = {"left_out_first": a, "left_out_last": b, "normalised_by": norm}, _pool_words(a, b, norm)
        name = f"POOL.token_weights=first{a}_last{b}_{norm}"
    elif all(det):
        params = {"weights": [[float(f"{v:.4g}") for v in w[:16]] for w in ws[:4]]}
        words = "the token weights follow no simple family (first prompt: " + ", ".join(f"{v:.3g}" for v in ws[0][:8])
        words, name = words + ")", "POOL.token_weights"
    else:  # undetermined weights reproduce any target: reporting them would explain anything
        log.info("%s: token weights not determined (more tokens than features) and no family fits", node.name)
        return
    err = ctx.error_of([(w @ np.asarray(x[node.inputs[0]], np.float64)).reshape(1, -1)
                        for w, x in zip(ws, ctx.inputs, strict=True)])  # fmt: skip
    n_und = len(det) - sum(det)
    note = f"; {n_und} prompt(s) longer than the hidden size: weights not determined, family checked" if n_und else ""
    says = (f"{node.name}: pooling: {words} (recovered token weights on {len(ws)} prompts{note}); re-run with "
            f"them: residual {err:.2e} (spec {ctx.err0:.2e})")  # fmt: skip
    yield Finding("recovered", name, says, err, {**params, "undetermined_prompts": int(n_und)})
