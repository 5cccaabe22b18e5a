"""Bad inputs that only show through the real pipeline (issue 15, the bad-input tour): a shard the hash gives
no prompt, a model replaced in place after a finished run. Small configs: the tiny model, fp32, our engine."""

from __future__ import annotations

import json
import textwrap

import pandas as pd
from helpers import ensure_tiny_model, snakemake

# p1 and p5 both hash to shard 1 of 2 (actdiff.prompts.shard_of), so shard 0 gets no prompt
TWO_PROMPTS = "prompt_id\ttext\np1\thello world\np5\tx = 1 + 2\n"


def _tiny_config(tmp_path, model_source: str, shards: int = 2) -> str:
    sheet = tmp_path / "p.tsv"
    sheet.write_text(TWO_PROMPTS, encoding="utf-8")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        textwrap.dedent(f"""\
        prompts: {sheet}
        results: {tmp_path}/r
        shards: {shards}
        variants: [fp32]
        engines: [actdiff]
        engine_threads: 1
        reference: {{threads: 1}}
        stats: {{search_seconds: 0}}
        models:
          tiny:
            source: {model_source}
            max_length: 64
        """),
        encoding="utf-8",
    )
    return str(cfg)


def _ok(p):
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    assert "Traceback" not in out
    return out


def test_empty_shard_runs_end_to_end(tmp_path):
    """Fewer prompts than shards is legal (the shard count is a config choice, the hash decides the rest): the
    empty shard gets empty tokens, dumps and statistics, and the verdict and report cover every prompt."""
    from actdiff.prompts import shard_of

    assert [shard_of(p, 2) for p in ("p1", "p5")] == [1, 1], "the test needs both prompts in one shard"
    model = ensure_tiny_model()
    _ok(snakemake("--cores", "2", "--configfile", _tiny_config(tmp_path, f"{{path: {model}}}")))
    r = tmp_path / "r"
    assert len(pd.read_parquet(r / "tiny/tokens/shard-0.parquet")) == 0
    assert len(pd.read_parquet(r / "tiny/tokens/shard-1.parquet")) == 2
    verdict = json.loads((r / "tiny/actdiff/fp32/summary/verdict.json").read_text())
    assert verdict["prompts"] == 2 and verdict["status"] == "pass", verdict["plain"]
    assert (r / "reports/tiny/actdiff/fp32.html").is_file() and (r / "reports/index.html").is_file()
