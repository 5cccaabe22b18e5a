"""Generalisation benchmark of the diagnosis: plant engine bugs the catalogue does not name and score what
the verdict reports.

    .venv/bin/python bench/diagnosis.py [--bugs id,id] [--prompts N] [--json out.json] [--workdir DIR] [--fast]

Every bug (bench/diagnosis_bugs.py: >= 22 porting mistakes, none of them a catalogue entry of
src/actdiff/data/hypotheses.yaml nor a deliberate fault of actdiff.engine.faults) is planted by patching
``actdiff.engine.core.Engine`` in this process only, for the engine's dump AND for the statistics stage
(whose replay of the engine's per-node code builds an Engine through ``actdiff.sides.open_replay``); the
comparison code is never patched. Stages run in-process, as the workflow's rules call them: the tiny
NomicBERT-MoE (generated, seed 0), a small corpus from config/prompts/default.tsv plus long prompts
(>= 200 tokens: one bug shows only there), the reference dumped ONCE, then per bug the engine's dump,
``compute_shard_stats`` (timed) and ``aggregate``, whose ``verdict.json`` is scored.

Score of a bug, from :func:`reported` (the one place that reads the verdict's schema):
- caught: the reported node is the bug's first divergent node and its cause passes the bug's predicate
  (a no-effect bug also needs status "deviates", not "fail");
- unexplained: right node, no cause or an "unexplained" one;
- wrong: right node with a named cause the predicate rejects, or a named cause on a wrong node;
- missed: status "pass", or a wrong node without a named cause.
False positives: the UNPATCHED engine at fp32, fp16, bf16 and int8; every run whose status is not "pass"
counts. ``--fast`` runs five representative bugs and fp32 only (tests/test_diagnosis_bench.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pandas as pd  # noqa: E402
from diagnosis_bugs import BUGS, Bug, engine_patched  # noqa: E402

from actdiff.layout import Layout  # noqa: E402
from actdiff.nodes import Graph  # noqa: E402
from actdiff.tables import AGGREGATE_JSON, AGGREGATE_TABLES, SHARD_TABLES  # noqa: E402

MODEL = "tiny-nomic-moe"
SIDE = "actdiff"
FAST_BUGS = ("fused_w1_rolled", "rope_offset_3", "rope_base_5000", "router_softmax_tokens", "expert_permuted")
FP_VARIANTS = ("fp32", "fp16", "bf16", "int8")  # as in config/config.yaml
LONG_PROMPTS = 3  # prompts of >= LONG_TOKENS tokens (bugs that show only on long prompts)
LONG_TOKENS = 200
SCORES = ("caught", "unexplained", "wrong", "missed")


@dataclass
class Setup:
    """The shared inputs of every run: the model record, the tokens and the reference's dump."""

    layout: Layout
    model_json: str
    tokens: str
    ref_h5: str
    graph: Graph

    def record(self):
        from actdiff.models.record import ModelRecord

        return ModelRecord.load(self.model_json)


# ------------------------------------------------------------------------------------------ corpus
def corpus(n_prompts: int) -> pd.DataFrame:
    """``n_prompts`` prompts: evenly spaced short rows of the default sheet (under 400 characters), and
    LONG_PROMPTS long ones made of consecutive English prose rows joined (~700 characters, 250-300 tokens:
    past the positions where the long-prompt bugs act, short enough to keep the statistics quick)."""
    from actdiff.prompts import load_prompt_sheet

    sheet = load_prompt_sheet(REPO / "config/prompts/default.tsv")
    short_rows = sheet[sheet["text"].str.len() < 400]
    n_short = max(n_prompts - LONG_PROMPTS, 1)
    step = max(len(short_rows) // n_short, 1)
    short = short_rows.iloc[::step].head(n_short)[["prompt_id", "text"]]
    prose = sheet.loc[sheet["prompt_id"].str.startswith("en-"), "text"].tolist()
    return pd.concat([short, pd.DataFrame([_long_prompt(prose, i) for i in range(LONG_PROMPTS)])], ignore_index=True)


def _long_prompt(texts: list[str], i: int, chars: int = 700) -> dict:
    parts: list[str] = []
    for t in texts[7 * i :] + texts:
        if sum(map(len, parts)) >= chars:
            break
        parts.append(t)
    return {"prompt_id": f"long-{i}", "text": " ".join(parts)}


def prepare(workdir: str | Path, n_prompts: int) -> Setup:
    """Model, tokens and the reference's dump, built once per workdir and prompt count and reused while the
    corpus is the same."""
    from actdiff.models.record import ModelRecord
    from actdiff.models.tiny import TRAINING_TEXT
    from actdiff.nodes import build_graph
    from actdiff.pipeline import dump, generate_model, resolve_model, tokenize

    layout = Layout(str(Path(workdir) / f"prompts-{n_prompts}"))
    models = Path(workdir) / "models"
    if not (models / MODEL / "config.json").is_file():
        generate_model(MODEL, str(models / MODEL), str(TRAINING_TEXT), seed=0)
    model_json, tokens = layout.model_json(MODEL), layout.tokens(MODEL, 0)
    ref_h5 = layout.activations(MODEL, "reference", "fp32", 0)
    prompts = corpus(n_prompts)
    if not Path(ref_h5).is_file() or not _same_corpus(layout.prompts(0), prompts):
        for path in (model_json, layout.prompts(0), tokens, ref_h5):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        resolve_model(MODEL, {"generate": MODEL, "seed": 0}, model_json, resources_dir=str(models))
        prompts.to_parquet(layout.prompts(0), index=False)
        tokenize(model_json, layout.prompts(0), 512, tokens)
        _check_long(tokens)
        dump(model_json, tokens, ref_h5, "reference", "fp32", 0, impl="actdiff", batch_size=16)
    return Setup(layout, model_json, tokens, ref_h5, build_graph(ModelRecord.load(model_json).config))


def _same_corpus(path: str, prompts: pd.DataFrame) -> bool:
    return Path(path).is_file() and pd.read_parquet(path).equals(prompts)


def _check_long(tokens: str) -> None:
    lengths = pd.read_parquet(tokens, columns=["reference_ids"])["reference_ids"].map(len)
    if (lengths >= LONG_TOKENS).sum() < LONG_PROMPTS:
        raise RuntimeError(f"the corpus has too few prompts of >= {LONG_TOKENS} tokens: {sorted(lengths)[-5:]}")


# --------------------------------------------------------------------------------------- one run
def run_engine(setup: Setup, label: str, variant: str = "fp32", patch: dict | None = None) -> dict:
    """Dump the engine (patched by ``patch``), compute its statistics under the same patch, aggregate; return
    the verdict with the seconds of each stage under ``_seconds``."""
    from actdiff.compare.stats import compute_shard_stats
    from actdiff.pipeline import dump

    L = setup.layout
    eng_h5 = L.activations(MODEL, SIDE, label, 0)
    Path(eng_h5).parent.mkdir(parents=True, exist_ok=True)
    shard = {t: L.stats(MODEL, SIDE, label, 0, t) for t in SHARD_TABLES}
    Path(shard["nodes"]).parent.mkdir(parents=True, exist_ok=True)
    seconds = {}
    with engine_patched(patch or {}):
        t0 = time.perf_counter()
        dump(setup.model_json, setup.tokens, eng_h5, SIDE, variant, 0, threads=1, engine_ids="reference")
        t1 = time.perf_counter()
        compute_shard_stats(setup.record().dir, setup.ref_h5, eng_h5, SIDE, variant, 0, shard)
        t2 = time.perf_counter()
    seconds.update(dump=t1 - t0, stats=t2 - t1)
    verdict = _aggregate(setup, label, variant, shard)
    seconds["aggregate"] = time.perf_counter() - t2
    Path(eng_h5).unlink()  # 2.4 MB per prompt: only the tables are kept
    return {**verdict, "_seconds": seconds}


def _aggregate(setup: Setup, label: str, variant: str, shard: dict) -> dict:
    from actdiff.compare.aggregate import aggregate
    from actdiff.compare.search_run import RunSearch

    L, record = setup.layout, setup.record()
    outputs = {t: L.summary(MODEL, SIDE, label, t) for t in AGGREGATE_TABLES}
    outputs.update({k: L.summary_json(MODEL, SIDE, label, k) for k in AGGREGATE_JSON})
    Path(outputs["verdict"]).parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": record.name,
        "side": SIDE,
        "variant": variant,
        "arch": record.arch,
        "weights_sha256": record.weights_sha256,
        "experts": int(record.config.get("num_experts", 0) or 0),
        "embedding_sample": 2000,
    }
    aggregate({t: [p] for t, p in shard.items()}, outputs, meta, tokens=[setup.tokens], search=RunSearch.of(record.dir))
    return json.loads(Path(outputs["verdict"]).read_text())


# ----------------------------------------------------------------------------------------- scoring
def reported(verdict: dict) -> tuple[str | None, dict | None]:
    """(node, cause) the verdict reports: the first replay mismatch if any (a fused-path bug), else the first
    divergence, else the output node whose error grows most; the cause is the one whose nodes hold that node.
    The one place that reads the verdict's schema (older verdicts lack replay_mismatches and outputs)."""
    mismatches = verdict.get("replay_mismatches") or []
    outputs = verdict.get("outputs") or {}
    node = (
        (mismatches[0].get("node") if mismatches else None)
        or verdict.get("first_divergence")
        or outputs.get("grows_most")
    )
    cause = next((c for c in verdict.get("causes") or [] if node is not None and node in (c.get("nodes") or [])), None)
    return node, cause


def _named(cause: dict | None) -> bool:
    return (
        cause is not None
        and cause.get("hypothesis") not in (None, "unexplained")
        and cause.get("kind") != ("unexplained")
    )


def score(bug: Bug, graph, verdict: dict) -> str:
    """caught | unexplained | wrong | missed (the rules in the module's docstring)."""
    node, cause = reported(verdict)
    if verdict.get("status") == "pass":
        return "missed"
    if node != bug.node(graph):
        return "wrong" if _named(cause) else "missed"
    if not _named(cause):
        return "unexplained"
    if not bug.predicate(graph)(cause):
        return "wrong"
    if bug.no_effect and verdict.get("status") != "deviates":
        return "wrong"  # right node and cause, but the outputs were said to diverge
    return "caught"


def _cause_words(cause: dict | None) -> str:
    if cause is None:
        return "-"
    says = cause.get("says") or ""
    return f"{cause.get('hypothesis')}: {says}"[:90] if says else str(cause.get("hypothesis"))


# ------------------------------------------------------------------------------------------ the runs
def observed_first(setup: Setup, label: str) -> str | None:
    """The first node, in graph order, that is not "pass" on some prompt (the statistics' own judgement,
    warnings included): checks that a bug changes the engine first where the bug says, whatever the
    diagnosis then reports."""
    nodes = pd.read_parquet(
        setup.layout.stats(MODEL, SIDE, label, 0, "nodes"), columns=["node", "node_index", "status"]
    )
    off = nodes[nodes["status"] != "pass"].sort_values("node_index")
    return None if off.empty else str(off["node"].iloc[0])


def run_bug(setup: Setup, bug: Bug) -> dict:
    verdict = run_engine(setup, f"bug-{bug.id}", "fp32", bug.patch(setup.graph))
    node, cause = reported(verdict)
    return {
        "id": bug.id,
        "category": bug.category,
        "description": bug.description,
        "expected_node": bug.node(setup.graph),
        "observed_first": observed_first(setup, f"bug-{bug.id}"),
        "expected_cause": bug.expect,
        "status": verdict.get("status"),
        "reported_node": node,
        "reported_cause": cause,
        "score": score(bug, setup.graph, verdict),
        "seconds": verdict["_seconds"],
    }


def false_positive(setup: Setup, variant: str) -> dict:
    verdict = run_engine(setup, f"unpatched-{variant}", variant)
    summary = pd.read_parquet(setup.layout.summary(MODEL, SIDE, f"unpatched-{variant}", "nodes"))
    failing = summary.loc[summary["fail"] > 0, "node"].tolist() if len(summary) else []
    return {
        "variant": variant,
        "status": verdict.get("status"),
        "false_positive": verdict.get("status") != "pass",
        "failing_nodes": failing,
        "first_divergence": verdict.get("first_divergence"),
        "seconds": verdict["_seconds"],
    }


def select_bugs(ids: list[str] | None) -> list[Bug]:
    if not ids:
        return list(BUGS)
    known = {b.id: b for b in BUGS}
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise SystemExit(f"unknown bug id(s) {unknown}; known: {', '.join(known)}")
    return [known[i] for i in ids]


def run_benchmark(
    workdir: str | Path = REPO / "results/bench/diagnosis",
    bug_ids: list[str] | None = None,
    n_prompts: int = 32,
    variants: tuple[str, ...] = FP_VARIANTS,
    fast: bool = False,
    progress=None,
) -> dict:
    """The whole benchmark (``fast``: FAST_BUGS and fp32 false positives); returns the results dict that
    ``--json`` writes. ``progress(line)`` is called after each run."""
    if fast:
        bug_ids, variants = bug_ids or list(FAST_BUGS), ("fp32",)
    t0 = time.perf_counter()
    setup = prepare(workdir, n_prompts)
    prep = time.perf_counter() - t0
    rows, fps = [], []
    for bug in select_bugs(bug_ids):
        rows.append(run_bug(setup, bug))
        if progress:
            progress(f"{bug.id}: {rows[-1]['score']} ({rows[-1]['seconds']['stats']:.1f} s statistics)")
    for v in variants:
        fps.append(false_positive(setup, v))
        if progress:
            progress(f"unpatched {v}: {fps[-1]['status']}")
    totals = {s: sum(r["score"] == s for r in rows) for s in SCORES}
    totals["percent_caught"] = 100.0 * totals["caught"] / max(len(rows), 1)
    return {
        "prompts": n_prompts,
        "model_dir": str(setup.record().dir),
        "bugs": rows,
        "totals": totals,
        "false_positives": fps,
        "false_positive_runs": sum(f["false_positive"] for f in fps),
        "seconds": {"prepare": prep, "total": time.perf_counter() - t0},
    }


# ------------------------------------------------------------------------------------------- output
def table(results: dict) -> str:
    """The results as a Markdown table and summary lines. "first off": the first node the statistics do
    not pass ("=" when it is the expected node), a check of the planted bug itself."""
    cols = ("bug", "category", "expected node", "expected cause", "first off", "status", "reported node")
    lines = ["| " + " | ".join((*cols, "reported cause", "score", "stats s")) + " |", "|" + "---|" * 10]
    for r in results["bugs"]:
        first = "=" if r["observed_first"] == r["expected_node"] else r["observed_first"]
        cells = [
            r["id"], r["category"], r["expected_node"], r["expected_cause"], first, r["status"],
            r["reported_node"] or "-", _cause_words(r["reported_cause"]), r["score"], f"{r['seconds']['stats']:.1f}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return "\n".join(lines + [""] + _summary_lines(results))


def _summary_lines(results: dict) -> list[str]:
    t, bugs = results["totals"], results["bugs"]
    planted = sum(r["observed_first"] == r["expected_node"] for r in bugs)
    lines = [
        f"totals: caught {t['caught']}, unexplained {t['unexplained']}, wrong {t['wrong']}, missed {t['missed']} "
        f"of {len(bugs)} ({t['percent_caught']:.0f} % caught)",
        f"planted-node check: {planted} of {len(bugs)} bugs are first off at their expected node",
    ]
    for f in results["false_positives"]:
        first = f" (first divergence {f['first_divergence']})" if f["failing_nodes"] else ""
        lines.append(f"unpatched {f['variant']}: status {f['status']}, {len(f['failing_nodes'])} failing nodes{first}")
    lines.append(f"false-positive runs: {results['false_positive_runs']} of {len(results['false_positives'])}")
    stats = [r["seconds"]["stats"] for r in bugs]
    s = results["seconds"]
    lines.append(
        f"seconds: prepare {s['prepare']:.1f}, statistics per bug median {_median(stats):.1f} "
        f"(max {max(stats, default=0):.1f}), total {s['total']:.1f}"
    )
    return lines


def _median(xs: list[float]) -> float:
    return float(pd.Series(xs).median()) if xs else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bugs", help="comma-separated bug ids (default: all)")
    ap.add_argument("--prompts", type=int, default=32, help="corpus size, long prompts included (default 32)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--workdir", default=str(REPO / "results/bench/diagnosis"))
    ap.add_argument("--fast", action="store_true", help=f"bugs {', '.join(FAST_BUGS)}; false positives at fp32")
    ap.add_argument("--list", action="store_true", help="list the bugs and exit")
    a = ap.parse_args(argv)
    if a.list:
        for b in BUGS:
            print(f"{b.id:24} {b.category:24} {b.description}")
        return 0
    ids = [i for i in (a.bugs or "").split(",") if i]
    results = run_benchmark(a.workdir, ids or None, a.prompts, fast=a.fast, progress=lambda s: print(s, flush=True))
    print(table(results))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
