# actdiff: activation-level diff of a reference transformer against an inference engine.
#
# Path scheme (owned by actdiff.layout.Layout: rules and Python ask it for paths; tests/test_layout.py keeps
# these lines equal to Layout().scheme_lines()). {side} is "reference" or an engine name such as "actdiff",
# "llamacpp", "onnxruntime" or an imported engine's (config engines: {name, kind: import}); the reference always runs at
# variant fp32; tables: actdiff.tables.
#   resources/models/{model}/                                               generated models (config.json, weights, tokenizer.json)
#   results/prompts/shard-{shard}.parquet                                   prompt sheet split by stable hash of prompt_id
#   results/prompts/plan.json                                               shard count planned from disk_budget (when shards are not set)
#   results/{model}/model-files.json                                        sha256 of the model's files (rewritten only when one changes)
#   results/{model}/model.json                                              resolved model dir, architecture, sha256 of its files
#   results/{model}/tokens/shard-{shard}.parquet                            token ids, reference and engine tokenizers
#   results/{model}/{side}/{variant}/activations/shard-{shard}.h5           per-node dumps (docs/formats.md)
#   results/{model}/{side}/{variant}/model.gguf                             llama.cpp's GGUF of the variant
#   results/{model}/onnxruntime/{variant}/model.onnx                        ONNX Runtime's model of the variant
#   results/{model}/{side}/{variant}/import/shard-{shard}.json              an imported engine's provenance and alignment
#   results/{model}/reference/fp32/noise/shard-{shard}.parquet              the reference's fp32 noise, read by every run's statistics
#   results/{model}/{side}/{variant}/stats/shard-{shard}/{table}.parquet    shard tables (actdiff.tables)
#   results/{model}/{side}/{variant}/summary/{table}.parquet                summary tables (actdiff.tables)
#   results/{model}/{side}/{variant}/summary/{name}.json                    verdict, embeddings, tokenization, config_parity
#   results/reports/{model}/{side}/{variant}.html                           one report per model/side/variant
#   results/reports/index.html                                              index over all of them
#   results/logs/{rule}/{wildcards}.log                                     logs
# Variants follow the grammar precision[+fault=name[:param]] (actdiff.variants), e.g. fp32, int8,
# fp32+fault=gelu_tanh (a fault is a catalogue entry of actdiff/data/hypotheses.yaml run on purpose).

import sys

from actdiff.config import read_config_file
from actdiff.errors import ConfigError


# The default config applies only when no --configfile is given, so a user's config replaces it
# instead of being merged into it (a merge could never remove a default model).
if not workflow.overwrite_configfiles:
    try:  # read first: Snakemake's own loader names neither the file nor the line of a YAML error
        read_config_file("config/config.yaml")
    except ConfigError as e:
        sys.exit(f"actdiff: {e}")

    configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/tokenize.smk"
include: "workflow/rules/reference.smk"
include: "workflow/rules/engine.smk"
include: "workflow/rules/llamacpp.smk"
include: "workflow/rules/onnxruntime.smk"
include: "workflow/rules/imported.smk"
include: "workflow/rules/stats.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        all_targets(),
    default_target: True
