"""Stage functions called by the workflow's script adapters (one function per rule).

Each reads its inputs, does one thing, and writes its outputs atomically, so a rerun after a kill
recomputes only what is missing.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pandas as pd

from .atomic import atomic_path, write_json_atomic
from .errors import ModelError
from .models.loading import check_model_dir, model_summary, resolve_model_dir
from .models.released import released_config
from .nodes import build_graph
from .progress import Progress
from .prompts import load_prompt_sheet, split_into_shards

log = logging.getLogger(__name__)


def generate_model(kind: str, out_dir: str, text_file: str, seed: int) -> None:
    from .models.tiny import generate_tiny_model

    if kind != "tiny-nomic-moe":
        raise ModelError(f"unknown generated model {kind!r}; available: tiny-nomic-moe")
    t0 = time.perf_counter()
    generate_tiny_model(out_dir, text_file, released_config(), seed=seed)
    log.info("generated %s (seed %d) in %s in %.1f s", kind, seed, out_dir, time.perf_counter() - t0)


def resolve_model(name: str, source: dict, out_json: str, resources_dir: str = "resources/models") -> None:
    """Locate the model, check it, and record its directory, architecture and weights hash."""
    d = resolve_model_dir(name, source, resources_dir)
    check_model_dir(d)
    summary = model_summary(name, d)
    graph = build_graph(summary["config"], str(d / "config.json"))
    summary["n_nodes"] = len(graph)
    write_json_atomic(out_json, summary)
    log.info(
        "model %s: %s (%s), %d graph nodes, weights sha256 %s",
        name,
        d,
        summary["arch"],
        len(graph),
        summary["weights_sha256"][:16],
    )


def split_prompts(sheet: str, n_shards: int, outputs: list[str]) -> None:
    df = load_prompt_sheet(sheet)
    shards = split_into_shards(df, n_shards)
    for s, (part, out) in enumerate(zip(shards, outputs, strict=True)):
        with atomic_path(out) as tmp:
            part.to_parquet(tmp, index=False)
        log.info("shard %d: %d prompts", s, len(part))
    log.info("%s: %d prompts in %d shards", sheet, len(df), n_shards)


def tokenize(model_json: str, prompts: str, max_length: int, out: str, engine_side: bool = True) -> None:
    from .token_shards import tokenize_shard

    info = json.loads(Path(model_json).read_text())
    df = pd.read_parquet(prompts)
    engine_tok = None
    if engine_side:
        from .engine.tokenizer import EngineTokenizer

        engine_tok = EngineTokenizer.from_file(Path(info["dir"]) / "tokenizer.json")
    t0 = time.perf_counter()
    res = tokenize_shard(df, info["dir"], max_length, out, model_name=info["name"], engine_tokenizer=engine_tok)
    dt = time.perf_counter() - t0
    parity = f", engine ids equal on {int(res['ids_match'].sum())}/{len(res)}" if engine_side else ""
    log.info(
        "tokenized %d prompts (%d truncated%s) in %.2f s (%.0f prompts/s)",
        len(res),
        int(res["reference_truncated"].sum()),
        parity,
        dt,
        len(res) / max(dt, 1e-9),
    )


def dump_reference(
    model_json: str,
    tokens: str,
    out: str,
    batch_size: int,
    impl: str,
    shard: int,
    allow_pickle: bool = False,
    compression: str = "none",
) -> None:
    from .h5io import ActivationWriter
    from .models.loading import load_reference_model
    from .reference import ReferenceRunner

    info = json.loads(Path(model_json).read_text())
    model, cfg, arch = load_reference_model(info["dir"], impl=impl, allow_pickle=allow_pickle)
    graph = build_graph(cfg, str(Path(info["dir"]) / "config.json"))
    toks = pd.read_parquet(tokens, columns=["prompt_id", "reference_ids"])
    runner = ReferenceRunner(model, graph)
    attrs = {
        "model": info["name"],
        "side": "reference",
        "variant": "fp32",
        "shard": int(shard),
        "arch": arch,
        "weights_sha256": info["weights_sha256"],
        "model_dir": info["dir"],
        "impl": impl,
        "dtypes": json.dumps({"weights": "float32", "activations": "float32", "indices": "int64"}),
        "batch_size": int(batch_size),
    }
    t0 = time.perf_counter()
    n_bad = 0
    items = [(pid, [int(i) for i in ids]) for pid, ids in zip(toks["prompt_id"], toks["reference_ids"], strict=True)]
    with ActivationWriter(out, graph, attrs, compression=compression) as w:
        ids_of = dict(zip(toks["prompt_id"], toks["reference_ids"], strict=True))
        for pid, vals in runner.run(items, batch_size=batch_size):
            bad = w.append(pid, vals, input_ids=ids_of[pid])
            if bad:
                n_bad += 1
                log.warning("prompt %r: NaN/Inf in reference node(s) %s (recorded as is)", pid, bad[:5])
    runner.close()
    dt = time.perf_counter() - t0
    log.info(
        "dumped %d prompts, %d tokens, %d nodes in %.1f s (%.1f prompts/s); %d prompts with NaN/Inf",
        len(toks),
        int(sum(len(x) for x in toks["reference_ids"])),
        len(graph),
        dt,
        len(toks) / max(dt, 1e-9),
        n_bad,
    )


def dump_engine(
    model_json: str,
    tokens: str,
    out: str,
    variant: str,
    shard: int,
    engine_ids: str = "reference",
    threads: int = 1,
    fault_aliases: dict | None = None,
    compression: str = "none",
) -> None:
    """Run the actdiff engine (C kernels, no torch) over one shard and record every graph node."""
    from . import kernels
    from .engine.core import Engine
    from .engine.faults import register_aliases
    from .h5io import ActivationWriter

    register_aliases(fault_aliases or {})
    info = json.loads(Path(model_json).read_text())
    engine = Engine(info["dir"], threads=threads)
    engine.prepare(variant)  # reads and converts every tensor first: a bad checkpoint fails here
    column = "reference_ids" if engine_ids == "reference" else "engine_ids"
    toks = pd.read_parquet(tokens, columns=["prompt_id", column])
    if toks[column].isna().any():
        raise ModelError(f"{tokens}: column {column} is empty; engine_ids: own needs the engine tokenizer side")
    attrs = {
        "model": info["name"],
        "side": "actdiff",
        "variant": variant,
        "shard": int(shard),
        "arch": engine.dims.arch,
        "weights_sha256": info["weights_sha256"],
        "model_dir": info["dir"],
        "engine": "actdiff",
        "engine_ids": engine_ids,
        "kernel_isa": kernels.get_isa(),  # the C kernels' instruction-set path (ACTDIFF_KERNELS_ISA forces one)
        "understood_config": json.dumps(engine.understood_config(variant)),
        "dtypes": json.dumps({"activations": "float32", "indices": "int64", "precision": variant}),
    }
    progress = Progress(log, f"engine {variant}", len(toks))
    with ActivationWriter(out, engine.graph, attrs, compression=compression) as w:
        for pid, ids in zip(toks["prompt_id"], toks[column], strict=True):
            progress.step(pid, w.append(pid, engine.forward([int(x) for x in ids], variant), input_ids=ids))
    log.info(
        "engine %s: dumped %d prompts in %.1f s (%.1f prompts/s); %d prompts with NaN/Inf",
        variant,
        len(toks),
        progress.seconds,
        progress.rate,
        progress.n_bad,
    )


STATS_TABLES = ("nodes", "tokens", "routing", "drilldown", "hypotheses", "prompts", "embeddings")


def compute_stats(
    model_json: str,
    ref_h5: str,
    eng_h5: str,
    side: str,
    variant: str,
    shard: int,
    outputs: dict[str, str],
    budgets: dict | None = None,
    worst_m: int = 5,
    embedding_sample: int = 2000,
    fault_aliases: dict | None = None,
    diagnose_all_failing: bool = True,
) -> None:
    from .compare.stats import StatsConfig, compute_shard_stats
    from .engine.faults import register_aliases

    register_aliases(fault_aliases or {})  # only the engine replay resolves them
    info = json.loads(Path(model_json).read_text())
    cfg = StatsConfig(
        budgets=budgets or {},
        worst_m=worst_m,
        embedding_sample=embedding_sample,
        diagnose_all_failing=diagnose_all_failing,
    )
    compute_shard_stats(info["dir"], ref_h5, eng_h5, side, variant, shard, outputs, cfg)


def aggregate_stats(
    model_json: str,
    side: str,
    variant: str,
    shard_tables: dict[str, list[str]],
    outputs: dict[str, str],
    embedding_sample: int = 2000,
) -> None:
    from .compare.aggregate import aggregate

    info = json.loads(Path(model_json).read_text())
    meta = {
        "model": info["name"],
        "side": side,
        "variant": variant,
        "arch": info["arch"],
        "weights_sha256": info["weights_sha256"],
        "experts": int(info["config"].get("num_experts", 0) or 0),
        "embedding_sample": int(embedding_sample),
    }
    v = aggregate(shard_tables, outputs, meta)
    log.info("%s", v["plain"])


def parity(model_json: str, variant: str, out_weights: str, out_config: str, fault_aliases: dict | None = None) -> None:
    from .compare.stats import weight_parity
    from .engine.faults import register_aliases

    register_aliases(fault_aliases or {})
    info = json.loads(Path(model_json).read_text())
    rows, config_rows = weight_parity(info["dir"], variant)
    with atomic_path(out_weights) as tmp:
        pd.DataFrame(rows).to_parquet(tmp, index=False)
    write_json_atomic(out_config, config_rows)
    bad = [k for k, v in config_rows.items() if not v["match"]]
    log.info(
        "weight parity: %d tensors, max relative L2 %.2e; config values differing: %s",
        len(rows),
        max(r["rel_l2"] for r in rows),
        bad or "none",
    )


# ---------------------------------------------------------------- llama.cpp (optional extra)
def convert_gguf(model_json: str, variant: str, out: str) -> None:
    """Convert the model to a GGUF of the variant's weight type with llama.cpp's converter (verified)."""
    from .llamacpp.dump import outtype_for_variant
    from .llamacpp.gguf_export import convert_to_gguf

    info = json.loads(Path(model_json).read_text())
    t0 = time.perf_counter()
    meta = convert_to_gguf(info["dir"], out, outtype_for_variant(variant))
    log.info(
        "converted %s to %s (%s) in %.1f s; metadata %s", info["dir"], out, variant, time.perf_counter() - t0, meta
    )


def llamacpp_parity(model_json: str, gguf: str, out_config: str) -> None:
    """Config parity of llama.cpp: the values it applies (GGUF metadata and what its graph hard-codes)."""
    from .compare.stats import config_parity
    from .llamacpp.capture import LlamaCppRunner

    info = json.loads(Path(model_json).read_text())
    with LlamaCppRunner(gguf, threads=1) as runner:
        understood = runner.understood_config()
    rows = config_parity(info["dir"], understood)
    write_json_atomic(out_config, rows)
    bad = {k: (v["config"], v["engine"]) for k, v in rows.items() if not v["match"]}
    log.info("llama.cpp config parity: values differing from config.json (config, llama.cpp): %s", bad or "none")
