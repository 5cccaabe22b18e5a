"""The llama.cpp HF -> GGUF converter files, taken from the llama-cpp-python sdist.

The llama-cpp-python wheel ships only the ``llama_cpp`` package and its shared libraries, not llama.cpp's
``convert_hf_to_gguf.py``. The sdist vendors the whole llama.cpp tree (``vendor/llama.cpp``), so we take
the converter from the SAME sdist the library is built from: converter and runtime come from one llama.cpp
commit. Files needed (paths below ``vendor/llama.cpp/``):

- ``convert_hf_to_gguf.py``: the entry point;
- ``conversion/``: the model classes (``__init__.py``, ``base.py`` and ``bert.py`` are imported for
  NomicBERT; the whole folder is copied since ``__init__`` may import any of them lazily);
- ``gguf-py/gguf/``: the GGUF writer of the same commit (PyPI's ``gguf`` may lag behind the constants the
  converter uses, e.g. ``MODEL_ARCH.NOMIC_BERT_MOE`` and ``add_moe_every_n_layers``);
- ``LICENSE`` (MIT).

Python dependencies of the converter: torch, transformers, numpy, sentencepiece, protobuf (>= 5), and for
gguf-py tqdm, pyyaml, requests; all are in actdiff's own dependencies or the ``llamacpp`` extra.

Install (only PyPI is needed)::

    python -m actdiff.llamacpp.converter_script install               # pip download the sdist, extract
    python -m actdiff.llamacpp.converter_script install --sdist X.tar.gz   # reuse an sdist already downloaded

The files go to ``$ACTDIFF_LLAMACPP_CONVERTER`` if set, else ``<sys.prefix>/share/actdiff/llama-cpp-python-
<version>/`` (inside the venv, so deleting the venv removes them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from ..errors import ActdiffError
from . import PINNED_VERSION

ENV_DIR = "ACTDIFF_LLAMACPP_CONVERTER"
VENDOR = "vendor/llama.cpp/"
# copied from the sdist (prefix match below vendor/llama.cpp/)
MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/", "LICENSE")
# must exist for a usable converter
REQUIRED = (
    "convert_hf_to_gguf.py",
    "conversion/__init__.py",
    "conversion/base.py",
    "conversion/bert.py",
    "gguf-py/gguf/__init__.py",
    "gguf-py/gguf/constants.py",
    "gguf-py/gguf/gguf_writer.py",
)
MANIFEST = "ACTDIFF_MANIFEST.json"


def default_dir(version: str = PINNED_VERSION) -> Path:
    return Path(sys.prefix) / "share" / "actdiff" / f"llama-cpp-python-{version}"


def converter_dir() -> Path:
    env = os.environ.get(ENV_DIR)
    return Path(env) if env else default_dir()


def missing_files(d: Path | None = None) -> list[str]:
    d = converter_dir() if d is None else Path(d)
    return [f for f in REQUIRED if not (d / f).is_file()]


def install_hint() -> str:
    return (
        f"install them with `python -m actdiff.llamacpp.converter_script install` (downloads llama-cpp-python=="
        f"{PINNED_VERSION}'s sdist from PyPI and extracts {', '.join(MEMBERS)} of vendor/llama.cpp into "
        f"{default_dir()}, or ${ENV_DIR})"
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_sdist(dest: Path, version: str = PINNED_VERSION) -> Path:
    """``pip download`` the sdist (no build, no dependencies) into ``dest``; returns its path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--no-input",
        "-d", str(dest), f"llama-cpp-python=={version}",
    ]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(f"llama_cpp_python-{version}.tar.gz"))
    if p.returncode != 0 or not found:
        raise ActdiffError(
            f"could not download the llama-cpp-python=={version} sdist from PyPI ({' '.join(cmd)}):\n"
            f"{(p.stderr or p.stdout)[-2000:]}"
        )
    return found[0]


def extract_converter(sdist: Path, dest: Path) -> list[str]:
    """Copy the converter members out of the sdist into ``dest`` (written beside it, then renamed)."""
    sdist = Path(sdist)
    if not sdist.is_file():
        raise ActdiffError(f"{sdist}: sdist not found")
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    files: list[str] = []
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            for m in tar.getmembers():
                parts = m.name.split("/", 1)  # strip the top folder llama_cpp_python-<version>/
                if len(parts) != 2 or not parts[1].startswith(VENDOR) or not m.isfile():
                    continue
                rel = parts[1][len(VENDOR) :]
                if not any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in MEMBERS):
                    continue
                if "__pycache__" in rel or ".." in Path(rel).parts:
                    continue
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(m)
                assert src is not None
                target.write_bytes(src.read())
                files.append(rel)
        missing = missing_files(tmp)
        if missing:
            raise ActdiffError(f"{sdist}: the sdist lacks converter file(s) {missing} below {VENDOR}")
        manifest = {"sdist": sdist.name, "sdist_sha256": _sha256(sdist), "files": sorted(files)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return files


def install_converter(sdist: str | Path | None = None, dest: str | Path | None = None) -> Path:
    """Make the converter files available (download the sdist when ``sdist`` is None); returns the folder."""
    dest = Path(dest) if dest else converter_dir()
    with tempfile.TemporaryDirectory(prefix="actdiff-llamacpp-") as td:
        path = Path(sdist) if sdist else download_sdist(Path(td))
        extract_converter(path, dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m actdiff.llamacpp.converter_script", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    inst = sub.add_parser("install", help="extract convert_hf_to_gguf.py, conversion/ and gguf-py from the sdist")
    inst.add_argument(
        "--sdist", help=f"llama_cpp_python-{PINNED_VERSION}.tar.gz already downloaded (default: pip download)"
    )
    inst.add_argument("--dest", help=f"target folder (default: ${ENV_DIR} or {default_dir()})")
    sub.add_parser("where", help="print the converter folder and whether it is complete")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "install":
            d = install_converter(args.sdist, args.dest)
            print(f"llama.cpp converter files in {d}")
        else:
            d = converter_dir()
            miss = missing_files(d)
            print(f"{d}: {'complete' if not miss else 'missing ' + ', '.join(miss)}")
            return 1 if miss else 0
    except ActdiffError as e:
        print(f"actdiff: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
