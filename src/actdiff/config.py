"""Workflow configuration: validation against the packaged schema, ``actdiff/data/config.schema.yaml``.

Errors name the offending key as a dotted path (``models.tiny-nomic-moe.max_length``) and the file, and
schema defaults are filled in so the rules can rely on every key being present.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import jsonschema
import yaml

from .errors import ConfigError
from .variants import resolve_variant

SCHEMA = Path(str(resources.files("actdiff").joinpath("data/config.schema.yaml")))  # the packaged config schema


def _extend_with_default(validator_class):
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for prop, sub in properties.items():
                if "default" in sub and prop not in instance:
                    instance[prop] = _copy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


def _copy(v):
    import copy

    return copy.deepcopy(v)


_DefaultFilling = _extend_with_default(jsonschema.Draft7Validator)


def _key_path(err) -> str:
    parts = [str(p) for p in err.absolute_path]
    return ".".join(parts) if parts else "(top level)"


def validate_config(config: dict, schema_path: str | Path | None = None, source: str = "the config") -> dict:
    """Validate (and fill defaults in) a config dict in place; raise ConfigError naming the key.

    ``schema_path`` defaults to the packaged schema (:data:`SCHEMA`)."""
    schema_path = SCHEMA if schema_path is None else schema_path
    schema = yaml.safe_load(Path(schema_path).read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise ConfigError(f"{source}: the configuration must be a mapping of keys to values")
    errors = sorted(_DefaultFilling(schema).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for e in errors[:5]:
            lines.append(f"config key '{_key_path(e)}': {e.message}")
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise ConfigError(f"{source} is invalid:\n  " + "\n  ".join(lines) + more)
    from .variants import ENGINE_PRECISIONS

    lists = [("variants", config.get("variants", []), "actdiff")]
    lists += [(f"models.{m}.variants", c.get("variants", []), "actdiff") for m, c in config.get("models", {}).items()]
    lists += [(f"{e}.variants", config.get(e, {}).get("variants", []), e) for e in ("llamacpp", "onnxruntime")]
    for key, variants, engine in lists:
        for i, v in enumerate(variants):
            try:
                parsed = resolve_variant(v, config.get("fault_aliases", {}))
                if parsed.precision not in ENGINE_PRECISIONS[engine] or (engine != "actdiff" and parsed.fault):
                    raise ConfigError(
                        f"variant {v!r} is not available for the {engine} engine; it runs "
                        f"{', '.join(ENGINE_PRECISIONS[engine])}" + (" (no faults)" if engine != "actdiff" else "")
                    )
                if parsed.fault:  # a catalogue entry the engine can run (an alias stands for one)
                    from .engine.faults import lookup_fault

                    lookup_fault(parsed.fault, parsed.fault_param)
            except ConfigError as e:
                raise ConfigError(f"config key '{key}.{i}': {e}") from None
    from .diskplan import parse_size

    parse_size(config["disk_budget"], "disk_budget")
    from .sides.configured import engine_specs

    names = list(engine_specs(config.get("engines", [])))
    for m, c in config.get("models", {}).items():
        for i, e in enumerate(c.get("engines", [])):
            if e not in names:
                raise ConfigError(
                    f"config key 'models.{m}.engines.{i}': engine {e!r} is not in the top-level 'engines' list "
                    f"{names}; a model can only narrow that list"
                )
    return config


def read_config_file(path: str | Path) -> dict:
    """Parse a config file (YAML, or JSON, which is YAML) into a mapping; a syntax error names the file, line
    and column (Snakemake's own loader says only "not valid JSON or YAML", which is why `actdiff run` and the
    Snakefile read every config file through this first)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {p} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {p} cannot be read ({e})") from None
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(_yaml_error(p, e)) from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"config file {p}: the configuration must be a mapping of keys to values (key: value lines)")
    return cfg


def _yaml_error(p: Path, e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f"{p}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(p)
    what = getattr(e, "problem", None) or str(e)
    context = getattr(e, "context", None)
    context_mark = getattr(e, "context_mark", None)
    if context and context_mark is not None and (mark is None or context_mark.line != mark.line):
        what += f" ({context} at line {context_mark.line + 1})"
    hint = " (indent with spaces: YAML does not allow tabs)" if "\\t" in what else ""
    return f"config file {where}: not valid YAML: {what}{hint}"


def load_config(path: str | Path, schema_path: str | Path | None = None) -> dict:
    p = Path(path)
    return validate_config(read_config_file(p), schema_path, source=str(p))
