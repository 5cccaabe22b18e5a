"""The resolved model of a run (``model.json``, written by the resolve_model rule), read once per stage."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelError
from ..nodes import Graph, build_graph


@dataclass(frozen=True)
class ModelRecord:
    name: str
    dir: Path
    arch: str
    weights_sha256: str
    config: dict

    @classmethod
    def load(cls, model_json: str | Path) -> ModelRecord:
        p = Path(model_json)
        try:
            d = json.loads(p.read_text())
            return cls(d["name"], Path(d["dir"]), d["arch"], d["weights_sha256"], d["config"])
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"{p}: not a model record written by resolve_model ({e}); rerun the pipeline") from None

    @classmethod
    def from_dir(cls, model_dir: str | Path, name: str | None = None, allow_pickle: bool = False) -> ModelRecord:
        """The record of a model directory used without the workflow (the Python API): what resolve_model
        writes to model.json, read now. The weights' sha256 is what dumps and cached conversions are keyed on."""
        from .loading import check_model_dir, sha256_file, weights_file

        d = Path(model_dir)
        cfg = check_model_dir(d, allow_pickle, name, need_tokenizer=False)  # ids-only use needs no tokenizer
        arch = build_graph(cfg, str(d / "config.json")).dims.arch
        return cls(name or d.name, d.resolve(), arch, sha256_file(weights_file(d, allow_pickle, name)), cfg)

    def graph(self) -> Graph:
        return build_graph(self.config, str(self.dir / "config.json"))

    def provenance(self) -> dict:
        """What every dump of this model records about it."""
        return {"model": self.name, "weights_sha256": self.weights_sha256, "model_dir": str(self.dir)}
