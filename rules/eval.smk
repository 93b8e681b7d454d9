# Benchmarks, generation through an inference server, grading, and results/eval.json.
#
# Each (model, benchmark) pair is one `generate` job: it starts the server for the model on its node,
# sends the requests, grades the answers and writes out("eval", model, benchmark)/ (NeMo-Skills-format
# output[-rsN].jsonl plus metrics.json). Answers of an interrupted job wait in
# out("eval", ".inprogress", ...) - not an output, so Snakemake keeps them - and a rerun only asks
# for the missing ones. eval_summary gathers every metrics.json into out("eval.json") and a table.


rule prepare_benchmark:
    output:
        out("benchmarks", "{benchmark}", "test.jsonl"),
    log:
        out("logs", "prepare_benchmark_{benchmark}.log"),
    benchmark:
        out("benchmarks_time", "prepare_benchmark_{benchmark}.tsv")
    conda:
        "../envs/eval.yaml"
    resources:
        **cpu_resources(),
    params:
        source=lambda wildcards: config["eval"]["benchmark_files"].get(wildcards.benchmark),
    script:
        "../scripts/prepare_benchmark.py"


ruleorder: demo_generations > prepare_benchmark


rule generate:
    input:
        model=lambda wildcards: local_inputs(eval_model_path(wildcards.model)),
        tokenizer=lambda wildcards: local_inputs(eval_tokenizer(wildcards.model)),
        benchmark=out("benchmarks", "{benchmark}", "test.jsonl"),
        # The settings that change the answers: a change reruns every model's evaluation, so eval.json never
        # compares runs made with different settings (the others are in eval.run.json, not an input).
        config=stage_config("eval"),
    output:
        directory(out("eval", "{model}", "{benchmark}")),
    log:
        # Written by generate.py (the paths are in its command line too, see generate_command).
        generate=out("logs", "generate_{model}_{benchmark}.log"),
        server=out("logs", "server_{model}_{benchmark}.log"),
    benchmark:
        out("benchmarks_time", "generate_{model}_{benchmark}.tsv")
    conda:
        "../envs/eval.yaml"
    threads: eval_threads()
    resources:
        **eval_resources(),
    params:
        command=generate_command,
        # Rerun triggers (plain values, unlike the command): the server's own arguments, and the seeds.
        server_args=config["eval"]["server_args"],
        seeds=lambda wildcards: benchmark_seeds()[wildcards.benchmark],
    shell:
        "{params.command}"


rule eval_summary:
    input:
        results=[out("eval", m, b) for m in eval_models() for b in benchmark_names()],
        report_pages=report_pages(),
    output:
        json=out("eval.json"),
        markdown=out("eval.md"),
        report=report(
            out("report", "eval.html"),
            caption="../report/eval.rst",
            category="3. Evaluation",
            labels={"content": "benchmark results"},
        ),
    log:
        out("logs", "eval_summary.log"),
    benchmark:
        out("benchmarks_time", "eval_summary.tsv")
    conda:
        "../envs/eval.yaml"
    resources:
        **cpu_resources(),
    params:
        benchmarks=config["eval"]["benchmarks"],
        models={m: eval_model_path(m) for m in eval_models()},
    script:
        "../scripts/summarize_eval.py"
