rule split_prompts:
    """Validate the prompt sheet and split it into shards by a stable hash of prompt_id."""
    input:
        sheet=config["prompts"],
    output:
        shards=expand(f"{R}/prompts/shard-{{shard}}.parquet", shard=SHARDS),
    params:
        n_shards=N_SHARDS,
    log:
        f"{R}/logs/split_prompts/split_prompts.log",
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
        model=f"{R}/{{model}}/model.json",
        prompts=f"{R}/prompts/shard-{{shard}}.parquet",
    output:
        tokens=f"{R}/{{model}}/tokens/shard-{{shard}}.parquet",
    params:
        max_length=lambda wc: config["models"][wc.model]["max_length"],
        engine_side="actdiff" in config["engines"],
    log:
        f"{R}/logs/tokenize/{{model}}/shard-{{shard}}.log",
    benchmark:
        f"{R}/benchmarks/tokenize/{{model}}/shard-{{shard}}.tsv"
    conda:
        "../envs/actdiff.yaml"
    threads: 1
    resources:
        mem_mb=1000,
    script:
        "../scripts/tokenize.py"
