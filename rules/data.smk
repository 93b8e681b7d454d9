# Data preparation: decontamination against the evaluated benchmarks, then filtering and formatting.


rule decontaminate:
    input:
        generations=get_generations(),
        benchmarks=[get_benchmark_file(b) for b in benchmark_names()],
        config=stage_config("decontaminate"),
    output:
        out("data", "contamination.jsonl"),
    log:
        out("logs", "decontaminate.log"),
    benchmark:
        out("benchmarks_time", "decontaminate.tsv")
    conda:
        "../envs/data.yaml"
    resources:
        **cpu_resources(),
    script:
        "../scripts/find_contamination.py"


rule prepare_data:
    input:
        generations=get_generations(),
        tokenizer=local_inputs(get_tokenizer()),
        contamination=get_contamination(),
        config=stage_config("prepare_data"),
    output:
        data=out("data", "sft.jsonl"),
        stats=out("data", "sft.stats.json"),
    log:
        out("logs", "prepare_data.log"),
    benchmark:
        out("benchmarks_time", "prepare_data.tsv")
    conda:
        "../envs/data.yaml"
    threads: cpu_threads()
    resources:
        **cpu_resources(),
    script:
        "../scripts/prepare_data.py"
