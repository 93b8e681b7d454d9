# Path helpers and input functions shared by every rule file. Plain Python (Snakemake's `config` and `workflow`
# are its only outside names), so that ruff checks it like the package (pyproject.toml).
import os
import sys
from pathlib import Path  # also the other rule files' Path

OUT = Path(config["output_dir"])


def check_existing_checkpoints():
    """Before any job: checkpoints left in OUT by a run with other training settings are refused (naming the
    keys and the ways out), so a changed learning rate never leaves old checkpoints standing as this run's.
    """
    from sftflow.train.config import check_checkpoint_matches

    check_checkpoint_matches(out("checkpoints"), config["training"])


def out(*parts):
    """A path under the configured output directory."""
    return str(OUT.joinpath(*parts))


# What rule remove_averaged_checkpoints removed and kept (training.remove_checkpoints_after_average).
AVERAGED_REMOVED = out("checkpoints", "averaged_removed.json")


def all_targets():
    """Default targets - the eval summary (which brings the report's pages), the training.export_steps exports and,
    with training.remove_checkpoints_after_average, the removal of the averaged steps' checkpoints."""
    steps = config["training"]["export_steps"] or []
    removal = [AVERAGED_REMOVED] if config["training"]["remove_checkpoints_after_average"] else []
    return [out("eval.json"), *(out("hf_models", f"step_{step}") for step in dict.fromkeys(steps)), *removal]


def exported_step_models():
    """Every out("hf_models", "step_N") the workflow makes: training.export_steps, average_steps, eval.models' step_N."""
    t = config["training"]
    steps = [*(t["export_steps"] or []), *(t["average_steps"] or [])]
    steps += [int(m.split("_", 1)[1]) for m in eval_models() if m.startswith("step_")]
    return [out("hf_models", f"step_{step}") for step in sorted(set(steps))]


def report_pages():
    """The report pages results/eval.json brings along (rules/report.smk), so `snakemake --report` works after
    any run that made it: the config's always; the data and training pages when a trained model is evaluated
    (a base-model-only eval trains nothing, so it has none). eval_summary writes the eval page itself.
    """
    from sftflow.report.pages import FILE_NAMES, RULE_PAGES

    rules = ["report_config"]
    if any(label != "base" for label in eval_models()):
        rules += ["report_data", "report_training"]
    return [out("report", FILE_NAMES[f]) for rule in rules for f in RULE_PAGES[rule]]


def get_generations():
    """The generation files data preparation reads: the demo's, or the user's globs (expanded now)."""
    patterns = config["prepare_data"]["input_files"]
    if patterns is None:
        return [out("demo", "generations", f"output-rs{i}.jsonl") for i in range(config["demo"]["num_seeds"])]
    from sftflow.prepare.pipeline import expand_input_files, stats_path_for

    own = (out("data", "sft.jsonl"), stats_path_for(out("data", "sft.jsonl")))  # a glob over them leaves them out
    return [str(p) for p in expand_input_files(patterns, own)]


def get_base_model():
    """Local directory (a DAG input) or hub name of the model to fine-tune."""
    return config["model"]["base_model"] or out("demo", "base_model")


def get_tokenizer():
    return config["model"]["tokenizer"] or get_base_model()


def local_inputs(*paths):
    """Only the paths the workflow makes (under output_dir) or that exist locally (hub names are not DAG inputs)."""
    return [p for p in paths if Path(p).is_relative_to(OUT) or Path(p).exists()]


def benchmark_seeds():
    """{name: seeds} from eval.benchmarks ("gsm8k:4,math" -> {"gsm8k": 4, "math": 0}); 0 means greedy."""
    from sftflow.evaluation.benchmarks import parse_benchmarks_spec

    return dict(parse_benchmarks_spec(config["eval"]["benchmarks"]))


def benchmark_names():
    return list(benchmark_seeds())


def eval_models():
    """The model labels eval.json reports (eval.models, or its default)."""
    models = config["eval"]["models"]
    if models is None:
        return ["averaged"] if config["training"]["average_steps"] else ["final"]
    return list(dict.fromkeys(models))


def eval_model_path(label):
    """Where the model with this label is (a directory made by the workflow, or the base model's name)."""
    if label == "final":
        return out("final_hf_model")
    if label == "averaged":
        return out("averaged_hf_model")
    if label == "base":
        return get_base_model()
    return out("hf_models", label)  # step_N


def eval_tokenizer(label):
    """Tokenizer that renders the prompts: exported models carry their own; the base model uses model.tokenizer."""
    return get_tokenizer() if label == "base" else eval_model_path(label)


def python_exe():
    """The interpreter for shell rules: the conda env's python under --sdm conda, else Snakemake's own."""
    if "conda" in {str(m).lower() for m in workflow.deployment_settings.deployment_method}:
        return "python"
    return sys.executable


def generate_command(wildcards, input, output):
    """The generate rule's command line: scripts/generate.py with the eval stage files (the tracked input and
    eval.run.json), then '--' and the server command, all quoted."""
    import shlex

    from sftflow.evaluation.server import server_command

    e = config["eval"]
    model = input.model[0] if input.model else eval_model_path(wildcards.model)
    tokenizer = input.tokenizer[0] if input.tokenizer else eval_tokenizer(wildcards.model)
    args = [python_exe(), str(Path(workflow.basedir) / "scripts" / "generate.py")]
    args += [
        "--model-label",
        wildcards.model,
        "--model",
        model,
        "--tokenizer",
        tokenizer,
    ]
    args += ["--benchmark", wildcards.benchmark, "--benchmark-file", input.benchmark]
    args += [
        "--seeds",
        str(benchmark_seeds()[wildcards.benchmark]),
        "--output-dir",
        output[0],
    ]
    args += [
        "--resume-dir",
        out("eval", ".inprogress", wildcards.model, wildcards.benchmark),
    ]
    logs = {kind: out("logs", f"{kind}_{wildcards.model}_{wildcards.benchmark}.log") for kind in ("generate", "server")}
    args += [
        "--server-log",
        logs["server"],
        "--log",
        logs["generate"],
    ]
    args += ["--config", input.config, "--config", stage_config("eval", run=True)]
    server = server_command(e["server_type"], model, e["server_gpus"], e["server_args"], python=python_exe())
    return shlex.join(args + ["--", *server])


def train_command(wildcards, input, output):
    """The train_job rule's command line: scripts/train.py launch, then '--' and the torchrun (or srun +
    torchrun) command, whose worker reads the training stage files (input.config, tracked; train.run.json, not).
    """
    import shlex

    from sftflow.train.launch import LaunchFiles, planned_command

    t = config["training"]
    checkpoints = Path(output.done).parent
    worker = [
        "--packed",
        input.packed,
        "--model",
        input.model[0] if input.model else get_base_model(),
    ]
    worker += [
        "--checkpoint-dir",
        str(checkpoints),
        "--metrics-dir",
        str(checkpoints / "metrics"),
    ]
    worker += [
        "--job-index",
        wildcards.job,
        "--num-jobs",
        str(t["num_training_jobs"]),
        "--done-file",
        output.done,
    ]
    worker += [
        "--tokenizer",
        input.tokenizer[0] if input.tokenizer else get_tokenizer(),
    ]
    if config["model"]["chat_template"]:
        worker += ["--chat-template", config["model"]["chat_template"]]
    if input.validation_packed:
        worker += ["--validation-packed", input.validation_packed[0]]
    worker += ["--config", input.config, "--config", stage_config("train", run=True)]
    script = Path(workflow.basedir) / "scripts" / "train.py"
    log = out("logs", f"train_job{wildcards.job}.log")
    command = planned_command(
        python_exe(),
        script,
        t,
        worker,
        LaunchFiles(output.done, log, config["slurm"]["master_port"]),
    )
    return shlex.join(command)


def get_benchmark_file(name):
    return out("benchmarks", name, "test.jsonl")


def get_contamination():
    """The contamination file remove_contaminated reads: the user's, or the one the decontaminate rule makes."""
    prep = config["prepare_data"]
    if not prep["filters"]["remove_contaminated"]:
        return []
    return prep["contamination_file"] or out("data", "contamination.jsonl")


# --- Stage config files (sftflow.stage_config): each job's resolved config, a tracked input of its rule --------
# Written while planning by the main process (Snakefile: write_stage_configs), only where the content changed,
# so a changed key reruns exactly the jobs whose file it is in ("Updated input files: .../config/<stage>.json" in
# a dry run's reason). A stage's keys that must rerun nothing go to <stage>.run.json, which no rule takes as an
# input (the job reads both). Jobs on Slurm parse the Snakefile again but never write these files.


def stage_config(stage, run=False):
    """The config file of `stage` (run=True: the one of its keys that rerun nothing, not an input)."""
    return out("config", f"{stage}.run.json" if run else f"{stage}.json")


def decontaminate_config():
    p = config["prepare_data"]
    return {
        "benchmarks": benchmark_names(),
        "input_key": p["input_key"],
        "ngram_size": p["decontamination"]["ngram_size"],
        "threshold": p["decontamination"]["threshold"],
    }


def prepare_data_config():
    """The prepare_data section with what the workflow resolved: the input files, the tokenizer, the chat
    template and the contamination file (the keys of `python scripts/prepare_data.py ++key=value`)."""
    cfg = dict(config["prepare_data"])
    cfg["input_files"] = get_generations()
    cfg["tokenizer"] = get_tokenizer()
    cfg["chat_template"] = config["model"]["chat_template"]
    if cfg["filters"]["remove_contaminated"]:
        cfg["contamination_file"] = get_contamination()
    return cfg


PACK_DATA_KEYS = ("max_total_sequence_length", "overlong", "sequences_per_shard", "num_workers")


def pack_data_config():
    from dataclasses import asdict

    from sftflow.packing.pipeline import PackingConfig

    # Only the keys pack_data uses: packing.enabled and packing.algorithm are the trainer's (it packs each
    # step's sequences), so changing them reruns neither pack_data nor what is made from its output.
    packing = asdict(PackingConfig.from_section(config["packing"]))
    return {
        "packing": {key: packing[key] for key in PACK_DATA_KEYS},
        "tokenizer": get_tokenizer(),
        "chat_template": config["model"]["chat_template"],
        "chat_template_kwargs": config["prepare_data"]["chat_template_kwargs"],
        # Only when set, so that runs without a held-out share keep their pack_data.json (and their packed data).
        **({"held_out": held_out_config()} if held_out_config() else {}),
    }


def held_out_config():
    """The held-out share of the prepared data that pack_data packs for validation, or None (training.val_set_size 0)."""
    t = config["training"]
    if not t.get("val_set_size"):
        return None
    return {"val_set_size": t["val_set_size"], "val_set_seed": t["val_set_seed"]}


def get_validation_packed():
    """pack_data's held-out rows, packed (training.val_set_size), as a list of zero or one path."""
    return [out("data", "packed_validation")] if held_out_config() else []


def train_configs():
    """(tracked, run): the training keys that decide what each step computes (RESULT_KEYS: a change with
    checkpoints standing is refused while planning, so tracking them reruns nothing that would otherwise
    run), and the rest of training and packing (a change reruns no job; rules/train.smk's header)."""
    from sftflow.config import validate_sections
    from sftflow.train.config import RESULT_KEYS

    sections = validate_sections({"training": config["training"], "packing": config["packing"]})
    training = sections["training"]
    tracked = {"training": {key: training[key] for key in RESULT_KEYS}}
    from sftflow.train.retention import protected_steps

    run = {
        "training": {key: value for key, value in training.items() if key not in RESULT_KEYS},
        "packing": sections["packing"],
        # The steps exported after training (eval.models' step_N included): retention never removes them.
        "protected_steps": sorted(protected_steps(config)),
    }
    return tracked, run


def eval_configs():
    """(tracked, run): the eval settings that change the answers, and those that only decide how they are
    fetched (concurrency, retries, timeouts, the API key's variable)."""
    from sftflow.evaluation.settings import EvalSettings

    settings = EvalSettings.from_config(config)
    return settings.result_settings(), settings.transport_settings()


def write_stage_configs(sources):
    """Write every stage's config files (unchanged ones are left alone) and the report's resolved.json (the
    whole config and where each value comes from: `sources`)."""
    from sftflow.stage_config import write_if_changed

    train, train_run = train_configs()
    evaluation, eval_run = eval_configs()
    files = {
        stage_config("decontaminate"): decontaminate_config(),
        stage_config("prepare_data"): prepare_data_config(),
        stage_config("pack_data"): pack_data_config(),
        stage_config("train"): train,
        stage_config("train", run=True): train_run,
        stage_config("eval"): evaluation,
        stage_config("eval", run=True): eval_run,
        stage_config("resolved"): {"config": config, "sources": dict(sources)},
    }
    if config["demo"]["enabled"]:  # the demo rules' section; an experiment of the user's has none
        files[stage_config("demo")] = config["demo"]
    for path, data in files.items():
        write_if_changed(path, data)


# --- Slurm resources (config key slurm.*): the profile holds none of them -----------------------


def _slurm_placement(gpu_job):
    s = config["slurm"]
    res = {}
    partition = (s["gpu_partition"] or s["partition"]) if gpu_job else s["partition"]
    if partition:
        res["slurm_partition"] = partition
    if s["account"]:
        res["slurm_account"] = s["account"]
    if s["qos"]:
        res["qos"] = s["qos"]
    if gpu_job and s["constraint"]:
        res["constraint"] = s["constraint"]
    return res


def cpu_threads():
    """Threads of the data jobs that use worker processes (prepare_data, pack_data): the cores their Slurm job
    asks for (slurm.cpu_cpus); Snakemake caps them at --cores locally."""
    return config["slurm"]["cpu_cpus"]


def cpu_resources():
    """Data preparation, packing, conversion, averaging, summary, report: one CPU task."""
    s = config["slurm"]
    return {
        "runtime": s["cpu_runtime"],
        "mem_mb": s["cpu_mem_mb"],
        "cpus_per_task": s["cpu_cpus"],
        **_slurm_placement(False),
    }


def train_runtime_minutes():
    """training.time_limit (the trainer's own deadline too), else slurm.train_runtime."""
    from math import ceil

    from sftflow.train.deadline import parse_time_limit

    limit = config["training"]["time_limit"]
    if limit is None:
        return config["slurm"]["train_runtime"]
    return max(1, ceil(parse_time_limit(limit) / 60))


def gpu_job_threads(gpus_per_node):
    """CPU cores per node of a training or evaluation job (slurm.cpus_per_gpu per process). Also the rule's
    threads: Snakemake caps them at --cores when it runs the job locally and sets OMP_NUM_THREADS to them
    (a rule without threads gets OMP_NUM_THREADS=1, which ran CPU training on one core).
    """
    return config["slurm"]["cpus_per_gpu"] * max(gpus_per_node, 1)


def train_threads():
    return gpu_job_threads(config["training"]["num_gpus"])


def eval_server_gpus():
    """GPUs of an evaluation job: the server's, none when it uses a running server (server_type openai)."""
    e = config["eval"]
    return e["server_gpus"] if e["server_type"] != "openai" else 0


def eval_threads():
    return gpu_job_threads(eval_server_gpus())


def _gpu_job_resources(nodes, gpus_per_node, runtime):
    s = config["slurm"]
    use_gpus = s["gpus"] and gpus_per_node > 0
    res = {
        "nodes": nodes,
        "runtime": runtime,
        "mem_mb": s["mem_mb_per_gpu"] * max(gpus_per_node, 1),
        # one task per node runs all its processes
        "cpus_per_task": gpu_job_threads(gpus_per_node),
        **_slurm_placement(use_gpus),
    }
    if use_gpus:
        # GPUs per node through gres; tasks_per_gpu 0 keeps the plugin from adding --ntasks-per-gpu.
        res["gres"] = f"gpu:{gpus_per_node}"
        res["tasks_per_gpu"] = 0
    if nodes > 1:
        # One task per node; the job's command runs in the batch step and starts `srun torchrun` itself.
        res["mpi"] = "srun"
        res["tasks"] = nodes
    return res


def train_resources():
    t = config["training"]
    return _gpu_job_resources(t["num_nodes"], t["num_gpus"], train_runtime_minutes())


def eval_resources():
    return _gpu_job_resources(1, eval_server_gpus(), config["slurm"]["eval_runtime"])


def deleted_targets():
    """[(deleted target, a result made from it that still exists)]: Snakemake keeps results whose inputs were
    deleted, so deleting a stage's target alone reruns nothing; the workflow says which option does.
    """
    made_from = [
        (out("data", "sft.jsonl"), [out("data", "packed")]),
        (out("data", "packed"), [out("checkpoints", "job0.done")]),
    ]
    for label in eval_models():
        if label != "base":
            made_from.append(
                (
                    eval_model_path(label),
                    [out("eval", label, b) for b in benchmark_names()],
                )
            )
        made_from += [(out("eval", label, b), [out("eval.json")]) for b in benchmark_names()]
    made_from += [(page, [out("eval.json")]) for page in report_pages()]
    found = []
    for target, results in made_from:
        if not os.path.exists(target):
            found += [(target, r) for r in results if os.path.exists(r)][:1]
    return found


def warn_about_deleted_targets():
    import shlex

    for target, result in deleted_targets():
        if target in sys.argv:
            continue  # already asked for (e.g. --forcerun TARGET)
        command = shlex.join(["snakemake", *sys.argv[1:], "--forcerun", target])
        print(
            f"sftflow: {target} was deleted, but {result}, made from it, still exists; Snakemake keeps it and "
            f"will not rebuild {target} on its own. To rebuild {target} and everything made from it, run:\n"
            f"    {command}",
            file=sys.stderr,
        )


if workflow.is_main_process:
    warn_about_deleted_targets()
