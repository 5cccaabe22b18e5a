from pathlib import Path

import sys
from types import SimpleNamespace

from actdiff.config import validate_config
from actdiff.errors import ActdiffError, ConfigError, ModelError
from actdiff.models.loading import resolve_model_dir
from actdiff.models.tiny import TRAINING_TEXT
from actdiff.pipeline import STATS_TABLES
from actdiff.prompts import n_shards_for
from actdiff.report.render import REPORTS_DIR
from actdiff.variants import VARIANT_RE


try:
    validate_config(config)  # against the packaged schema, actdiff/data/config.schema.yaml
except ConfigError as e:  # a clear message naming the key, not a traceback
    sys.exit(f"actdiff: {e}")

R = config["results"]  # every output lives under this directory
ENGINES = list(config["engines"])
if "llamacpp" in ENGINES:
    from actdiff.llamacpp import available

    LLAMACPP_OK, LLAMACPP_WHY = available()
    if not LLAMACPP_OK:
        if config["llamacpp"]["required"]:
            sys.exit(f"actdiff: the llamacpp engine is required (llamacpp.required) but unavailable: {LLAMACPP_WHY}")
        print(f"actdiff: NOTE: the llamacpp engine is skipped: {LLAMACPP_WHY}", file=sys.stderr)
        ENGINES.remove("llamacpp")
MODELS = list(config["models"])
try:
    N_SHARDS = n_shards_for(config["prompts"], config["shard_size"]) if "shard_size" in config else config["shards"]
except ActdiffError as e:
    sys.exit(f"actdiff: {e}")
SHARDS = list(range(N_SHARDS))


wildcard_constraints:
    model="|".join(MODELS),
    side="reference|[a-z][a-z0-9_]*",
    variant=VARIANT_RE,
    shard=r"\d+",


def activations(path):
    """An activation dump: a temp() output (deleted once every consumer is done, so disk use is bounded by
    the shards in flight) unless keep_activations is set."""
    return path if config["keep_activations"] else temp(path)


def generated_model_files(wildcards):
    """Inputs of resolve_model: the generated model's files, or nothing for shipped/local models."""
    src = config["models"][wildcards.model]["source"]
    if "generate" in src:
        return {"config": f"resources/models/{wildcards.model}/config.json"}
    return {}


def reference_mem_mb(wildcards):
    """Memory of one reference run: the config's mem_mb, else ~3x the checkpoint + 1 GB (weights, a
    meta-device build, activations, allocator slack); 2 GB when the checkpoint is not there yet."""
    m = config["models"][wildcards.model]
    if "mem_mb" in m:
        return m["mem_mb"]
    try:
        d = resolve_model_dir(wildcards.model, m["source"])
        return int(3 * (d / "model.safetensors").stat().st_size / 2**20) + 1000
    except (ModelError, OSError):
        return 2000


def variants_of(model):
    """The model's own variant list if it has one, else the global one."""
    return config["models"][model].get("variants", config["variants"])


def engines_of(model):
    """The engines a model is compared on: its own list if it has one, else every configured engine;
    llamacpp only when llama-cpp-python is installed."""
    return [e for e in config["models"][model].get("engines", config["engines"]) if e in ENGINES]


def engine_variants(model, engine):
    return variants_of(model) if engine == "actdiff" else config["llamacpp"]["variants"]


def runs():
    """Every (model, side, variant) compared with the reference; each gets a report."""
    return [(m, e, v) for m in MODELS for e in engines_of(m) for v in engine_variants(m, e)]


def parity_files(wildcards):
    """Weight and config parity of a run: both for our engine, config parity for llama.cpp."""
    d = f"{R}/{wildcards.model}/{wildcards.side}/{wildcards.variant}/summary"
    if wildcards.side == "actdiff":
        return [f"{d}/weights.parquet", f"{d}/config_parity.json"]
    if wildcards.side == "llamacpp":
        return [f"{d}/config_parity.json"]
    return []


def stats_tables(wildcards):
    """Every shard's statistics tables of one (model, side, variant)."""
    return [
        f"{R}/{wildcards.model}/{wildcards.side}/{wildcards.variant}/stats/shard-{s}/{t}.parquet"
        for s in SHARDS
        for t in STATS_TABLES
    ]


def all_targets():
    out = []
    for m in MODELS:
        out.append(f"{R}/{m}/model.json")
        for s in SHARDS:
            out.append(f"{R}/{m}/tokens/shard-{s}.parquet")
            if config["keep_activations"]:
                out.append(f"{R}/{m}/reference/fp32/activations/shard-{s}.h5")
    for m, e, v in runs():
        out.append(f"{R}/{m}/{e}/{v}/summary/verdict.json")
        out += parity_files(SimpleNamespace(model=m, side=e, variant=v))
        if config["keep_activations"]:
            out += [f"{R}/{m}/{e}/{v}/activations/shard-{s}.h5" for s in SHARDS]
    out += [f"{R}/reports/{m}/{s}/{v}.html" for m, s, v in runs()]
    if runs():
        out.append(f"{R}/reports/index.html")
    return out
