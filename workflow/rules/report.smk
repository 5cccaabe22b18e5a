rule render_report:
    """Self-contained HTML report of one (model, side, variant) (actdiff/data/reports/report.qmd, actdiff.report)."""
    input:
        qmd=str(REPORTS_DIR / "report.qmd"),
        model=f"{R}/{{model}}/model.json",
        tokens=expand(f"{R}/{{{{model}}}}/tokens/shard-{{shard}}.parquet", shard=SHARDS),
        summary=f"{R}/{{model}}/{{side}}/{{variant}}/summary/nodes.parquet",
        first_divergence=f"{R}/{{model}}/{{side}}/{{variant}}/summary/first_divergence.parquet",
        hypotheses=f"{R}/{{model}}/{{side}}/{{variant}}/summary/hypotheses.parquet",
        routing=f"{R}/{{model}}/{{side}}/{{variant}}/summary/routing.parquet",
        embeddings=f"{R}/{{model}}/{{side}}/{{variant}}/summary/embeddings.json",
        verdict=f"{R}/{{model}}/{{side}}/{{variant}}/summary/verdict.json",
        parity=lambda wc: parity_files(wc),
        tables=lambda wc: stats_tables(wc),
    output:
        html=f"{R}/reports/{{model}}/{{side}}/{{variant}}.html",
    params:
        worst_n=config["report"]["worst_n"],
    log:
        f"{R}/logs/render_report/{{model}}/{{side}}/{{variant}}.log",
    benchmark:
        f"{R}/benchmarks/render_report/{{model}}/{{side}}/{{variant}}.tsv"
    conda:
        "../envs/actdiff.yaml"
    threads: 1
    resources:
        mem_mb=2000,
    script:
        "../scripts/render_report.py"


rule render_index:
    """One page comparing the verdicts of every report, linking to each."""
    input:
        qmd=str(REPORTS_DIR / "index.qmd"),
        verdicts=[f"{R}/{m}/{s}/{v}/summary/verdict.json" for m, s, v in runs()],
        reports=[f"{R}/reports/{m}/{s}/{v}.html" for m, s, v in runs()],
    output:
        html=f"{R}/reports/index.html",
    params:
        runs=[f"{m}/{s}/{v}" for m, s, v in runs()],
    log:
        f"{R}/logs/render_index/index.log",
    benchmark:
        f"{R}/benchmarks/render_index/index.tsv"
    conda:
        "../envs/actdiff.yaml"
    threads: 1
    resources:
        mem_mb=1000,
    script:
        "../scripts/render_index.py"
