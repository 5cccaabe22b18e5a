rule dump_reference:
    """Run the fp32 reference model over one shard (on reference.device) and record every graph node to HDF5."""
    input:
        model=L.model_json("{model}"),
        tokens=L.tokens("{model}", "{shard}"),
    output:
        h5=activations(L.activations("{model}", REFERENCE_SIDE, REFERENCE_VARIANT, "{shard}")),
    params:
        compression=config["activation_compression"],
        batch_size=lambda wc: config["models"][wc.model]["batch_size"],
        allow_pickle=lambda wc: config["models"][wc.model]["allow_pickle"],
        impl=config["reference"]["impl"],
        # resolved where the job runs (a login node may have no GPU): actdiff.reference_device
        device=config["reference"]["device"],
        allow_tf32=config["reference"]["allow_tf32"],
        device_batch_size=lambda wc: config["models"][wc.model].get("device_batch_size", {}),
    log:
        L.log("dump_reference", "{model}", "shard-{shard}"),
    conda:
        "../envs/actdiff.yaml"
    priority: 1  # consumers of temp() dumps first, so finished shards free their disk early
    threads: config["reference"]["threads"]
    resources:
        mem_mb=reference_mem_mb,
    script:
        "../scripts/dump_reference.py"
