"""An outside engine in the config, end to end (README "Your own engine: from a folder of tensors to a report").

The engine is examples/numpy-port (a numpy NomicBERT-MoE written from docs/spec.md, with its own tensor names
and layouts) through its mapping file, three ways in one pipeline run (tiny-nomic-moe, 6 prompts of the
bundled corpus in 2 shards, two of them truncated to the 512-token max_length):

- ``numpy``: the correct port, its tensors already in a folder per shard (``source:``), and
- ``numpy_eps``: the port with a deliberate bug (emb_ln with LayerNorm eps 1e-12), run by the pipeline
  (``command:``), both exactly as the README's walk-through configures them (its YAML block is read here);
- ``refdump``: the reference's own activations, dumped by canonical node name, imported without a mapping.

Asserted: the correct port passes ``actdiff check`` with every node within budget (attn.q_rot / attn.k_rot on
the 512-token prompts included); the buggy one fails with its first divergence at ``emb_ln`` and the
hypothesis ``layernorm_eps_1e-12`` named; the reference imported as an engine differs from the reference by
exactly 0 at every node and passes; each report shows the engine's name, mapping file and source or
command; the reference is dumped once per shard for all three engines and deleted afterwards (temp()).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import BIN, REPO, ensure_tiny_model, run_cmd, snakemake

from actdiff.layout import Layout

MODEL = "tiny-nomic-moe"
PORT = "examples/numpy-port/nomic_numpy.py"
MAPPING = "examples/numpy-port/mapping.yaml"
PROMPTS = ("long-0001", "long-0005", "en-0001", "en-cactus", "en-0005", "query-0003")
ROPE = re.compile(r"attn\.(?:q|k)_rot$")


def _prompt_sheet(dst) -> None:
    lines = (REPO / "config/prompts/default.tsv").read_text(encoding="utf-8").splitlines()
    keep = [ln for ln in lines[1:] if ln.split("\t", 1)[0] in PROMPTS]
    assert len(keep) == len(PROMPTS), "a prompt id of this test is no longer in config/prompts/default.tsv"
    dst.write_text("\n".join([lines[0], *keep]) + "\n", encoding="utf-8")


def readme_engines() -> list[dict]:
    """The engines block of the README's walk-through ("Diffing another engine"), as the user copies it."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = text.split("<!-- walkthrough-engines:", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    return yaml.safe_load(block)["engines"]


def _config(tmp) -> dict:
    engines = readme_engines()
    for e in engines:  # the README's relative dump folder, under this test's folder
        if "source" in e:
            e["source"] = str(tmp / e["source"])
    assert [e["name"] for e in engines] == ["numpy", "numpy_eps"] and "command" in engines[1]
    return {
        "prompts": str(tmp / "prompts.tsv"),
        "results": str(tmp / "results"),
        "shards": 2,
        "models": {MODEL: {"source": {"generate": MODEL, "seed": 0}, "max_length": 512}},
        "reference": {"impl": "actdiff", "threads": 1},
        "engines": [*engines, {"name": "refdump", "kind": "import", "source": str(tmp / "refdump/shard-{shard}")}],
        "stats": {"search_seconds": 0},  # the catalogue names the bug; no open-ended search needed
        "keep_activations": False,
    }


def _reference_as_engine(L: Layout, shard: int, out) -> None:
    """The reference's activations of one shard as an outside engine would dump them (canonical names)."""
    import torch

    from actdiff.models.record import ModelRecord
    from actdiff.sides import open_side
    from actdiff.sides.dump import read_token_items

    torch.set_num_threads(1)  # as the pipeline's dump_reference (reference.threads: 1)
    side = open_side("reference", ModelRecord.load(L.model_json(MODEL)), "fp32", impl="actdiff")
    for pid, vals in side.forward(read_token_items(L.tokens(MODEL, shard), side.ids_column)):
        (out / pid).mkdir(parents=True)
        for name, a in vals.items():
            np.save(out / pid / f"{name}.npy", a)
    side.close()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    ensure_tiny_model()
    tmp = tmp_path_factory.mktemp("import-engine")
    _prompt_sheet(tmp / "prompts.tsv")
    cfg = tmp / "config.yaml"
    cfg.write_text(yaml.safe_dump(_config(tmp), sort_keys=False))
    L = Layout(str(tmp / "results"))
    tokens = [L.tokens(MODEL, s) for s in (0, 1)]
    p = snakemake(*tokens, "--cores", "2", "--configfile", str(cfg))  # targets first: the token ids
    assert p.returncode == 0, p.stderr[-3000:]
    for s, t in enumerate(tokens):  # "my engine's tensors in a folder": the port run outside the pipeline
        q = run_cmd([sys.executable, PORT, "--model-dir", str(REPO / "resources/models" / MODEL), "--tokens", t,
                     "--out", str(tmp / f"my-dumps/shard-{s}")])  # fmt: skip
        assert q.returncode == 0, q.stderr[-3000:]
        _reference_as_engine(L, s, tmp / f"refdump/shard-{s}")
    p = snakemake("--cores", "2", "--configfile", str(cfg))  # default target all
    assert p.returncode == 0, p.stderr[-5000:]
    return tmp, L, cfg, p.stdout + p.stderr


def _nodes(L: Layout, side: str) -> pd.DataFrame:
    return pd.concat(pd.read_parquet(L.stats(MODEL, side, "fp32", s, "nodes")) for s in (0, 1))


def _verdict(L: Layout, side: str) -> dict:
    import json

    return json.loads(open(L.verdict(MODEL, side, "fp32")).read())


def _check(L: Layout, side: str):
    return run_cmd([str(BIN / "actdiff"), "check", L.results, "--only", f"{MODEL}/{side}/fp32"])


@pytest.mark.e2e
def test_the_shards_hold_a_512_token_prompt(run):
    _, L, _, _ = run
    toks = pd.concat(pd.read_parquet(L.tokens(MODEL, s)) for s in (0, 1))
    assert set(toks["prompt_id"]) == set(PROMPTS)
    assert all(len(pd.read_parquet(L.tokens(MODEL, s))) for s in (0, 1)), "both shards hold prompts"
    assert (toks["reference_length"] == 512).sum() >= 2 and toks["reference_truncated"].sum() >= 2


@pytest.mark.e2e
def test_correct_port_passes_every_node(run):
    _, L, _, _ = run
    assert _verdict(L, "numpy")["status"] == "pass"
    nodes = _nodes(L, "numpy")
    assert nodes["status"].eq("pass").all(), nodes.loc[nodes["status"] != "pass", ["prompt_id", "node", "status"]]
    long_rope = nodes[nodes["node"].str.contains(ROPE) & (nodes["tokens"] == 512)]
    assert len(long_rope) == 2 * 2 * 4  # 2 prompts of 512 tokens x q/k x 4 layers
    assert long_rope["status"].eq("pass").all()


@pytest.mark.e2e
def test_buggy_port_fails_at_emb_ln_with_the_cause_named(run):
    _, L, _, _ = run
    v = _verdict(L, "numpy_eps")
    assert v["status"] == "fail" and v["first_divergence"] == "emb_ln"
    causes = [c["hypothesis"] for c in v.get("causes", [])] or [v.get("hypothesis")]
    assert causes[0] == "layernorm_eps_1e-12", v


@pytest.mark.e2e
def test_reference_imported_as_an_engine_is_exact(run):
    _, L, _, _ = run
    assert _verdict(L, "refdump")["status"] == "pass"
    nodes = _nodes(L, "refdump")
    assert nodes["max_abs"].max() == 0.0  # the same values: no error at all against the reference
    assert nodes["status"].eq("pass").all()


@pytest.mark.e2e
def test_check_gates_each_engine(run):
    _, L, _, _ = run
    assert _check(L, "numpy").returncode == 0
    assert _check(L, "refdump").returncode == 0
    assert _check(L, "numpy_eps").returncode == 1


@pytest.mark.e2e
def test_reports_show_engine_mapping_and_source(run):
    tmp, L, _, _ = run
    html = open(L.report(MODEL, "numpy", "fp32"), encoding="utf-8").read()
    assert "numpy" in html and "examples/numpy-port/mapping.yaml" in html and str(tmp / "my-dumps") in html
    html = open(L.report(MODEL, "numpy_eps", "fp32"), encoding="utf-8").read()
    assert "numpy_eps" in html and "--bug emb_ln_eps" in html and "mapping.yaml" in html
    index = open(L.index(), encoding="utf-8").read()
    assert all(f"{MODEL}/{s}/fp32.html" in index for s in ("numpy", "numpy_eps", "refdump"))


@pytest.mark.e2e
def test_one_reference_dump_per_shard_for_every_engine(run):
    _, L, _, log = run
    assert len(re.findall(r"^(?:local)?rule dump_reference:", log, re.M)) == 2  # 2 shards, 3 engines
    assert not list(Path(L.results).rglob("*.h5"))  # temp(): every dump deleted once its consumers ran
