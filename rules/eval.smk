# Benchmarks, generation through an inference server, grading, results/eval.json. Issue 4 implements these.


rule prepare_benchmark:
    output:
        out("benchmarks", "{benchmark}", "test.jsonl"),
    conda:
        "../envs/eval.yaml"
    log:
        out("logs", "prepare_benchmark_{benchmark}.log"),
    shell:
        not_implemented("benchmark download ({wildcards.benchmark})", 4)


ruleorder: demo_generations > prepare_benchmark


rule generate:
    input:
        model=out("final_hf_model"),
        benchmark=out("benchmarks", "{benchmark}", "test.jsonl"),
    output:
        out("eval", "{benchmark}", "output.jsonl"),
    conda:
        "../envs/eval.yaml"
    log:
        out("logs", "generate_{benchmark}.log"),
    shell:
        not_implemented("generation", 4)


rule eval_summary:
    input:
        [out("eval", b, "output.jsonl") for b in benchmark_names()],
    output:
        out("eval.json"),
    conda:
        "../envs/eval.yaml"
    log:
        out("logs", "eval_summary.log"),
    shell:
        not_implemented("evaluation summary", 4)
