# The offline demo's inputs, made inside the workflow (used when model/data paths are null in the config).


rule demo_tokenizer:
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
        demo=config["demo"],
        what="tokenizer",
    script:
        "../scripts/make_demo_inputs.py"


rule demo_base_model:
    input:
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
        demo=config["demo"],
        what="model",
    script:
        "../scripts/make_demo_inputs.py"


rule demo_generations:
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
        demo=config["demo"],
        what="data",
    script:
        "../scripts/make_demo_inputs.py"
