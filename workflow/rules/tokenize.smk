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
    """Tokenize one shard three ways (transformers: the reference's ids; tokenizers literally; the engine's own,
    held to engine_tokenizer_target); over-long prompts are truncated and flagged. No max_length in the config:
    the model's own limit (sentence_bert_config.json, tokenizer_config.json, config.json)."""
    input:
        model=L.model_json("{model}"),
        prompts=L.prompts("{shard}"),
    output:
        tokens=L.tokens("{model}", "{shard}"),
    params:
        max_length=lambda wc: config["models"][wc.model].get("max_length"),
        engine_side="actdiff" in config["engines"],
        engine_target=lambda wc: config["models"][wc.model].get(
            "engine_tokenizer_target", config.get("engine_tokenizer_target", "transformers")
        ),
    log:
        L.log("tokenize", "{model}", "shard-{shard}"),
    conda:
        "../envs/actdiff.yaml"
    threads: 1
    resources:
        mem_mb=1000,
    script:
        "../scripts/tokenize.py"
