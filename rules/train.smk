# Packing, N chained training jobs, and HF export. Issue 3 implements these stages.


def not_implemented(stage, issue):
    return (
        f"echo 'sftflow: the {stage} stage is not implemented yet (tracked in issue {issue}); "
        f"run the stages before it, e.g. snakemake --cores 2 {out('data', 'sft.jsonl')}' >&2; exit 1"
    )


def get_previous_checkpoint(wildcards):
    job = int(wildcards.job)
    return [] if job == 0 else out("checkpoints", f"job{job - 1}.done")


rule pack_data:
    input:
        data=out("data", "sft.jsonl"),
    output:
        packed=directory(out("data", "packed")),
    log:
        out("logs", "pack_data.log"),
    shell:
        not_implemented("packing", 3)


rule train_job:
    input:
        packed=out("data", "packed"),
        model=local_inputs(get_base_model()),
        previous=get_previous_checkpoint,
    output:
        done=out("checkpoints", "job{job}.done"),
    log:
        out("logs", "train_job{job}.log"),
    shell:
        not_implemented("training", 3)


rule convert_final:
    input:
        last_job=out("checkpoints", f"job{config['training']['num_training_jobs'] - 1}.done"),
    output:
        model=directory(out("final_hf_model")),
    log:
        out("logs", "convert_final.log"),
    shell:
        not_implemented("HF conversion", 3)
