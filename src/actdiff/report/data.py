"""Loading one run's tables (summaries, shard statistics, tokens, model record) for a report."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..errors import ActdiffError


@dataclass
class Run:
    """Everything a report about one (model, side, variant) needs."""

    results: Path
    model: str
    side: str
    variant: str
    model_info: dict
    verdict: dict
    embeddings_summary: dict
    config_parity: dict | None
    summary: dict[str, pd.DataFrame] = field(default_factory=dict)  # nodes, first_divergence, ...
    stats: dict[str, pd.DataFrame] = field(default_factory=dict)  # shard tables concatenated
    tokens: pd.DataFrame | None = None

    @property
    def run_dir(self) -> Path:
        return self.results / self.model / self.side / self.variant


SUMMARY_TABLES = ("nodes", "first_divergence", "hypotheses", "routing", "weights")
SHARD_TABLES = ("nodes", "tokens", "routing", "drilldown", "hypotheses", "prompts", "embeddings")


def _shard_dirs(d: Path) -> list[Path]:
    dirs = [p for p in d.glob("shard-*") if re.fullmatch(r"shard-\d+", p.name) and p.is_dir()]
    return sorted(dirs, key=lambda p: int(p.name.split("-")[1]))


def _read_json(p: Path, required: bool = True) -> dict | None:
    if not p.is_file():
        if required:
            raise ActdiffError(f"report input {p} is missing; run the pipeline (snakemake) to produce it")
        return None
    return json.loads(p.read_text())


def load_run(results: str | Path, model: str, side: str, variant: str) -> Run:
    """Read every table of one run. Missing required inputs raise an ActdiffError naming the file."""
    results = Path(results).resolve()
    run_dir = results / model / side / variant
    summ = run_dir / "summary"
    run = Run(
        results=results,
        model=model,
        side=side,
        variant=variant,
        model_info=_read_json(results / model / "model.json") or {},
        verdict=_read_json(summ / "verdict.json") or {},
        embeddings_summary=_read_json(summ / "embeddings.json", required=False) or {},
        config_parity=_read_json(summ / "config_parity.json", required=False),
    )
    for t in SUMMARY_TABLES:
        p = summ / f"{t}.parquet"
        if p.is_file():
            run.summary[t] = pd.read_parquet(p)
        elif t != "weights":  # weight parity exists for the actdiff engine only
            raise ActdiffError(f"report input {p} is missing; run the pipeline (snakemake) to produce it")
    shards = _shard_dirs(run_dir / "stats")
    if not shards:
        raise ActdiffError(f"no shard statistics under {run_dir / 'stats'}; run the pipeline to produce them")
    for t in SHARD_TABLES:
        frames = []
        for s in shards:
            p = s / f"{t}.parquet"
            if not p.is_file():
                raise ActdiffError(f"report input {p} is missing; run the pipeline (snakemake) to produce it")
            df = pd.read_parquet(p)
            if len(df):
                frames.append(df.assign(shard=int(s.name.split("-")[1])))
        run.stats[t] = pd.concat(frames, ignore_index=True) if frames else pd.read_parquet(shards[0] / f"{t}.parquet")
    tok_files = sorted((results / model / "tokens").glob("shard-*.parquet"))
    if tok_files:
        run.tokens = pd.concat([pd.read_parquet(p) for p in tok_files], ignore_index=True)
    return run


@dataclass
class IndexEntry:
    model: str
    side: str
    variant: str
    verdict: dict


def load_index(results: str | Path, runs: str | list[str]) -> list[IndexEntry]:
    """The verdicts of the runs ``model/side/variant`` (a list, or one string separated by ';')."""
    results = Path(results).resolve()
    if isinstance(runs, str):
        runs = [r for r in runs.split(";") if r.strip()]
    out = []
    for r in runs:
        parts = r.strip().split("/")
        if len(parts) != 3:
            raise ActdiffError(f"index run {r!r} is not of the form model/side/variant")
        model, side, variant = parts
        v = _read_json(results / model / side / variant / "summary" / "verdict.json") or {}
        out.append(IndexEntry(model, side, variant, v))
    return out
