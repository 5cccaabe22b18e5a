"""ONNX Runtime as a third engine (issue 17): the only package that knows ORT by name.

- :mod:`.export`: the fp32 reference -> ONNX (torch.onnx), every canonical node a named value;
- :mod:`.capture`: ORT CPU sessions at optimisation level disable/basic/all, every surviving node exposed
  as a graph output ("mark all"), the nodes ORT's fusions removed and the fused op that absorbed each;
- :mod:`.variants`: fp32, fp16, int8-dynamic and int8-static (QDQ) model files;
- :mod:`.side`: the Side (actdiff.sides.base) producing every canonical node.

Importing this package does not import ``onnxruntime`` (the extra is optional); :func:`available` says
whether it is installed.
"""

from __future__ import annotations

import importlib.util

INSTALL = "pip install -e '.[onnxruntime]'"
# the ORT variants (actdiff.onnxrt.variants makes their model files); actdiff.variants asks this tuple which
# precisions the onnxruntime engine runs, so a new variant is added here only
VARIANTS = ("fp32", "fp16", "int8-dynamic", "int8-static")
# the precision policy of each variant, in the terms every precision is budgeted by (actdiff.variants.Policy,
# actdiff.compare.budgets): the weights' storage format, the weighted ops whose weights stay fp32, the
# activations' format. quantize_dynamic quantises every MatMul (the router's too) and the word-embedding
# Gather; the static QDQ variant quantises MatMuls only (variants.STATIC_OPS), so the embedding table stays
# fp32. Both quantise the activations entering a quantised MatMul to 8 bits per tensor. fp16 is the float16
# conversion (variants.make_fp16): every initializer (embeddings and routers too) and every value between two
# ops is typed float16 (ORT's CPU provider runs the ops it has no float16 kernel for in float32 between inserted
# Casts, so a value is rounded to fp16 where it enters or leaves a float16 kernel: at most once per node, which
# the fp16 activation allowance covers), unlike the fp16 of our engine and llama.cpp (weights only), whose name
# it shares: actdiff.variants.policy gives a side's own policy of a name first. fp32 is the shared one's.
POLICIES = {
    "fp16": {"weights": "fp16", "fp32_ops": (), "activations": "fp16"},
    "int8-dynamic": {"weights": "int8", "fp32_ops": (), "activations": "int8"},
    "int8-static": {"weights": "int8", "fp32_ops": ("EMBED",), "activations": "int8"},
}


def available() -> tuple[bool, str]:
    """(True, versions) when onnxruntime and onnx import; otherwise (False, why and how to install)."""
    for mod in ("onnxruntime", "onnx"):
        if importlib.util.find_spec(mod) is None:
            return False, f"{mod} is not installed; install it with: {INSTALL}"
    try:
        import onnx
        import onnxruntime
    except Exception as e:  # a broken wheel fails at import
        return False, f"onnxruntime/onnx cannot be imported ({type(e).__name__}: {e}); reinstall: {INSTALL}"
    return True, f"onnxruntime {onnxruntime.__version__}, onnx {onnx.__version__}"


__all__ = ["INSTALL", "POLICIES", "VARIANTS", "available"]
