"""Embedding-level agreement (actdiff.compare.embeddings): the similarity matrices' rank correlation, computed
with numpy's sort (scipy.stats' import was a third of an aggregation job), against scipy.stats.spearmanr."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import rankdata, spearmanr

from actdiff.compare.embeddings import _unit, average_ranks, similarity_rank_correlation


@pytest.mark.parametrize("x", [np.arange(10.0)[::-1], np.array([3.0, 1, 2, 1, 3, 3]), np.zeros(5),
                               np.random.default_rng(0).integers(0, 7, 1000).astype(float)])  # fmt: skip
def test_average_ranks_are_scipys_with_ties(x):
    assert np.array_equal(average_ranks(x), rankdata(x))


@pytest.mark.parametrize(("n", "noise"), [(3, 0.5), (50, 1.0), (357, 0.01), (200, 0.0)])
def test_rank_correlation_is_scipys_spearman(n, noise):
    """Both are the Pearson correlation of the same ranks, summed in another order: equal to a few float64
    roundings of a value at most 1 (measured 1.1e-16); 1e-12 leaves room for other BLAS orders."""
    rng = np.random.default_rng(n)
    ref = rng.standard_normal((n, 16))
    eng = ref + noise * rng.standard_normal((n, 16))
    iu = np.triu_indices(n, 1)
    want = spearmanr((_unit(ref) @ _unit(ref).T)[iu], (_unit(eng) @ _unit(eng).T)[iu]).statistic
    assert similarity_rank_correlation(ref, eng) == pytest.approx(float(want), abs=1e-12)


def test_constant_similarities_have_no_rank_correlation():
    ref = np.ones((4, 3))  # every pair's cosine is 1: no ranking to correlate (scipy gives NaN too)
    assert np.isnan(similarity_rank_correlation(ref, ref))


def test_a_nan_embedding_gives_no_rank_correlation():
    """An engine whose embedding holds a NaN: no correlation to report (scipy propagates NaN; ranks would not)."""
    ref = np.random.default_rng(1).standard_normal((6, 4))
    eng = ref.copy()
    eng[2, 1] = np.nan
    assert np.isnan(similarity_rank_correlation(ref, eng))
