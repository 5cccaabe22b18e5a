"""What machine this is: CPU model, nominal clock, vector extensions (benchmarks and report provenance)."""

from __future__ import annotations

import os
from pathlib import Path


def cpu_info() -> dict:
    """Model name, nominal clock (MHz, /proc/cpuinfo), flags, cores, and fp32 FLOP/cycle/core with FMA
    (32 with AVX-512: Zen 4 double-pumps 512-bit FMAs over two 256-bit pipes; 16 with AVX2)."""
    mhz, model, flags = None, None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz") and mhz is None:
                mhz = float(line.split(":")[1])
            elif line.startswith("model name") and model is None:
                model = line.split(":")[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {
        "model": model,
        "mhz": mhz,
        "flags": flags,
        "avx512f": "avx512f" in flags,
        "cores": os.cpu_count(),
        "fp32_flop_per_cycle_per_core": 32 if "avx512f" in flags else 16,
    }


# the packages whose versions a dump or a report records
LIBRARIES = ("actdiff", "torch", "transformers", "tokenizers", "numpy", "pandas", "pyarrow", "h5py", "safetensors")


def library_versions(packages=LIBRARIES) -> dict[str, str]:
    """Installed versions of ``packages`` (absent ones left out)."""
    import importlib.metadata as md

    out = {}
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def git_commit() -> str:
    """The commit of the checkout actdiff is imported from, or "unavailable" (an installed wheel)."""
    import subprocess

    try:
        here = Path(__file__).resolve().parent
        p = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        return p.stdout.strip() if p.returncode == 0 else "unavailable"
    except (OSError, subprocess.SubprocessError):
        return "unavailable"


def runtime() -> dict:
    """Python, machine and CPU (the vector extensions that decide the C kernels' path)."""
    import platform

    c = cpu_info()
    return {
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.system()} {platform.release()}",
        "cpu": c["model"],
        "cpu_flags": {f: f in c["flags"] for f in ("avx2", "avx512f", "fma", "f16c")} if c["flags"] else {},
    }


def nvidia_driver_version() -> str:
    """The NVIDIA driver's version (nvidia-smi; torch reports only the CUDA runtime it was built with), or
    "unavailable"."""
    import subprocess

    try:
        p = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)  # fmt: skip
        lines = p.stdout.strip().splitlines() if p.returncode == 0 else []
        return lines[0].strip() if lines else "unavailable"
    except (OSError, subprocess.SubprocessError):
        return "unavailable"


def cuda_info(index: int) -> dict:
    """CUDA device ``index``: name, compute capability, memory, CUDA runtime, driver and cuDNN versions (dump
    provenance of a reference run on the GPU; JSON-safe scalars)."""
    import torch

    p = torch.cuda.get_device_properties(index)
    return {
        "device_name": p.name,
        "cuda_capability": f"{p.major}.{p.minor}",
        "cuda_memory_mb": int(p.total_memory // 2**20),
        "cuda_runtime": str(torch.version.cuda),
        "cuda_driver": nvidia_driver_version(),
        "cudnn_version": str(torch.backends.cudnn.version()),
    }
