"""Adapter for rule onnx_variant: an ONNX Runtime variant's model file made from the fp32 export."""

from actdiff.warm import hand_over

hand_over()  # in a fork of the run's warm process, where there is one (actdiff.warm)

from actdiff.pipeline import onnx_variant
from actdiff.workflow_support import run

run(
    snakemake,  # noqa: F821
    onnx_variant,
    fp32=snakemake.input.fp32,  # noqa: F821
    variant=snakemake.wildcards.variant,  # noqa: F821
    out=snakemake.output.onnx,  # noqa: F821
    tokens=snakemake.input.get("tokens"),  # noqa: F821
    calibration_prompts=snakemake.params.calibration_prompts,  # noqa: F821
)
