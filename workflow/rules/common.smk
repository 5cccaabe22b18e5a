from pathlib import Path

import sys

from actdiff.config import validate_config
from actdiff.errors import ActdiffError, ConfigError, ModelError
from actdiff.models.loading import resolve_model_dir
from actdiff.pipeline import STATS_TABLES
from actdiff.prompts import n_shards_for
from actdiff.variants import VARIANT_RE


try:
    validate_config(config, workflow.source_path("../schemas/config.schema.yaml"))
except ConfigError as e:  # a clear message naming the key, not a traceback
    sys.exit(f"actdiff: {e}")

R = config["results"]  # every output lives under this directory
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


def model_cfg(wildcards):
    return config["models"][wildcards.model]


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


def stats_tables(wildcards):
    """Every shard's statistics tables of one (model, side, variant)."""
    return [
        f"{R}/{wildcards.model}/{wildcards.side}/{wildcards.variant}/stats/shard-{s}/{t}.parquet"
        for s in SHARDS
        for t in STATS_TABLES
    ]


def report_runs():
    """Every (model, side, variant) that gets a report: the actdiff engine's variants of every model."""
    if "actdiff" not in config["engines"]:
        return []
    return [(m, "actdiff", v) for m in MODELS for v in variants_of(m)]


def all_targets():
    out = []
    for m in MODELS:
        out.append(f"{R}/{m}/model.json")
        for s in SHARDS:
            out.append(f"{R}/{m}/tokens/shard-{s}.parquet")
            if config["keep_activations"]:
                out.append(f"{R}/{m}/reference/fp32/activations/shard-{s}.h5")
                if "actdiff" in config["engines"]:
                    out += [f"{R}/{m}/actdiff/{v}/activations/shard-{s}.h5" for v in variants_of(m)]
        if "actdiff" in config["engines"]:
            for v in variants_of(m):
                out.append(f"{R}/{m}/actdiff/{v}/summary/verdict.json")
                out.append(f"{R}/{m}/actdiff/{v}/summary/weights.parquet")
    out += [f"{R}/reports/{m}/{s}/{v}.html" for m, s, v in report_runs()]
    if report_runs():
        out.append(f"{R}/reports/index.html")
    return out
