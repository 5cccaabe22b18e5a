"""The reference on CUDA against the reference on the CPU, with TF32 off and on (issue 20).

    .venv/bin/python bench/reference_gpu.py                      # tiny + full size, 8 corpus prompts + 1 of 512 tokens
    .venv/bin/python bench/reference_gpu.py --skip-fullsize --prompts 4   # a quick look
    .venv/bin/python bench/reference_gpu.py --device cuda:1 --out results/bench/reference_gpu

Runs the reference side (actdiff.sides.reference, as dump_reference runs it) three times per model on the same
token ids: on the CPU (fp32), on CUDA in true fp32 (``reference.allow_tf32: false``: TF32 off, matmul precision
highest, deterministic algorithms) and on CUDA with TF32 allowed. Models: the tiny model and a full-size
NomicBERT-MoE (the released config, random fp32 weights: actdiff.models.fullsize, built once into
``--fullsize-dir``). Prompts: the first ``--prompts`` prompts of config/prompts/default.tsv tokenized by the
reference's tokenizer, plus one of 512 random token ids (fixed seed): the longest reductions.

Per node it writes the relative L2 of each pair (``cuda_fp32`` vs ``cpu``, ``cuda_tf32`` vs ``cpu``,
``cuda_tf32`` vs ``cuda_fp32``): median and max over the prompts, ||a - b|| / ||b|| over the node's values of one
prompt (for the expert ids: the fraction of ids that differ). Outputs: ``<out>.csv`` (model, node, op, pair,
rel_l2_median, rel_l2_max, prompts), ``<out>.json`` (the same rows, each run's recorded provenance: device,
versions, torch numerics, time) and a printout of the key nodes. The budgets' TF32 term
(actdiff.compare.budgets.U_REFERENCE: 2^-10 at matmul-like nodes, times SAFETY ~ 6.3) is printed beside them.

Without CUDA it exits with status 2 and says so: nothing here is meaningful on the CPU alone.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PAIRS = (("cuda_fp32", "cpu"), ("cuda_tf32", "cpu"), ("cuda_tf32", "cuda_fp32"))
SEED = 1234
LONG = 512  # tokens of the random prompt (the released model's limit)
NO_CUDA = 2  # exit status without a CUDA device


def cuda_or_exit(device: str) -> str:
    """The CUDA device ``device`` names; stops with a clear message (exit 2) where torch has none: a result
    measured on the CPU alone would pretend."""
    import torch

    from actdiff.errors import ConfigError
    from actdiff.reference_device import pick_device

    try:
        resolved = pick_device(device)
        why = "" if resolved.startswith("cuda") else f"--device {device} resolves to {resolved}"
    except ConfigError as e:
        why = str(e)
    if why:
        print(
            f"bench/reference_gpu.py needs a CUDA device and found none usable (torch {torch.__version__}, "
            f"torch.cuda.is_available() = {torch.cuda.is_available()}): {why}.\nRun it on a machine with an "
            "NVIDIA GPU and a CUDA build of torch; nothing was measured.",
            file=sys.stderr,
        )
        sys.exit(NO_CUDA)
    return resolved


def prompt_ids(model_dir: Path, n: int, vocab: int) -> list[tuple[str, list[int]]]:
    """The first ``n`` corpus prompts as the reference's tokenizer gives them, and one random 512-token prompt."""
    from actdiff.prompts import load_prompt_sheet
    from actdiff.token_shards import load_reference_tokenizer, tokenize_texts

    sheet = load_prompt_sheet(ROOT / "config/prompts/default.tsv").head(n)
    toks = tokenize_texts(load_reference_tokenizer(model_dir), sheet["text"].tolist(), LONG)
    items = [(str(p), list(r["ids"])) for p, r in zip(sheet["prompt_id"], toks, strict=True)]
    rng = np.random.default_rng(SEED)
    items.append(("random-512", [0, *rng.integers(5, vocab - 1, LONG - 2).tolist(), 2]))
    return items


def run_reference(record, device: str, allow_tf32: bool, items) -> dict:
    """Every node of every prompt from the reference side on ``device`` (``record``: the model's
    actdiff.models.record.ModelRecord), its provenance and its time. Sides run one after another: torch's
    numerics flags are process-wide, and the side sets and restores them."""
    from actdiff.sides import open_side

    side = open_side("reference", record, "fp32", device=device, allow_tf32=allow_tf32, batch_size=1)
    try:
        t0 = time.perf_counter()
        values = {pid: vals for pid, vals in side.forward(items)}
        seconds = time.perf_counter() - t0
        provenance = side.provenance()
    finally:
        side.close()
    return {"values": values, "provenance": provenance, "seconds": seconds}


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b|| in float64 (0 when both are 0)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    den, num = float(np.linalg.norm(b)), float(np.linalg.norm(a - b))
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


def node_errors(graph, runs: dict[str, dict], pairs=PAIRS) -> list[dict]:
    """One row per (node, pair): median and max over the prompts of the pair's relative L2 (index nodes: the
    fraction of ids that differ)."""
    rows = []
    for node in graph:
        for a, b in pairs:
            if a not in runs or b not in runs:
                continue
            errs = []
            for pid, ref in runs[b]["values"].items():
                x, y = runs[a]["values"][pid][node.name], ref[node.name]
                errs.append(float(np.mean(x != y)) if node.kind == "index" else rel_l2(x, y))
            rows.append({"node": node.name, "op": node.op, "pair": f"{a} vs {b}",
                         "rel_l2_median": float(np.median(errs)), "rel_l2_max": float(np.max(errs)),
                         "prompts": len(errs)})  # fmt: skip
    return rows


def print_table(model: str, graph, rows: list[dict]) -> None:
    """The key nodes (Graph.key_nodes) and the worst node of each pair."""
    from actdiff.compare.budgets import SAFETY, U_REFERENCE

    pairs = list(dict.fromkeys(r["pair"] for r in rows))
    by = {(r["node"], r["pair"]): r for r in rows}
    print(f"\n== {model}: relative L2 per node, median / max over {rows[0]['prompts']} prompts")
    print(f"{'node':48s} " + " ".join(f"{p:>24s}" for p in pairs))
    for n in graph.key_nodes():
        cells = [by[(n, p)] for p in pairs if (n, p) in by]
        print(f"{n:48s} " + " ".join(f"{c['rel_l2_median']:>11.2e} /{c['rel_l2_max']:>10.2e}" for c in cells))
    for p in pairs:
        worst = max((r for r in rows if r["pair"] == p and r["op"] not in ("TOPK",)), key=lambda r: r["rel_l2_max"])
        print(f"worst float node, {p}: {worst['node']} ({worst['op']}) max {worst['rel_l2_max']:.2e}")
    print(f"budgets' TF32 term at matmul-like nodes: SAFETY x 2^-10 = {SAFETY * U_REFERENCE['tf32']:.2e}")


def write_outputs(out: Path, rows: list[dict], meta: dict) -> None:
    """<out>.csv and <out>.json, each written atomically."""
    from actdiff.atomic import atomic_path, write_json_atomic

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out.with_suffix(".csv")) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["model", "node", "op", "pair", "rel_l2_median", "rel_l2_max", "prompts"])
        w.writeheader()
        w.writerows(rows)
    write_json_atomic(out.with_suffix(".json"), {**meta, "rows": rows})
    print(f"\nwrote {out.with_suffix('.csv')} and {out.with_suffix('.json')}")


def measure(model: str, model_dir: Path, device: str, n_prompts: int) -> tuple[list[dict], dict]:
    """The three runs of one model and their per-node errors; returns (rows, what each run recorded)."""
    from actdiff.models.record import ModelRecord

    record = ModelRecord.from_dir(model_dir, model)  # hashes the weights once
    graph = record.graph()
    items = prompt_ids(model_dir, n_prompts, graph.dims.vocab)
    runs = {}
    for name, dev, tf32 in (("cpu", "cpu", False), ("cuda_fp32", device, False), ("cuda_tf32", device, True)):
        runs[name] = run_reference(record, dev, tf32, items)
        print(f"{model}: {name} on {runs[name]['provenance']['device']} "
              f"({runs[name]['provenance']['device_name']}) {runs[name]['seconds']:.2f} s")  # fmt: skip
    rows = [{"model": model, **r} for r in node_errors(graph, runs)]
    print_table(model, graph, rows)
    recorded = {k: {"provenance": r["provenance"], "seconds": r["seconds"]} for k, r in runs.items()}
    return rows, {"prompts": [p for p, _ in items], "tokens": [len(x) for _, x in items], "runs": recorded}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="the CUDA device (reference.device syntax): cuda or cuda:N")
    ap.add_argument("--prompts", type=int, default=8, help="corpus prompts (plus one random 512-token prompt)")
    ap.add_argument("--skip-fullsize", action="store_true", help="the tiny model only")
    ap.add_argument("--tiny-dir", default=str(ROOT / "resources/models/tiny-nomic-moe"))
    ap.add_argument("--fullsize-dir", default="results/bench/fullsize-random")
    ap.add_argument("--out", default="results/bench/reference_gpu", help="writes OUT.csv and OUT.json")
    args = ap.parse_args(argv)
    device = cuda_or_exit(args.device)
    from actdiff import sysinfo
    from actdiff.api import model_dir

    tiny = model_dir(args.tiny_dir) if Path(args.tiny_dir).is_dir() else model_dir("tiny-nomic-moe")
    models = {"tiny": tiny}
    if not args.skip_fullsize:
        from actdiff.models.fullsize import build_fullsize_random

        t0 = time.perf_counter()
        models["fullsize"] = build_fullsize_random(args.fullsize_dir, seed=0, tokenizer_dir=tiny)
        print(f"full-size random model: {models['fullsize']} ({time.perf_counter() - t0:.1f} s to build or reuse)")
    rows, meta = [], {"device": device, "runtime": sysinfo.runtime(), "libraries": sysinfo.library_versions()}
    for name, d in models.items():
        r, meta[name] = measure(name, Path(d), device, args.prompts)
        rows += r
    write_outputs(Path(args.out), rows, meta)


if __name__ == "__main__":
    main()
