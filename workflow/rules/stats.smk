rule compute_stats:
    """Compare one shard of an engine dump with the reference: per-node statistics with teacher-forced local
    error, first divergence, root-cause ranking, routing, embeddings (actdiff.compare.stats)."""
    input:
        model=f"{R}/{{model}}/model.json",
        ref=f"{R}/{{model}}/reference/fp32/activations/shard-{{shard}}.h5",
        eng=f"{R}/{{model}}/{{side}}/{{variant}}/activations/shard-{{shard}}.h5",
    output:
        **{t: f"{R}/{{model}}/{{side}}/{{variant}}/stats/shard-{{shard}}/{t}.parquet" for t in STATS_TABLES},
    params:
        budgets=config["budgets"],
        worst_m=config["stats"]["worst_m"],
        embedding_sample=config["stats"]["embedding_sample"],
        diagnose_all_failing=config["stats"]["diagnose_all_failing"],
        fault_aliases=config["fault_aliases"],
    log:
        f"{R}/logs/compute_stats/{{model}}/{{side}}/{{variant}}/shard-{{shard}}.log",
    benchmark:
        f"{R}/benchmarks/compute_stats/{{model}}/{{side}}/{{variant}}/shard-{{shard}}.tsv"
    conda:
        "../envs/actdiff.yaml"
    priority: 3  # consumers of temp() dumps first, so finished shards free their disk early
    threads: 1
    resources:
        mem_mb=reference_mem_mb,
    script:
        "../scripts/compute_stats.py"


rule aggregate_stats:
    """Corpus aggregates over the shards and the verdict (actdiff.compare.aggregate)."""
    input:
        model=f"{R}/{{model}}/model.json",
        tables=lambda wc: stats_tables(wc),
    output:
        summary=f"{R}/{{model}}/{{side}}/{{variant}}/summary/nodes.parquet",
        first_divergence=f"{R}/{{model}}/{{side}}/{{variant}}/summary/first_divergence.parquet",
        hypotheses=f"{R}/{{model}}/{{side}}/{{variant}}/summary/hypotheses.parquet",
        routing=f"{R}/{{model}}/{{side}}/{{variant}}/summary/routing.parquet",
        embeddings=f"{R}/{{model}}/{{side}}/{{variant}}/summary/embeddings.json",
        verdict=f"{R}/{{model}}/{{side}}/{{variant}}/summary/verdict.json",
    params:
        embedding_sample=config["stats"]["embedding_sample"],
    log:
        f"{R}/logs/aggregate_stats/{{model}}/{{side}}/{{variant}}.log",
    benchmark:
        f"{R}/benchmarks/aggregate_stats/{{model}}/{{side}}/{{variant}}.tsv"
    conda:
        "../envs/actdiff.yaml"
    threads: 1
    resources:
        mem_mb=2000,
    script:
        "../scripts/aggregate_stats.py"


rule parity:
    """Weight and config parity of the actdiff engine at one variant."""
    input:
        model=f"{R}/{{model}}/model.json",
    output:
        weights=f"{R}/{{model}}/actdiff/{{variant}}/summary/weights.parquet",
        config=f"{R}/{{model}}/actdiff/{{variant}}/summary/config_parity.json",
    params:
        fault_aliases=config["fault_aliases"],
    log:
        f"{R}/logs/parity/{{model}}/{{variant}}.log",
    benchmark:
        f"{R}/benchmarks/parity/{{model}}/{{variant}}.tsv"
    conda:
        "../envs/actdiff.yaml"
    threads: 1
    resources:
        mem_mb=reference_mem_mb,
    script:
        "../scripts/parity.py"
