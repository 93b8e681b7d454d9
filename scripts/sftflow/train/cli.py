"""Command lines of scripts/train.py and scripts/convert_checkpoint.py, and their Snakemake launchers.

Training (one invocation = one chained job, under torchrun)::

    torchrun --standalone --nproc-per-node=2 scripts/train.py \\
        --packed results/data/packed --model results/demo/base_model \\
        --checkpoint-dir results/checkpoints --job-index 0 --num-jobs 2 \\
        --done-file results/checkpoints/job0.done [--config c.json] [++training.max_num_steps=50 ...]

The config is the schema defaults, then `--config` (a JSON file {"training": {...}, "packing": {...}}),
then the `++section.key=value` arguments. A plain `python scripts/train.py ...` is a world of one process.
The train_job rule runs `scripts/train.py launch ... -- <torchrun or srun + torchrun command>` (see
planned_command), with the config as `++` arguments: the keys that differ from the defaults.

Export::

    python scripts/convert_checkpoint.py --checkpoint-dir results/checkpoints --model BASE \\
        --output results/final_hf_model [--step N | --done-file results/checkpoints/job1.done] \\
        [--tokenizer TOK] [--chat-template FILE] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from sftflow import config as C
from sftflow.errors import SftflowError
from sftflow.logs import setup_logging

LOG = logging.getLogger("sftflow.train")


def _deep_update(base: dict, overrides: dict) -> dict:
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value
    return base


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Run one chained training job (launch with torchrun).")
    p.add_argument(
        "--config", default=None, help='JSON file {"training": {...}, "packing": {...}} (default: the schema defaults)'
    )
    p.add_argument("--packed", required=True, help="packed data directory (pack_data output)")
    p.add_argument("--model", required=True, help="base model: local HF directory or hub name")
    p.add_argument("--checkpoint-dir", required=True, help="checkpoint directory shared by all chained jobs")
    p.add_argument("--job-index", type=int, default=0, help="this job's index i (0-based)")
    p.add_argument("--num-jobs", type=int, default=1, help="number of chained jobs N")
    p.add_argument("--done-file", default=None, help="JSON record written atomically when the job ends")
    p.add_argument("--metrics-dir", default=None, help="metrics.jsonl + tensorboard/ (default: CHECKPOINT_DIR/metrics)")
    p.add_argument("--tokenizer", default=None, help="tokenizer for packing validation_data (default: --model)")
    p.add_argument("--chat-template", default=None, help="Jinja chat template file replacing the tokenizer's")
    return p


def load_train_config(path: str | None, overrides: list[str]) -> dict:
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8")) if path else {}
    except (OSError, ValueError) as err:
        raise SftflowError(f"--config {path}: cannot read JSON ({err})") from None
    if not isinstance(raw, dict):
        raise SftflowError(f"--config {path}: expected a JSON object with 'training' and 'packing' sections")
    unknown = set(raw) - {"training", "packing"}
    if unknown:
        raise SftflowError(f"--config {path}: unknown sections {sorted(unknown)} (expected training, packing)")
    _deep_update(raw, C.parse_overrides(overrides))
    from sftflow.config import validate_sections

    return validate_sections(raw)


def _setup_rank_logging(rank: int, world_size: int) -> None:
    """Progress from rank 0 only; other ranks report warnings and errors, tagged with their rank."""
    setup_logging(level=logging.INFO if rank == 0 else logging.WARNING)
    if world_size > 1:
        fmt = f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s"
        for handler in logging.getLogger().handlers:
            handler.setFormatter(logging.Formatter(fmt))
    # transformers' per-rank chatter (e.g. the same warning from every process) is not progress information
    logging.getLogger("transformers").setLevel(logging.ERROR)


def train_main(argv: list[str] | None = None) -> int:
    setup_logging()
    args, extra = train_parser().parse_known_args(argv)
    from sftflow.train.engine import init_parallel
    from sftflow.train.parallel import shutdown
    from sftflow.train.trainer import JobSpec, run_job

    try:
        bad = [a for a in extra if not a.startswith("++")]
        if bad:
            raise SftflowError(f"unknown arguments {bad}; overrides look like ++training.max_num_steps=10")
        if not 0 <= args.job_index < args.num_jobs:
            raise SftflowError(
                f"--job-index {args.job_index} is not in 0..{args.num_jobs - 1} (--num-jobs {args.num_jobs})"
            )
        cfg = load_train_config(args.config, extra)
        parallel = init_parallel(cfg["training"])
        _setup_rank_logging(parallel.rank, parallel.world_size)
        if parallel.is_main:  # the job's resolved config, for the record
            from sftflow.io import write_json

            Path(args.checkpoint_dir).mkdir(parents=True, exist_ok=True)
            write_json(Path(args.checkpoint_dir) / f"job{args.job_index}.config.json", cfg)
        spec = JobSpec(
            packed=args.packed,
            model=args.model,
            checkpoint_dir=args.checkpoint_dir,
            job_index=args.job_index,
            num_jobs=args.num_jobs,
            done_file=args.done_file,
            metrics_dir=args.metrics_dir,
            tokenizer=args.tokenizer,
            chat_template=args.chat_template,
        )
        run_job(cfg, spec, parallel)
    except SftflowError as err:
        LOG.error("%s", err)
        return 2
    finally:
        shutdown()
    return 0


# Placeholders in a planned multi-node command, filled in by `launch` inside the Slurm allocation.
HEAD, PORT, JOB_ID = "{head}", "{port}", "{job_id}"


def torchrun_command(
    train_script: str | os.PathLike, nproc_per_node: int, train_args: list[str], python: str = sys.executable
) -> list[str]:
    """argv of a single-node torchrun launch (an argument list: no shell, no quoting issues)."""
    return [
        python,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc_per_node}",
        str(train_script),
        *train_args,
    ]


def srun_torchrun_command(
    train_script: str | os.PathLike,
    nnodes: int,
    nproc_per_node: int,
    train_args: list[str],
    python: str = sys.executable,
) -> list[str]:
    """argv of a multi-node launch inside a Slurm allocation: one srun task per node, each a torchrun agent
    that rendezvouses (c10d) on the allocation's first node ({head}:{port}, filled in by `launch`);
    torchrun then starts nproc_per_node ranks on its node."""
    return [
        "srun",
        f"--nodes={nnodes}",
        f"--ntasks={nnodes}",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
        python,
        "-m",
        "torch.distributed.run",
        f"--nnodes={nnodes}",
        f"--nproc-per-node={nproc_per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={HEAD}:{PORT}",
        f"--rdzv-id=sftflow-{JOB_ID}",
        str(train_script),
        *train_args,
    ]


def config_overrides(config: dict, sections: tuple[str, ...] = ("training", "packing")) -> list[str]:
    """`++section.key=value` for every key of `sections` that differs from the schema default.

    The worker fills in the defaults again (validate_sections), so these arguments alone rebuild the
    config: the command line shows exactly what an experiment changed, as NeMo-Skills' commands do.
    """
    from sftflow.config import validate_sections

    defaults = validate_sections({})

    def walk(prefix: str, value, default) -> list[str]:
        if isinstance(value, dict) and isinstance(default, dict):
            return [arg for key in value for arg in walk(f"{prefix}.{key}", value[key], default.get(key))]
        return [] if value == default else [f"++{prefix}={C.yaml_value(value)}"]

    return [arg for section in sections for arg in walk(section, config.get(section, {}), defaults[section])]


def planned_command(
    python: str,
    train_script: str | os.PathLike,
    training: dict,
    worker_args: list[str],
    done_file: str,
    log_file: str,
    master_port: int = 29500,
) -> list[str]:
    """The whole launch of one chained job, as the train_job rule runs it (and `snakemake -n -p` prints it):

        python scripts/train.py launch ... -- [srun ...] python -m torch.distributed.run ... scripts/train.py ...

    `launch` fills in the rendezvous placeholders from the Slurm allocation, runs the rest, and fails the
    last job if it stopped with steps left (see last_job_unfinished).
    """
    nnodes = training["num_nodes"]
    if nnodes == 1:
        run = torchrun_command(train_script, training["num_gpus"], worker_args, python)
    else:
        run = srun_torchrun_command(train_script, nnodes, training["num_gpus"], worker_args, python)
    launcher = [python, str(train_script), "launch", "--num-nodes", str(nnodes), "--master-port", str(master_port)]
    launcher += ["--procs-per-node", str(max(training["num_gpus"], 1))]
    return [*launcher, "--done-file", str(done_file), "--log", str(log_file), "--", *run]


def slurm_job_nodes(job_id: str, run=subprocess.run) -> list[str]:
    """The node names of Slurm job `job_id`, from scontrol (the job's SLURM_* environment may have been
    stripped: the Slurm executor plugin removes it before running a job's command)."""
    shown = run(["scontrol", "show", "job", job_id, "--oneliner"], capture_output=True, text=True, check=False)
    fields = dict(f.split("=", 1) for f in shown.stdout.split() if "=" in f)
    nodelist = fields.get("NodeList")
    if shown.returncode != 0 or not nodelist or nodelist == "(null)":
        raise SftflowError(f"cannot read the nodes of Slurm job {job_id} from scontrol: {shown.stderr.strip()}")
    names = run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return names.stdout.split()


def slurm_node_address(node: str, run=subprocess.run) -> str:
    """A node's NodeAddr (what other nodes connect to; often, not always, its name)."""
    shown = run(["scontrol", "show", "node", node, "--oneliner"], capture_output=True, text=True, check=False).stdout
    for field in shown.split():
        if field.startswith("NodeAddr="):
            return field.split("=", 1)[1]
    return node


def fill_placeholders(argv: list[str], nnodes: int, master_port: int, env=None, run=subprocess.run) -> list[str]:
    """Put the Slurm allocation's first node, a per-job port and the job id into a planned multi-node command."""
    if not any(mark in arg for arg in argv for mark in (HEAD, PORT, JOB_ID)):
        return list(argv)
    env = dict(os.environ) if env is None else env
    job_id = env.get("SLURM_JOB_ID")
    if not job_id:
        raise SftflowError(
            f"config key 'training.num_nodes' is {nnodes}: a multi-node job runs inside a Slurm allocation of that "
            "many nodes (snakemake --profile profiles/slurm ...); run it there, or set num_nodes: 1"
        )
    nodes = slurm_job_nodes(job_id, run=run)
    if len(nodes) != nnodes:
        raise SftflowError(
            f"config key 'training.num_nodes' is {nnodes}, but this Slurm job {job_id} has {len(nodes)} node(s)"
        )
    values = {HEAD: slurm_node_address(nodes[0], run=run), PORT: str(master_port + int(job_id) % 1000), JOB_ID: job_id}
    filled = []
    for arg in argv:
        for mark, value in values.items():
            arg = arg.replace(mark, value)
        filled.append(arg)
    return filled


def launch_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py launch", description="Run one chained training job's launch command (the train_job rule)."
    )
    p.add_argument("--num-nodes", type=int, default=1, help="nodes the Slurm allocation must have")
    p.add_argument("--master-port", type=int, default=29500, help="rendezvous port base (+ job id %% 1000)")
    p.add_argument("--done-file", required=True, help="the job's done-file (written by the training ranks)")
    p.add_argument("--log", default=None, help="log file; the training processes' output is appended to it")
    p.add_argument(
        "--procs-per-node", type=int, default=1, help="training processes per node (they share OMP_NUM_THREADS)"
    )
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the srun/torchrun command")
    return p


def launch_main(argv: list[str] | None = None) -> int:
    args = launch_parser().parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.log:  # a fresh log, then every writer appends: ours before and after, the ranks' output between
        Path(args.log).write_text("", encoding="utf-8")
    setup_logging(args.log, mode="a")
    try:
        if not command:
            raise SftflowError("train.py launch: no command after '--'")
        command = fill_placeholders(command, args.num_nodes, args.master_port)
    except SftflowError as err:
        LOG.error("%s", err)
        return 2
    LOG.info("launching: %s", shlex.join(command))
    for handler in logging.getLogger().handlers:
        handler.flush()
    log = open(args.log, "a", encoding="utf-8") if args.log else None  # noqa: SIM115
    ranks_start = log.tell() if log else 0
    try:
        rc = subprocess.run(
            command,
            stdout=log or None,
            stderr=subprocess.STDOUT if log else None,
            env=worker_environment(os.environ, args.procs_per_node),
        ).returncode
    finally:
        if log:
            log.close()
    if rc != 0:
        ranks_output = Path(args.log).read_bytes()[ranks_start:].decode("utf-8", errors="replace") if log else ""
        reason = failure_reason(ranks_output)
        LOG.error(
            "training failed (exit code %d)%s%s",
            rc,
            f": {reason}" if reason else "",
            f"\n  full log: {args.log}" if args.log else "",
        )
        return 1
    unfinished = last_job_unfinished(args.done_file)
    if unfinished:
        LOG.error("%s", unfinished)
        return 3
    return 0


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def worker_environment(env, procs_per_node: int) -> dict[str, str]:
    """The training processes' environment: the job's threads (Snakemake sets OMP_NUM_THREADS & co. to the
    rule's threads, i.e. the cores of the whole job) shared among the processes of a node, so that they do
    not oversubscribe the cores; torchrun keeps a value that is already set."""
    env = dict(env)
    for name in THREAD_VARIABLES:
        if env.get(name, "").isdigit() and procs_per_node > 1:
            env[name] = str(max(1, int(env[name]) // procs_per_node))
    return env


_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (\w+) ([\w.]+): (.*)$")
_EXCEPTION_LINE = re.compile(r"^(?:\[rank\d+\]: )?((?:[\w.]+\.)?\w*(?:Error|Exception|Interrupt)\b: .+)$")


def failure_reason(ranks_output: str) -> str | None:
    """The reason training failed, from the ranks' part of the log: the last error sftflow logged (with its
    continuation lines), else the last exception line of a traceback (e.g. CUDA out of memory)."""
    lines = ranks_output.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        match = _LOG_LINE.match(lines[i])
        if match and match.group(1) == "ERROR" and match.group(2).startswith("sftflow"):
            message = [match.group(3)]
            for more in lines[i + 1 :]:
                if not more.startswith(" ") or not more.strip():  # our multi-line messages indent the rest
                    break
                message.append(more)
            return "\n".join(message)
    for line in reversed(lines):
        match = _EXCEPTION_LINE.match(line.strip())
        if match and "ChildFailedError" not in line:
            return match.group(1)
    return None


def last_job_unfinished(done_file: str | os.PathLike) -> str | None:
    """Why the chain is not finished, if `done_file` is the last job's record and training is incomplete.

    An earlier job that stops at its deadline exits 0 (the next job resumes); the last one fails instead,
    so that Snakemake's retry (`retries` in profiles/slurm) gives it a fresh allocation that resumes from
    the checkpoint it saved, and so that the chain never reports success with steps left.
    """
    record = json.loads(Path(done_file).read_text(encoding="utf-8"))
    if record["complete"] or record["job_index"] != record["num_jobs"] - 1:
        return None
    return (
        f"the last training job stopped before its deadline at step {record['end_step']} of "
        f"{record['total_steps']} ({record['remaining_steps']} steps remain) and saved {record['checkpoint']}; "
        "a retry or rerun continues from there. To finish in one pass, raise config key "
        "'training.num_training_jobs' or the job's wall time ('training.time_limit' / 'slurm.train_runtime')"
    )


def convert_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Export a DCP training checkpoint as a Hugging Face model folder.")
    p.add_argument("--checkpoint-dir", required=True, help="the training checkpoint directory")
    p.add_argument("--output", required=True, help="HF model directory to write (atomically)")
    p.add_argument("--model", required=True, help="base model (config.json, generation_config.json)")
    p.add_argument("--tokenizer", default=None, help="tokenizer to save with the model (default: --model)")
    p.add_argument("--chat-template", default=None, help="Jinja chat template file replacing the tokenizer's")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, default=None, help="export this saved step")
    which.add_argument(
        "--done-file", default=None, help="last job's done-file: export its checkpoint, if training is complete"
    )
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="default: the base model's dtype"
    )
    p.add_argument("--max-shard-gb", type=float, default=2.0, help="largest safetensors shard (GiB)")
    return p


def convert(args: argparse.Namespace) -> Path:
    from sftflow.train.export import check_training_complete, export_checkpoint, resolve_checkpoint

    checkpoint = None
    if args.done_file:
        record = check_training_complete(args.done_file)
        checkpoint = record.get("checkpoint")
        if not checkpoint or not Path(checkpoint).is_dir():
            checkpoint = resolve_checkpoint(args.checkpoint_dir, None)
    else:
        checkpoint = resolve_checkpoint(args.checkpoint_dir, args.step)
    return export_checkpoint(
        checkpoint,
        args.output,
        args.model,
        tokenizer=args.tokenizer,
        chat_template=args.chat_template,
        dtype=args.dtype,
        max_shard_bytes=int(args.max_shard_gb * 1024**3),
    )


def convert_main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = convert_parser().parse_args(argv)
    try:
        convert(args)
    except SftflowError as err:
        LOG.error("%s", err)
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def convert_from_snakemake(smk) -> None:
    """Snakemake `convert_final` / `convert_step` rules."""
    setup_logging(smk.log[0] if smk.log else None)
    argv = [
        "--checkpoint-dir", str(smk.params.checkpoint_dir),
        "--output", str(smk.output.model),
        "--model", str(smk.params.model),
        "--tokenizer", str(smk.params.tokenizer),
    ]  # fmt: skip
    if smk.params.chat_template:
        argv += ["--chat-template", str(smk.params.chat_template)]
    if smk.params.get("step", None) is not None:
        argv += ["--step", str(smk.params.step)]
    else:
        argv += ["--done-file", str(smk.input.last_job)]
    try:
        convert(convert_parser().parse_args(argv))
    except SftflowError as err:
        LOG.error("%s", err)
        raise SystemExit(f"error: {err}") from None
