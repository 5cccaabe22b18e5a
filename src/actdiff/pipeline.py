"""Stage functions called by the workflow's script adapters (one function per rule).

Each reads its inputs, does one thing, and writes its outputs atomically, so a rerun after a kill
recomputes only what is missing.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from .atomic import atomic_path, write_json_atomic
from .errors import ModelError
from .models.loading import WEIGHTS_FILE, convert_pickle_checkpoint, model_summary, resolve_model_dir
from .models.record import ModelRecord
from .models.released import released_config
from .nodes import build_graph
from .variants import resolve_variant

log = logging.getLogger(__name__)


def generate_model(kind: str, out_dir: str, text_file: str, seed: int) -> None:
    from .models.tiny import generate_tiny_model

    if kind != "tiny-nomic-moe":
        raise ModelError(f"unknown generated model {kind!r}; available: tiny-nomic-moe")
    t0 = time.perf_counter()
    generate_tiny_model(out_dir, text_file, released_config(), seed=seed)
    log.info("generated %s (seed %d) in %s in %.1f s", kind, seed, out_dir, time.perf_counter() - t0)


def resolve_model(
    name: str, source: dict, out_json: str, resources_dir: str = "resources/models", allow_pickle: bool = False
) -> None:
    """Locate the model, check it, and record its directory, architecture and the sha256 of its files as they
    are now. A pytorch_model.bin (allow_pickle) is converted once to safetensors beside model.json, and the
    record points every later stage at that copy."""
    d = resolve_model_dir(name, source, resources_dir)
    fingerprint = Path(out_json).with_name("model-files.json")  # Layout.model_files
    summary = model_summary(name, d, allow_pickle, fingerprint)
    if summary["weights_file"] != WEIGHTS_FILE:
        converted = Path(out_json).parent / "checkpoint"
        convert_pickle_checkpoint(d, converted)
        summary["source_dir"], summary["dir"] = summary["dir"], str(converted.resolve())
        log.info("model %s: %s converted to safetensors in %s", name, summary["weights_file"], converted)
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
    from .prompts import load_prompt_sheet, split_into_shards  # pandas: loaded by the jobs that read tables

    df = load_prompt_sheet(sheet)
    shards = split_into_shards(df, n_shards)
    for s, (part, out) in enumerate(zip(shards, outputs, strict=True)):
        with atomic_path(out) as tmp:
            part.to_parquet(tmp, index=False)
        log.info("shard %d: %d prompts", s, len(part))
    log.info("%s: %d prompts in %d shards", sheet, len(df), n_shards)


def tokenize(
    model_json: str,
    prompts: str,
    max_length: int | None,
    out: str,
    engine_side: bool = True,
    engine_target: str = "transformers",
) -> None:
    """Tokens of one shard: transformers (the reference's ids), tokenizers literally, and the engine's own
    tokenizer held to ``engine_target`` (its transformers-5 mode for transformers, its literal mode for
    tokenizers). ``max_length`` None: the model's own limit (token_shards.model_max_length)."""
    import pandas as pd

    from .token_shards import AGREEMENT, tokenize_shard

    record = ModelRecord.load(model_json)
    df = pd.read_parquet(prompts)
    engine_tok = None
    if engine_side:
        from .engine.tokenizer import EngineTokenizer

        compat = engine_target == "transformers"
        engine_tok = EngineTokenizer.from_file(record.dir / "tokenizer.json", transformers_compat=compat)
    t0 = time.perf_counter()
    res = tokenize_shard(
        df, str(record.dir), max_length, out, model_name=record.name, engine_tokenizer=engine_tok,
        engine_target=engine_target,
    )  # fmt: skip
    dt = time.perf_counter() - t0
    agree = ", ".join(
        f"{col} {int(res[col].eq(True).sum())}/{len(res)}" for col, *_ in AGREEMENT if res[col].notna().any()
    )
    log.info(
        "tokenized %d prompts (%d truncated) in %.2f s (%.0f prompts/s); ids equal: %s",
        len(res),
        int(res["reference_truncated"].sum()),
        dt,
        len(res) / max(dt, 1e-9),
        agree or "-",
    )


def dump(
    model_json: str,
    tokens: str,
    out: str,
    side: str,
    variant: str,
    shard: int,
    compression: str = "none",
    fault_aliases: dict | None = None,
    **options,
) -> None:
    """Run one side (reference, actdiff, llamacpp: actdiff.sides) over one shard and record every graph node.
    ``options`` go to the side (reference: impl, batch_size, allow_pickle, device, allow_tf32,
    device_batch_size; engines: threads, engine_ids;
    llamacpp: gguf). The side is opened through the Python API's object (actdiff.api.Model): the dumps and
    ``actdiff.load`` run the same code."""
    from .api import Model
    from .sides.dump import dump_shard, read_token_items

    record = ModelRecord.load(model_json)
    # the variant is resolved once, here: an opaque fault label becomes the fault it stands for
    resolved = resolve_variant(variant, fault_aliases or {})
    # reads and converts the weights: a bad checkpoint fails here
    with Model.from_record(record, side, resolved, **options) as m:
        dump_shard(m.side, record.provenance(), read_token_items(tokens, m.side.ids_column), out, shard, compression)


def dump_import(
    model_json: str, tokens: str, out: str, record_json: str, engine: dict, variant: str, shard: int,
    compression: str = "none",
) -> None:  # fmt: skip
    """An outside engine (config kind ``import``, actdiff.sides.configured) over one shard: run its command
    into a scratch folder, or read its source folder, and import the per-prompt dumps through its mapping."""
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    from .errors import DumpError
    from .sides.configured import EngineSpec
    from .sides.imported import import_dump

    spec = EngineSpec(**{**engine, "variants": tuple(engine.get("variants") or ())})
    record = ModelRecord.load(model_json)
    common = dict(mapping_path=spec.mapping, model_dir=record.dir, tokens_parquet=tokens, out_h5=out, side=spec.name,
                  variant=variant, shard=shard, allow_missing=spec.allow_missing, report_json=record_json,
                  model_name=record.name, engine=spec.as_dict(), compression=compression)  # fmt: skip
    if spec.source is not None:
        import_dump(spec.source_dir(record.name, shard, variant), **common)
        return
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{spec.name}-shard-{shard}-", dir=Path(out).parent))
    try:
        cmd = spec.command_line(record.dir, tokens, scratch, record.name, shard, variant)
        log.info("running %s", cmd)
        t0 = time.perf_counter()
        p = subprocess.run(cmd, shell=True, capture_output=True, text=True)
        dt = time.perf_counter() - t0
        log.info("engine %s: exit %d in %.1f s\n%s%s", spec.name, p.returncode, dt, p.stdout, p.stderr)
        if p.returncode != 0:
            raise DumpError(f"engine {spec.name}: command failed (exit {p.returncode}): {cmd}\n{p.stderr[-2000:]}")
        import_dump(scratch, exact_prompts=True, **common)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def reference_noise(model_json: str, ref_h5: str, out: str, budgets: dict | None = None) -> None:
    """The reference's fp32 noise per (prompt, node) of one shard, shared by every run's statistics, and the
    propagated budgets of an fp32 engine (``budgets``: the config's overrides, as compute_stats gets them)."""
    from .compare.refnoise import measure_reference_noise

    measure_reference_noise(ModelRecord.load(model_json).dir, ref_h5, out, budgets)


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
    search: dict | None = None,
    noise: str | None = None,
) -> None:
    from .compare.stats import StatsConfig, compute_shard_stats

    record = ModelRecord.load(model_json)
    cfg = StatsConfig(
        budgets=budgets or {},
        worst_m=worst_m,
        embedding_sample=embedding_sample,
        diagnose_all_failing=diagnose_all_failing,
        **(search or {}),
    )
    resolved = resolve_variant(variant, fault_aliases or {})
    compute_shard_stats(record.dir, ref_h5, eng_h5, side, resolved, shard, outputs, cfg, noise=noise)


def aggregate_stats(
    model_json: str,
    tokens: list[str],
    side: str,
    variant: str,
    shard_tables: dict[str, list[str]],
    outputs: dict[str, str],
    embedding_sample: int = 2000,
    worst_n: int = 20,
    search: dict | None = None,
) -> None:
    """``search``: config ``stats.search_seconds``, ``search_prompts``, ``search_nodes`` (the search runs here,
    once for the run, on the shards' samples)."""
    from .compare.aggregate import aggregate
    from .compare.search_run import RunSearch

    record = ModelRecord.load(model_json)
    meta = {
        "model": record.name,
        "side": side,
        "variant": variant,
        "arch": record.arch,
        "weights_sha256": record.weights_sha256,
        "experts": int(record.config.get("num_experts", 0) or 0),
        "embedding_sample": int(embedding_sample),
    }
    key_nodes = build_graph(record.config, model_json).key_nodes()  # the prompt table's error columns
    found = RunSearch.of(record.dir, search)
    v = aggregate(shard_tables, outputs, meta, tokens=tokens, worst_n=worst_n, key_nodes=key_nodes, search=found)
    log.info("%s", v["plain"])


def parity(
    model_json: str,
    variant: str,
    out_weights: str,
    out_config: str,
    fault_aliases: dict | None = None,
    side: str = "actdiff",
) -> None:
    """Weight and config parity of a side that exports its weights (our engine). The table goes through pyarrow
    alone: importing pandas was half of each of these 19 jobs of the default report."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .compare.parity import weight_parity
    from .sides import open_side

    record = ModelRecord.load(model_json)
    s = open_side(side, record, resolve_variant(variant, fault_aliases or {}))
    rows, config_rows = weight_parity(record.dir, s)
    with atomic_path(out_weights) as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp)
    write_json_atomic(out_config, config_rows)
    bad = [k for k, v in config_rows.items() if not v["match"]]
    for r in rows:  # a finite max relative L2 below would hide them: name every tensor holding NaN/Inf
        if r["nonfinite_checkpoint"] or r["nonfinite_engine"]:
            log.warning(
                "weight parity: %s (checkpoint %s) holds %d NaN/Inf values in the checkpoint, %d in the engine's "
                "tensor; relative L2 over the finite values %.2e",
                r["tensor"], r["source"], r["nonfinite_checkpoint"], r["nonfinite_engine"], r["rel_l2"],
            )  # fmt: skip
    log.info(
        "weight parity: %d tensors, max relative L2 %.2e; config values differing: %s",
        len(rows),
        max(r["rel_l2"] for r in rows),
        bad or "none",
    )


# ---------------------------------------------------------------- llama.cpp (optional extra)
def convert_gguf(model_json: str, variant: str, out: str) -> None:
    """Convert the model to a GGUF of the variant's weight type with llama.cpp's converter (verified)."""
    convert_record_gguf(ModelRecord.load(model_json), variant, out)


def convert_record_gguf(record: ModelRecord, variant: str, out: str) -> None:
    """convert_gguf for a model record (the Python API converts through here too: one conversion path)."""
    from .llamacpp.gguf_export import convert_to_gguf
    from .llamacpp.side import outtype_for_variant

    t0 = time.perf_counter()
    meta = convert_to_gguf(str(record.dir), out, outtype_for_variant(variant))
    log.info("converted %s to %s (%s) in %.1f s; metadata %s", record.dir, out, variant, time.perf_counter() - t0, meta)


def llamacpp_parity(model_json: str, gguf: str, out_config: str) -> None:
    """Config parity of llama.cpp: the values it applies (GGUF metadata and what its graph hard-codes)."""
    from .compare.parity import config_parity
    from .llamacpp.capture import LlamaCppRunner

    record = ModelRecord.load(model_json)
    with LlamaCppRunner(gguf, threads=1) as runner:
        understood = runner.understood_config()
    rows = config_parity(record.dir, understood)
    write_json_atomic(out_config, rows)
    bad = {k: (v["config"], v["engine"]) for k, v in rows.items() if not v["match"]}
    log.info("llama.cpp config parity: values differing from config.json (config, llama.cpp): %s", bad or "none")


# ---------------------------------------------------------------- ONNX Runtime (optional extra)
def export_onnx(model_json: str, out: str) -> None:
    """The fp32 reference exported to ONNX (actdiff.onnxrt.export): onnxruntime's fp32 model, and the source
    of every other ORT variant."""
    from .nodes import ARCH_BERT, ARCH_NOMIC_MOE
    from .onnxrt.export import export_model

    record = ModelRecord.load(model_json)
    if record.arch not in (ARCH_NOMIC_MOE, ARCH_BERT):
        raise ModelError(f"{record.dir}: the onnxruntime engine exports {ARCH_NOMIC_MOE} and {ARCH_BERT} models, not "
                         f"{record.arch}; leave onnxruntime out of models.{record.name}.engines")  # fmt: skip
    t0 = time.perf_counter()
    meta = export_model(record.dir, out)
    log.info("exported %s to %s in %.1f s: %s", record.dir, out, time.perf_counter() - t0, meta)


def onnx_variant(fp32: str, variant: str, out: str, tokens: str | None = None, calibration_prompts: int = 4) -> None:
    """An ORT variant's model file made from the fp32 export (actdiff.onnxrt.variants). int8-static is
    calibrated on the first ``calibration_prompts`` prompts of ``tokens`` (the reference's ids), recorded in
    the model's metadata and the dumps' provenance; statistics leave them out (actdiff.compare.fitted)."""
    from .onnxrt.variants import write_variant
    from .sides.dump import ids_column, read_token_items

    calibration = []
    if variant == "int8-static":
        if tokens is None:
            raise ModelError(f"{out}: int8-static needs the tokens of its calibration prompts")
        calibration = read_token_items(tokens, ids_column("reference"))[:calibration_prompts]
    t0 = time.perf_counter()
    ids = [pid for pid, _ in calibration]
    write_variant(fp32, out, variant, [x for _, x in calibration], ids)
    log.info("made %s (%s) in %.1f s%s", out, variant, time.perf_counter() - t0,
             f"; calibrated on {', '.join(ids)} ({tokens})" if ids else "")  # fmt: skip
