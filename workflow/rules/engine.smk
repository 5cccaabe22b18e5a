rule dump_engine:
    """Run the actdiff engine (C kernels, no torch) at one variant over one shard; record every graph node."""
    input:
        model=L.model_json("{model}"),
        tokens=L.tokens("{model}", "{shard}"),
        after=shard_opened,  # starts once the shard's reference dump exists: disk budget (common.smk)
    output:
        h5=activations(L.activations("{model}", "actdiff", "{variant}", "{shard}")),
    params:
        compression=config["activation_compression"],
        engine_ids=config["engine_ids"],
        fault_aliases=config["fault_aliases"],
        batch_size=lambda wc: config["models"][wc.model]["batch_size"],  # padded batches, as the reference
    log:
        L.log("dump_engine", "{model}", "{variant}", "shard-{shard}"),
    conda:
        "../envs/actdiff.yaml"
    priority: 2  # consumers of temp() dumps first, so finished shards free their disk early
    threads: config["engine_threads"]
    resources:
        mem_mb=reference_mem_mb,
    script:
        "../scripts/dump_engine.py"
