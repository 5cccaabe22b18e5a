rule reference_noise:
    """The reference's fp32 noise per (prompt, node) of one shard, which every node's budget scales, and the
    propagated budgets of an fp32 engine: computed once here and read by every side's and variant's statistics of
    the shard, the budgets by the fp32 runs where they are their own (actdiff.compare.refnoise)."""
    input:
        model=L.model_json("{model}"),
        ref=L.activations("{model}", REFERENCE_SIDE, REFERENCE_VARIANT, "{shard}"),
    output:
        noise=L.reference_noise("{model}", "{shard}"),
    params:
        budgets=config["budgets"],
    log:
        L.log("reference_noise", "{model}", "shard-{shard}"),
    conda:
        "../envs/actdiff.yaml"
    priority: 3  # every statistics job of the shard waits for it, and they free the shard's dumps
    threads: 1
    resources:
        mem_mb=reference_mem_mb,
    script:
        "../scripts/reference_noise.py"


rule compute_stats:
    """Compare one shard of a side's dump with the reference: per-node statistics with teacher-forced local
    error, first divergence, root-cause ranking, routing, embeddings (actdiff.compare.stats)."""
    input:
        model=L.model_json("{model}"),
        ref=L.activations("{model}", REFERENCE_SIDE, REFERENCE_VARIANT, "{shard}"),
        eng=L.activations("{model}", "{side}", "{variant}", "{shard}"),
        noise=L.reference_noise("{model}", "{shard}"),
    output:
        **{t: L.stats("{model}", "{side}", "{variant}", "{shard}", t) for t in SHARD_TABLES},
    params:
        budgets=config["budgets"],
        worst_m=config["stats"]["worst_m"],
        embedding_sample=config["stats"]["embedding_sample"],
        diagnose_all_failing=config["stats"]["diagnose_all_failing"],
        search={k: config["stats"][k] for k in ("search_seconds", "search_prompts", "search_nodes")},
        fault_aliases=config["fault_aliases"],
    log:
        L.log("compute_stats", "{model}", "{side}", "{variant}", "shard-{shard}"),
    conda:
        "../envs/actdiff.yaml"
    priority: 3  # consumers of temp() dumps first, so finished shards free their disk early
    threads: 1
    resources:
        mem_mb=stats_mem_mb,
    script:
        "../scripts/compute_stats.py"


rule aggregate_stats:
    """Corpus aggregates over the shards, the worst prompts ranked once, the search at the nodes the catalogue
    left unexplained (once per run, on the shards' merged samples: actdiff.compare.search_run), and the verdict
    (actdiff.compare.aggregate)."""
    input:
        model=L.model_json("{model}"),
        tokens=[L.tokens("{model}", s) for s in SHARDS],
        tables=stats_tables,
    output:
        **summary_outputs("{model}", "{side}", "{variant}"),
    params:
        embedding_sample=config["stats"]["embedding_sample"],
        worst_n=config["report"]["worst_n"],
        search={k: config["stats"][k] for k in ("search_seconds", "search_prompts", "search_nodes")},
    log:
        L.log("aggregate_stats", "{model}", "{side}", "{variant}"),
    conda:
        "../envs/actdiff.yaml"
    threads: 1
    resources:
        mem_mb=aggregate_mem_mb,
    script:
        "../scripts/aggregate_stats.py"


rule parity:
    """Weight and config parity of the actdiff engine at one variant (actdiff.compare.parity)."""
    input:
        model=L.model_json("{model}"),
    output:
        weights=L.summary("{model}", "actdiff", "{variant}", "weights"),
        config=L.summary_json("{model}", "actdiff", "{variant}", "config_parity"),
    params:
        fault_aliases=config["fault_aliases"],
    log:
        L.log("parity", "{model}", "{variant}"),
    conda:
        "../envs/actdiff.yaml"
    threads: 1
    resources:
        mem_mb=reference_mem_mb,
    script:
        "../scripts/parity.py"
