"""Adapter for rule export_onnx: the fp32 reference as ONNX, every canonical node a named value."""

from actdiff.warm import hand_over

hand_over()  # in a fork of the run's warm process, where there is one (actdiff.warm)

from actdiff.pipeline import export_onnx
from actdiff.workflow_support import run

run(
    snakemake,  # noqa: F821
    export_onnx,
    model_json=snakemake.input.model,  # noqa: F821
    out=snakemake.output.onnx,  # noqa: F821
)
