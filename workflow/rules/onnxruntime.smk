rule export_onnx:
    """Export the fp32 reference to ONNX (torch.onnx; every canonical node a named value, the MoE as its
    dense-gather formulation): onnxruntime's fp32 model (actdiff.onnxrt.export)."""
    input:
        model=L.model_json("{model}"),
    output:
        onnx=L.onnx_model("{model}", "fp32"),
    log:
        L.log("export_onnx", "{model}"),
    conda:
        "../envs/onnxruntime.yaml"
    threads: 1
    resources:
        mem_mb=reference_mem_mb,
    script:
        "../scripts/export_onnx.py"


rule onnx_variant:
    """An ORT variant's model file from the fp32 export: fp16 (float16 conversion, fp32 inputs/outputs),
    int8-dynamic (quantize_dynamic, per channel), int8-static (QDQ, calibrated; actdiff.onnxrt.variants)."""
    input:
        unpack(onnx_variant_inputs),
    output:
        onnx=L.onnx_model("{model}", "{variant}"),
    wildcard_constraints:
        variant=ORT_DERIVED,
    params:
        calibration_prompts=config["onnxruntime"]["calibration_prompts"],
    log:
        L.log("onnx_variant", "{model}", "{variant}"),
    conda:
        "../envs/onnxruntime.yaml"
    threads: 1
    resources:
        mem_mb=reference_mem_mb,
    script:
        "../scripts/onnx_variant.py"


rule dump_onnxruntime:
    """Run ONNX Runtime (CPU execution provider, onnxruntime.level) over one shard on the reference's token ids;
    every canonical node its optimiser kept is a graph output, the fused-away ones not_captured (actdiff.onnxrt)."""
    input:
        model=L.model_json("{model}"),
        tokens=L.tokens("{model}", "{shard}"),
        onnx=L.onnx_model("{model}", "{variant}"),
        after=shard_opened,  # starts once the shard's reference dump exists: disk budget (common.smk)
    output:
        h5=activations(L.activations("{model}", "onnxruntime", "{variant}", "{shard}")),
    params:
        compression=config["activation_compression"],
        level=config["onnxruntime"]["level"],
        batch_size=lambda wc: config["models"][wc.model]["batch_size"],  # padded batches, as the reference
    log:
        L.log("dump_onnxruntime", "{model}", "{variant}", "shard-{shard}"),
    conda:
        "../envs/onnxruntime.yaml"
    priority: 2  # consumers of temp() dumps first, so finished shards free their disk early
    threads: config["onnxruntime"]["threads"]
    resources:
        mem_mb=reference_mem_mb,
    script:
        "../scripts/dump_onnxruntime.py"
