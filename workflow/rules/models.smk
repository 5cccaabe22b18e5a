rule generate_model:
    """Generate an embedded default model (tiny-nomic-moe) from a seed, bitwise identical on every run."""
    input:
        text=str(TRAINING_TEXT),
    output:
        config=L.generated_model("{model}", "config.json"),
        weights=L.generated_model("{model}", "model.safetensors"),
        tokenizer=L.generated_model("{model}", "tokenizer.json"),
    params:
        kind=lambda wc: config["models"][wc.model]["source"]["generate"],
        seed=lambda wc: config["models"][wc.model]["source"].get("seed", 0),
    log:
        L.log("generate_model", "{model}"),
    conda:
        "../envs/actdiff.yaml"
    threads: 1
    resources:
        mem_mb=1000,
    script:
        "../scripts/generate_model.py"


rule resolve_model:
    """Locate a model (generated, shipped in a package, local dir or HF cache) and record its hash."""
    input:
        unpack(model_files),
    output:
        model=L.model_json("{model}"),
    params:
        source=lambda wc: config["models"][wc.model]["source"],
        allow_pickle=lambda wc: config["models"][wc.model]["allow_pickle"],
    log:
        L.log("resolve_model", "{model}"),
    conda:
        "../envs/actdiff.yaml"
    threads: 1
    resources:
        mem_mb=500,
    script:
        "../scripts/resolve_model.py"
