"""docs/nodes.md is generated from the graph: it must list exactly the current graph of both models."""

from __future__ import annotations

from helpers import REPO

from actdiff.cli import nodes_markdown
from actdiff.nodes import graph_for_model_dir


def test_nodes_doc_is_current(tiny_model_dir, minilm_model_dir):
    doc = (REPO / "docs/nodes.md").read_text()
    for d in (tiny_model_dir, minilm_model_dir):
        assert nodes_markdown(graph_for_model_dir(d)) in doc


def test_every_config_key_is_documented():
    import yaml

    from actdiff.config import SCHEMA

    schema = yaml.safe_load(SCHEMA.read_text())
    readme = (REPO / "config/README.md").read_text()
    for key in schema["properties"]:
        assert f"`{key}" in readme, key
