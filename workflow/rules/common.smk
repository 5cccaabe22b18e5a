from pathlib import Path

import sys
from types import SimpleNamespace

from actdiff.config import validate_config
from actdiff.errors import ActdiffError, ConfigError, ModelError
from actdiff.models.fingerprint import update_fingerprint
from actdiff.models.loading import graph_of_source, resolve_model_dir
from actdiff.compare.budgets import check_budget_globs
from actdiff.compare.grouped import GROUP_BYTES
from actdiff.compare.refops import WEIGHT_MEMO
from actdiff.layout import REFERENCE_SIDE, REFERENCE_VARIANT, Layout
from actdiff.models.tiny import TRAINING_TEXT
from actdiff.tables import AGGREGATE_JSON, AGGREGATE_TABLES, SHARD_TABLES
from actdiff.diskplan import (
    Concurrency,
    ModelDumps,
    configured_shards,
    free_space_note,
    max_tokens_of,
    parse_size,
    recorded_plan,
    shard_count,
)
from actdiff.prompts import read_prompt_ids
from actdiff.sides.configured import IMPORT, configured_runs, engine_specs, usable_engines
from actdiff.report.render import REPORTS_DIR
from actdiff.onnxrt import VARIANTS as ONNXRUNTIME_VARIANTS
from actdiff.variants import VARIANT_RE
from actdiff.workflow_support import coalesce_scheduler_wakeups


# Snakemake's scheduler woke once per second per finished job by the end of a run; one pending wakeup instead
coalesce_scheduler_wakeups()

try:
    validate_config(config)  # against the packaged schema, actdiff/data/config.schema.yaml
except ConfigError as e:  # a clear message naming the key, not a traceback
    sys.exit(f"actdiff: {e}")

R = config["results"]  # every output lives under this directory
L = Layout(R)  # every path of a run (actdiff.layout): rules ask it, never spell a path
try:
    ENGINE_SPECS = engine_specs(config["engines"])  # name -> EngineSpec (actdiff.sides.configured): rules use its kind
    USABLE_ENGINES, SKIPPED_WHY = usable_engines(config, ENGINE_SPECS)
except ConfigError as e:
    sys.exit(f"actdiff: {e}")
if SKIPPED_WHY:
    print(f"actdiff: NOTE: {SKIPPED_WHY}", file=sys.stderr)
ENGINES = list(USABLE_ENGINES)
IMPORTED = [n for n, s in ENGINE_SPECS.items() if s.kind == IMPORT]  # outside engines, dumped by rule dump_import
IMPORTED_RE = "|".join(IMPORTED) or "(?!x)x"  # that rule's {side}; matches nothing when there are none
MODELS = list(config["models"])


wildcard_constraints:
    model="|".join(MODELS),
    side="reference|[a-z][a-z0-9_]*",
    variant=VARIANT_RE,
    shard=r"\d+",


def activations(path):
    """An activation dump: a temp() output (deleted once every consumer is done, so disk use is bounded by
    the shards in flight) unless keep_activations is set."""
    return path if config["keep_activations"] else temp(path)


def fingerprint_models():
    """Fingerprint every shipped or local model now, before the DAG is built (actdiff.models.fingerprint):
    its fingerprint file is rewritten only when a file's content changed, and it is an input of resolve_model,
    so a model replaced in place reruns everything computed from it, and nothing else does. Generated models
    are pipeline outputs (inputs of resolve_model by modification time) and may not exist yet."""
    for m, c in config["models"].items():
        if "generate" in c["source"]:
            continue
        try:
            update_fingerprint(resolve_model_dir(m, c["source"]), c["allow_pickle"], L.model_files(m))
        except (ModelError, OSError):  # resolve_model reports it, saying what to do
            pass


fingerprint_models()


def model_graphs():
    """Every configured model's node graph now, before any rule ran, and the models whose graph is unknown (their
    directory is missing: resolve_model reports it, saying what to do)."""
    graphs, unknown = {}, []
    for m, c in config["models"].items():
        try:
            graphs[m] = graph_of_source(m, c["source"])
        except (ActdiffError, OSError):
            unknown.append(m)
    return graphs, unknown


GRAPHS, UNKNOWN_GRAPHS = model_graphs()


def check_budgets():
    """A budgets: glob that matches no node of any model stops the run now, naming it (not silently ignored)."""
    try:
        check_budget_globs(config["budgets"], GRAPHS, tuple(UNKNOWN_GRAPHS))
    except ConfigError as e:
        sys.exit(f"actdiff: {e}")


check_budgets()


def model_files(wildcards):
    """Inputs of resolve_model: the generated model's files, or the model's fingerprint (missing when the
    model directory cannot be found: resolve_model then says why)."""
    src = config["models"][wildcards.model]["source"]
    if "generate" in src:
        files = ("config.json", "model.safetensors", "tokenizer.json")
        return {f.split(".")[0]: L.generated_model(wildcards.model, f) for f in files}
    fingerprint = L.model_files(wildcards.model)
    return {"fingerprint": fingerprint} if Path(fingerprint).is_file() else {}


def stats_mem_mb(wildcards):
    """Memory of one statistics job: a reference run's, the bound of its memo of rounded weights
    (actdiff.compare.refops.WEIGHT_MEMO, filled where a precision or a hypothesis rounds them), and twice the
    group of short prompts judged together (actdiff.compare.grouped: dumps, windows, replays; where the shard's
    longest prompt is larger, a group holds no more than that prompt does, which the reference's share covers)."""
    return reference_mem_mb(wildcards) + (WEIGHT_MEMO.max_bytes >> 20) + (2 * GROUP_BYTES >> 20)


def aggregate_mem_mb(wildcards):
    """Memory of one aggregation: the summaries (2 GB) or, when more, a statistics job's (the search reads the
    searched nodes' weights and rounds them through the same memo)."""
    return max(2000, stats_mem_mb(wildcards))


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


def runs():
    """Every (model, side, variant) compared with the reference; each gets a report (one list, also
    `actdiff check`'s: actdiff.sides.configured.configured_runs)."""
    return configured_runs(config, USABLE_ENGINES)


def parity_files(wildcards):
    """Weight and config parity of a run: both for our engine, config parity for llama.cpp."""
    run = (wildcards.model, wildcards.side, wildcards.variant)
    kind = ENGINE_SPECS[wildcards.side].kind if wildcards.side in ENGINE_SPECS else None
    if kind == "actdiff":
        return [L.summary(*run, "weights"), L.summary_json(*run, "config_parity")]
    if kind == "llamacpp":
        return [L.summary_json(*run, "config_parity")]
    return []


def import_inputs(wildcards):
    """Inputs of dump_import besides the tokens: the engine's mapping file and, for a source, its folder."""
    spec = ENGINE_SPECS[wildcards.side]
    out = {"mapping": spec.mapping} if spec.mapping else {}
    if spec.source is not None:
        out["source"] = str(spec.source_dir(wildcards.model, wildcards.shard, wildcards.variant))
    return out


ORT_DERIVED = "|".join(v for v in ONNXRUNTIME_VARIANTS if v != "fp32")  # what onnx_variant makes from the fp32 export


def onnx_variant_inputs(wildcards):
    """The fp32 export every other ORT variant is made from; int8-static also reads shard 0's token ids, its
    first onnxruntime.calibration_prompts prompts being its calibration set."""
    out = {"fp32": L.onnx_model(wildcards.model, "fp32")}
    if wildcards.variant == "int8-static":
        out["tokens"] = L.tokens(wildcards.model, 0)
    return out


def side_records(wildcards):
    """What a report shows about where a side's dumps came from: an imported engine's per-shard records."""
    if wildcards.side not in IMPORTED:
        return []
    return [L.import_record(wildcards.model, wildcards.side, wildcards.variant, s) for s in SHARDS]


def stats_tables(wildcards):
    """Every shard's statistics tables of one (model, side, variant)."""
    run = (wildcards.model, wildcards.side, wildcards.variant)
    return [L.stats(*run, s, t) for s in SHARDS for t in SHARD_TABLES]


def summary_outputs(model, side, variant):
    """What aggregation writes for one run: the summary tables and the JSON summaries."""
    out = {t: L.summary(model, side, variant, t) for t in AGGREGATE_TABLES}
    out.update({n: L.summary_json(model, side, variant, n) for n in AGGREGATE_JSON})
    return out


def all_targets():
    out = []
    keep = config["keep_activations"]
    for m in MODELS:
        out.append(L.model_json(m))
        out += [L.tokens(m, s) for s in SHARDS]
        out += [L.activations(m, REFERENCE_SIDE, REFERENCE_VARIANT, s) for s in SHARDS if keep]
    for m, e, v in runs():
        out.append(L.verdict(m, e, v))
        out += parity_files(SimpleNamespace(model=m, side=e, variant=v))
        out += [L.activations(m, e, v, s) for s in SHARDS if keep]
    out += [L.report(m, s, v) for m, s, v in runs()]
    if runs():
        out.append(L.index())
    return out


def shard_opened(wildcards):
    """The shard's reference dump, an input of every other dump of the shard: a shard's dumps start only once it
    is open, which bounds the dumps on disk at once (actdiff.diskplan)."""
    return L.activations(wildcards.model, REFERENCE_SIDE, REFERENCE_VARIANT, wildcards.shard)


def plan_shards():
    """The shard count: shards / shard_size when set, checked against disk_budget, else planned from it
    (actdiff.diskplan); a run whose settings cannot fit stops here, before any job runs. A job's own process
    (which parses this file again) takes the count the main process settled on."""
    if not workflow.is_main_process:
        explicit = configured_shards(config, len(read_prompt_ids(config["prompts"])))
        n = explicit[0] if explicit else recorded_plan(L.shard_plan())
        if n:
            return n
    sides = [m for m, _, _ in runs()]
    dumps = [
        ModelDumps(m, g, max_tokens_of(m, config["models"][m], g), sides.count(m)) for m, g in GRAPHS.items()
    ]
    # jobs at once: --cores locally, --jobs on a cluster (whichever bounds it); unknown (a dry run): 1
    jobs = min([v for v in (workflow._cores, workflow.nodes) if v] or [1])
    others = [config["engine_threads"], config["llamacpp"]["threads"], config["onnxruntime"]["threads"]]
    conc = Concurrency(jobs, config["reference"]["threads"], max(others) <= config["reference"]["threads"])
    try:
        n, why = shard_count(config, dumps, conc, L.shard_plan())
    except ActdiffError as e:
        sys.exit(f"actdiff: {e}")
    print(f"actdiff: {why}", file=sys.stderr)
    note = free_space_note(R, parse_size(config["disk_budget"]))
    if note:
        print(f"actdiff: {note}", file=sys.stderr)
    return n


N_SHARDS = plan_shards()
SHARDS = list(range(N_SHARDS))
