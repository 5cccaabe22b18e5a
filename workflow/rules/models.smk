rule generate_model:
    """Generate an embedded default model (tiny-nomic-moe) from a seed, bitwise identical on every run."""
    input:
        text=str(TRAINING_TEXT),
    output:
        config="resources/models/{model}/config.json",
        weights="resources/models/{model}/model.safetensors",
        tokenizer="resources/models/{model}/tokenizer.json",
    params:
        kind=lambda wc: config["models"][wc.model]["source"]["generate"],
        seed=lambda wc: config["models"][wc.model]["source"].get("seed", 0),
    log:
        f"{R}/logs/generate_model/{{model}}.log",
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
        unpack(generated_model_files),
    output:
        model=f"{R}/{{model}}/model.json",
    params:
        source=lambda wc: config["models"][wc.model]["source"],
    log:
        f"{R}/logs/resolve_model/{{model}}.log",
    conda:
        "../envs/actdiff.yaml"
    threads: 1
    resources:
        mem_mb=500,
    script:
        "../scripts/resolve_model.py"
