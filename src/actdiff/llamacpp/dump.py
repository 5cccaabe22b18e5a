"""One shard of prompts through llama.cpp, recorded in actdiff's HDF5 layout (mirrors pipeline.dump_engine)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import ConfigError, ModelError
from ..nodes import graph_for_model_dir, load_config_json
from ..progress import Progress

log = logging.getLogger(__name__)

# variant -> GGUF outtype (the precision policy of the llama.cpp side is the GGUF's weight type)
VARIANT_OUTTYPE = {"fp32": "f32", "fp16": "f16", "q8_0": "q8_0"}


def outtype_for_variant(variant: str) -> str:
    if variant not in VARIANT_OUTTYPE:
        raise ConfigError(
            f"variant {variant!r} is not available for llama.cpp: use one of {', '.join(VARIANT_OUTTYPE)} "
            "(faults exist only in actdiff's own engine)"
        )
    return VARIANT_OUTTYPE[variant]


def _placeholder(graph, name: str, tokens: int) -> np.ndarray:
    # same convention as actdiff.compare.importer: NaN, or -1 for expert ids (int64 cannot hold NaN)
    n = graph[name]
    return np.full(graph.shape(name, tokens), -1 if n.kind == "index" else np.nan, dtype=n.dtype)


def dump_llamacpp(
    model_json: str,
    tokens: str,
    gguf: str,
    out: str,
    variant: str,
    shard: int,
    threads: int = 1,
    engine_ids: str = "reference",
    mapping: str | None = None,
    compression: str = "none",
) -> None:
    """Run llama.cpp on every prompt of a tokens shard and write every mapped graph node to ``out``.

    Nodes the mapping cannot fill are written as NaN (-1 for expert ids) and listed in the ``missing_nodes``
    attribute, as ``actdiff import --allow-missing`` does; with the packaged mapping and llama-cpp-python
    0.3.36 there are none for NomicBERT-MoE."""
    from ..compare.align import load_mapping
    from ..h5io import ActivationWriter
    from . import mapping_path
    from .capture import LlamaCppRunner, library_info
    from .gguf_export import sha256_file, verify_gguf
    from .gguf_meta import read_gguf_header

    outtype = outtype_for_variant(variant)
    info = json.loads(Path(model_json).read_text())
    model_dir = Path(info["dir"])
    graph = graph_for_model_dir(model_dir)
    # config-parity guard again here: a stale GGUF from another config must not be diffed
    meta = verify_gguf(read_gguf_header(gguf), load_config_json(model_dir), outtype, str(model_dir / "config.json"))
    mpath = Path(mapping) if mapping else mapping_path()
    mp = load_mapping(mpath, graph)
    column = "reference_ids" if engine_ids == "reference" else "engine_ids"
    if engine_ids not in ("reference", "own"):
        raise ConfigError(f"engine_ids {engine_ids!r}: use 'reference' or 'own'")
    toks = pd.read_parquet(tokens, columns=["prompt_id", column])
    if toks[column].isna().any():
        raise ModelError(f"{tokens}: column {column} is empty; engine_ids: own needs the engine tokenizer side")

    with LlamaCppRunner(gguf, threads=threads) as runner:
        alignment = mp.resolve(runner.node_names)
        missing = list(alignment.unmatched_canonical)
        if missing:
            log.warning(
                "llama.cpp: %d graph node(s) have no captured source in %s, written as NaN (missing_nodes): %s",
                len(missing),
                mpath,
                "; ".join(f"{n} (needs {', '.join(alignment.missing_sources.get(n, ['an entry']))})" for n in missing),
            )
        matched = list(alignment.matched)
        needed = sorted({s for spec in alignment.matched.values() for s in spec.external_names})
        lib = library_info()
        attrs = {
            "model": info["name"],
            "side": "llamacpp",
            "variant": variant,
            "shard": int(shard),
            "arch": graph.dims.arch,
            "weights_sha256": info["weights_sha256"],
            "model_dir": info["dir"],
            "impl": "llama.cpp",
            "engine": "llamacpp",
            "engine_ids": engine_ids,
            "batch_size": 1,
            "threads": int(threads),
            "understood_config": json.dumps(runner.understood_config()),
            "dtypes": json.dumps({"activations": "float32", "indices": "int64", "precision": variant, "gguf": outtype}),
            "llama_cpp_version": lib["llama_cpp_python"],
            "llama_cpp_system_info": lib["system_info"],
            "gguf_path": str(Path(gguf).resolve()),
            "gguf_sha256": sha256_file(gguf),
            "gguf_outtype": outtype,
            "gguf_metadata": json.dumps(meta, default=str),
            "mapping": str(mpath),
            "alignment": json.dumps(alignment.to_dict(), separators=(",", ":")),
            "missing_nodes": json.dumps(missing),
        }
        progress = Progress(log, f"llama.cpp {variant}", len(toks))
        t_fwd = 0.0
        with ActivationWriter(out, graph, attrs, compression=compression) as w:
            for pid, ids in zip(toks["prompt_id"], toks[column], strict=True):
                ids = [int(x) for x in ids]
                t1 = time.perf_counter()
                ext = runner.forward(ids, needed)
                t_fwd += time.perf_counter() - t1
                vals = mp.apply(ext, len(ids), nodes=matched)
                for n in missing:
                    vals[n] = _placeholder(graph, n, len(ids))
                progress.step(pid, [b for b in w.append(pid, vals, input_ids=ids) if b not in missing])
    log.info(
        "llama.cpp %s: dumped %d prompts in %.1f s (%.1f prompts/s; forward+capture %.1f ms/prompt); "
        "%d nodes mapped, %d missing; %d prompts with NaN/Inf",
        variant,
        len(toks),
        progress.seconds,
        progress.rate,
        1000 * t_fwd / max(len(toks), 1),
        len(matched),
        len(missing),
        progress.n_bad,
    )
