"""The propagated budget's perturbation (actdiff.compare.propagation._perturb): its definition, checked against the
same draws written out plainly, its size, and what it leaves alone."""

from __future__ import annotations

import math

import numpy as np
import pytest

from actdiff.compare import propagation as P


def _plain(y: np.ndarray, budget: float, seed: int) -> np.ndarray:
    """The definition with the same draws, written as separate steps: a slice of the bank at the generator's
    offset for the per-element part, one standard normal per feature for the shared part, each scaled to half
    of the budget's energy."""
    rng = np.random.default_rng(seed)
    y2 = y.reshape(y.shape[0], -1).astype(np.float64)
    n = y2.size
    o = int(rng.integers(0, P.BANK_SIZE - n + 1))
    g = P._bank()[o : o + n].astype(np.float64).reshape(y2.shape)
    s = rng.standard_normal(y2.shape[1], dtype=np.float32).astype(np.float64)
    yn, shared = np.linalg.norm(y2), y2 * s
    c = budget * yn / math.sqrt(2.0)
    return (y2 + g * (c / np.linalg.norm(g)) + shared * (c / np.linalg.norm(shared))).reshape(y.shape)


@pytest.mark.parametrize("shape", [(30, 384), (7, 12, 32), (1, 64), (50,)])
def test_perturbation_is_its_definition(shape):
    """The one-pass norms (per-feature sums of squares of y, the dot of the draws) give the plain definition's
    values: to 1e-6 of the perturbation's size (float32 draws and a float32 dot of up to 10^4 of them)."""
    y = np.random.default_rng(1).standard_normal(shape)
    budget = 1e-3
    out = P._perturb(y, budget, np.random.default_rng(7))
    want = _plain(y, budget, 7)
    assert out.shape == y.shape and out.dtype == np.float64
    scale = budget * np.linalg.norm(y)
    assert np.linalg.norm(out - want) <= 1e-6 * scale


def test_perturbation_has_the_budget_as_relative_l2():
    """Two parts of norm budget*|y|/sqrt(2) each: |sum| = budget*|y|*sqrt(1 + cos) with cos their angle, which for
    n = 11,520 independent draws is within 5/sqrt(n) = 0.047 of 0 (so the ratio within [0.976, 1.023])."""
    y = np.random.default_rng(2).standard_normal((30, 384))
    for seed in range(5):
        d = P._perturb(y, 1e-4, np.random.default_rng(seed)) - y
        ratio = np.linalg.norm(d) / (1e-4 * np.linalg.norm(y))
        assert abs(ratio - 1.0) <= 1.0 - math.sqrt(1.0 - 5.0 / math.sqrt(y.size))


def test_perturbation_is_fixed_by_the_generator():
    y = np.random.default_rng(3).standard_normal((10, 16))
    a = P._perturb(y, 1e-3, np.random.default_rng(11))
    b = P._perturb(y, 1e-3, np.random.default_rng(11))
    c = P._perturb(y, 1e-3, np.random.default_rng(12))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize(
    "y, budget",
    [
        (np.zeros((4, 8)), 1e-3),  # nothing to scale
        (np.zeros((0, 8)), 1e-3),  # no tokens
        (np.full((4, 8), np.nan), 1e-3),  # a non-finite norm
        (np.ones((4, 8)), math.inf),  # no finite budget
        (np.ones((4, 8)), math.nan),
    ],
)
def test_perturbation_leaves_what_it_cannot_scale(y, budget):
    out = P._perturb(y, budget, np.random.default_rng(0))
    assert out is y


def test_bank_slices_are_standard_normal_and_large_nodes_draw_their_own():
    """A slice's mean and variance within 5 standard errors of 0 and 1; a node larger than half the bank draws
    fresh values of its size. (The draws' norm is the perturbation kernel's: tests/kernels/test_compare.py.)"""
    n = 100_000
    g = P._draw(n, np.random.default_rng(4))
    assert g.dtype == np.float32 and g.shape == (n,) and not g.flags.writeable
    assert abs(g.mean()) <= 5 / math.sqrt(n) and abs(g.var() - 1.0) <= 5 * math.sqrt(2 / n)
    big = P._draw(P.BANK_SIZE // 2 + 1, np.random.default_rng(4))
    assert big.shape == (P.BANK_SIZE // 2 + 1,) and big.flags.writeable and np.linalg.norm(big) > 0
