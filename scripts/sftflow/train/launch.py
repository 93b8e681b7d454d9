"""The train_job rule's launcher, `scripts/train.py launch ... -- <command>`: it fills in the Slurm allocation's
rendezvous address, runs the torchrun (or srun + torchrun) command and checks the job's done-file.

The rule's command comes from planned_command (and `snakemake -n -p` prints it)::

    python scripts/train.py launch --num-nodes 1 --master-port 29500 --procs-per-node 2 \\
        --done-file results/checkpoints/job1.done --log results/logs/train_job1.log \\
        -- python -m torch.distributed.run --standalone --nproc-per-node=2 scripts/train.py ...

Exit codes of `launch` (launch_main):

* 0: training ran, and the chain is finished or this is not its last job (an earlier job that stopped at
  its deadline exits 0: the next job resumes from its checkpoint);
* 1: the training processes failed; the log names the ranks' error (failure_reason);
* 2: the command cannot run: nothing after '--', or a multi-node job outside a matching Slurm allocation;
* 3: "unfinished": the last job stopped at its deadline with steps left (last_job_unfinished), so that
  Snakemake's retry gives it a fresh allocation that resumes from its checkpoint;
* 130: interrupted with Ctrl-C (SIGINT). torchrun forwards the signal to the ranks (they run in their own
  session), which finish the step in progress and save before they exit; a rerun resumes from that checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sftflow.errors import SftflowError
from sftflow.logs import setup_logging

LOG = logging.getLogger("sftflow.train")

EXIT_OK, EXIT_TRAINING_FAILED, EXIT_CANNOT_RUN, EXIT_UNFINISHED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


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


@dataclass(frozen=True)
class LaunchFiles:
    """The launcher's own arguments for one job: the done-file it checks, the log it writes (the training
    processes' output is appended to it) and the rendezvous port base of a multi-node job."""

    done_file: str | os.PathLike
    log_file: str | os.PathLike
    master_port: int = 29500


def planned_command(
    python: str, train_script: str | os.PathLike, training: Mapping, worker_args: list[str], launch: LaunchFiles
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
    launcher = [python, str(train_script), "launch", "--num-nodes", str(nnodes)]
    launcher += ["--master-port", str(launch.master_port), "--procs-per-node", str(max(training["num_gpus"], 1))]
    return [*launcher, "--done-file", str(launch.done_file), "--log", str(launch.log_file), "--", *run]


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
    """`scripts/train.py launch`; returns the exit code (see the module docstring)."""
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
        return EXIT_CANNOT_RUN
    LOG.info("launching: %s", shlex.join(command))
    for handler in logging.getLogger().handlers:
        handler.flush()
    log = open(args.log, "a", encoding="utf-8") if args.log else None  # noqa: SIM115
    ranks_start = log.tell() if log else 0
    interrupts, started = InterruptWatch(), time.time()
    try:
        rc = subprocess.run(
            command,
            stdout=log or None,
            stderr=subprocess.STDOUT if log else None,
            env=worker_environment(os.environ, args.procs_per_node),
        ).returncode
    finally:
        interrupts.restore()
        if log:
            log.close()
    if interrupts.count:
        LOG.error(
            "interrupted (Ctrl-C): %s; rerun the same command to resume from the latest checkpoint in %s%s",
            interrupted_state(args.done_file, started),
            Path(args.done_file).parent,
            f"\n  full log: {args.log}" if args.log else "",
        )
        return EXIT_INTERRUPTED
    if rc != 0:
        ranks_output = Path(args.log).read_bytes()[ranks_start:].decode("utf-8", errors="replace") if log else ""
        reason = failure_reason(ranks_output)
        LOG.error(
            "training failed (exit code %d)%s%s",
            rc,
            f": {reason}" if reason else "",
            f"\n  full log: {args.log}" if args.log else "",
        )
        return EXIT_TRAINING_FAILED
    unfinished = last_job_unfinished(args.done_file)
    if unfinished:
        LOG.error("%s", unfinished)
        return EXIT_UNFINISHED
    return EXIT_OK


def interrupted_state(done_file: str | os.PathLike, since: float) -> str:
    """What the ranks did after a Ctrl-C: they write the done-file only after their last save, so one written
    since `since` (the launch) means they saved; torchrun's exit code does not tell (it exits non-zero on SIGINT
    either way), and a Ctrl-C while the ranks start up stops them before the trainer can save."""
    path = Path(done_file)
    if path.is_file() and path.stat().st_mtime >= math.floor(since):  # floor: filesystems with 1 s mtimes
        record = json.loads(path.read_text(encoding="utf-8"))
        return f"the training processes saved step {record['end_step']} and stopped"
    return "the training processes stopped before saving (the checkpoints saved before are intact)"


class InterruptWatch:
    """Counts Ctrl-C (SIGINT) while the launcher waits for torchrun, instead of dying of KeyboardInterrupt:
    subprocess.run would kill torchrun, and with it the ranks' save. torchrun gets the terminal's SIGINT
    itself and passes it on to the ranks. Installed only in the main thread (signal's rule)."""

    def __init__(self) -> None:
        self.count, self._previous = 0, None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        self.count += 1

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


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
