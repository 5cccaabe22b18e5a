"""The one path layout of a run: every file the workflow reads or writes, under one results folder.

Rules (through ``workflow/rules/common.smk``), the stage functions, the report, ``actdiff check`` and the
benchmarks ask a :class:`Layout` for paths; nothing else spells them. Arguments may be Snakemake wildcards
(``"{model}"``), so one method gives both a rule's pattern and a concrete path. The Snakefile's header lists
:meth:`Layout.scheme` (tests/test_layout.py keeps the two in step).

``side`` is ``reference`` or an engine's name (``actdiff``, ``llamacpp``, ``onnxruntime``, an imported engine's
name); the reference always runs at variant ``fp32``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .tables import SHARD_TABLES, SUMMARY_TABLES
from .variants import REFERENCE_VARIANT  # (also re-exported: the reference side's variant)

REFERENCE_SIDE = "reference"

GENERATED_MODELS = "resources/models"  # generated models live beside the workflow, not under a results folder


@dataclass(frozen=True)
class Layout:
    results: str = "results"

    # ---------------------------------------------------------------------------------------- inputs
    def prompts(self, shard) -> str:
        return f"{self.results}/prompts/shard-{shard}.parquet"

    def shard_plan(self) -> str:
        """The shard count planned from disk_budget (actdiff.diskplan), kept so a rerun reuses it while it fits."""
        return f"{self.results}/prompts/plan.json"

    def model_json(self, model) -> str:
        return f"{self.results}/{model}/model.json"

    def model_files(self, model) -> str:
        """{file: sha256} of the model's files, rewritten only when one changes (actdiff.models.fingerprint)."""
        return f"{self.results}/{model}/model-files.json"

    def tokens(self, model, shard) -> str:
        return f"{self.results}/{model}/tokens/shard-{shard}.parquet"

    @staticmethod
    def generated_model(model, file: str = "") -> str:
        return f"{GENERATED_MODELS}/{model}/{file}".rstrip("/")

    # --------------------------------------------------------------------------------------- one run
    def run_dir(self, model, side, variant) -> str:
        return f"{self.results}/{model}/{side}/{variant}"

    def activations(self, model, side, variant, shard) -> str:
        return f"{self.run_dir(model, side, variant)}/activations/shard-{shard}.h5"

    def artifact(self, model, side, variant, name: str) -> str:
        """A side's own build product for a variant (llama.cpp's GGUF)."""
        return f"{self.run_dir(model, side, variant)}/{name}"

    def onnx_model(self, model, variant) -> str:
        """ONNX Runtime's model file of a variant (actdiff.onnxrt.variants); fp32's is the export itself, the
        others are made from it."""
        return self.artifact(model, "onnxruntime", variant, "model.onnx")

    def import_record(self, model, side, variant, shard) -> str:
        """What an imported side's shard came from: engine, mapping, source or command, alignment (JSON)."""
        return f"{self.run_dir(model, side, variant)}/import/shard-{shard}.json"

    def reference_noise(self, model, shard) -> str:
        """The reference's fp32 noise per (prompt, node) of a shard, read by every run's statistics
        (actdiff.compare.refnoise; table actdiff.tables.REFERENCE_NOISE)."""
        return f"{self.run_dir(model, REFERENCE_SIDE, REFERENCE_VARIANT)}/noise/shard-{shard}.parquet"

    def stats(self, model, side, variant, shard, table: str) -> str:
        _known(table, SHARD_TABLES)
        return f"{self.run_dir(model, side, variant)}/stats/shard-{shard}/{table}.parquet"

    def summary(self, model, side, variant, table: str) -> str:
        _known(table, SUMMARY_TABLES)
        return f"{self.run_dir(model, side, variant)}/summary/{table}.parquet"

    def summary_json(self, model, side, variant, name: str) -> str:
        return f"{self.run_dir(model, side, variant)}/summary/{name}.json"

    def verdict(self, model, side, variant) -> str:
        return self.summary_json(model, side, variant, "verdict")

    # --------------------------------------------------------------------------------- publication
    def report(self, model, side, variant) -> str:
        return f"{self.results}/reports/{model}/{side}/{variant}.html"

    def index(self) -> str:
        return f"{self.results}/reports/index.html"

    def log(self, rule: str, *parts) -> str:
        return "/".join([self.results, "logs", rule, *map(str, parts)]) + ".log"

    # ---------------------------------------------------------------------------------- discovery
    @classmethod
    def of_model_json(cls, path) -> Layout:
        """The layout a model record belongs to (the inverse of :meth:`model_json`)."""
        return cls(str(Path(path).parent.parent))

    @classmethod
    def of_index(cls, path) -> Layout:
        """The layout an index page belongs to (the inverse of :meth:`index`)."""
        return cls(str(Path(path).parent.parent))

    @classmethod
    def of_tokens(cls, path) -> tuple[Layout, str] | None:
        """(layout, model) of a tokens shard path (the inverse of :meth:`tokens`), or None for another path."""
        p = Path(path)
        if p.parent.name != "tokens" or not re.fullmatch(r"shard-\d+\.parquet", p.name):
            return None
        return cls(str(p.parent.parent.parent)), p.parent.parent.name

    def runs_with_verdicts(self) -> list[tuple[str, str, str]]:
        """(model, side, variant) of every run under the results folder that has a verdict."""
        root = Path(self.results)
        found = root.glob(self.verdict("*", "*", "*")[len(self.results) + 1 :])
        return sorted(tuple(p.relative_to(root).parts[:3]) for p in found)  # type: ignore[misc]

    def shard_of(self, path: str) -> int:
        m = re.search(r"/shard-(\d+)(?:/|\.)", str(path))
        if not m:
            raise ValueError(f"{path} is not a per-shard path of this layout")
        return int(m.group(1))

    def scheme(self) -> list[tuple[str, str]]:
        """Every path pattern with what it holds (the Snakefile header and docs list exactly these)."""
        w = ("{model}", "{side}", "{variant}")
        return [
            (self.generated_model("{model}") + "/", "generated models (config.json, weights, tokenizer.json)"),
            (self.prompts("{shard}"), "prompt sheet split by stable hash of prompt_id"),
            (self.shard_plan(), "shard count planned from disk_budget (when shards are not set)"),
            (self.model_files("{model}"), "sha256 of the model's files (rewritten only when one changes)"),
            (self.model_json("{model}"), "resolved model dir, architecture, sha256 of its files"),
            (self.tokens("{model}", "{shard}"), "token ids, reference and engine tokenizers"),
            (self.activations(*w, "{shard}"), "per-node dumps (docs/formats.md)"),
            (self.artifact(*w, "model.gguf"), "llama.cpp's GGUF of the variant"),
            (self.onnx_model("{model}", "{variant}"), "ONNX Runtime's model of the variant"),
            (self.import_record(*w, "{shard}"), "an imported engine's provenance and alignment"),
            (self.reference_noise("{model}", "{shard}"), "the reference's fp32 noise, read by every run's statistics"),
            (self.stats(*w, "{shard}", "{table}"), "shard tables (actdiff.tables)"),
            (self.summary(*w, "{table}"), "summary tables (actdiff.tables)"),
            (self.summary_json(*w, "{name}"), "verdict, embeddings, tokenization, config_parity"),
            (self.report(*w), "one report per model/side/variant"),
            (self.index(), "index over all of them"),
            (self.log("{rule}", "{wildcards}"), "logs"),
        ]

    def scheme_lines(self) -> list[str]:
        """:meth:`scheme` as the comment lines of the Snakefile's header."""
        return [f"#   {p:<70}  {d}" for p, d in self.scheme()]


def _known(table: str, registry: dict) -> None:
    if table not in registry and not (table.startswith("{") and table.endswith("}")):
        raise KeyError(f"unknown table {table!r}; known: {', '.join(registry)}")
