rule split_prompts:
    """Validate the prompt sheet and split it into shards by a stable hash of prompt_id."""
    input:
        sheet=config["prompts"],
    output:
        shards=[L.prompts(s) for s in SHARDS],
    params:
        n_shards=N_SHARDS,
    log:
        L.log("split_prompts", "split_prompts"),
    conda:
        "../envs/actdiff.yaml"
    threads: 1
    resources:
        mem_mb=1000,
    script:
        "../scripts/split_prompts.py"


rule tokenize:
    """Tokenize one shard with the reference tokenizer; over-long prompts are truncated and flagged."""
    input:
        model=L.model_json("{model}"),
        prompts=L.prompts("{shard}"),
    output:
        tokens=L.tokens("{model}", "{shard}"),
    params:
        max_length=lambda wc: config["models"][wc.model]["max_length"],
        engine_side="actdiff" in config["engines"],
    log:
        L.log("tokenize", "{model}", "shard-{shard}"),
    benchmark:
        L.benchmark("tokenize", "{model}", "shard-{shard}")
    conda:
        "../envs/actdiff.yaml"
    threads: 1
    resources:
        mem_mb=1000,
    script:
        "../scripts/tokenize.py"
