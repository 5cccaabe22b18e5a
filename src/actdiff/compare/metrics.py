"""Error metrics between an engine array and the reference array of one node (one prompt).

All metrics are computed in float64 over the positions where both sides are finite; NaN/Inf are counted
separately on each side. ``max_ulp`` is the largest distance in units in the last place at fp32 (both
values viewed as ordered int32), so 1 means "adjacent floats".
"""

from __future__ import annotations

import math

import numpy as np

from ..kernels import compare_result, rel_l2_f32

FLOAT_METRICS = ("max_abs", "mean_abs", "rmse", "rel_l2", "cosine", "sqnr_db", "nmse", "max_ulp")


def _ordered_int(a: np.ndarray) -> np.ndarray:
    """fp32 bit patterns mapped to integers that are ordered like the floats (adjacent floats differ by 1)."""
    i = np.ascontiguousarray(a, dtype=np.float32).view(np.int32).astype(np.int64)
    return np.where(i < 0, np.int64(-0x80000000) - i, i)


def _norm(x: np.ndarray) -> float:
    # elementwise square and sum: no BLAS call (a BLAS dot per small array costs more than the math here)
    return math.sqrt(float(np.sum(x * x)))


def _fast(a, b) -> bool:
    """Both float32, C-contiguous, same shape: the one-pass C kernel applies."""
    return (
        isinstance(a, np.ndarray)
        and isinstance(b, np.ndarray)
        and a.dtype == np.float32
        and b.dtype == np.float32
        and a.shape == b.shape
        and a.flags.c_contiguous
        and b.flags.c_contiguous
    )


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b|| in float64 (0 when both are zero)."""
    if _fast(a, b):
        r = rel_l2_f32(a, b)
        if math.isfinite(r):  # NaN/Inf anywhere: the numpy definition below decides (nan or inf)
            return r
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    num = _norm(a - b)
    den = _norm(b)
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def nonfinite_match(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """(positions non-finite on both sides with the same value class: NaN, +Inf or -Inf; positions where only
    one side is non-finite or the classes differ). The first are the same NaN/Inf computed twice (a NaN in
    the weights reaches both sides alike), the second a divergence."""
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind != "f" or (np.isfinite(a).all() and np.isfinite(b).all()):
        return 0, 0
    na, nb = np.isnan(a), np.isnan(b)
    pa, pb, ma, mb = np.isposinf(a), np.isposinf(b), np.isneginf(a), np.isneginf(b)
    same = (na & nb) | (pa & pb) | (ma & mb)
    either = na | nb | pa | pb | ma | mb
    return int(same.sum()), int((either & ~same).sum())


def rel_l2_finite(a: np.ndarray, b: np.ndarray) -> float:
    """:func:`rel_l2` over the positions finite on both sides (NaN when there are none)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind != "f" or (np.isfinite(a).all() and np.isfinite(b).all()):
        return rel_l2(a, b)
    both = np.isfinite(a) & np.isfinite(b)
    return rel_l2(a[both], b[both]) if both.any() else math.nan


def local_error(a: np.ndarray, b: np.ndarray) -> tuple[int, int, float]:
    """(:func:`nonfinite_match`, :func:`rel_l2_finite`) of ``a`` against ``b``, the pair the statistics judge a
    node's local error by. For two float32 arrays the C kernel's relative L2 comes first: it lets NaN and Inf
    propagate (kernels_c compare.c), so a finite result proves both arrays finite, and the four finiteness passes
    of the two functions are skipped (they were a tenth of a small model's statistics job). Otherwise, or when
    anything is not finite, the two functions decide as before."""
    if _fast(a, b):
        r = rel_l2_f32(a, b)
        if math.isfinite(r):
            return 0, 0, r
    same, diverged = nonfinite_match(a, b)
    return same, diverged, rel_l2_finite(a, b)


def compare(eng: np.ndarray, ref: np.ndarray) -> dict:
    """Metrics of ``eng`` against ``ref`` (same shape [rows, ...]). Location: row (token) and flat channel.

    float32 inputs go through the one-pass C kernel (ak_compare); anything else through
    :func:`compare_reference`, the numpy definition it is tested against."""
    if eng.shape != ref.shape:
        raise ValueError(f"shape mismatch: engine {eng.shape} vs reference {ref.shape}")
    if not _fast(eng, ref) or eng.size == 0:
        return compare_reference(eng, ref)
    s = compare_result(eng, ref)
    out = {"nan_ref": s.nan_ref, "inf_ref": s.inf_ref, "nan_eng": s.nan_eng, "inf_eng": s.inf_eng}
    n = s.n_valid
    if n == 0:
        out.update({k: math.nan for k in FLOAT_METRICS})
        out.update(max_abs_token=-1, max_abs_channel=-1)
        return out
    per_row = eng.size // max(eng.shape[0], 1) if eng.ndim else 1
    flat, sig, err = s.argmax, s.sum_sq_ref, s.sum_sq_err
    ne, nr = math.sqrt(s.sum_sq_eng), math.sqrt(sig)
    out.update(
        max_abs=s.max_abs,
        max_abs_token=flat // per_row if per_row else 0,
        max_abs_channel=flat % per_row if per_row else 0,
        mean_abs=s.sum_abs / n,
        rmse=math.sqrt(err / n),
        rel_l2=(math.sqrt(err) / nr) if nr > 0 else (0.0 if err == 0 else math.inf),
        cosine=s.dot / (ne * nr) if ne > 0 and nr > 0 else (1.0 if ne == nr else 0.0),
        sqnr_db=(10 * math.log10(sig / err)) if err > 0 and sig > 0 else math.inf,
        nmse=(err / sig) if sig > 0 else (0.0 if err == 0 else math.inf),
        max_ulp=int(s.max_ulp),
    )
    return out


def compare_reference(eng: np.ndarray, ref: np.ndarray) -> dict:
    """The numpy definition of :func:`compare` (any float dtype)."""
    if eng.shape != ref.shape:
        raise ValueError(f"shape mismatch: engine {eng.shape} vs reference {ref.shape}")
    e = np.asarray(eng, np.float64)
    r = np.asarray(ref, np.float64)
    fe, fr = np.isfinite(e), np.isfinite(r)
    all_finite = bool(fe.all() and fr.all())
    out = {"nan_ref": 0, "inf_ref": 0, "nan_eng": 0, "inf_eng": 0}
    if not all_finite:
        out = {
            "nan_ref": int(np.isnan(r).sum()),
            "inf_ref": int(np.isinf(r).sum()),
            "nan_eng": int(np.isnan(e).sum()),
            "inf_eng": int(np.isinf(e).sum()),
        }
        both = fe & fr
        if not both.any():
            out.update({k: math.nan for k in FLOAT_METRICS})
            out.update(max_abs_token=-1, max_abs_channel=-1)
            return out
        e = np.where(both, e, 0.0)
        r = np.where(both, r, 0.0)
        n = int(both.sum())
    else:
        n = e.size
    d = e - r
    ad = np.abs(d)
    flat = int(np.argmax(ad))
    per_row = ad.size // max(ad.shape[0], 1)
    sig = float(np.sum(r * r))
    err = float(np.sum(d * d))
    ne, nr = _norm(e), math.sqrt(sig)
    ulp_e, ulp_r = (eng, ref) if all_finite else (eng[both], ref[both])
    out.update(
        max_abs=float(ad.flat[flat]),
        max_abs_token=flat // per_row if per_row else 0,
        max_abs_channel=flat % per_row if per_row else 0,
        mean_abs=float(ad.sum() / n),
        rmse=math.sqrt(err / n),
        rel_l2=(math.sqrt(err) / nr) if nr > 0 else (0.0 if err == 0 else math.inf),
        cosine=float(np.sum(e * r) / (ne * nr)) if ne > 0 and nr > 0 else (1.0 if ne == nr else 0.0),
        sqnr_db=(10 * math.log10(sig / err)) if err > 0 and sig > 0 else math.inf,
        nmse=(err / sig) if sig > 0 else (0.0 if err == 0 else math.inf),
        max_ulp=int(np.max(np.abs(_ordered_int(ulp_e) - _ordered_int(ulp_r)))),
    )
    return out


def per_token_errors(eng: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(max abs error, relative L2) of each row (token)."""
    e = np.asarray(eng, np.float64).reshape(eng.shape[0], -1)
    r = np.asarray(ref, np.float64).reshape(ref.shape[0], -1)
    d = e - r
    den = np.sqrt(np.sum(r * r, axis=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(den > 0, np.sqrt(np.sum(d * d, axis=1)) / den, 0.0)
    return np.abs(d).max(axis=1), rel
