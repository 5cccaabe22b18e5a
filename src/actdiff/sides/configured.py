"""The engines a config compares with the reference (config key ``engines``), as one :class:`EngineSpec` each.

An entry is a built-in engine by name (``actdiff``, ``llamacpp``, ``onnxruntime``: its kind is its name) or an outside
engine of kind ``import``::

    engines:
      - actdiff
      - name: mynumpy                       # the side's name in paths and reports ([a-z][a-z0-9_]*)
        kind: import
        mapping: examples/numpy-port/mapping.yaml   # optional: default aligns by canonical node name
        command: "{python} examples/numpy-port/nomic_numpy.py --model-dir {model_dir} --tokens {tokens} --out {out}"
        # or source: dumps/mynumpy/shard-{shard}    # a folder of per-prompt dumps ({model}, {shard}, {variant})
        variants: [fp32]                    # labels only (default [fp32]); {variant} reaches the command

The workflow dispatches on ``kind`` (workflow/rules/common.smk): it never needs an engine's name.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import ConfigError
from ..variants import VARIANT_RE

BUILTIN = ("actdiff", "llamacpp", "onnxruntime")  # engines that run here; their kind is their name
# built-in engines behind an optional extra: the package whose available() says whether it runs here; each
# has a config block of its own name with variants and required (and onnxruntime enabled)
OPTIONAL = {"llamacpp": "actdiff.llamacpp", "onnxruntime": "actdiff.onnxrt"}
IMPORT = "import"
RESERVED = ("reference", *BUILTIN)
NAME_RE = r"[a-z][a-z0-9_]*"
COMMAND_FIELDS = ("python", "model_dir", "tokens", "out", "shard", "variant", "model")
SOURCE_FIELDS = ("model", "shard", "variant")


@dataclass(frozen=True)
class EngineSpec:
    name: str
    kind: str  # "actdiff" | "llamacpp" | "onnxruntime" | "import"
    variants: tuple[str, ...] | None = None  # None: the kind's own list (variants / llamacpp / onnxruntime)
    mapping: str | None = None
    source: str | None = None
    command: str | None = None
    allow_missing: bool = False

    def as_dict(self) -> dict:
        """JSON-safe fields (a rule's params; EngineSpec(**d) gives it back)."""
        d = asdict(self)
        d["variants"] = list(self.variants) if self.variants is not None else None
        return d

    def source_dir(self, model: str, shard: int, variant: str) -> Path:
        return Path(self.source.format(model=model, shard=shard, variant=variant))  # type: ignore[union-attr]

    def command_line(self, model_dir, tokens, out, model: str, shard: int, variant: str) -> str:
        """The command with its placeholders filled in (paths shell-quoted; {python}: this interpreter)."""
        q = {"python": sys.executable, "model_dir": model_dir, "tokens": tokens, "out": out}
        fields = {k: shlex.quote(str(v)) for k, v in q.items()}
        return self.command.format(**fields, shard=shard, variant=variant, model=model)  # type: ignore[union-attr]


def _fields_ok(template: str, allowed: tuple[str, ...], where: str) -> None:
    used = set(re.findall(r"{([^{}]*)}", template))
    bad = sorted(used - set(allowed))
    if bad:
        raise ConfigError(
            f"config key '{where}': unknown placeholder(s) {', '.join('{' + b + '}' for b in bad)} in {template!r}; "
            f"available: {', '.join('{' + a + '}' for a in allowed)}"
        )


def _import_spec(e: dict, where: str) -> EngineSpec:
    name = e.get("name")
    if not isinstance(name, str) or not re.fullmatch(NAME_RE, name) or name in RESERVED:
        raise ConfigError(
            f"config key '{where}.name': {name!r} must match {NAME_RE} and not be one of {', '.join(RESERVED)}"
        )
    if (e.get("source") is None) == (e.get("command") is None):
        raise ConfigError(f"config key '{where}': give exactly one of 'source' (a dump folder) or 'command'")
    if e.get("command") is not None:
        _fields_ok(e["command"], COMMAND_FIELDS, f"{where}.command")
        if "{out}" not in e["command"] or "{tokens}" not in e["command"]:
            raise ConfigError(f"config key '{where}.command': the command must use {{tokens}} and {{out}}")
    else:
        _fields_ok(e["source"], SOURCE_FIELDS, f"{where}.source")
    if e.get("mapping") is not None and not Path(e["mapping"]).is_file():
        raise ConfigError(f"config key '{where}.mapping': mapping file {e['mapping']} not found (docs/mapping.md)")
    variants = tuple(e.get("variants") or ("fp32",))
    for j, v in enumerate(variants):
        if not re.fullmatch(VARIANT_RE, v):
            raise ConfigError(f"config key '{where}.variants.{j}': {v!r} is not a variant label such as fp32")
    return EngineSpec(name, IMPORT, variants, e.get("mapping"), e.get("source"), e.get("command"),
                      bool(e.get("allow_missing", False)))  # fmt: skip


def engine_specs(entries: list) -> dict[str, EngineSpec]:
    """name -> EngineSpec of the config's ``engines`` list, in order; a ConfigError names the bad key."""
    out: dict[str, EngineSpec] = {}
    for i, e in enumerate(entries):
        where = f"engines.{i}"
        if isinstance(e, str):
            if e not in BUILTIN:
                raise ConfigError(f"config key '{where}': unknown engine {e!r}; built in: {', '.join(BUILTIN)} "
                                  f"(an outside engine is a mapping with kind: {IMPORT})")  # fmt: skip
            spec = EngineSpec(e, e)
        elif isinstance(e, dict) and e.get("kind") == IMPORT:
            spec = _import_spec(e, where)
        else:
            raise ConfigError(f"config key '{where}': expected {' or '.join(BUILTIN)} or a mapping with kind: {IMPORT}")
        if spec.name in out:
            raise ConfigError(f"config key '{where}': engine {spec.name!r} is listed twice")
        out[spec.name] = spec
    return out


def _unusable(cfg: dict, kind: str) -> str | None:
    """Why an optional engine does not run here (None: it does): turned off (``{kind}.enabled: false``), or not
    installed, which is a ConfigError when ``{kind}.required`` is set."""
    import importlib

    block = cfg.get(kind, {})
    if not block.get("enabled", True):
        return f"{kind}.enabled is false"
    ok, why = importlib.import_module(OPTIONAL[kind]).available()
    if ok:
        return None
    if block.get("required", False):
        raise ConfigError(f"the {kind} engine is required ({kind}.required) but unavailable: {why}")
    return why


def usable_engines(cfg: dict, specs: dict[str, EngineSpec]) -> tuple[dict[str, EngineSpec], str | None]:
    """(the engines that can run here, why engines were skipped or None): llamacpp only when llama-cpp-python is
    installed, onnxruntime only when onnxruntime and onnx are (and ``onnxruntime.enabled``); a ConfigError when
    one is required (``llamacpp.required``, ``onnxruntime.required``) and missing."""
    skipped = {k: _unusable(cfg, k) for k in OPTIONAL if k in specs}
    skipped = {k: why for k, why in skipped.items() if why is not None}
    usable = {n: s for n, s in specs.items() if n not in skipped}
    return usable, "; ".join(f"the {k} engine is skipped: {why}" for k, why in skipped.items()) or None


def engine_variants(cfg: dict, model: str, spec: EngineSpec) -> list[str]:
    """An engine's variants by its kind: the model's own list or the global one (actdiff), the engine's config
    block (llamacpp.variants, onnxruntime.variants), or the import entry's."""
    if spec.kind == "actdiff":
        return [str(v) for v in cfg["models"][model].get("variants", cfg["variants"])]
    return [str(v) for v in (cfg[spec.kind]["variants"] if spec.kind in OPTIONAL else spec.variants)]


def configured_runs(cfg: dict, engines: dict[str, EngineSpec]) -> list[tuple[str, str, str]]:
    """Every (model, side, variant) a validated config compares with the reference, each engine's from the
    ``engines`` it can run (:func:`usable_engines`): the one list the workflow's targets and ``actdiff check``
    both use."""
    out = []
    for m, mc in cfg["models"].items():
        for e in [e for e in mc.get("engines", list(engines)) if e in engines]:
            out += [(m, e, v) for v in engine_variants(cfg, m, engines[e])]
    return out
