"""budgets.budget_terms / budget_of (what a statistics job works out once per node, ShardContext.budget): the same
budget, bit for bit, as the rule written out in one expression, for every node of the released model's graph at
every precision policy, engine, reference precision, override and noise value."""

import math

import numpy as np
import pytest

from actdiff.compare.budgets import (
    NOISE_FLOOR,
    SAFETY,
    TF32_OPS,
    U_ACT,
    U_REFERENCE,
    U_WEIGHTS,
    WEIGHTED_OPS,
    Noise,
    budget,
    budget_of,
    budget_terms,
)
from actdiff.models.released import released_config
from actdiff.nodes import build_graph
from actdiff.variants import ENGINE_PRECISIONS, policy


def _rule(node, precision, noise, overrides, reference, side) -> float:
    """The budget rule in one expression (budgets.budget's docstring and module docstring)."""
    import fnmatch

    for pattern, value in (overrides or {}).items():
        if fnmatch.fnmatchcase(node.name, pattern):
            return float(value)
    pol = policy(precision, side)
    u_w = U_WEIGHTS[pol.weights] if node.op in WEIGHTED_OPS and node.op not in pol.fp32_ops else 0.0
    u_a = U_ACT.get(pol.activations, 0.0) * (2 if node.kind != "index" else 0)
    u_r = U_REFERENCE[reference] if node.op in TF32_OPS else 0.0
    floor = noise.value if math.isfinite(noise.value) and noise.value > NOISE_FLOOR else NOISE_FLOOR
    return SAFETY * (floor + u_w + u_a + u_r)


NOISES = [Noise(math.nan), Noise(0.0), Noise(1e-9), Noise(3.7e-7, 5.1e-7), Noise(2e-6, 1e-7), Noise(math.inf, 4e-7)]


@pytest.mark.parametrize("side", sorted(ENGINE_PRECISIONS))
@pytest.mark.parametrize("reference", sorted(U_REFERENCE))
@pytest.mark.parametrize("overrides", [None, {"encoder.layers.0.*": 1e-3, "pooled": 2.5e-4}])
def test_terms_give_the_rule_bit_for_bit(side, reference, overrides):
    graph = build_graph(released_config())
    checked = 0
    for precision in ENGINE_PRECISIONS[side]:
        for node in graph:
            terms = budget_terms(node, precision, overrides, reference, side)
            for noise in NOISES:
                want = _rule(node, precision, noise, overrides, reference, side)
                got = (budget_of(terms, noise), budget(node, precision, noise, overrides, reference, side))
                assert np.float64(got[0]).tobytes() == np.float64(want).tobytes() == np.float64(got[1]).tobytes()
                checked += 1
    assert checked == len(ENGINE_PRECISIONS[side]) * len(graph) * len(NOISES)


def test_an_override_is_the_budget_whatever_the_noise():
    graph = build_graph(released_config())
    node = graph["pooled"]
    terms = budget_terms(node, "fp16", {"pool*": 0.125})
    assert terms.override == 0.125 and {budget_of(terms, n) for n in NOISES} == {0.125}
