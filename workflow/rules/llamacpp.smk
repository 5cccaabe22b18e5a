rule convert_gguf:
    """Convert the model to GGUF at the variant's weight type with llama.cpp's own converter (reading
    config.json itself, not through transformers' nomic_bert class); metadata verified against config.json."""
    input:
        model=L.model_json("{model}"),
    output:
        gguf=L.artifact("{model}", "llamacpp", "{variant}", "model.gguf"),
    log:
        L.log("convert_gguf", "{model}", "{variant}"),
    conda:
        "../envs/llamacpp.yaml"
    threads: 1
    resources:
        mem_mb=reference_mem_mb,
    script:
        "../scripts/convert_gguf.py"


rule dump_llamacpp:
    """Run llama.cpp over one shard; record every node it has a counterpart for through the packaged
    mapping file (src/actdiff/data/mappings/llamacpp/)."""
    input:
        model=L.model_json("{model}"),
        tokens=L.tokens("{model}", "{shard}"),
        gguf=L.artifact("{model}", "llamacpp", "{variant}", "model.gguf"),
        after=shard_opened,  # starts once the shard's reference dump exists: disk budget (common.smk)
    output:
        h5=activations(L.activations("{model}", "llamacpp", "{variant}", "{shard}")),
    params:
        compression=config["activation_compression"],
        engine_ids=config["engine_ids"],
    log:
        L.log("dump_llamacpp", "{model}", "{variant}", "shard-{shard}"),
    conda:
        "../envs/llamacpp.yaml"
    priority: 2  # consumers of temp() dumps first, so finished shards free their disk early
    threads: config["llamacpp"]["threads"]
    resources:
        mem_mb=reference_mem_mb,
    script:
        "../scripts/dump_llamacpp.py"


rule llamacpp_parity:
    """Config parity of llama.cpp: the values it applies (GGUF metadata, graph constants) against config.json."""
    input:
        model=L.model_json("{model}"),
        gguf=L.artifact("{model}", "llamacpp", "{variant}", "model.gguf"),
    output:
        config=L.summary_json("{model}", "llamacpp", "{variant}", "config_parity"),
    log:
        L.log("llamacpp_parity", "{model}", "{variant}"),
    conda:
        "../envs/llamacpp.yaml"
    threads: 1
    resources:
        mem_mb=reference_mem_mb,
    script:
        "../scripts/llamacpp_parity.py"
