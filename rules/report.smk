# The report's pages for `snakemake --report report.html`: data funnel, decontamination matches, packing,
# training curves and throughput, eval results, and the resolved config. Captions live in report/*.rst.
# results/eval.json needs them (rule eval_summary, which writes the eval page itself), so the report works
# after any run that made eval.json: report_pages() in common.smk says which pages a config's eval brings.


rule report_data:
    input:
        sft_stats=out("data", "sft.stats.json"),
        packed=out("data", "packed"),
        contamination=get_contamination(),
        prepare_config=stage_config("prepare_data"),
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
            labels={"content": "tokenized sequences, over-long ones"},
        ),
    log:
        out("logs", "report_data.log"),
    benchmark:
        out("benchmarks_time", "report_data.tsv")
    conda:
        "../envs/report.yaml"
    resources:
        **cpu_resources(),
    script:
        "../scripts/make_report.py"


rule report_training:
    input:
        last_job=LAST_JOB_DONE,
    output:
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
            labels={"content": "summary by run, packing per step"},
        ),
    log:
        out("logs", "report_training.log"),
    benchmark:
        out("benchmarks_time", "report_training.tsv")
    conda:
        "../envs/report.yaml"
    resources:
        **cpu_resources(),
    script:
        "../scripts/make_report.py"


rule report_config:
    input:
        resolved=stage_config("resolved"),
    output:
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
        out("logs", "report_config.log"),
    benchmark:
        out("benchmarks_time", "report_config.tsv")
    conda:
        "../envs/report.yaml"
    resources:
        **cpu_resources(),
    script:
        "../scripts/make_report.py"
