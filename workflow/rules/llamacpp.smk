rule convert_gguf:
    """Convert the model to GGUF at the variant's weight type with llama.cpp's own converter (reading
    config.json itself, not through transformers' nomic_bert class); metadata verified against config.json."""
    input:
        model=f"{R}/{{model}}/model.json",
    output:
        gguf=f"{R}/{{model}}/llamacpp/{{variant}}/model.gguf",
    log:
        f"{R}/logs/convert_gguf/{{model}}/{{variant}}.log",
    benchmark:
        f"{R}/benchmarks/convert_gguf/{{model}}/{{variant}}.tsv"
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
        model=f"{R}/{{model}}/model.json",
        tokens=f"{R}/{{model}}/tokens/shard-{{shard}}.parquet",
        gguf=f"{R}/{{model}}/llamacpp/{{variant}}/model.gguf",
    output:
        h5=activations(f"{R}/{{model}}/llamacpp/{{variant}}/activations/shard-{{shard}}.h5"),
    params:
        compression=config["activation_compression"],
        engine_ids=config["engine_ids"],
    log:
        f"{R}/logs/dump_llamacpp/{{model}}/{{variant}}/shard-{{shard}}.log",
    benchmark:
        f"{R}/benchmarks/dump_llamacpp/{{model}}/{{variant}}/shard-{{shard}}.tsv"
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
        model=f"{R}/{{model}}/model.json",
        gguf=f"{R}/{{model}}/llamacpp/{{variant}}/model.gguf",
    output:
        config=f"{R}/{{model}}/llamacpp/{{variant}}/summary/config_parity.json",
    log:
        f"{R}/logs/llamacpp_parity/{{model}}/{{variant}}.log",
    conda:
        "../envs/llamacpp.yaml"
    threads: 1
    resources:
        mem_mb=reference_mem_mb,
    script:
        "../scripts/llamacpp_parity.py"
