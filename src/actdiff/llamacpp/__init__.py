"""llama.cpp (through llama-cpp-python) as a second engine for NomicBERT-MoE (docs/llamacpp.md).

- :mod:`.convert`: HF directory -> GGUF with llama.cpp's own converter, metadata checked against config.json;
- :mod:`.capture`: ctypes layer over the bundled ggml and a runner that records every graph node;
- :mod:`.dump`: one shard of prompts -> actdiff's HDF5 layout through the mapping file
  ``actdiff/data/mappings/llamacpp/nomic-bert-moe.yaml``.

Importing this package does not import ``llama_cpp`` (the extra is optional); :func:`available` says
whether everything is installed.
"""

from __future__ import annotations

import importlib.util
from importlib import resources
from pathlib import Path

PINNED_VERSION = "0.3.36"  # the llama-cpp-python release this layer is built and tested against
INSTALL = (
    f"pip install -e '.[llamacpp]' (builds llama-cpp-python=={PINNED_VERSION} from source; "
    "CMAKE_ARGS='-DLLAVA_BUILD=OFF' saves time), then python -m actdiff.llamacpp.converter_script install"
)


def mapping_path(arch: str = "nomic-bert-moe") -> Path:
    """The packaged mapping file for a llama.cpp architecture."""
    return Path(str(resources.files("actdiff").joinpath(f"data/mappings/llamacpp/{arch}.yaml")))


def available() -> tuple[bool, str]:
    """(True, version) when llama_cpp is importable at the pinned version and the converter files exist;
    otherwise (False, why and how to install)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return False, f"llama_cpp (llama-cpp-python) is not installed; install it with: {INSTALL}"
    try:
        import llama_cpp
    except Exception as e:  # a broken build fails at import with OSError/RuntimeError from ctypes
        return False, f"llama_cpp is installed but cannot be imported ({type(e).__name__}: {e}); reinstall: {INSTALL}"
    version = getattr(llama_cpp, "__version__", "?")
    if version != PINNED_VERSION:
        return False, (
            f"llama_cpp {version} is installed, actdiff's llama.cpp layer is built and tested against "
            f"{PINNED_VERSION} (ggml struct layout, node names); install it with: {INSTALL}"
        )
    from .converter_script import install_hint, missing_files  # not at import: `python -m .converter_script` runs it

    miss = missing_files()
    if miss:
        return False, f"llama.cpp converter files missing ({', '.join(miss)}); {install_hint()}"
    return True, f"llama-cpp-python {version}"


__all__ = ["INSTALL", "PINNED_VERSION", "available", "mapping_path"]
