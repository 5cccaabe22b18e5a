"""MoE routing agreement between the reference and an engine.

Per (prompt, layer, token): both top-k expert sets, exact agreement (same set), Jaccard overlap, the
reference's router margin (gap between its k-th and (k+1)-th probability) and whether a disagreement is
explained by a near-tie: the margin is within the error the engine's router probabilities carry at that
token (``tie_threshold``: max abs error of the engine's probs at that token, floored at the probs budget),
so a correct engine could legitimately pick either expert.
"""

from __future__ import annotations

import numpy as np


def margins(probs: np.ndarray, k: int) -> np.ndarray:
    """k-th minus (k+1)-th largest probability per row (inf when k equals the number of experts)."""
    p = -np.sort(-np.asarray(probs, np.float64), axis=1)
    if p.shape[1] <= k:
        return np.full(p.shape[0], np.inf)
    return p[:, k - 1] - p[:, k]


def near_ties(ref_probs: np.ndarray, eng_probs: np.ndarray, k: int, probs_budget: float) -> np.ndarray:
    """Per token: could the engine's routing legitimately differ from the reference's? The reference's margin
    between the k-th and the next expert is within twice the engine's largest probability error on that token
    (or the probabilities' budget): a flip there is explained by error in the probabilities, not by the top-k."""
    m = margins(ref_probs, k)
    prob_err = np.abs(np.asarray(eng_probs, np.float64) - np.asarray(ref_probs, np.float64)).max(axis=1)
    return m <= np.maximum(2 * prob_err, probs_budget)


def routing_rows(
    prompt_id: str,
    layer: int,
    ref_idx: np.ndarray,
    eng_idx: np.ndarray,
    ref_probs: np.ndarray,
    eng_probs: np.ndarray,
    probs_budget: float,
) -> dict[str, list]:
    """Column lists (one entry per token) for the routing table."""
    T, k = ref_idx.shape
    m = margins(ref_probs, k)
    tie = near_ties(ref_probs, eng_probs, k, probs_budget)
    rs = [set(r) for r in ref_idx.tolist()]
    es = [set(e) for e in eng_idx.tolist()]
    agree = [a == b for a, b in zip(rs, es, strict=True)]
    jacc = [len(a & b) / len(a | b) for a, b in zip(rs, es, strict=True)]
    return {
        "prompt_id": [prompt_id] * T,
        "layer": [layer] * T,
        "token": list(range(T)),
        "ref_experts": ref_idx.astype(np.int16).tolist(),
        "eng_experts": eng_idx.astype(np.int16).tolist(),
        "agree": agree,
        "jaccard": jacc,
        "ref_margin": m.tolist(),
        "near_tie": tie.tolist(),
        "flip_explained": [(not a) and bool(t) for a, t in zip(agree, tie, strict=True)],
    }


def expert_load(idx: np.ndarray, n_experts: int) -> np.ndarray:
    """How many (token, slot) assignments each expert received."""
    return np.bincount(np.asarray(idx).ravel(), minlength=n_experts)[:n_experts]
