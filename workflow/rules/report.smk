rule render_report:
    """Self-contained HTML report of one (model, side, variant) (actdiff/data/reports/report.qmd, actdiff.report); it reads
    the run's summaries only, so its memory does not grow with the corpus."""
    input:
        qmd=str(REPORTS_DIR / "report.qmd"),
        model=L.model_json("{model}"),
        summaries=lambda wc: list(summary_outputs(wc.model, wc.side, wc.variant).values()),
        parity=parity_files,
        records=side_records,
    output:
        html=L.report("{model}", "{side}", "{variant}"),
    params:
        worst_n=config["report"]["worst_n"],
        baseline=config["report"].get("baseline", ""),
    log:
        L.log("render_report", "{model}", "{side}", "{variant}"),
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
        verdicts=[L.verdict(m, s, v) for m, s, v in runs()],
        reports=[L.report(m, s, v) for m, s, v in runs()],
    output:
        html=L.index(),
    params:
        runs=[f"{m}/{s}/{v}" for m, s, v in runs()],
        baseline=config["report"].get("baseline", ""),
    log:
        L.log("render_index", "index"),
    conda:
        "../envs/actdiff.yaml"
    threads: 1
    resources:
        mem_mb=1000,
    script:
        "../scripts/render_index.py"
