# actdiff: activation-level diff of a reference transformer against an inference engine.
#
# Path scheme (every stage, including the ones later issues add; {side} is "reference" or an engine
# name such as "actdiff" or "llamacpp"; the reference always runs at variant fp32):
#   resources/models/{model}/                                   generated models (config.json, model.safetensors, tokenizer.json)
#   results/prompts/shard-{shard}.parquet                       prompt sheet split by stable hash of prompt_id
#   results/{model}/model.json                                  resolved model dir, architecture, weights sha256
#   results/{model}/tokens/shard-{shard}.parquet                token ids (reference side; engine side columns reserved)
#   results/{model}/{side}/{variant}/activations/shard-{shard}.h5   per-node dumps (docs/formats.md)
#   results/{model}/{side}/{variant}/stats/shard-{shard}.parquet    per-(prompt, node) statistics     [comparison issue]
#   results/{model}/{side}/{variant}/stats/summary.parquet          corpus aggregates                  [comparison issue]
#   results/reports/{model}/{side}/{variant}.html                   one report per model/engine/variant [reports issue]
#   results/reports/index.html                                      index over all of them             [reports issue]
#   results/logs/{rule}/...log, results/benchmarks/{rule}/...tsv   logs and Snakemake benchmarks
# Variants follow the grammar precision[+fault=name[:param]] (actdiff.variants), e.g. fp32, int8,
# fp32+fault=gelu_tanh.

# The default config applies only when no --configfile is given, so a user's config replaces it
# instead of being merged into it (a merge could never remove a default model).
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/tokenize.smk"
include: "workflow/rules/reference.smk"
include: "workflow/rules/engine.smk"
include: "workflow/rules/llamacpp.smk"
include: "workflow/rules/stats.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        all_targets(),
    default_target: True
