"""Loading one run's tables (summaries, shard statistics, tokens, model record) for a report."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..errors import ActdiffError
from ..layout import Layout
from ..tables import EMBEDDING_SAMPLE, SUMMARY_TABLES


@dataclass
class Run:
    """Everything a report about one (model, side, variant) needs: its summaries only (actdiff.tables), so a
    report's memory does not grow with the number of prompts."""

    results: Path
    model: str
    side: str
    variant: str
    model_info: dict
    verdict: dict
    embeddings_summary: dict
    config_parity: dict | None
    tokenization: dict
    imported: list[dict] = field(default_factory=list)  # an imported engine's per-shard records (Layout.import_record)
    summary: dict[str, pd.DataFrame] = field(default_factory=dict)  # SUMMARY_TABLES by name

    @property
    def layout(self) -> Layout:
        return Layout(str(self.results))

    @property
    def run_dir(self) -> Path:
        return Path(self.layout.run_dir(self.model, self.side, self.variant))


OPTIONAL_SUMMARIES = ("weights",)  # weight parity exists for the actdiff engine only


def _read_json(p: Path, required: bool = True) -> dict | None:
    if not p.is_file():
        if required:
            raise ActdiffError(f"report input {p} is missing; run the pipeline (snakemake) to produce it")
        return None
    return json.loads(p.read_text())


def load_run(results: str | Path, model: str, side: str, variant: str) -> Run:
    """Read the summaries of one run. Missing required inputs raise an ActdiffError naming the file."""
    L = Layout(str(Path(results).resolve()))
    run_id = (model, side, variant)
    run = Run(
        results=Path(L.results),
        model=model,
        side=side,
        variant=variant,
        model_info=_read_json(Path(L.model_json(model))) or {},
        verdict=_read_json(Path(L.verdict(*run_id))) or {},
        embeddings_summary=_read_json(Path(L.summary_json(*run_id, EMBEDDING_SAMPLE)), required=False) or {},
        config_parity=_read_json(Path(L.summary_json(*run_id, "config_parity")), required=False),
        tokenization=_read_json(Path(L.summary_json(*run_id, "tokenization")), required=False) or {},
    )
    run.imported = [json.loads(p.read_text()) for p in sorted(Path(L.results).glob(
        L.import_record(*run_id, "*")[len(L.results) + 1 :]))]  # fmt: skip
    for t in SUMMARY_TABLES:
        p = Path(L.summary(*run_id, t))
        if p.is_file():
            run.summary[t] = pd.read_parquet(p)
        elif t not in OPTIONAL_SUMMARIES:
            raise ActdiffError(f"report input {p} is missing; run the pipeline (snakemake) to produce it")
    return run


@dataclass
class IndexEntry:
    model: str
    side: str
    variant: str
    verdict: dict
    embeddings: dict = field(default_factory=dict)  # the run's embedding summary (compare.aggregate), {} if none


def load_index(results: str | Path, runs: str | list[str], required: bool = True) -> list[IndexEntry]:
    """The verdicts of the runs ``model/side/variant`` (a list, or one string separated by ';'); with
    ``required=False`` a run without a verdict gets an empty one (a baseline need not hold every run)."""
    results = Path(results).resolve()
    if isinstance(runs, str):
        runs = [r for r in runs.split(";") if r.strip()]
    out = []
    for r in runs:
        parts = r.strip().split("/")
        if len(parts) != 3:
            raise ActdiffError(f"index run {r!r} is not of the form model/side/variant")
        model, side, variant = parts
        L = Layout(str(results))
        v = _read_json(Path(L.verdict(model, side, variant)), required) or {}
        e = _read_json(Path(L.summary_json(model, side, variant, EMBEDDING_SAMPLE)), required=False) or {}
        out.append(IndexEntry(model, side, variant, v, e))
    return out
