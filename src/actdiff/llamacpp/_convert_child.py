"""Subprocess entry point: run llama.cpp's convert_hf_to_gguf.py with config.json read verbatim.

``python -m actdiff.llamacpp._convert_child CONVERTER_DIR [converter args...]``

Why: the converter loads hparams through ``transformers.AutoConfig``. Under transformers 5 the model type
``nomic_bert`` resolves to transformers' own NomicBert config class, which does not know the released
key names (``n_embd``, ``n_head``, ``n_inner``, ``rotary_emb_base``) and fills its defaults instead: the
GGUF silently becomes a 768-wide, 12-head model with rope base 1000 and eps 1e-12. Replacing
``ModelBase.load_hparams`` by a plain ``json.load(config.json)`` (what the converter itself falls back to
when AutoConfig fails) gives it the real values. It runs in a subprocess so the patch, the converter's
``sys.path`` entries and its torch import never touch the calling process.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit("usage: python -m actdiff.llamacpp._convert_child CONVERTER_DIR [converter args...]")
    conv_dir = Path(argv[0]).resolve()
    script = conv_dir / "convert_hf_to_gguf.py"
    # the converter's own gguf-py first, so a different PyPI gguf never shadows it
    sys.path[:0] = [str(conv_dir), str(conv_dir / "gguf-py")]
    import conversion.base as base  # importable only after the path change

    original = base.ModelBase.load_hparams

    def load_raw_hparams(dir_model: Path, is_mistral_format: bool):
        if is_mistral_format:
            return original(dir_model, is_mistral_format)
        with open(Path(dir_model) / "config.json", encoding="utf-8") as f:
            return json.load(f)

    base.ModelBase.load_hparams = staticmethod(load_raw_hparams)
    sys.argv = [str(script), *argv[1:]]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
