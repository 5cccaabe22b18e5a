rule dump_reference:
    """Run the fp32 reference model over one shard and record every graph node to HDF5."""
    input:
        model=f"{R}/{{model}}/model.json",
        tokens=f"{R}/{{model}}/tokens/shard-{{shard}}.parquet",
    output:
        h5=activations(f"{R}/{{model}}/reference/fp32/activations/shard-{{shard}}.h5"),
    params:
        compression=config["activation_compression"],
        batch_size=lambda wc: config["models"][wc.model]["batch_size"],
        allow_pickle=lambda wc: config["models"][wc.model]["allow_pickle"],
        impl=config["reference"]["impl"],
    log:
        f"{R}/logs/dump_reference/{{model}}/shard-{{shard}}.log",
    benchmark:
        f"{R}/benchmarks/dump_reference/{{model}}/shard-{{shard}}.tsv"
    conda:
        "../envs/actdiff.yaml"
    priority: 1  # consumers of temp() dumps first, so finished shards free their disk early
    threads: config["reference"]["threads"]
    resources:
        mem_mb=reference_mem_mb,
    script:
        "../scripts/dump_reference.py"
