"""The reference side: the HuggingFace/PyTorch model in fp32, observed through forward hooks."""

from __future__ import annotations

import json

from ..layout import REFERENCE_SIDE, REFERENCE_VARIANT


class ReferenceSide:
    name = REFERENCE_SIDE
    ids_column = "reference_ids"
    records_input_ids = True
    missing_nodes: tuple[str, ...] = ()

    def __init__(self, record, variant: str = REFERENCE_VARIANT, impl: str = "actdiff", batch_size: int = 1,
                 allow_pickle: bool = False):  # fmt: skip
        from ..models.loading import load_reference_model
        from ..nodes import build_graph
        from ..reference import ReferenceRunner

        if str(variant) != REFERENCE_VARIANT:
            raise ValueError(f"the reference runs at {REFERENCE_VARIANT} only, not {variant}")
        self.variant = REFERENCE_VARIANT
        model, cfg, self.arch = load_reference_model(str(record.dir), impl=impl, allow_pickle=allow_pickle)
        self.graph = build_graph(cfg, str(record.dir / "config.json"))
        self.runner = ReferenceRunner(model, self.graph)
        self.impl, self.batch_size = impl, int(batch_size)

    def provenance(self) -> dict:
        return {
            "arch": self.arch,
            "impl": self.impl,
            "dtypes": json.dumps({"weights": "float32", "activations": "float32", "indices": "int64"}),
            "batch_size": self.batch_size,
        }

    def forward(self, items):
        yield from self.runner.run(items, batch_size=self.batch_size)

    def close(self) -> None:
        self.runner.close()
