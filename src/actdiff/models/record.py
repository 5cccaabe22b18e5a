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

    def graph(self) -> Graph:
        return build_graph(self.config, str(self.dir / "config.json"))

    def provenance(self) -> dict:
        """What every dump of this model records about it."""
        return {"model": self.name, "weights_sha256": self.weights_sha256, "model_dir": str(self.dir)}
