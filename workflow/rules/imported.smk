rule dump_import:
    """Run an outside engine (config engines entry of kind import) over one shard, or read its dump folder,
    and import its per-prompt tensors through its mapping file (actdiff.sides.imported, docs/mapping.md)."""
    input:
        unpack(import_inputs),
        model=L.model_json("{model}"),
        tokens=L.tokens("{model}", "{shard}"),
        after=shard_opened,  # starts once the shard's reference dump exists: disk budget (common.smk)
    output:
        h5=activations(L.activations("{model}", "{side}", "{variant}", "{shard}")),
        record=L.import_record("{model}", "{side}", "{variant}", "{shard}"),
    wildcard_constraints:
        side=IMPORTED_RE,
    params:
        engine=lambda wc: ENGINE_SPECS[wc.side].as_dict(),
        compression=config["activation_compression"],
    log:
        L.log("dump_import", "{model}", "{side}", "{variant}", "shard-{shard}"),
    conda:
        "../envs/actdiff.yaml"
    priority: 2  # consumers of temp() dumps first, so finished shards free their disk early
    threads: 1
    resources:
        mem_mb=reference_mem_mb,
    script:
        "../scripts/dump_import.py"
