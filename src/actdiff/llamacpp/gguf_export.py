"""HF model directory -> GGUF with llama.cpp's own converter, then a config-parity check of the result.

The converter runs in a subprocess (:mod:`actdiff.llamacpp._convert_child`) that reads config.json
verbatim (see there for why), writes a temporary file beside the target, and the file is renamed only
after :func:`verify_gguf` has checked its metadata against config.json: a GGUF that does not describe
the model we diff against never reaches the engine stage.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import ModelError
from ..models.loading import sha256_file
from ..nodes import ARCH_NOMIC_MOE, dims_from_config, load_config_json
from .converter_script import converter_dir, install_hint, missing_files
from .gguf_meta import FILE_TYPES, POOLING_TYPES, GGUFHeader, read_gguf_header

log = logging.getLogger(__name__)

OUTTYPES = ("f32", "f16", "q8_0")
GGUF_ARCH = "nomic-bert-moe"
# the converter's context-length rule for NomicBERT: (n_positions, max_trained_positions) -> context
_CONTEXT_RULE = {(8192, 2048): 2048, (2048, 2048): 512}


class GGUFConfigMismatch(ModelError):
    """The GGUF's metadata disagree with config.json (the message names both keys)."""


def expected_metadata(config: dict, source: str = "config.json") -> dict[str, tuple[str, object]]:
    """GGUF key (relative to the architecture, leading '.') -> (config key it comes from, expected value)."""
    d = dims_from_config(config, source)
    if d.arch != ARCH_NOMIC_MOE or not d.moe_every_n_layers:
        raise ModelError(
            f"{source}: llama.cpp's '{GGUF_ARCH}' needs a NomicBERT-MoE config (architectures NomicBertModel with "
            f"moe_every_n_layers > 0); got arch {d.arch!r}, moe_every_n_layers={d.moe_every_n_layers}"
        )
    if d.rotary_scaling_factor:
        # llama.cpp's nomic-bert-moe graph rotates with one fixed base: a GGUF of this checkpoint would compute
        # another model beyond max_trained_positions, so it is refused rather than converted
        raise ModelError(
            f"{source}: rotary_scaling_factor={config['rotary_scaling_factor']} (dynamic NTK rotary scaling) has no "
            "counterpart in llama.cpp's nomic-bert-moe graph; remove the key (or compare this model without the "
            "llama.cpp engine)"
        )
    npos, mtp = int(config.get("n_positions", 0)), int(config.get("max_trained_positions", 2048))
    if (npos, mtp) not in _CONTEXT_RULE:
        raise ModelError(
            f"{source}: n_positions={npos}, max_trained_positions={mtp}: llama.cpp's converter only accepts "
            f"{sorted(_CONTEXT_RULE)} for NomicBERT (it maps them to the trained context length)"
        )
    return {
        ".block_count": ("n_layer", d.layers),
        ".context_length": ("n_positions/max_trained_positions", _CONTEXT_RULE[(npos, mtp)]),
        ".embedding_length": ("n_embd", d.hidden),
        ".feed_forward_length": ("n_inner", d.inner),
        ".attention.head_count": ("n_head", d.heads),
        ".attention.layer_norm_epsilon": ("layer_norm_epsilon", d.eps),
        ".rope.freq_base": ("rotary_emb_base", d.rotary_base),
        ".expert_count": ("num_experts", d.experts),
        ".expert_used_count": ("moe_top_k", d.top_k),
        ".moe_every_n_layers": ("moe_every_n_layers", d.moe_every_n_layers),
        ".attention.causal": ("causal", bool(config.get("causal", False))),
    }


def _same(got, want) -> bool:
    if isinstance(want, bool) or isinstance(got, bool):
        return bool(got) == bool(want) and type(got) is type(want)
    if isinstance(want, float) or isinstance(got, float):
        # GGUF stores these as float32: compare at float32
        return got is not None and math.isclose(float(np.float32(got)), float(np.float32(want)), rel_tol=0, abs_tol=0)
    return got == want


def verify_gguf(header: GGUFHeader, config: dict, outtype: str | None = None, source: str = "config.json") -> dict:
    """Check a GGUF against config.json; raise GGUFConfigMismatch naming the first differing key.

    Returns the verified metadata (GGUF keys without the architecture prefix, plus ``file_type``,
    ``tensor_types``, ``pooling_type`` and ``expert_bias``)."""
    where = header.path
    if header.arch != GGUF_ARCH:
        raise GGUFConfigMismatch(
            f"{where}: general.architecture is {header.arch!r}, expected {GGUF_ARCH!r} for {source} (the converter "
            "chose another model class: is this a NomicBERT-MoE checkpoint?)"
        )
    bad = []
    for key, (cfg_key, want) in expected_metadata(config, source).items():
        got = header.get(key)
        if key == ".attention.causal" and got is None:
            got = True  # llama.cpp's default when the key is absent
        if not _same(got, want):
            bad.append(f"GGUF key '{GGUF_ARCH}{key}' = {got!r} but config.json '{cfg_key}' = {want!r}")
    if bad:
        raise GGUFConfigMismatch(f"{where}: does not match {source}: " + "; ".join(bad))
    ftype = FILE_TYPES.get(header.get("general.file_type"), str(header.get("general.file_type")))
    if outtype is not None and ftype != outtype:
        raise GGUFConfigMismatch(f"{where}: general.file_type is {ftype!r}, expected {outtype!r}")
    d = dims_from_config(config, source)
    emb = next((t for t in header.tensors if t.name == "token_embd.weight"), None)
    if emb is None or emb.shape != (d.hidden, d.vocab):
        raise GGUFConfigMismatch(
            f"{where}: tensor token_embd.weight has shape {None if emb is None else list(emb.shape)}, expected "
            f"[{d.hidden}, {d.vocab}] from config.json 'n_embd' and 'vocab_size'"
        )
    out = {k.lstrip("."): header.get(k) for k in expected_metadata(config, source)}
    pooling = header.get(".pooling_type")
    out.update(
        architecture=header.arch,
        file_type=ftype,
        tensor_types=header.tensor_types(),
        n_tensors=len(header.tensors),
        pooling_type=POOLING_TYPES.get(pooling, pooling) if pooling is not None else None,
        # the converter drops mlp.experts.bias (llama.cpp's graph has no slot for it); recorded, not an error
        expert_bias=any("exps.bias" in t.name for t in header.tensors),
        vocab_size=int(emb.shape[1]),
    )
    return out


# The converter's sentencepiece.bpe.model path writes '<mask>' at the released XLM-R id 250001; with a
# smaller vocabulary that index does not exist. Its tokenizer.json path (taken when the .model file is
# absent) reads the vocabulary and the Precompiled charsmap from tokenizer.json instead.
_XLMR_MASK_ID = 250001


def _stage_model_dir(model_dir: Path, stage: Path, config: dict) -> str:
    """A folder of symlinks to ``model_dir``'s files that the converter reads; returns the tokenizer file
    the converter will take the vocabulary from. Only the tokenizer choice differs from ``model_dir``."""
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    skip = set()
    spm = model_dir / "sentencepiece.bpe.model"
    if spm.is_file() and int(config.get("vocab_size", 0)) <= _XLMR_MASK_ID:
        skip.add(spm.name)
        if not (model_dir / "tokenizer.json").is_file():
            raise ModelError(
                f"{model_dir}: vocab_size {config.get('vocab_size')} is below llama.cpp's hard-coded <mask> id "
                f"{_XLMR_MASK_ID} for sentencepiece.bpe.model, and there is no tokenizer.json to convert instead"
            )
    for entry in model_dir.iterdir():
        if entry.name not in skip and not entry.name.startswith("."):
            (stage / entry.name).symlink_to(entry.resolve())
    return "sentencepiece.bpe.model" if spm.is_file() and not skip else "tokenizer.json"


def convert_to_gguf(model_dir: str, out_gguf: str, outtype: str) -> dict:
    """Convert ``model_dir`` to ``out_gguf`` (atomic) with llama.cpp's converter; returns the verified metadata."""
    if outtype not in OUTTYPES:
        raise ModelError(f"GGUF outtype {outtype!r} is not supported; use one of {', '.join(OUTTYPES)}")
    model_dir_p = Path(model_dir)
    config = load_config_json(model_dir_p)
    source = str(model_dir_p / "config.json")
    expected_metadata(config, source)  # wrong architecture: fail before spending time in the converter
    cdir = converter_dir()
    miss = missing_files(cdir)
    if miss:
        raise ModelError(f"llama.cpp converter files missing in {cdir}: {', '.join(miss)}; {install_hint()}")
    out = Path(out_gguf)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    stage = out.with_name(f".{out.name}.stage-{os.getpid()}")
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)  # the converter must use its own gguf-py
    t0 = time.perf_counter()
    try:
        tokenizer_source = _stage_model_dir(model_dir_p, stage, config)
        cmd = [
            sys.executable, "-m", "actdiff.llamacpp._convert_child", str(cdir), str(stage),
            "--outfile", str(tmp), "--outtype", outtype,
        ]  # fmt: skip
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if p.returncode != 0 or not tmp.is_file():
            tail = "\n".join((p.stderr or p.stdout).strip().splitlines()[-25:])
            raise ModelError(f"{model_dir}: llama.cpp's convert_hf_to_gguf.py failed (exit {p.returncode}):\n{tail}")
        meta = verify_gguf(read_gguf_header(tmp), config, outtype, source)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if tmp.exists():
            tmp.unlink()
    meta["tokenizer_source"] = tokenizer_source
    meta["sha256"] = sha256_file(out)
    meta["outtype"] = outtype
    log.info(
        "converted %s -> %s (%s, %d tensors: %s) in %.1f s; metadata match config.json",
        model_dir,
        out,
        outtype,
        meta["n_tensors"],
        meta["tensor_types"],
        time.perf_counter() - t0,
    )
    return meta
