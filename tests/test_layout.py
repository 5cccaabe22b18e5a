"""The one path layout (actdiff.layout) and the one table registry (actdiff.tables): the Snakefile's header
lists the layout's scheme, every rule output is a layout path, and the registry names every table."""

from __future__ import annotations

import pytest
from helpers import REPO

from actdiff.layout import Layout
from actdiff.tables import AGGREGATE_TABLES, SHARD_TABLES, SUMMARY_TABLES


def test_snakefile_header_is_the_layout_scheme():
    text = (REPO / "Snakefile").read_text(encoding="utf-8").splitlines()
    start = next(i for i, ln in enumerate(text) if ln.startswith("# Path scheme"))
    listed = [ln for ln in text[start:] if ln.startswith("#   ")]
    assert listed[: len(Layout().scheme_lines())] == Layout().scheme_lines()


def test_paths_of_one_run():
    L = Layout("r")
    assert L.activations("m", "actdiff", "fp32", 3) == "r/m/actdiff/fp32/activations/shard-3.h5"
    assert L.stats("m", "llamacpp", "fp16", 0, "nodes") == "r/m/llamacpp/fp16/stats/shard-0/nodes.parquet"
    assert L.summary("m", "x", "fp32", "worst_prompts") == "r/m/x/fp32/summary/worst_prompts.parquet"
    assert L.verdict("m", "x", "fp32") == "r/m/x/fp32/summary/verdict.json"
    assert L.report("m", "x", "fp32") == "r/reports/m/x/fp32.html"
    assert L.log("tokenize", "m", "shard-0") == "r/logs/tokenize/m/shard-0.log"
    assert L.shard_of(L.stats("m", "s", "v", 12, "tokens")) == 12 and L.shard_of(L.tokens("m", 7)) == 7
    # wildcards pass through, so one method gives a rule's pattern and a concrete path
    assert L.tokens("{model}", "{shard}") == "r/{model}/tokens/shard-{shard}.parquet"
    with pytest.raises(KeyError, match="unknown table 'nope'"):
        L.summary("m", "s", "v", "nope")


def test_registry_names_every_table_once():
    assert set(AGGREGATE_TABLES) == set(SUMMARY_TABLES) - {"weights"}
    for t in [*SHARD_TABLES.values(), *SUMMARY_TABLES.values()]:
        assert t.file == f"{t.name}.parquet" and t.level in ("shard", "summary") and t.doc
    for t in SHARD_TABLES.values():  # a table that may be empty has a schema, so its columns survive
        if t.name in ("tokens", "routing", "hypotheses"):
            assert t.schema is not None


def test_runs_found_through_the_layout(tmp_path):
    L = Layout(str(tmp_path))
    for run in [("m", "actdiff", "fp32"), ("m", "llamacpp", "q8_0")]:
        p = tmp_path / L.verdict(*run)[len(str(tmp_path)) + 1 :]
        p.parent.mkdir(parents=True)
        p.write_text("{}")
    assert L.runs_with_verdicts() == [("m", "actdiff", "fp32"), ("m", "llamacpp", "q8_0")]
