"""Graph queries of actdiff.nodes (MoE blocks, producers/consumers, reduction lengths, key nodes), and a
count of node-name string literals outside the graph module: other modules should ask the graph."""

from __future__ import annotations

import ast
import json
import math
from collections import Counter

import pytest
from helpers import REPO

from actdiff.models.tiny import tiny_config
from actdiff.nodes import EMBEDDING, INPUT_IDS, POOLED, MoeBlock, build_graph


@pytest.fixture(scope="module")
def tiny(released_config):
    # the tiny model's config as models/tiny.py writes it; no node depends on the vocabulary size, so the
    # graph needs no generated model
    return build_graph(tiny_config(released_config, n_tokens=4000))


@pytest.fixture(scope="module")
def minilm(minilm_model_dir):
    return build_graph(json.loads((minilm_model_dir / "config.json").read_text()))


# ------------------------------------------------------------------------------------------ MoE blocks
def test_moe_blocks_tiny(tiny):
    blocks = tiny.moe_blocks()
    assert [b.layer for b in blocks] == [1, 3]
    m = "encoder.layers.3.mlp."
    assert blocks[1] == MoeBlock(
        layer=3,
        input="encoder.layers.3.norm1",
        logits=m + "router.logits",
        probs=m + "router.probs",
        topk_weights=m + "router.topk_weights",
        topk_indices=m + "router.topk_indices",
        fc1=m + "experts.fc1",
        act=m + "experts.act",
        expert_out=m + "experts.out",
        weighted_sum=m + "experts.weighted_sum",
        output=m + "experts.bias_add",
    )
    for b in blocks:
        ops = ["ROUTER", "SOFTMAX", "TOPK", "TOPK", "EXPERT_FC1", "GELU", "EXPERT_FC2", "MOE_SUM", "BIAS_ADD"]
        assert [tiny[n].op for n in b.nodes()] == ops
        assert all(tiny.moe_block_of(n) is b for n in b.nodes())
        assert tiny.moe_block_of(b.input) is None  # the layer's norm1 feeds the block, it is not in it
    assert tiny.moe_block_of("encoder.layers.0.mlp.fc2") is None
    assert tiny.moe_block_of(EMBEDDING) is None
    with pytest.raises(AttributeError):  # frozen: callers may key dicts by it
        blocks[0].layer = 0


def test_moe_blocks_bert(minilm):
    assert minilm.moe_blocks() == []
    assert all(minilm.moe_block_of(n) is None for n in minilm.names())


# ------------------------------------------------------------------------------- producers / consumers
def test_producers_and_consumers(tiny, minilm):
    names = lambda nodes: [n.name for n in nodes]  # noqa: E731
    for g in (tiny, minilm):
        assert names(g.producers("embeddings")) == []  # input_ids is the graph input, not a node
        assert names(g.consumers(INPUT_IDS)) == ["embeddings"]
        assert names(g.producers("encoder.layers.0.resid_attn")) == ["emb_ln", "encoder.layers.0.attn.out_proj"]
        assert names(g.producers(EMBEDDING)) == [POOLED]
        assert names(g.consumers(POOLED)) == [EMBEDDING]
        assert g.consumers(EMBEDDING) == []
        for n in g:  # the two views agree
            assert all(n in g.consumers(p.name) for p in g.producers(n.name))
    assert names(tiny.consumers("encoder.layers.1.norm1")) == [
        "encoder.layers.1.mlp.router.logits",
        "encoder.layers.1.mlp.experts.fc1",
        "encoder.layers.1.resid_mlp",
    ]
    assert names(tiny.consumers("encoder.layers.0.attn.qkv")) == [f"encoder.layers.0.attn.{s}" for s in "qkv"]
    assert names(minilm.consumers("emb_ln")) == [f"encoder.layers.0.attn.{s}" for s in "qkv"] + [
        "encoder.layers.0.resid_attn"
    ]
    assert names(tiny.producers("encoder.layers.1.mlp.experts.weighted_sum")) == [
        "encoder.layers.1.mlp.experts.out",
        "encoder.layers.1.mlp.router.topk_weights",
    ]


# ------------------------------------------------------------------------------------ reduction length
def test_reduction_length(tiny, minilm):
    H, F, E, k = 128, 512, 8, 2  # models/tiny.py TINY_ARCH
    expect = {
        "encoder.layers.0.attn.qkv": H,
        "encoder.layers.0.attn.out_proj": H,
        "encoder.layers.0.mlp.fc1": H,
        "encoder.layers.0.mlp.fc2": F,
        "encoder.layers.1.mlp.router.logits": H,
        "encoder.layers.1.mlp.router.probs": E,
        "encoder.layers.1.mlp.experts.fc1": H,
        "encoder.layers.1.mlp.experts.out": F,
        "encoder.layers.1.mlp.experts.weighted_sum": k,
        "encoder.layers.1.norm1": H,
        "encoder.layers.1.mlp.experts.act": 1,
        "encoder.layers.1.mlp.router.topk_weights": 1,
        "encoder.layers.0.attn.q_rot": 1,
        "encoder.layers.0.resid_attn": 1,
        EMBEDDING: H,
    }
    assert {n: tiny.reduction_length(n) for n in expect} == expect
    assert tiny.reduction_length(tiny[POOLED], tokens=7) == 7
    assert tiny.reduction_length("encoder.layers.0.attn.context", tokens=9) == 9
    with pytest.raises(ValueError, match="tokens"):
        tiny.reduction_length(POOLED)
    assert minilm.reduction_length("encoder.layers.5.attn.v") == 384
    assert minilm.reduction_length("encoder.layers.5.mlp.fc2") == 1536


def test_reduction_length_equals_the_array_derived_one(tiny, minilm):
    """budgets.sequential_sum_noise took K from the arrays before (hidden/inner for the MoE ops, else the
    input's row width); the graph must give the same integers, so every budget stays byte-identical."""
    for g in (tiny, minilm):
        d = g.dims
        for n in g:
            if n.op in ("MATMUL", "ROUTER", "EXPERT_FC1", "EXPERT_FC2"):
                old = {"ROUTER": d.hidden, "EXPERT_FC1": d.hidden, "EXPERT_FC2": d.inner}.get(
                    n.op, math.prod(g.shape(n.inputs[0], 5)) // 5
                )
                assert g.reduction_length(n) == old, n.name


# ----------------------------------------------------------------------------------------- key nodes
# the definition compare/stats.py used (names), kept here to pin Graph.key_nodes (roles) to it
OLD_KEY_SUFFIXES = ("attn.out_proj", "norm1", "mlp.fc2", "experts.bias_add", "router.logits", "router.probs", "norm2")
OLD_KEY_NODES = ("embeddings", "emb_ln", "pooled", "embedding")


def test_key_nodes_equal_the_old_definition(tiny, minilm):
    for g in (tiny, minilm):
        old = [n.name for n in g if n.name in OLD_KEY_NODES or n.name.endswith(OLD_KEY_SUFFIXES)]
        assert g.key_nodes() == old
    assert len(tiny.key_nodes()) == 4 + 2 * 4 + 2 * 6  # 2 dense and 2 MoE layers
    assert minilm.key_nodes()[:6] == [
        "embeddings",
        "emb_ln",
        "encoder.layers.0.attn.out_proj",
        "encoder.layers.0.norm1",
        "encoder.layers.0.mlp.fc2",
        "encoder.layers.0.norm2",
    ]
    assert minilm.key_nodes()[-2:] == [POOLED, EMBEDDING]


# -------------------------------------------------------------------------------- node-name literals
SRC = REPO / "src" / "actdiff"
# Counted: every string constant (docstrings excepted) in src/actdiff/**/*.py outside nodes.py that, with
# surrounding dots stripped (so "mlp." or ".norm1" pieces of name surgery count too), equals
#   (a) a canonical node name of the tiny NomicBERT-MoE or the MiniLM graph ("emb_ln", "encoder.layers.0.norm1"),
#   (b) a dotted suffix of at least two components of one ("router.probs", "experts.bias_add", "mlp.fc2"),
#   (c) the last component of one ("norm1", "topk_indices", "probs"), except GENERIC words, which are also
#       everyday identifiers (keyword arguments, top-k's k, an op's out) and would drown the signal.
# Not counted, because they name other things that merely share a node's spelling:
#   - the kernels package: C kernel names (the "embedding" lookup kernel); it sits below the graph;
#   - table names: keys of an ``outputs``/``*tables`` mapping, elements of a ``*_TABLES`` tuple
#     (the "embeddings" statistics table);
#   - row kinds: a value compared with a ``["kind"]`` column or given for a "kind" key (the prompts table's
#     "embedding" rows).
GENERIC = frozenset({"q", "k", "v", "out", "act", "qkv"})
EXCLUDED_DIRS = ("kernels",)
MAX_LITERALS = 5  # the target once stats.py, pipeline.py, importer.py, align.py, dump.py, report/data.py ask too


def _name_literals(graphs) -> set[str]:
    found = set()
    for g in graphs:
        for name in g.names():
            parts = name.split(".")
            found.add(name)
            found.update(".".join(parts[i:]) for i in range(1, len(parts) - 1))
            if parts[-1] not in GENERIC:
                found.add(parts[-1])
    return found


def _not_node_contexts(tree: ast.AST) -> set[int]:
    """ids of constants that are docstrings, table names or row kinds (see the rule above)."""
    skip: set[int] = set()

    def consts(nodes):
        return {id(c) for c in nodes if isinstance(c, ast.Constant)}

    def is_kind_column(e):
        return isinstance(e, ast.Subscript) and isinstance(e.slice, ast.Constant) and e.slice.value == "kind"

    def is_tables(e):
        label = e.id if isinstance(e, ast.Name) else e.attr if isinstance(e, ast.Attribute) else ""
        return label == "outputs" or label.endswith("tables")

    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            skip |= consts([body[0].value])  # module, class and function docstrings
        if isinstance(node, ast.Compare) and any(is_kind_column(e) for e in [node.left, *node.comparators]):
            skip |= consts([node.left, *node.comparators])
        elif isinstance(node, ast.Dict):
            kind_keys = [isinstance(k, ast.Constant) and k.value == "kind" for k in node.keys]
            skip |= consts(v for v, is_kind in zip(node.values, kind_keys, strict=True) if is_kind)
        elif isinstance(node, ast.Subscript) and is_tables(node.value):
            skip |= consts([node.slice])
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Tuple):
            if any(isinstance(t, ast.Name) and t.id.endswith("_TABLES") for t in node.targets):
                skip |= consts(node.value.elts)
    return skip


def count_node_name_literals(graphs) -> dict[str, list[str]]:
    """{file: ["line: literal", ...]} for every counted literal (see the rule above)."""
    names = _name_literals(graphs)
    hits: dict[str, list[tuple[int, str]]] = {}
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel == "nodes.py" or rel.startswith(tuple(d + "/" for d in EXCLUDED_DIRS)):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _not_node_contexts(tree)
        for c in ast.walk(tree):
            if isinstance(c, ast.Constant) and isinstance(c.value, str) and id(c) not in skip:
                if c.value.strip(".") in names:
                    hits.setdefault(rel, []).append((c.lineno, c.value))
    return {f: [f"{line}: {v!r}" for line, v in sorted(h)] for f, h in hits.items()}


def test_node_name_literals_outside_the_graph_module(tiny, minilm):
    hits = count_node_name_literals([tiny, minilm])
    per_file = Counter({f: len(v) for f, v in hits.items()})
    report = "\n".join(f"{n:3d} {f}\n      " + "\n      ".join(hits[f]) for f, n in per_file.most_common())
    print(f"node-name literals outside nodes.py: {sum(per_file.values())}\n{report}")
    assert sum(per_file.values()) <= MAX_LITERALS, (
        f"{sum(per_file.values())} node-name literals outside actdiff/nodes.py (at most {MAX_LITERALS}); "
        f"ask the graph (Graph.moe_blocks, key_nodes, producers, ...) or use its constants:\n{report}"
    )


def test_the_literal_rule_sees_name_surgery(tiny, minilm):
    """The counter finds the patterns it is meant to find, and skips table names and row kinds."""
    src = (
        'a = name.replace("topk_indices", "probs")\n'
        'b = prefix[: -len("mlp.")] + "norm1"\n'
        'c = ref["emb_ln"]\n'
        'd = outputs["embeddings"]\n'
        'e = prompts[prompts["kind"] == "embedding"]\n'
        'f = kernel("embedding", out=1)\n'
    )
    tree = ast.parse(src)
    names = _name_literals([tiny, minilm])
    skip = _not_node_contexts(tree)
    got = [c.value for c in ast.walk(tree) if isinstance(c, ast.Constant) and id(c) not in skip]
    counted = sorted(v for v in got if isinstance(v, str) and v.strip(".") in names)
    assert counted == ["emb_ln", "embedding", "norm1", "probs", "topk_indices"]
    assert "mlp" not in names  # "mlp." alone names no node (a module path piece)


def test_forced_moe_takes_the_block_or_its_router_name(tiny_model_dir):
    """forced_moe with the engine's own routing reproduces the block output of the fused forward, whether
    given the MoeBlock or its router's name (the statistics' call)."""
    import numpy as np

    from actdiff.engine.core import Engine
    from actdiff.errors import ActdiffError

    e = Engine(tiny_model_dir, threads=1)
    vals = e.forward(np.arange(3, 12), "fp32")
    for b in e.graph.moe_blocks():
        args = (vals[b.input], vals[b.topk_indices], vals[b.topk_weights])
        by_block = e.forced_moe(b, *args)
        np.testing.assert_array_equal(by_block, e.forced_moe(b.logits, *args))
        np.testing.assert_allclose(by_block, vals[b.output], rtol=1e-5, atol=1e-6)
    with pytest.raises(ActdiffError, match="not part of a mixture-of-experts block"):
        e.forced_moe("encoder.layers.0.norm1", *args)
