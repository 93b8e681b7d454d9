# Packing, N chained training jobs, and HF export.
#
# Rerun triggers. The checkpoint directory out("checkpoints") is shared state, not an output: every job
# resumes from its latest complete checkpoint, so a rerun never redoes finished steps. The training
# config reaches the job in two files written while planning (rules/common.smk): out("config", "train.json"),
# a tracked input, holds only the keys that decide what each step computes (RESULT_KEYS: a change is refused
# before any job while checkpoints of the old values exist, so tracking them reruns nothing that would run);
# train.run.json, the rest (e.g. micro-batch size, save / log periods), is not an input, so editing those does
# not rerun finished jobs. Only the last job carries, as
# params, the keys that decide where training ends (max_num_steps, max_num_epochs,
# train_global_batch_size, num_training_jobs, time_limit): raising one of them reruns just that job,
# which continues from the last checkpoint. Raising num_training_jobs adds jobs; the former last job
# reruns too (its params change) and, its checkpoint already past its new target, only rewrites its
# done-file. Start training over by deleting out("checkpoints").
#
# training.conversion_step: X makes out("final_hf_model") from step X's checkpoint (as NeMo-Skills'
# --conversion_step; null: the last step). Other steps are exported beside it, each to out("hf_models", "step_X")
# (rule convert_step): training.export_steps, eval.models' step_N and average_steps ask for them. Every such step
# is checked at planning time (sftflow.config.check_saved_steps).
#
# Checkpoint retention (training.keep_top_k by metric_name, keep_optimizer_state) runs only inside the trainer,
# on rank 0 after each save commits: no convert rule overlaps a training job (each depends on the last job's
# done-file), and the trainer never removes the newest checkpoint or a step an export reads (conversion_step,
# export_steps, average_steps, eval.models' step_N; the workflow hands it the list in train.run.json). Rule
# remove_averaged_checkpoints (training.remove_checkpoints_after_average) deletes the averaged steps' checkpoints
# once averaged_hf_model, final_hf_model and every hf_models/step_N export exist (its inputs), keeping the newest;
# no rule takes a checkpoint directory as an input, so the removal makes nothing rerun (but an export of a removed
# step, forced or newly asked for, cannot be made again).


# The keys that decide the final step and the last job's length (rerun trigger of the last job only).
TRAINING_PLAN_KEYS = (
    "max_num_steps",
    "max_num_epochs",
    "train_global_batch_size",
    "num_training_jobs",
    "time_limit",
)
LAST_JOB_DONE = out("checkpoints", f"job{config['training']['num_training_jobs'] - 1}.done")
# Checkpoints of a run with other learning rate, batch size, seed ... are refused before any job (once, in
# the main process: a job's own re-parse need not read them again).
if workflow.is_main_process:
    check_existing_checkpoints()


rule pack_data:
    input:
        data=out("data", "sft.jsonl"),
        tokenizer=local_inputs(get_tokenizer()),
        config=stage_config("pack_data"),
    output:
        # training.val_set_size: the whole problems held out of training, packed for validation.
        **({"validation": directory(out("data", "packed_validation"))} if held_out_config() else {}),
        packed=directory(out("data", "packed")),
    log:
        out("logs", "pack_data.log"),
    benchmark:
        out("benchmarks_time", "pack_data.tsv")
    conda:
        "../envs/data.yaml"
    threads: cpu_threads()
    resources:
        **cpu_resources(),
    script:
        "../scripts/pack_data.py"


rule train_job:
    input:
        packed=out("data", "packed"),
        model=local_inputs(get_base_model()),
        tokenizer=local_inputs(get_tokenizer()),
        validation=local_inputs(*filter(None, [config["training"]["validation_data"]])),
        validation_packed=get_validation_packed(),
        # The training keys that decide what each step computes (train.run.json, the rest, is not an input).
        config=stage_config("train"),
        previous=lambda wildcards: (
            [] if int(wildcards.job) == 0 else out("checkpoints", f"job{int(wildcards.job) - 1}.done")
        ),
    output:
        done=out("checkpoints", "job{job}.done"),
    log:
        out("logs", "train_job{job}.log"),
    benchmark:
        out("benchmarks_time", "train_job{job}.tsv")
    conda:
        "../envs/train.yaml"
    threads: train_threads()
    resources:
        **train_resources(),
    params:
        # Derived from input/output, so not a rerun trigger: only `plan` is (see the header).
        command=train_command,
        plan=lambda wildcards: (
            {key: config["training"][key] for key in TRAINING_PLAN_KEYS}
            if int(wildcards.job) == config["training"]["num_training_jobs"] - 1
            else {}
        ),
    shell:
        "{params.command}"


rule convert_final:
    input:
        last_job=LAST_JOB_DONE,
        model=local_inputs(get_base_model()),
        tokenizer=local_inputs(get_tokenizer()),
    output:
        model=directory(out("final_hf_model")),
    log:
        out("logs", "convert_final.log"),
    benchmark:
        out("benchmarks_time", "convert_final.tsv")
    conda:
        "../envs/train.yaml"
    resources:
        **cpu_resources(),
    params:
        checkpoint_dir=lambda wildcards, input: str(Path(input.last_job).parent),
        model=lambda wildcards, input: (input.model[0] if input.model else get_base_model()),
        tokenizer=lambda wildcards, input: (input.tokenizer[0] if input.tokenizer else get_tokenizer()),
        chat_template=config["model"]["chat_template"],
        # A rerun trigger: changing it remakes the final model from the other step.
        step=config["training"]["conversion_step"],
    script:
        "../scripts/convert_checkpoint.py"


rule convert_step:
    input:
        last_job=LAST_JOB_DONE,
        model=local_inputs(get_base_model()),
        tokenizer=local_inputs(get_tokenizer()),
    output:
        model=directory(out("hf_models", "step_{step}")),
    log:
        out("logs", "convert_step_{step}.log"),
    benchmark:
        out("benchmarks_time", "convert_step_{step}.tsv")
    wildcard_constraints:
        step=r"\d+",
    conda:
        "../envs/train.yaml"
    resources:
        **cpu_resources(),
    params:
        checkpoint_dir=lambda wildcards, input: str(Path(input.last_job).parent),
        model=lambda wildcards, input: (input.model[0] if input.model else get_base_model()),
        tokenizer=lambda wildcards, input: (input.tokenizer[0] if input.tokenizer else get_tokenizer()),
        chat_template=config["model"]["chat_template"],
        step=lambda wildcards: int(wildcards.step),
    script:
        "../scripts/convert_checkpoint.py"


rule average_checkpoints:
    input:
        # Sorted: the last model (whose config and tokenizer files are copied) is the most trained.
        models=[out("hf_models", f"step_{s}") for s in sorted(config["training"]["average_steps"] or [])],
    output:
        model=directory(out("averaged_hf_model")),
    log:
        out("logs", "average_checkpoints.log"),
    benchmark:
        out("benchmarks_time", "average_checkpoints.tsv")
    conda:
        "../envs/train.yaml"
    resources:
        **cpu_resources(),
    params:
        steps=sorted(config["training"]["average_steps"] or []),
    script:
        "../scripts/average_checkpoints.py"


rule remove_averaged_checkpoints:
    input:
        # Every model made from a checkpoint: once they exist, nothing reads the averaged steps' checkpoints.
        averaged=out("averaged_hf_model"),
        final=out("final_hf_model"),
        exports=exported_step_models(),
    output:
        record=AVERAGED_REMOVED,
    log:
        out("logs", "remove_averaged_checkpoints.log"),
    benchmark:
        out("benchmarks_time", "remove_averaged_checkpoints.tsv")
    conda:
        "../envs/train.yaml"
    resources:
        **cpu_resources(),
    params:
        checkpoint_dir=lambda wildcards, output: str(Path(output.record).parent),
        steps=sorted(config["training"]["average_steps"] or []),
    script:
        "../scripts/remove_checkpoints.py"
