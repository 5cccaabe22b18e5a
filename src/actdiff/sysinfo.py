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
    return {"model": model, "mhz": mhz, "flags": flags, "avx512f": "avx512f" in flags, "cores": os.cpu_count(),
            "fp32_flop_per_cycle_per_core": 32 if "avx512f" in flags else 16}
