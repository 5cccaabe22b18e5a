"""The reference side: the HuggingFace/PyTorch model in fp32, observed through forward hooks.

It runs on ``device`` (config ``reference.device``: auto, cpu, cuda, cuda:N; actdiff.reference_device), in true
fp32 there (TF32 off unless ``allow_tf32``), with the batch size of that device (``device_batch_size``, else
``batch_size``). Its provenance records the device, its name and versions, and the torch numerics as torch
reports them; the statistics read ``reference_precision`` from it (actdiff.compare.budgets)."""

from __future__ import annotations

import json
import logging

from ..layout import REFERENCE_SIDE, REFERENCE_VARIANT

log = logging.getLogger(__name__)


class ReferenceSide:
    name = REFERENCE_SIDE
    ids_column = "reference_ids"
    records_input_ids = True
    missing_nodes: tuple[str, ...] = ()

    def __init__(self, record, variant: str = REFERENCE_VARIANT, impl: str = "actdiff", batch_size: int = 1,
                 allow_pickle: bool = False, device: str = "auto", allow_tf32: bool = False,
                 device_batch_size: dict | None = None):  # fmt: skip
        from .. import reference_device as rd
        from ..models.loading import load_reference_model
        from ..nodes import build_graph
        from ..reference import ReferenceRunner

        if str(variant) != REFERENCE_VARIANT:
            raise ValueError(f"the reference runs at {REFERENCE_VARIANT} only, not {variant}")
        self.variant = REFERENCE_VARIANT
        self.device = rd.pick_device(device)  # a CUDA device torch cannot use fails here, naming the key
        # before the model reaches the device: cuBLAS reads its workspace setting when it starts
        self._numerics_before = rd.apply_numerics(rd.numerics_plan(self.device, allow_tf32))
        try:
            model, cfg, self.arch = load_reference_model(str(record.dir), impl=impl, allow_pickle=allow_pickle)
            self.graph = build_graph(cfg, str(record.dir / "config.json"))
            self.runner = ReferenceRunner(model, self.graph, self.device)
            self.numerics = rd.read_numerics()  # what torch reports, not what was asked for
        except BaseException:
            rd.restore_numerics(self._numerics_before)
            raise
        self.impl = impl
        self.batch_size = rd.batch_size_for(self.device, batch_size, device_batch_size)
        self._device_attrs = rd.device_provenance(self.device, self.numerics)
        if allow_tf32 and not self.device.startswith("cuda"):
            log.warning("%s: true has no effect on %s (TF32 is a CUDA format); the reference runs in fp32",
                        rd.TF32_KEY, self.device)  # fmt: skip
        log.info("reference on %s (%s), precision %s, batch size %d; torch numerics %s", self.device,
                 self._device_attrs["device_name"], self._device_attrs["reference_precision"], self.batch_size,
                 self._device_attrs["torch_numerics"])  # fmt: skip

    def provenance(self) -> dict:
        return {
            "arch": self.arch,
            "impl": self.impl,
            "dtypes": json.dumps({"weights": "float32", "activations": "float32", "indices": "int64"}),
            "batch_size": self.batch_size,
            **self._device_attrs,
        }

    def forward(self, items):
        yield from self.runner.run(items, batch_size=self.batch_size)

    def stream(self, items, sink) -> None:
        from ..batching import stream_batches

        stream_batches(items, sink, self.runner.run_batch_into, self.batch_size, self.graph)

    def close(self) -> None:
        from .. import reference_device as rd

        self.runner.close()
        if self._numerics_before is not None:
            rd.restore_numerics(self._numerics_before)
            self._numerics_before = None
