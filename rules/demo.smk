# The offline demo's inputs, made inside the workflow (used when model/data paths are null in the config).


rule demo_tokenizer:
    resources:
        **cpu_resources(),
    output:
        tokenizer=directory(out("demo", "tokenizer")),
    params:
        demo=config["demo"],
        what="tokenizer",
    conda:
        "../envs/data.yaml"
    log:
        out("logs", "demo_tokenizer.log"),
    benchmark:
        out("benchmarks_time", "demo_tokenizer.tsv")
    script:
        "../scripts/make_demo_inputs.py"


rule demo_base_model:
    resources:
        **cpu_resources(),
    input:
        tokenizer=out("demo", "tokenizer"),
    output:
        model=directory(out("demo", "base_model")),
    params:
        demo=config["demo"],
        what="model",
    conda:
        "../envs/data.yaml"
    log:
        out("logs", "demo_base_model.log"),
    benchmark:
        out("benchmarks_time", "demo_base_model.tsv")
    script:
        "../scripts/make_demo_inputs.py"


rule demo_generations:
    resources:
        **cpu_resources(),
    output:
        generations=[out("demo", "generations", f"output-rs{i}.jsonl") for i in range(config["demo"]["num_seeds"])],
        benchmark=out("benchmarks", "demo", "test.jsonl"),
    params:
        demo=config["demo"],
        what="data",
    conda:
        "../envs/data.yaml"
    log:
        out("logs", "demo_generations.log"),
    benchmark:
        out("benchmarks_time", "demo_generations.tsv")
    script:
        "../scripts/make_demo_inputs.py"
