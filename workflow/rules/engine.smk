rule dump_engine:
    """Run the actdiff engine (C kernels, no torch) at one variant over one shard; record every graph node."""
    input:
        model=f"{R}/{{model}}/model.json",
        tokens=f"{R}/{{model}}/tokens/shard-{{shard}}.parquet",
    output:
        h5=activations(f"{R}/{{model}}/actdiff/{{variant}}/activations/shard-{{shard}}.h5"),
    params:
        compression=config["activation_compression"],
        engine_ids=config["engine_ids"],
        fault_aliases=config["fault_aliases"],
    log:
        f"{R}/logs/dump_engine/{{model}}/{{variant}}/shard-{{shard}}.log",
    benchmark:
        f"{R}/benchmarks/dump_engine/{{model}}/{{variant}}/shard-{{shard}}.tsv"
    conda:
        "../envs/actdiff.yaml"
    priority: 2  # consumers of temp() dumps first, so finished shards free their disk early
    threads: config["engine_threads"]
    resources:
        mem_mb=reference_mem_mb,
    script:
        "../scripts/dump_engine.py"
