# Plots and tables for `snakemake --report report.html`: data funnel, decontamination matches, packing,
# training curves and throughput, eval results, and the resolved config. Captions live in report/*.rst.


rule report_assets:
    input:
        sft_stats=out("data", "sft.stats.json"),
        packed=out("data", "packed"),
        contamination=get_contamination(),
        last_job=LAST_JOB_DONE,
        eval_results=out("eval.json"),
    output:
        data_funnel=report(
            out("report", "data_funnel.png"),
            caption="../report/data_funnel.rst",
            category="1. Data",
            labels={"content": "filter funnel (plot)"},
        ),
        data_prep=report(
            out("report", "data_prep.html"),
            caption="../report/data_prep.rst",
            category="1. Data",
            labels={"content": "filter funnel (table)"},
        ),
        contamination=report(
            out("report", "contamination.html"),
            caption="../report/contamination.rst",
            category="1. Data",
            labels={"content": "decontamination matches"},
        ),
        packing=report(
            out("report", "packing.html"),
            caption="../report/packing.rst",
            category="1. Data",
            labels={"content": "packing fill"},
        ),
        training_curves=report(
            out("report", "training_curves.png"),
            caption="../report/training_curves.rst",
            category="2. Training",
            labels={"content": "loss, learning rate, grad norm"},
        ),
        throughput=report(
            out("report", "throughput.png"),
            caption="../report/throughput.rst",
            category="2. Training",
            labels={"content": "throughput (tokens/s)"},
        ),
        training_summary=report(
            out("report", "training_summary.html"),
            caption="../report/training_summary.rst",
            category="2. Training",
            labels={"content": "summary by run"},
        ),
        eval_results=report(
            out("report", "eval.html"),
            caption="../report/eval.rst",
            category="3. Evaluation",
            labels={"content": "benchmark results"},
        ),
        config_html=report(
            out("report", "config.html"),
            caption="../report/config.rst",
            category="4. Config",
            labels={"content": "resolved config"},
        ),
        config_yaml=report(
            out("report", "config.yaml"),
            caption="../report/config_yaml.rst",
            category="4. Config",
            labels={"content": "resolved config (YAML file for --configfile)"},
        ),
    log:
        out("logs", "report_assets.log"),
    benchmark:
        out("benchmarks_time", "report_assets.tsv")
    conda:
        "../envs/report.yaml"
    resources:
        **cpu_resources(),
    params:
        config=config,
        config_sources=CONFIG_SOURCES,
        metrics=lambda wildcards, input: str(
            Path(input.last_job).parent / "metrics" / "metrics.jsonl"
        ),
    script:
        "../scripts/make_report.py"
