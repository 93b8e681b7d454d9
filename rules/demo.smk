# The offline demo's inputs, made inside the workflow (used when model/data paths are null in the config). Each
# job reads the demo section from its stage file (results/config/demo.json), so a config that lists the same demo
# keys in another order reruns nothing.


rule demo_tokenizer:
    input:
        config=stage_config("demo"),
    output:
        tokenizer=directory(out("demo", "tokenizer")),
    log:
        out("logs", "demo_tokenizer.log"),
    benchmark:
        out("benchmarks_time", "demo_tokenizer.tsv")
    conda:
        "../envs/data.yaml"
    resources:
        **cpu_resources(),
    params:
        what="tokenizer",
    script:
        "../scripts/make_demo_inputs.py"


rule demo_base_model:
    input:
        config=stage_config("demo"),
        tokenizer=out("demo", "tokenizer"),
    output:
        model=directory(out("demo", "base_model")),
    log:
        out("logs", "demo_base_model.log"),
    benchmark:
        out("benchmarks_time", "demo_base_model.tsv")
    conda:
        "../envs/data.yaml"
    resources:
        **cpu_resources(),
    params:
        what="model",
    script:
        "../scripts/make_demo_inputs.py"


rule demo_generations:
    input:
        config=stage_config("demo"),
    output:
        generations=[out("demo", "generations", f"output-rs{i}.jsonl") for i in range(config["demo"]["num_seeds"])],
        benchmark=out("benchmarks", "demo", "test.jsonl"),
    log:
        out("logs", "demo_generations.log"),
    benchmark:
        out("benchmarks_time", "demo_generations.tsv")
    conda:
        "../envs/data.yaml"
    resources:
        **cpu_resources(),
    params:
        what="data",
    script:
        "../scripts/make_demo_inputs.py"
