"""Parameters recovered from the data (actdiff.compare.recover) on the tiny NomicBERT-MoE model.

Inputs are the tiny model's real activations (the spec ops run through the graph on its checkpoint; refops
reproduces the reference to ~1e-7); each planted bug builds the engine's output from those inputs and
checkpoint tensors in numpy (fp32-rounded, like an engine's), and the recovery must name what was used.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import tiny_spec_activations

from actdiff.compare.findings import Deadline, explains
from actdiff.compare.recover import RECOVERY_SEARCHERS
from actdiff.compare.refops import run_op, spec_params
from actdiff.compare.search import make_context
from actdiff.nodes import INPUT_IDS

BUDGET = 1e-5
PROMPTS, TOKENS = 10, 30  # 300 rows: enough for H=128-input matmuls (129), too few for fc2 (513)


class Tiny:
    def __init__(self):
        self.graph, self.weights, self.vals = tiny_spec_activations([TOKENS] * PROMPTS)

    def inputs(self, name: str) -> list[dict]:
        node = self.graph[name]
        keep = set(node.inputs)
        block = self.graph.moe_block_of(name)
        if block is not None:
            keep.add(block.topk_weights)
        return [{k: v[k] for k in keep} for v in self.vals]

    def planted(self, name: str, replace=None, params=None, inputs=None) -> list[np.ndarray]:
        """The engine's output under a planted bug, rounded to fp32 as an engine's would be."""
        node = self.graph[name]
        w = {k: (replace or {}).get(k, self.weights[k]) for k in node.weights}
        p = {**spec_params(self.graph, node), **(params or {})}
        xs = inputs if inputs is not None else self.inputs(name)
        return [run_op(self.graph, node, x, w, p).astype(np.float32) for x in xs]

    def findings(self, name: str, targets):
        ctx = make_context(self.graph, name, self.inputs(name), targets, self.weights, BUDGET, Deadline(600))
        found = sorted((f for s in RECOVERY_SEARCHERS for f in s(ctx)), key=lambda f: f.error)
        return ctx, found


@pytest.fixture(scope="module", autouse=True)
def one_blas_thread():
    """As the stats job runs the search (threadpool_limits(1)): threaded BLAS on these small matrices only
    spins against other jobs (the file takes ~12 s single-threaded, minutes when the cores are shared)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


@pytest.fixture(scope="module")
def tiny() -> Tiny:
    return Tiny()


def _top(tiny: Tiny, name: str, targets):
    ctx, found = tiny.findings(name, targets)
    assert found, f"{name}: nothing found (spec error {ctx.err0:.2e})"
    best = found[0]
    assert explains(best.error, ctx.err0, BUDGET), f"{name}: best {best.says} does not explain (err0 {ctx.err0:.2e})"
    json.dumps(best.to_dict())  # JSON-safe
    return best


def _w(tiny: Tiny, key: str) -> np.ndarray:
    return np.asarray(tiny.weights[key], np.float64)


# -------------------------------------------------------------------------------------- linear layers
def test_out_proj_with_another_layers_weight(tiny):
    other = "encoder.layers.0.attn.out_proj.weight"
    best = _top(
        tiny,
        "encoder.layers.1.attn.out_proj",
        tiny.planted("encoder.layers.1.attn.out_proj", {"encoder.layers.1.attn.out_proj.weight": _w(tiny, other)}),
    )
    assert best.name == f"MATMUL.weight<-{other}"
    assert best.params["slots"]["weight"]["tensor"] == other
    assert "another layer's" in best.says


def test_matmul_weight_scaled(tiny):
    own = "encoder.layers.0.mlp.fc1.weight"
    best = _top(tiny, "encoder.layers.0.mlp.fc1", tiny.planted("encoder.layers.0.mlp.fc1", {own: 0.5 * _w(tiny, own)}))
    m = best.params["slots"]["weight"]
    assert (m["tensor"], m["scale"], m["transposed"]) == (own, 0.5, False)
    assert "scaled by 0.5" in best.says


def test_matmul_bias_from_another_layer(tiny):
    own, other = "encoder.layers.2.attn.out_proj.bias", "encoder.layers.3.attn.out_proj.bias"
    best = _top(tiny, "encoder.layers.2.attn.out_proj",
                tiny.planted("encoder.layers.2.attn.out_proj", {own: _w(tiny, other)}))  # fmt: skip
    assert best.name == f"MATMUL.bias<-{other}"
    assert set(best.params["slots"]) == {"bias"}


def test_matmul_too_few_rows_falls_back_to_substitution(tiny):
    # fc2 has 512 inputs: 300 rows cannot determine it, every same-shaped tensor is substituted instead
    own, other = "encoder.layers.0.mlp.fc2.weight", "encoder.layers.2.mlp.fc2.weight"
    best = _top(tiny, "encoder.layers.0.mlp.fc2", tiny.planted("encoder.layers.0.mlp.fc2", {own: _w(tiny, other)}))
    assert best.kind == "structure" and best.params["tensor"] == other



def test_substitutions_scored_in_float32_keep_the_float64_least(tiny):
    """recover._substitution_errors on a MATMUL (search.coarse_scores): every substitution scored with float32
    products, those near the least again in float64. The least is the planted tensor with its float64 residual
    (as scoring each in float64 gives), each candidate is counted once in ``tried``, and the others kept their
    float32 residuals (the float64 pass ran on few of them)."""
    from actdiff.compare.recover import _rerun, _substitutes, _substitution_errors, _tensors_shaped

    name, other = "encoder.layers.1.attn.out_proj", "encoder.layers.0.attn.out_proj.weight"
    own = f"{name}.weight"
    targets = tiny.planted(name, {own: _w(tiny, other)})
    ctx = make_context(tiny.graph, name, tiny.inputs(name), targets, tiny.weights, BUDGET, Deadline(600))
    shape = tuple(np.shape(tiny.weights[own]))
    cands = [(n, t) for n in _tensors_shaped(ctx, {shape, shape[::-1]}) for t in (False, True)
             if _substitutes(ctx, n, t, own, shape)]  # fmt: skip
    tried = ctx.tried
    errs = _substitution_errors(ctx, own, cands)
    assert ctx.tried - tried == len(cands) == len(errs) > 4
    exact = [_rerun(ctx, {own: _w(tiny, n).T if t else _w(tiny, n)}) for n, t in cands]
    k = int(np.argmin(exact))
    assert cands[k] == (other, False) and int(np.argmin(errs)) == k and errs[k] == exact[k]
    assert sum(e == x for e, x in zip(errs, exact, strict=True)) < len(cands) / 2

ROUTER_PERM = [1, 0, 2, 3, 4, 5, 7, 6]


@pytest.mark.parametrize(
    ("name", "transform", "expected"),
    [
        ("encoder.layers.1.attn.out_proj", lambda w: w.T, {"transposed": True, "permutation": None}),
        ("encoder.layers.1.mlp.router.logits", lambda w: w[ROUTER_PERM], {"permutation": ROUTER_PERM}),
    ],
    ids=["t1", "t2"],
)
def test_matmul_weight_transformed(tiny, name, transform, expected):
    own = tiny.graph[name].weights[0]
    best = _top(tiny, name, tiny.planted(name, {own: transform(_w(tiny, own))}))
    m = best.params["slots"]["weight"]
    assert m["tensor"] == own and {k: m[k] for k in expected} == expected


def test_bias_add_scaled_by_topk_weight_sum(tiny):
    name = "encoder.layers.1.mlp.experts.bias_add"
    best = _top(tiny, name, tiny.planted(name, params={"bias": "per_expert"}))
    assert best.params["bias"] == "per_expert" and best.params["slots"] == {}


# -------------------------------------------------------------------------------------- LayerNorm
def test_layernorm_gamma_beta_swapped(tiny):
    g, b = "encoder.layers.0.norm1.weight", "encoder.layers.0.norm1.bias"
    best = _top(tiny, "encoder.layers.0.norm1",
                tiny.planted("encoder.layers.0.norm1", {g: _w(tiny, b), b: _w(tiny, g)}))  # fmt: skip
    assert best.name == "LAYERNORM.gamma<->beta"


def test_layernorm_gamma_from_another_layer(tiny):
    own, other = "encoder.layers.1.norm2.weight", "encoder.layers.2.norm2.weight"
    best = _top(tiny, "encoder.layers.1.norm2", tiny.planted("encoder.layers.1.norm2", {own: _w(tiny, other)}))
    assert best.name == f"LAYERNORM.gamma<-{other}"


# -------------------------------------------------------------------------------------- experts
def _expert_permutation(E: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    while True:  # neither the identity nor a +-1 shift: only an assignment finds it
        p = [int(e) for e in rng.permutation(E)]
        if all(any(p[e] != (e + s) % E for e in range(E)) for s in (0, 1, -1)):
            return p


@pytest.mark.parametrize("name", ["encoder.layers.1.mlp.experts.fc1", "encoder.layers.3.mlp.experts.out"])
def test_expert_permutation(tiny, name):
    d = tiny.graph.dims
    node = tiny.graph[name]
    key = node.weights[0]
    perm = _expert_permutation(d.experts, seed=len(name))
    permuted = _w(tiny, key).reshape(d.experts, d.inner, d.hidden)[perm].reshape(-1, d.hidden)
    best = _top(tiny, name, tiny.planted(name, {key: permuted}))
    assert best.name == f"{node.op}.expert_map"
    routed = {int(e) for x in tiny.inputs(name) for e in np.unique(x[node.inputs[1]])}
    assert {e: m for e, m in best.params["map"]} == {e: perm[e] for e in routed}
    assert best.params["orientation"] == "FH"


# -------------------------------------------------------------------------------------- embeddings
def test_token_ids_shifted(tiny):
    V = tiny.graph.dims.vocab
    shifted = [{INPUT_IDS: (x[INPUT_IDS] + 1) % V} for x in tiny.inputs("embeddings")]
    best = _top(tiny, "embeddings", tiny.planted("embeddings", inputs=shifted))
    assert best.name == "EMBED.token_ids+1" and "shifted by +1" in best.says


def test_token_rows_from_another_table(tiny):
    # any matrix as wide as the hidden size can serve as a table: the engine read an expert matrix
    own, other = "embeddings.word_embeddings.weight", "encoder.layers.1.mlp.experts.mlp.w1"
    best = _top(tiny, "embeddings", tiny.planted("embeddings", {own: _w(tiny, other)}))
    assert best.name == f"EMBED.table<-{other}" and best.params["tensor"] == other


# -------------------------------------------------------------------------------------- negatives
NEGATIVE_NODES = ["encoder.layers.1.attn.out_proj", "encoder.layers.0.norm1", "encoder.layers.1.mlp.experts.fc1",
                  "encoder.layers.1.mlp.experts.bias_add", "embeddings"]  # fmt: skip


@pytest.mark.parametrize("name", NEGATIVE_NODES)
@pytest.mark.parametrize("noise", [0.0, 100 * BUDGET])
def test_spec_and_noise_explain_nothing(tiny, name, noise):
    rng = np.random.default_rng(1)
    targets = tiny.planted(name)
    if noise:
        scale = noise * np.sqrt(sum(float(np.sum(t.astype(np.float64) ** 2)) for t in targets))
        n = [rng.standard_normal(t.shape) for t in targets]
        norm = np.sqrt(sum(float(np.sum(a * a)) for a in n))
        targets = [(t + a * scale / norm).astype(np.float32) for t, a in zip(targets, n, strict=True)]
    ctx, found = tiny.findings(name, targets)
    assert not [f for f in found if explains(f.error, ctx.err0, BUDGET)], [f.says for f in found]
