"""Paths and subprocess helpers shared by the tests (imported as `helpers`; tests/ is on sys.path)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
BIN = Path(sys.executable).parent


def run_cmd(args: list[str], cwd: Path = REPO, timeout: float = 1200, env: dict | None = None):
    e = dict(os.environ)
    e["PATH"] = f"{BIN}:{e.get('PATH', '')}"
    if env:
        e.update(env)
    return subprocess.run(args, cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)


def snakemake(*args: str, timeout: float = 1800):
    return run_cmd([str(BIN / "snakemake"), *args], timeout=timeout)


MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def model_copy(src: Path, dst: Path, mutate=None) -> Path:
    """Copy a model directory; ``mutate(weights_dict)`` edits its checkpoint (to build bad checkpoints)."""
    import shutil

    from safetensors.numpy import load_file, save_file

    dst.mkdir(parents=True)
    for f in MODEL_FILES:
        shutil.copy(src / f, dst / f)
    if mutate is not None:
        w = load_file(str(dst / "model.safetensors"))
        mutate(w)
        save_file(w, str(dst / "model.safetensors"))
    return dst


TINY_MODEL = REPO / "resources/models/tiny-nomic-moe"


def ensure_tiny_model() -> Path:
    """The generated tiny model, built with the pipeline's own rule if it is not there yet (config.json is
    written last, so its presence marks a complete directory)."""
    if not (TINY_MODEL / "config.json").is_file():
        p = snakemake("--cores", "2", "resources/models/tiny-nomic-moe/config.json")
        assert p.returncode == 0 and (TINY_MODEL / "config.json").is_file(), (
            f"could not build the tiny model:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
        )
    return TINY_MODEL


# the least a sequential fp32 normalisation's error was of budgets.normalisation_noise (rows of width 64-768,
# centred or not; test_budgets checks it): 0.66
SEQUENTIAL_OVER_ENVELOPE = 0.65


def tightness_ratios(nodes):
    """Per node (non-index): budget median over the fp32 error present, the larger of the engine's local error
    and the reference's own error against float64 at p99 over prompts (floored at one rounding); and the noise
    the budgets scale over that same error (actdiff.compare.budgets states the criterion)."""
    import numpy as np

    from actdiff.compare.budgets import NOISE_FLOOR, NORM_OPS

    n = nodes[nodes["ref_fp32_error"].notna()]
    g = n.groupby("node", sort=False).agg(
        op=("op", "first"),
        budget=("budget", "median"),
        local_p99=("local_rel_l2", lambda s: s.quantile(0.99)),
        ref_p99=("ref_fp32_error", lambda s: s.quantile(0.99)),
        noise_p99=("fp32_noise", lambda s: s.quantile(0.99)),
    )
    present = g[["local_p99", "ref_p99"]].max(axis=1)
    # A normalisation's noise is at least what summing its rows term after term costs (budgets.NORM_OPS), a
    # correct implementation's error (ONNX Runtime's is at that level): at least SEQUENTIAL_OVER_ENVELOPE x the
    # envelope (test_budgets.test_normalisation_envelope_is_a_sequential_implementations_error).
    norm = g["op"].isin(NORM_OPS)
    present[norm] = np.maximum(present[norm], SEQUENTIAL_OVER_ENVELOPE * g.loc[norm, "noise_p99"])
    present = present.clip(lower=NOISE_FLOOR)
    g["ratio"] = g["budget"] / present
    g["noise_over_present"] = g["noise_p99"].clip(lower=NOISE_FLOOR) / present
    return g


def summary_outputs(folder, prefix: str = "sum-") -> dict[str, str]:
    """Every output of aggregation (actdiff.tables), as files in ``folder``."""
    from actdiff.tables import AGGREGATE_JSON, AGGREGATE_TABLES

    out = {k: str(Path(folder) / f"{prefix}{k}.parquet") for k in AGGREGATE_TABLES}
    out.update({k: str(Path(folder) / f"{prefix}{k}.json") for k in AGGREGATE_JSON})
    return out


def shard_outputs(folder, prefix: str = "") -> dict[str, str]:
    """Every output of compute_shard_stats (actdiff.tables), as files in ``folder``."""
    from actdiff.tables import SHARD_TABLES

    return {t: str(Path(folder) / f"{prefix}{t}.parquet") for t in SHARD_TABLES}


def tiny_spec_activations(lengths, seed: int = 0):
    """(graph, checkpoint tensors, per-prompt values of every node) of the tiny model run as the float64 spec
    (actdiff.compare.refops) on random token ids of the given lengths, stored as fp32 like captured activations
    (a LayerNorm's output lies on its hyperplane only to ~1e-7): realistic inputs for the search's tests."""
    import numpy as np
    from safetensors.numpy import load_file

    from actdiff.compare.refops import run_op, spec_params
    from actdiff.nodes import INPUT_IDS, graph_for_model_dir

    d = ensure_tiny_model()
    graph = graph_for_model_dir(d)
    weights = load_file(str(d / "model.safetensors"))
    rng = np.random.default_rng(seed)
    vals = []
    for T in lengths:
        v = {INPUT_IDS: np.concatenate([[0], rng.integers(5, graph.dims.vocab - 1, T - 2), [2]]).astype(np.int64)}
        for node in graph:
            v[node.name] = run_op(graph, node, v, weights, spec_params(graph, node))
        vals.append({k: a if a.dtype.kind in "iu" else a.astype(np.float32) for k, a in v.items()})
    return graph, weights, vals


def engine_dump(model_dir, ref_h5, out_h5, variant) -> None:
    """Our engine's dump of the prompts of a reference dump, one prompt at a time (batch 1), as dump_engine
    writes it."""
    from actdiff.engine.core import Engine
    from actdiff.h5io import ActivationReader, ActivationWriter

    engine = Engine(model_dir)
    with ActivationReader(ref_h5) as r, ActivationWriter(out_h5, engine.graph, {"side": "actdiff"}) as w:
        for i, pid in enumerate(r.prompt_ids):
            ids = r.input_ids(i)
            w.append(pid, engine.forward(ids, variant), input_ids=ids)
