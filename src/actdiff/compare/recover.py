"""Parameters recovered from the data: what the engine actually used, named as a checkpoint tensor.

Where an op is linear in a parameter, the sample determines that parameter: the effective weight and bias of
a MATMUL/ROUTER (least squares over every row of the sample), the per-channel gamma/beta of a LAYERNORM
(a regression per channel), the bias of a BIAS_ADD (the mean of output minus input), the embedding row each
token looked up (the nearest row of the table), the checkpoint expert each routed expert id used (an
assignment problem). A recovered array is then identified among the checkpoint's tensors of the same shape
(or transposed), each with a fitted scalar scale and, for matrices, with rows or columns permuted (an
assignment problem on row similarities): "the effective weight equals layer 0's out_proj.weight".

A recovered array is never the explanation itself: every finding's error is the op RE-RUN on the sample with
the identified checkpoint values (transposed, scaled or permuted as identified) through
:func:`actdiff.compare.refops.run_op` under the spec's other parameters, so it is directly comparable with
the baseline. A recovered array that equals no checkpoint tensor is logged, not reported.

:func:`substitute_weights` covers the slots no identification handles (embedding tables, expert weights,
and linear layers whose sample has fewer rows than inputs + 1): every checkpoint tensor of the slot's shape
is substituted and evaluated exactly.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from ..batching import split_rows
from ..nodes import INPUT_IDS
from .findings import Finding
from .refops import NotApplicable, run_op
from .search import SearchContext, coarse_scores, float32_rounding, linear_after_product, register

log = logging.getLogger(__name__)

MATCH_TOL = 0.05  # a recovered array "equals" a checkpoint tensor when their relative distance is below this
SCALE_GAIN = 0.5  # a fitted scale is reported only when it at least halves the distance to the tensor
PERM_SIGNATURE_TOL = 0.02  # sorted row norms must agree this well before a permutation is searched
EXPERT_ROWS = 64  # rows per routed expert in the expert cost matrix (the exact re-run uses every row)
SAME_TOKEN_SHARE = 0.99  # EMBED: at least this share of rows looking up their own id is the spec
OFFSET_SHARE = 0.95  # EMBED: a constant id offset must hold for this share of rows
VOCAB_CHUNK = 8192  # EMBED: table rows compared at once (memory ~ rows x chunk)


# ------------------------------------------------------------------------------------------ helpers
def _shape_of(weights, name: str) -> tuple[int, ...]:
    shape_of = getattr(weights, "shape_of", None)  # CheckpointTensors reads it from the header
    return tuple(shape_of(name)) if shape_of is not None else tuple(np.shape(weights[name]))


def _tensors_shaped(ctx: SearchContext, shapes: set[tuple[int, ...]], first: str | None = None) -> list[str]:
    """Every checkpoint tensor whose shape is one of ``shapes`` (``first`` first, so the spec wins ties)."""
    names = [n for n in ctx.weights if _shape_of(ctx.weights, n) in shapes]
    if first in names:
        names.remove(first)
        names.insert(0, first)
    return names


def _stack(arrays) -> np.ndarray:
    """Per-prompt arrays [T, ...] as one float64 matrix of rows [sum T, prod(...)]."""
    return np.concatenate([np.asarray(a, np.float64).reshape(np.shape(a)[0], -1) for a in arrays])


def _rerun(ctx: SearchContext, replace: dict | None = None, params: dict | None = None, inputs=None) -> float:
    """Error of the op re-run on the sample with some checkpoint tensors replaced (exact values) and/or the
    inputs replaced, the spec's parameters otherwise: the same measure as the baseline."""
    replace = replace or {}
    w = {k: replace[k] if k in replace else ctx.weights[k] for k in ctx.node.weights}
    p = {**ctx.spec, **(params or {})}
    try:
        preds = [run_op(ctx.graph, ctx.node, x, w, p) for x in (inputs if inputs is not None else ctx.inputs)]
    except (NotApplicable, KeyError, ValueError, IndexError, FloatingPointError):
        ctx.tried += 1
        return float("inf")
    return ctx.error_of(preds)


def _whose(name: str, own: str) -> str:
    """How a tensor relates to the slot's own one, in words."""
    if name.rsplit(".", 1)[0] == own.rsplit(".", 1)[0]:  # the same module: its weight, or its bias
        return f"its own {name.rsplit('.', 1)[-1]}" + ("" if name == own else f" ({name})")
    if re.sub(r"\.\d+\.", ".#.", name) == re.sub(r"\.\d+\.", ".#.", own):
        return f"{name} (another layer's)"
    return name


def _snap(x: float) -> float:
    """A fitted scale rounded to 4 significant digits when that changes it by under 1e-4 (0.49999997 -> 0.5)."""
    if x == 0.0 or not np.isfinite(x):
        return x
    r = float(f"{x:.4g}")
    return r if abs(r - x) <= 1e-4 * abs(x) else x


def _fmt_perm(perm: list[int], limit: int = 6) -> str:
    moved = [(i, p) for i, p in enumerate(perm) if i != p]
    s = ", ".join(f"{i}->{p}" for i, p in moved[:limit])
    return s + (f", ... ({len(moved)} moved)" if len(moved) > limit else "")


# ------------------------------------------------------------------------------------------ matching
@dataclass
class Match:
    """A checkpoint tensor (or a constant) transformed to match a recovered array."""

    tensor: str | None  # None: the constant ``constant`` (zeros: dropped, ones: no scaling)
    constant: float = 0.0
    transposed: bool = False
    scale: float = 1.0
    perm: list[int] | None = None  # the transformed tensor's rows (perm_axis 0) or columns (1), reordered
    perm_axis: int = 0
    distance: float = float("inf")  # ||recovered - value|| / ||own tensor||

    def value(self, weights, shape) -> np.ndarray:
        """The exact checkpoint values under the transformation (what the re-run uses)."""
        if self.tensor is None:
            return np.full(shape, self.constant * self.scale)
        c = np.asarray(weights[self.tensor], np.float64)
        c = c.T if self.transposed else c
        if self.perm is not None:
            c = c[self.perm] if self.perm_axis == 0 else c[:, self.perm]
        return self.scale * c

    def is_spec(self, own: str) -> bool:
        return self.tensor == own and not self.transposed and self.scale == 1.0 and self.perm is None

    def label(self) -> str:
        s = self.tensor if self.tensor is not None else ("zeros" if self.constant == 0.0 else "ones")
        s += ".T" if self.transposed else ""
        s += ("[rows permuted]" if self.perm_axis == 0 else "[columns permuted]") if self.perm is not None else ""
        return s + ("*scaled" if self.scale != 1.0 and self.tensor is not None else "")

    def phrase(self, own: str) -> str:
        if self.tensor is None:
            return "zero (dropped)" if self.constant == 0.0 else f"the constant {self.scale:.4g}"
        words = [_whose(self.tensor, own)]
        if self.transposed:
            words.append("transposed")
        if self.scale != 1.0:
            words.append(f"scaled by {self.scale:.4g}")
        if self.perm is not None:
            axis = "output rows" if self.perm_axis == 0 else "input columns"
            words.append(f"with {axis} permuted ({_fmt_perm(self.perm)})")
        return ", ".join(words)

    def params(self) -> dict:
        return {"tensor": self.tensor, "constant": None if self.tensor else self.constant,
                "transposed": self.transposed, "scale": self.scale, "permutation": self.perm,
                "permuted_axis": self.perm_axis if self.perm is not None else None,
                "distance": self.distance}  # fmt: skip


def _scaled_fit(eff: np.ndarray, c: np.ndarray, ref: float) -> tuple[float, float]:
    """(scale, relative distance): scale 1 unless a fitted scale at least halves the distance."""
    d1 = float(np.linalg.norm(eff - c)) / ref
    cc = float(np.sum(c * c))
    if cc == 0.0:
        return 1.0, d1
    alpha = _snap(float(np.sum(eff * c)) / cc)
    if abs(alpha) * np.sqrt(cc) < MATCH_TOL * ref:  # a tensor scaled to nothing is the zero constant's case
        return 1.0, d1
    da = float(np.linalg.norm(eff - alpha * c)) / ref
    return (alpha, da) if da < SCALE_GAIN * d1 else (1.0, d1)


def _best_permutation(eff: np.ndarray, c: np.ndarray, ref: float, axis: int):
    """Rows (axis 0) or columns (1) of ``c`` reordered to match ``eff``, found as an assignment problem on
    cosine similarity between rows; None unless the sorted row norms agree (a permutation keeps them) and
    the permutation is not the identity. Returns (perm, scale, distance)."""
    a, b = (eff, c) if axis == 0 else (eff.T, c.T)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    sa, sb = np.sort(na) / max(np.linalg.norm(na), 1e-300), np.sort(nb) / max(np.linalg.norm(nb), 1e-300)
    if a.shape[0] < 2 or np.linalg.norm(sa - sb) > PERM_SIGNATURE_TOL:
        return None
    cos = (a / np.maximum(na, 1e-300)[:, None]) @ (b / np.maximum(nb, 1e-300)[:, None]).T
    rows, cols = linear_sum_assignment(-cos)
    perm = cols[np.argsort(rows)]
    if np.array_equal(perm, np.arange(len(perm))):
        return None
    cp = c[perm] if axis == 0 else c[:, perm]
    scale, dist = _scaled_fit(eff, cp, ref)
    return [int(p) for p in perm], scale, dist


def identify(
    ctx: SearchContext, eff: np.ndarray, own: str, constants: tuple[float, ...] = (), unseen: np.ndarray | None = None
) -> Match:
    """The checkpoint tensor (same shape, or transposed), or constant, closest to the recovered ``eff``.

    ``unseen``: an orthonormal basis of input directions the sample never varies along (LayerNorm outputs
    lie in a hyperplane); the rows of a matrix are compared without their components along it, since least
    squares cannot determine them."""
    eff = np.asarray(eff, np.float64)

    def seen(m: np.ndarray) -> np.ndarray:
        return m - (m @ unseen) @ unseen.T if unseen is not None and m.ndim == 2 else m

    eff = seen(eff)
    ref = float(np.linalg.norm(seen(np.asarray(ctx.weights[own], np.float64)))) or float(np.linalg.norm(eff)) or 1.0
    best = Match(None, distance=float("inf"))
    for name in _tensors_shaped(ctx, {eff.shape, eff.shape[::-1]}, first=own):
        if ctx.deadline.expired():
            break
        c0 = np.asarray(ctx.weights[name], np.float64)
        for transposed in (False, True):
            c = c0.T if transposed else c0
            if c.shape != eff.shape or (transposed and c0.ndim < 2):
                continue
            scale, dist = _scaled_fit(eff, seen(c), ref)
            m = Match(name, transposed=transposed, scale=scale, distance=dist)
            if dist > MATCH_TOL and eff.ndim == 2:
                m = _with_permutation(eff, seen(c), ref, m)
            if m.distance < best.distance:
                best = m
    for k in constants:
        c = np.full(eff.shape, k)
        scale, dist = _scaled_fit(eff, c, ref) if k != 0.0 else (1.0, float(np.linalg.norm(eff)) / ref)
        if dist < best.distance:
            best = Match(None, constant=k, scale=scale, distance=dist)
    return best


def _with_permutation(eff: np.ndarray, c: np.ndarray, ref: float, m: Match) -> Match:
    for axis in (0, 1):
        found = _best_permutation(eff, c, ref, axis)
        if found is not None and found[2] < m.distance:
            perm, scale, dist = found
            m = Match(m.tensor, transposed=m.transposed, scale=scale, perm=perm, perm_axis=axis, distance=dist)
    return m


# ------------------------------------------------------------------------------------------ findings
def _slot_findings(ctx: SearchContext, matches: list[tuple[str, str, Match]], params: dict | None = None):
    """Findings for recovered slots ``(slot, own tensor, match)``: each slot that differs from the spec and
    equals a checkpoint tensor alone, and all of them together when more than one differs."""
    node, shapes = ctx.node, {}
    changed = []
    for slot, own, m in matches:
        if m.is_spec(own):
            continue
        if m.distance > MATCH_TOL:
            log.info("%s: effective %s equals no checkpoint tensor (closest: %s, rel. distance %.2g)",
                     node.name, slot, m.label(), m.distance)  # fmt: skip
            continue
        shapes[own] = _shape_of(ctx.weights, own)
        changed.append((slot, own, m))
    groups = [[c] for c in changed] + ([changed] if len(changed) > 1 else [])
    if not changed and params:
        groups = [[]]
    for group in groups:
        if ctx.deadline.expired():
            return
        replace = {own: m.value(ctx.weights, shapes[own]) for _, own, m in group}
        err = _rerun(ctx, replace, params)
        yield Finding("recovered", _slot_name(node.op, group, params), _slot_says(ctx, group, params, err), err,
                      {"slots": {slot: m.params() for slot, _, m in group}, **(params or {})})  # fmt: skip


def _slot_name(op: str, group, params) -> str:
    # two slots holding each other's tensor, untransformed: a swap (LAYERNORM.gamma<->beta)
    plain = [m.tensor for _, _, m in group if m.perm is None and not m.transposed and m.scale == 1.0]
    if len(group) == 2 and plain == [group[1][1], group[0][1]]:
        return f"{op}.{group[0][0]}<->{group[1][0]}"
    name = "+".join(f"{op}.{slot}<-{m.label()}" for slot, _, m in group) or op
    return name + "".join(f".{k}={v}" for k, v in (params or {}).items())


_PARAM_WORDS = {
    ("bias", "per_expert"): "each row's bias is scaled by the sum of its top-k weights (added inside the expert loop)",
}


def _slot_says(ctx: SearchContext, group, params, err: float) -> str:
    parts = [f"its effective {slot} equals {m.phrase(own)} (rel. distance {m.distance:.1e})" for slot, own, m in group]
    if "<->" in _slot_name(ctx.node.op, group, None):
        parts.insert(0, f"its {group[0][0]} and {group[1][0]} are swapped")
    extra = [_PARAM_WORDS.get((k, v), f"{k} {v}") for k, v in (params or {}).items()]
    return (f"{ctx.node.name}: " + "; ".join(parts + extra) +
            f"; re-run with it: residual {err:.2e} (spec {ctx.err0:.2e})")  # fmt: skip


# ------------------------------------------------------------------------------------------ searchers
def _too_few_rows(ctx: SearchContext) -> bool:
    """MATMUL/ROUTER: least squares needs at least as many rows as unknowns per output (inputs + 1)."""
    rows = sum(np.shape(t)[0] for t in ctx.targets)
    width = int(np.prod(np.shape(ctx.inputs[0][ctx.node.inputs[0]])[1:]))
    return rows < width + 1


UNSEEN_RCOND = 1e-5  # singular values below this fraction of the largest: directions the sample does not vary
MAX_UNSEEN = 0.05  # more unseen input directions than this fraction: the weight is not determined


def _least_squares(a: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimum-norm least squares ``a @ sol ~ y`` and an orthonormal basis (columns) of the null space of
    ``a`` (fp32 inputs make a hyperplane only approximately exact, hence the relative cut-off)."""
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    keep = s > UNSEEN_RCOND * s[0]
    sol = vt[keep].T @ ((u[:, keep].T @ y) / s[keep][:, None])
    return sol, vt[~keep].T  # complete because callers ensure rows >= columns


@register
def recover_linear(ctx: SearchContext) -> Iterator[Finding]:
    """MATMUL/ROUTER: the effective weight by least squares, identified in the checkpoint; then the bias
    (when the node has one) as the mean residual of the identified weight, identified in turn."""
    node = ctx.node
    if node.op not in ("MATMUL", "ROUTER") or not node.weights:
        return
    x, y = _stack(x[node.inputs[0]] for x in ctx.inputs), _stack(ctx.targets)
    if _too_few_rows(ctx):
        log.info("%s: %d rows cannot determine a %d-input linear map (needs >= %d); not recovered",
                 node.name, x.shape[0], x.shape[1], x.shape[1] + 1)  # fmt: skip
        return
    has_bias = node.op == "MATMUL" and len(node.weights) > 1
    a = np.hstack([x, np.ones((x.shape[0], 1))]) if has_bias else x
    sol, null = _least_squares(a, y)
    if null.shape[1] > MAX_UNSEEN * a.shape[1]:
        log.info("%s: inputs span %d of %d dimensions; weight not recovered", node.name,
                 a.shape[1] - null.shape[1], a.shape[1])  # fmt: skip
        return
    # input directions the weight cannot be seen along (the x part of the null space, orthonormalised)
    unseen = np.linalg.qr(null[: x.shape[1]])[0] if null.shape[1] else None
    own, w_eff = node.weights[0], sol[: x.shape[1]].T
    wm = identify(ctx, w_eff, own, unseen=unseen)
    matches = [("weight", own, wm)]
    if has_bias:  # given the identified weight the bias is determined even where the weight alone is not
        b_eff = sol[-1] if wm.distance > MATCH_TOL else (y - x @ wm.value(ctx.weights, w_eff.shape).T).mean(axis=0)
        matches.append(("bias", node.weights[1], identify(ctx, b_eff, node.weights[1], constants=(0.0,))))
    yield from _slot_findings(ctx, matches)


@register
def recover_layernorm(ctx: SearchContext) -> Iterator[Finding]:
    """LAYERNORM: per-channel gamma and beta by regression on the normalised input, identified."""
    node = ctx.node
    if node.op != "LAYERNORM" or len(node.weights) < 2:
        return
    try:  # the normalised input under the spec's other parameters (eps, variance, precision)
        n = _stack(run_op(ctx.graph, node, x, ctx.weights, {**ctx.spec, "affine": False}) for x in ctx.inputs)
    except (NotApplicable, KeyError, ValueError):
        return
    y = _stack(ctx.targets)
    if y.shape[0] < 3:
        log.info("%s: %d rows cannot determine gamma and beta", node.name, y.shape[0])
        return
    nc, yc = n - n.mean(axis=0), y - y.mean(axis=0)
    var = np.sum(nc * nc, axis=0)
    gamma = np.sum(nc * yc, axis=0) / np.where(var > 0, var, 1.0)
    beta = y.mean(axis=0) - gamma * n.mean(axis=0)
    g, b = node.weights[0], node.weights[1]
    matches = [("gamma", g, identify(ctx, gamma, g, constants=(1.0,))),
               ("beta", b, identify(ctx, beta, b, constants=(0.0,)))]  # fmt: skip
    yield from _slot_findings(ctx, matches)


@register
def recover_bias_add(ctx: SearchContext) -> Iterator[Finding]:
    """BIAS_ADD: the added vector (mean of output - input), identified; rows scaled by the sum of the
    top-k weights (the bias added inside the per-expert loop) are recognised when those weights are given."""
    node = ctx.node
    if node.op != "BIAS_ADD" or not node.weights:
        return
    d = _stack(ctx.targets) - _stack(x[node.inputs[0]] for x in ctx.inputs)
    b, params = d.mean(axis=0), {}
    block = ctx.graph.moe_block_of(node.name)
    if block is not None and all(block.topk_weights in x for x in ctx.inputs):
        tw = _stack(x[block.topk_weights] for x in ctx.inputs).sum(axis=1)
        b_tw = tw @ d / max(float(tw @ tw), 1e-300)  # d_t = tw_t * b: least squares for b
        # per-row scaling only when it fits clearly better than one constant vector
        if np.linalg.norm(d - np.outer(tw, b_tw)) < SCALE_GAIN * np.linalg.norm(d - b):
            b, params = b_tw, {"bias": "per_expert"}
    own = node.weights[0]
    yield from _slot_findings(ctx, [("bias", own, identify(ctx, b, own, constants=(0.0,)))], params)


def _nearest_rows(ctx: SearchContext, r: np.ndarray, table: np.ndarray) -> np.ndarray | None:
    """Index of the table row nearest to each row of ``r`` (chunked over the table; None past the deadline)."""
    best_d = np.full(r.shape[0], np.inf)
    best_i = np.zeros(r.shape[0], np.int64)
    for start in range(0, table.shape[0], VOCAB_CHUNK):
        if ctx.deadline.expired():
            return None
        t = table[start : start + VOCAB_CHUNK]
        d = np.sum(t * t, axis=1)[None, :] - 2.0 * (r @ t.T)  # ||r||^2 is the same for every candidate
        i = np.argmin(d, axis=1)
        di = d[np.arange(r.shape[0]), i]
        better = di < best_d
        best_d[better], best_i[better] = di[better], i[better] + start
    return best_i


def _best_table(ctx: SearchContext, r: np.ndarray):
    """(tensor name, nearest row per row of ``r``, relative fit) over the node's token table first, then,
    when its rows do not fit, every other checkpoint matrix as wide as the hidden size (another table)."""
    own = ctx.node.weights[0]
    width = r.shape[1]
    wide = [n for n in ctx.weights if n != own and len(s := _shape_of(ctx.weights, n)) == 2 and s[1] == width]
    best = None
    for name in [own, *wide]:
        table = np.asarray(ctx.weights[name], np.float64)
        rows = _nearest_rows(ctx, r, table)
        if rows is None:
            break
        fit = float(np.linalg.norm(r - table[rows])) / max(float(np.linalg.norm(r)), 1e-300)
        if best is None or fit < best[2]:
            best = (name, rows, fit)
        if fit < MATCH_TOL:
            break
    return best


@register
def recover_token_map(ctx: SearchContext) -> Iterator[Finding]:
    """EMBED: which table row each token used (the spec's other added terms removed): its own token table
    or another one, and whether the id -> row mapping is a constant offset or a mirror."""
    node = ctx.node
    if node.op != "EMBED" or not node.weights:
        return
    own = node.weights[0]
    ids = [np.asarray(x[INPUT_IDS], np.int64).reshape(-1) for x in ctx.inputs]
    table = np.asarray(ctx.weights[own], np.float64)
    others = [s.reshape(len(i), -1) - table[i] for s, i in zip(ctx.spec_out, ids, strict=True)]  # type/position
    found = _best_table(
        ctx, _stack(t.reshape(len(i), -1) - o for t, o, i in zip(ctx.targets, others, ids, strict=True))
    )
    if found is None or found[2] > MATCH_TOL:
        log.info("%s: the embedded rows match no table row (closest %s, rel. distance %.2g)", node.name,
                 *(found[0::2] if found else ("none", float("inf"))))  # fmt: skip
        return
    name_t, rows, _ = found
    flat = np.concatenate(ids)
    if name_t == own and np.mean(rows == flat) >= SAME_TOKEN_SHARE:
        return
    size = _shape_of(ctx.weights, name_t)[0]
    name, what, fn, share = _id_relation(flat, rows, size)
    if fn is not None:  # a consistent function of the id: applied to every id (also ones it never saw)
        mapped = [fn(i) % size for i in ids]
    else:  # no simple function: the rows found, token by token
        mapped = split_rows(rows, [len(i) for i in ids])
    replace = {} if name_t == own else {own: ctx.weights[name_t]}
    err = _rerun(ctx, replace, inputs=[{**x, INPUT_IDS: m} for x, m in zip(ctx.inputs, mapped, strict=True)])
    pairs = sorted({(int(a), int(b)) for a, b in zip(flat, rows, strict=True) if a != b})
    examples = f"; e.g. {', '.join(f'{a}->{b}' for a, b in pairs[:4])}" if pairs else ""
    where = f"rows of {own}" if name_t == own else f"rows of {_whose(name_t, own)} instead of {own}"
    yield Finding("recovered", name + ("" if name_t == own else f"<-{name_t}"),
                  f"{node.name}: {where}, {what} ({share:.0%} of {len(flat)} rows{examples}); re-run with them: "
                  f"residual {err:.2e} (spec {ctx.err0:.2e})", err,
                  {"tensor": name_t, "relation": what, "share": float(share),
                   "examples": [list(p) for p in pairs[:20]]})  # fmt: skip


def _id_relation(ids: np.ndarray, rows: np.ndarray, vocab: int):
    """(name, words, function or None, share of rows it holds for): the table row each id looked up as a
    constant offset (row = id + k) or a mirror (row = c - id), modulo the table size (a shifted lookup
    wraps or clamps at the ends; wrapping is assumed), when one holds for most rows."""
    for sign in (1, -1):
        values, counts = np.unique((rows - sign * ids) % vocab, return_counts=True)
        c, share = int(values[np.argmax(counts)]), counts.max() / len(ids)
        c = c - vocab if sign == 1 and c > vocab // 2 else c  # -3, not +4029
        if share < OFFSET_SHARE:
            continue
        if sign == 1 and c == 0:
            return "EMBED.table", "token ids unchanged", (lambda i: i), share
        if sign == 1:
            return f"EMBED.token_ids{c:+d}", f"token ids shifted by {c:+d}", (lambda i, c=c: i + c), share
        return f"EMBED.token_ids_mirrored={c}", f"token ids mirrored: row {c} - id", (lambda i, c=c: c - i), share
    return "EMBED.token_map", "tokens looked up other rows", None, float(np.mean(rows != ids))


# ------------------------------------------------------------------------------------------ experts
def _expert_mats(raw: np.ndarray, dims, orientation: str) -> np.ndarray:
    """An expert tensor (E*F, H) as (E, F, H): ``FH`` as released, ``HF`` read as (E, H, F) and transposed
    (the two readings refops' w1/w2_orientation names)."""
    E, F, H = dims.experts, dims.inner, dims.hidden
    return raw.reshape(E, F, H) if orientation == "FH" else raw.reshape(E, H, F).transpose(0, 2, 1)


def _expert_rows(ctx: SearchContext):
    """(rows, expert ids, targets) with one row per top-k slot: FC1 repeats the token's row for each slot."""
    node = ctx.node
    idx = np.concatenate([np.asarray(x[node.inputs[1]], np.int64).reshape(-1) for x in ctx.inputs])
    xs = []
    for x in ctx.inputs:
        a = np.asarray(x[node.inputs[0]], np.float64)
        k = np.shape(x[node.inputs[1]])[1]
        xs.append(np.repeat(a, k, axis=0) if a.ndim == 2 else a.reshape(-1, a.shape[-1]))
    y = np.concatenate([np.asarray(t, np.float64).reshape(-1, np.shape(t)[-1]) for t in ctx.targets])
    return np.concatenate(xs), idx, y


def _expert_costs(x, idx, y, used, mats, fc1: bool) -> np.ndarray:
    """cost[i, e']: relative residual of the rows routed to expert used[i] computed with expert e'."""
    E = mats.shape[0]
    cost = np.zeros((len(used), E))
    for i, e in enumerate(used):
        sel = np.flatnonzero(idx == e)[:EXPERT_ROWS]
        xe, ye = x[sel], y[sel]
        # all experts at once (batched BLAS): FC1 out = x @ w1[e']^T (w1[e'] is F x H), FC2 out = x @ w2[e']
        pred = np.matmul(xe[None], mats.transpose(0, 2, 1) if fc1 else mats)
        cost[i] = np.sum((pred - ye[None]) ** 2, axis=(1, 2)) / max(float(np.sum(ye * ye)), 1e-300)
    return cost


def _complete_permutation(mapping: dict[int, int], E: int) -> list[int]:
    """A full permutation from a partial one: ids the sample never routes to take the experts left over."""
    left = iter(e for e in range(E) if e not in set(mapping.values()))
    return [mapping[e] if e in mapping else next(left) for e in range(E)]


def _best_expert_map(ctx: SearchContext, fc1: bool):
    """(orientation, {routed id: checkpoint expert}) of least total cost, trying both readings."""
    x, idx, y = _expert_rows(ctx)
    raw = np.asarray(ctx.weights[ctx.node.weights[0]], np.float64)
    used = [int(e) for e in np.unique(idx)]
    best = None
    for orientation in ("FH", "HF"):
        if ctx.deadline.expired():
            break
        cost = _expert_costs(x, idx, y, used, _expert_mats(raw, ctx.graph.dims, orientation), fc1)
        r, c = linear_sum_assignment(cost)
        total = float(cost[r, c].sum())
        if best is None or total < best[0]:
            best = (total, orientation, {used[i]: int(j) for i, j in zip(r, c, strict=True)})
    return best, raw


@register
def recover_expert_map(ctx: SearchContext) -> Iterator[Finding]:
    """EXPERT_FC1/FC2: which checkpoint expert each routed expert id used, as an assignment problem over
    the rows routed to each id (any permutation), and whether the expert matrices were read transposed."""
    node = ctx.node
    if node.op not in ("EXPERT_FC1", "EXPERT_FC2") or not node.weights:
        return
    fc1 = node.op == "EXPERT_FC1"
    best, raw = _best_expert_map(ctx, fc1)
    if best is None:
        return
    _, orientation, mapping = best
    E, slot = ctx.graph.dims.experts, ("w1" if fc1 else "w2")
    identity = all(e == m for e, m in mapping.items())
    if identity and orientation == ctx.spec.get(f"{slot}_orientation", "FH"):
        return
    perm = _complete_permutation(mapping, E)
    # the replacement read with the spec's orientation gives expert perm[e] (read as found) at id e
    mats = _expert_mats(raw, ctx.graph.dims, orientation)[perm]
    err = _rerun(ctx, {node.weights[0]: np.ascontiguousarray(mats).reshape(raw.shape)})
    unused = [e for e in range(E) if e not in mapping]
    moved = ", ".join(f"{e}->{m}" for e, m in sorted(mapping.items()))
    what = "expert ids map " + moved + (" (the identity)" if identity else " (not the identity)")
    what += f", {slot} read as {orientation}" if orientation != "FH" else ""
    what += f"; experts {unused} are never routed to in the sample (unassigned)" if unused else ""
    name = f"{node.op}.expert_map" if not identity else f"{node.op}.{slot}_orientation={orientation}"
    yield Finding("recovered", name, f"{node.name}: {what}; re-run with it: residual {err:.2e} (spec "
                  f"{ctx.err0:.2e})", err,
                  {"tensor": node.weights[0], "map": [[e, m] for e, m in sorted(mapping.items())],
                   "permutation": perm, "unassigned": unused, "orientation": orientation})  # fmt: skip


# ------------------------------------------------------------------------------------------ substitution
def _identified_elsewhere(ctx: SearchContext) -> bool:
    """Slots whose recovery above already compares them with every same-shaped tensor."""
    op = ctx.node.op
    return op in ("LAYERNORM", "BIAS_ADD") or (op in ("MATMUL", "ROUTER") and not _too_few_rows(ctx))


@register
def substitute_weights(ctx: SearchContext) -> Iterator[Finding]:
    """Every checkpoint tensor of a weight slot's shape (or its transpose) substituted for it and evaluated
    exactly; the best per slot is reported. Covers embedding tables, expert weights (another layer's, w1
    for w2) and linear layers too small a sample cannot recover."""
    node = ctx.node
    if not node.weights or _identified_elsewhere(ctx):
        return
    for own in node.weights:
        shape = _shape_of(ctx.weights, own)
        cands = [(name, transposed) for name in _tensors_shaped(ctx, {shape, shape[::-1]})
                 for transposed in (False, True) if _substitutes(ctx, name, transposed, own, shape)]  # fmt: skip
        errs = _substitution_errors(ctx, own, cands)
        best = min(((e, *c) for e, c in zip(errs, cands, strict=False)), key=lambda b: b[0], default=None)
        if best is not None and best[0] < ctx.err0:  # only a substitution that improves on the spec is news
            yield _substitution_finding(ctx, own, *best)


def _substitutes(ctx: SearchContext, name: str, transposed: bool, own: str, shape: tuple) -> bool:
    """Whether checkpoint tensor ``name`` (transposed) can stand for the slot ``own`` of ``shape``: the shape, not
    the slot's own tensor as it is, no vector transposed (read from the header, not the tensor)."""
    have = _shape_of(ctx.weights, name)
    if transposed and len(have) < 2:
        return False
    return (have[::-1] if transposed else have) == shape and not (name == own and not transposed)


def _substitution_errors(ctx: SearchContext, own: str, cands: list[tuple[str, bool]]) -> list[float]:
    """The residual of each substitution in ``cands`` (fewer once the deadline passes). Only their least is
    reported, so a MATMUL whose product nothing rounds after it scores them with float32 products first, and in
    float64 those near the least (search.coarse_scores: the same least, the same residual)."""

    def err(c: tuple[str, bool], counted: bool = True) -> float:
        before = ctx.tried
        t = np.asarray(ctx.weights[c[0]])
        e = _rerun(ctx, {own: t.T if c[1] else t})
        if not counted:  # scored again in float64 after coarse_scores' float32 pass: counted there
            ctx.tried = before
        return e

    if linear_after_product(ctx, {}) and np.isfinite(float32_rounding(ctx)):
        return coarse_scores(ctx, cands, err, lambda c: err(c, counted=False))
    errs = []
    for c in cands:
        if ctx.deadline.expired():
            break
        errs.append(err(c))
    return errs


def _substitution_finding(ctx: SearchContext, own: str, err: float, name: str, transposed: bool) -> Finding:
    slot = own.rsplit(".", 1)[-1] if ctx.node.op.startswith("EXPERT") else own.split(".")[-2]
    m = Match(name, transposed=transposed, distance=0.0)
    return Finding("structure", f"{ctx.node.op}.{slot}<-{m.label()}",
                   f"{ctx.node.name}: {own} replaced by {m.phrase(own)}: residual {err:.2e} (spec {ctx.err0:.2e})",
                   err, {"slot": own, "tensor": name, "transposed": transposed})  # fmt: skip


# this module's searchers in registration order (the tests run them without the rest of the search)
RECOVERY_SEARCHERS = (
    recover_linear,
    recover_layernorm,
    recover_bias_add,
    recover_token_map,
    recover_expert_map,
    substitute_weights,
)
