"""Where the reference runs (``reference.device``) and the torch numerics it runs with.

The reference is the fp32 ground truth every engine is judged against, so on CUDA it must compute true fp32:
recent GPUs run fp32 matmuls and convolutions in TF32 (a 10-bit mantissa) when torch allows it, which moves
the reference by about 1e-3 relative and would make every engine look wrong. :func:`numerics_plan` says what
the reference sets (TF32 off for matmul and cuDNN, ``float32_matmul_precision("highest")``, deterministic
algorithms on CUDA), :func:`apply_numerics` sets it through torch's own flags and :func:`read_numerics` reads
back what torch reports, which is what the dump's provenance records (never what was merely asked for).
``reference.allow_tf32: true`` allows TF32 on purpose; the dump then says ``reference_precision: tf32`` and the
budgets (actdiff.compare.budgets) and the report account for it.

torch 2.9 replaced the ``allow_tf32`` flags by per-backend ``fp32_precision`` values ("ieee", "tf32") and
refuses to read a mix of the two APIs, so a torch that has the new one is set and read through it only.
"""

from __future__ import annotations

import json
import logging
import os
import re

from .errors import ConfigError

log = logging.getLogger(__name__)

DEVICE_KEY = "reference.device"
TF32_KEY = "reference.allow_tf32"
DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:[0-9]+)?)$")
# cuBLAS is deterministic only with a fixed workspace (PyTorch's reproducibility notes); read when cuBLAS
# starts, so it is set before the model reaches the GPU
CUBLAS_WORKSPACE = ":4096:8"
PRECISIONS = ("fp32", "tf32")  # the reference's own precision, as the dump's reference_precision records it


def resolve_device(spec: str, cuda_available: bool, cuda_devices: int) -> str:
    """The torch device a ``reference.device`` value names: "cpu" or "cuda:N" (auto: cuda:0 when CUDA is
    available, else cpu). A CUDA device torch cannot reach is refused, naming the key and what to do."""
    spec = str(spec).strip()
    if not DEVICE_RE.match(spec):
        raise ConfigError(f"config key '{DEVICE_KEY}': {spec!r} is not a device; use auto, cpu, cuda or cuda:N")
    if spec == "auto":
        return "cuda:0" if cuda_available and cuda_devices > 0 else "cpu"
    if spec == "cpu":
        return "cpu"
    index = int(spec.split(":")[1]) if ":" in spec else 0
    if not cuda_available or cuda_devices == 0:
        raise ConfigError(
            f"config key '{DEVICE_KEY}' is {spec!r}, but this torch has no usable CUDA device (torch.cuda."
            "is_available() is False: a CPU-only torch build, no NVIDIA driver, or no GPU allocated to the job). "
            f"Set {DEVICE_KEY}: auto or cpu, install a CUDA build of torch, or request a GPU (docs/cluster.md)"
        )
    if index >= cuda_devices:
        raise ConfigError(
            f"config key '{DEVICE_KEY}' is {spec!r}, but torch sees {cuda_devices} CUDA device(s) "
            f"(cuda:0 to cuda:{cuda_devices - 1}); pick one of them or use auto"
        )
    return f"cuda:{index}"


def pick_device(spec: str) -> str:
    """:func:`resolve_device` against the CUDA devices this torch can use now."""
    import torch

    available = bool(torch.cuda.is_available())
    return resolve_device(spec, available, torch.cuda.device_count() if available else 0)


def numerics_plan(device: str, allow_tf32: bool = False) -> dict:
    """The torch settings the reference runs with on ``device``. TF32 exists on CUDA only: on the CPU the
    matmul precision stays "highest" whatever ``allow_tf32`` says (``"high"`` would let oneDNN use reduced
    precision on CPUs that have it). Deterministic algorithms on CUDA, warn-only: an op without a
    deterministic kernel warns in the log instead of stopping the dump."""
    cuda = device.startswith("cuda")
    tf32 = bool(cuda and allow_tf32)
    return {
        "float32_matmul_precision": "high" if tf32 else "highest",
        "cuda_matmul_tf32": tf32,
        "cudnn_tf32": tf32,
        "deterministic_algorithms": cuda,
        "deterministic_warn_only": cuda,
        "cudnn_deterministic": cuda,
        "cudnn_benchmark": False,
        "cublas_workspace_config": CUBLAS_WORKSPACE if cuda else "",
    }


def _new_api(torch) -> bool:
    return hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(torch.backends.cudnn, "conv")


def read_numerics() -> dict:
    """What torch reports now, in :func:`numerics_plan`'s keys."""
    import torch

    b = torch.backends
    if _new_api(torch):
        matmul_tf32 = b.cuda.matmul.fp32_precision == "tf32"
        cudnn_tf32 = b.cudnn.conv.fp32_precision == "tf32"
    else:
        matmul_tf32, cudnn_tf32 = bool(b.cuda.matmul.allow_tf32), bool(b.cudnn.allow_tf32)
    try:
        precision = torch.get_float32_matmul_precision()
    except RuntimeError:  # a mix of per-backend values that no single name describes
        precision = "mixed"
    return {
        "float32_matmul_precision": precision,
        "cuda_matmul_tf32": matmul_tf32,
        "cudnn_tf32": cudnn_tf32,
        "deterministic_algorithms": bool(torch.are_deterministic_algorithms_enabled()),
        "deterministic_warn_only": bool(torch.is_deterministic_algorithms_warn_only_enabled()),
        "cudnn_deterministic": bool(b.cudnn.deterministic),
        "cudnn_benchmark": bool(b.cudnn.benchmark),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG", ""),
    }


def _snapshot(torch) -> dict:
    """The raw flags :func:`apply_numerics` changes, for :func:`restore_numerics`."""
    b = torch.backends
    snap = {
        "deterministic": (
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
        ),
        "cudnn": (b.cudnn.deterministic, b.cudnn.benchmark),
        "cublas": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "matmul_precision": torch.get_float32_matmul_precision(),
    }
    if _new_api(torch):
        snap["fp32"] = {
            "cuda.matmul": b.cuda.matmul.fp32_precision, "cudnn.conv": b.cudnn.conv.fp32_precision,
            "cudnn.rnn": b.cudnn.rnn.fp32_precision, "mkldnn.matmul": b.mkldnn.matmul.fp32_precision,
        }  # fmt: skip
    else:
        snap["legacy"] = (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32)
    return snap


def apply_numerics(plan: dict) -> dict:
    """Set ``plan`` (:func:`numerics_plan`) through torch's flags; returns the previous state for
    :func:`restore_numerics` (the flags are process-wide: actdiff.load must not leave them changed)."""
    import torch

    b = torch.backends
    before = _snapshot(torch)
    if plan["cublas_workspace_config"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", plan["cublas_workspace_config"])
    # the global setter first: it sets the CUDA and oneDNN matmuls together
    torch.set_float32_matmul_precision(plan["float32_matmul_precision"])
    if _new_api(torch):
        b.cuda.matmul.fp32_precision = "tf32" if plan["cuda_matmul_tf32"] else "ieee"
        b.cudnn.conv.fp32_precision = b.cudnn.rnn.fp32_precision = "tf32" if plan["cudnn_tf32"] else "ieee"
    else:
        b.cuda.matmul.allow_tf32 = plan["cuda_matmul_tf32"]
        b.cudnn.allow_tf32 = plan["cudnn_tf32"]
    torch.use_deterministic_algorithms(plan["deterministic_algorithms"], warn_only=plan["deterministic_warn_only"])
    b.cudnn.deterministic, b.cudnn.benchmark = plan["cudnn_deterministic"], plan["cudnn_benchmark"]
    return before


def restore_numerics(before: dict) -> None:
    """Put back the flags :func:`apply_numerics` found."""
    import torch

    b = torch.backends
    torch.set_float32_matmul_precision(before["matmul_precision"])  # first: it sets the backends below too
    if "fp32" in before:
        f = before["fp32"]
        b.cuda.matmul.fp32_precision, b.mkldnn.matmul.fp32_precision = f["cuda.matmul"], f["mkldnn.matmul"]
        b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision = f["cudnn.conv"], f["cudnn.rnn"]
    else:
        b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32 = before["legacy"]
    enabled, warn_only = before["deterministic"]
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
    b.cudnn.deterministic, b.cudnn.benchmark = before["cudnn"]
    if before["cublas"] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = before["cublas"]


def reference_precision(device: str, numerics: dict) -> str:
    """The reference's own precision for the budgets: "tf32" when it ran on CUDA with TF32 allowed for
    matmuls or cuDNN (as torch reported it), else "fp32"."""
    return "tf32" if device.startswith("cuda") and (numerics["cuda_matmul_tf32"] or numerics["cudnn_tf32"]) else "fp32"


def device_provenance(device: str, numerics: dict) -> dict:
    """HDF5 attributes of the reference's device and numerics (JSON-safe scalars): the device, its name, the
    CUDA runtime/driver/cuDNN versions on CUDA, the torch settings as read back, and the precision."""
    from . import sysinfo

    out = {
        "device": device,
        "reference_precision": reference_precision(device, numerics),
        "torch_numerics": json.dumps(numerics, sort_keys=True),
    }
    if device.startswith("cuda"):
        out.update(sysinfo.cuda_info(int(device.split(":")[1])))
    else:
        out["device_name"] = sysinfo.cpu_info()["model"] or "unknown CPU"
    return out


def batch_size_for(device: str, batch_size: int, device_batch_size: dict | None) -> int:
    """The reference's batch size on ``device``: ``models.<m>.device_batch_size.<cpu|cuda>``, else the model's
    ``batch_size`` (which the engines run, whatever device the reference gets)."""
    kind = device.split(":")[0]
    return int((device_batch_size or {}).get(kind) or batch_size)


# ------------------------------------------------------------------ the record the statistics carry forward
# the nodes table's schema metadata (like actdiff.compare.fitted's): the reference dump's device record, so the
# verdict and the report know it after the temp() dumps are gone
REFERENCE_META = b"actdiff.reference"
RECORD_KEYS = ("device", "device_name", "reference_precision", "cuda_capability", "cuda_runtime", "cuda_driver",
               "cudnn_version", "batch_size")  # fmt: skip


def reference_record(attrs) -> dict:
    """What the reference dump's attributes say about its device and numerics (a dump from before they were
    recorded: the CPU in fp32, settings unknown)."""

    def text(v):
        return v.decode() if isinstance(v, bytes) else v.item() if hasattr(v, "item") else v

    rec = {k: text(attrs[k]) for k in RECORD_KEYS if k in attrs}
    rec.setdefault("device", "cpu")
    rec.setdefault("reference_precision", "fp32")
    rec["torch_numerics"] = json.loads(text(attrs.get("torch_numerics", "{}")) or "{}")
    return rec


def read_reference_records(nodes_tables) -> list[dict]:
    """The distinct reference records of the shards' nodes tables (one, unless shards ran on different devices)."""
    import pyarrow.parquet as pq

    out: list[dict] = []
    for p in nodes_tables:
        meta = pq.read_schema(p).metadata or {}
        if REFERENCE_META in meta:
            rec = json.loads(meta[REFERENCE_META])
            if rec not in out:
                out.append(rec)
    return out
