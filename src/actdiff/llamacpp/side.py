"""llama.cpp as a side: one GGUF run through llama-cpp-python, every mapped graph node captured."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from ..errors import ConfigError
from ..nodes import load_config_json

log = logging.getLogger(__name__)

ENGINE = "llamacpp"
# variant -> GGUF outtype (the precision policy of the llama.cpp side is the GGUF's weight type)
VARIANT_OUTTYPE = {"fp32": "f32", "fp16": "f16", "q8_0": "q8_0"}


def outtype_for_variant(variant: str) -> str:
    if str(variant) not in VARIANT_OUTTYPE:
        raise ConfigError(
            f"variant {variant!r} is not available for llama.cpp: use one of {', '.join(VARIANT_OUTTYPE)} "
            "(faults exist only in actdiff's own engine)"
        )
    return VARIANT_OUTTYPE[str(variant)]


class LlamaCppSide:
    """Nodes the mapping cannot fill are ``missing_nodes`` (written as placeholders, judged not_captured), as
    ``actdiff import --allow-missing`` does; with the packaged mapping and llama-cpp-python 0.3.36 there are
    none for NomicBERT-MoE. llama.cpp's ops cannot be replayed one at a time: no ``replay``."""

    name = ENGINE
    records_input_ids = True

    def __init__(self, record, variant, gguf: str, threads: int = 1, engine_ids: str = "reference",
                 mapping: str | None = None):  # fmt: skip
        from ..sides.dump import ids_column
        from ..sides.mapping import load_mapping
        from . import mapping_path
        from .capture import LlamaCppRunner
        from .gguf_export import verify_gguf
        from .gguf_meta import read_gguf_header

        self.variant, self.gguf, self.threads = str(variant), gguf, int(threads)
        self.outtype = outtype_for_variant(variant)
        self.engine_ids, self.ids_column = engine_ids, ids_column(engine_ids)
        self.graph = record.graph()
        # config-parity guard again here: a stale GGUF from another config must not be diffed
        cfg = load_config_json(record.dir)
        self.meta = verify_gguf(read_gguf_header(gguf), cfg, self.outtype, str(record.dir / "config.json"))
        self.mapping_file = Path(mapping) if mapping else mapping_path()
        self.mapping = load_mapping(self.mapping_file, self.graph)
        self.runner = LlamaCppRunner(gguf, threads=threads)
        self.alignment = self.mapping.resolve(self.runner.node_names)
        self.missing_nodes = tuple(self.alignment.unmatched_canonical)
        self._warn_missing()
        self.needed = sorted({s for spec in self.alignment.matched.values() for s in spec.external_names})
        self.forward_seconds = 0.0

    def _warn_missing(self) -> None:
        if self.missing_nodes:
            a = self.alignment
            needs = (f"{n} (needs {', '.join(a.missing_sources.get(n, ['an entry']))})" for n in self.missing_nodes)
            log.warning(
                "llama.cpp: %d graph node(s) have no captured source in %s, written as NaN (missing_nodes): %s",
                len(self.missing_nodes),
                self.mapping_file,
                "; ".join(needs),
            )

    def provenance(self) -> dict:
        from ..models.loading import sha256_file
        from .capture import library_info

        lib = library_info()
        return {
            "impl": "llama.cpp",
            "engine": ENGINE,
            "engine_ids": self.engine_ids,
            "batch_size": 1,
            "threads": self.threads,
            "understood_config": json.dumps(self.runner.understood_config()),
            "dtypes": json.dumps(
                {"activations": "float32", "indices": "int64", "precision": self.variant, "gguf": self.outtype}
            ),
            "llama_cpp_version": lib["llama_cpp_python"],
            "llama_cpp_system_info": lib["system_info"],
            "llama_cpp_extra_bufts": lib["extra_bufts"],
            "gguf_path": str(Path(self.gguf).resolve()),
            "gguf_sha256": sha256_file(self.gguf),
            "gguf_outtype": self.outtype,
            "gguf_metadata": json.dumps(self.meta, default=str),
            "mapping": str(self.mapping_file),
            "alignment": json.dumps(self.alignment.to_dict(), separators=(",", ":")),
            "missing_nodes": json.dumps(list(self.missing_nodes)),
        }

    def understood_config(self) -> dict:
        return self.runner.understood_config()

    def forward(self, items):
        matched = list(self.alignment.matched)
        for pid, ids in items:
            t1 = time.perf_counter()
            ext = self.runner.forward(ids, self.needed)
            self.forward_seconds += time.perf_counter() - t1
            yield pid, self.mapping.apply(ext, len(ids), nodes=matched)

    def close(self) -> None:
        self.runner.close()
