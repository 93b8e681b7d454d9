"""The train_job rule's launch: the config read back from the training stage files, the planned torchrun / srun +
torchrun command, the placeholders filled in from the Slurm allocation, and the launcher's exit codes."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sftflow.config import config_layers, merged_layers, validate_sections
from sftflow.errors import SftflowError
from sftflow.stage_config import write_if_changed
from sftflow.train.cli import load_train_config
from sftflow.train.config import RESULT_KEYS
from sftflow.train.launch import LaunchFiles, fill_placeholders, launch_main, planned_command, worker_environment
from tests.conftest import REPO


@pytest.mark.parametrize("files", [(), ("config/examples/llama3.1-8b-8x8.yaml",)])
def test_the_stage_files_rebuild_the_config_exactly(files, tmp_path):
    config = merged_layers(config_layers([REPO / name for name in files]))  # no file: the demo's config/config.yaml
    config = validate_sections({"training": config["training"], "packing": config.get("packing", {})})
    tracked = {"training": {k: v for k, v in config["training"].items() if k in RESULT_KEYS}}
    run = {
        "training": {k: v for k, v in config["training"].items() if k not in RESULT_KEYS},
        "packing": config["packing"],
        "protected_steps": [300, 100],  # the workflow's steps exported after training
    }
    write_if_changed(tmp_path / "train.json", tracked)
    write_if_changed(tmp_path / "train.run.json", run)
    loaded = load_train_config([tmp_path / "train.json", tmp_path / "train.run.json"])
    assert loaded == {**config, "protected_steps": [100, 300]}


def test_later_config_files_win_and_errors_name_the_files(tmp_path):
    (tmp_path / "a.json").write_text('{"training": {"time_limit": "4:00:00", "learning_rate": 1e-5}}')
    (tmp_path / "b.yaml").write_text("training:\n  learning_rate: 2.0e-5\npacking:\n  max_total_sequence_length: 64\n")
    config = load_train_config([tmp_path / "a.json", tmp_path / "b.yaml"])
    assert config["training"]["time_limit"] == "4:00:00"  # a string in JSON stays one (no YAML 1.1 sexagesimal)
    assert config["training"]["learning_rate"] == 2e-5 and config["packing"]["max_total_sequence_length"] == 64
    assert config.pop("protected_steps") == []
    assert config == validate_sections(config)  # the defaults are filled
    (tmp_path / "c.json").write_text('{"training": {"seed": "seven"}}')
    with pytest.raises(SftflowError, match=r"--config .*c.json: config key 'training.seed'"):
        load_train_config([tmp_path / "c.json"])
    (tmp_path / "d.json").write_text('{"eval": {}}')
    with pytest.raises(SftflowError, match=r"--config .*d.json: unknown sections \['eval'\]"):
        load_train_config([tmp_path / "d.json"])


def test_single_node_is_plain_torchrun_and_multi_node_is_srun_with_placeholders():
    training = {"num_nodes": 1, "num_gpus": 2}
    cmd = planned_command("py", "scripts/train.py", training, ["--packed", "my data"], LaunchFiles("d.done", "t.log"))
    assert cmd[: cmd.index("--") + 1] == [
        "py", "scripts/train.py", "launch", "--num-nodes", "1", "--master-port", "29500", "--procs-per-node", "2",
        "--done-file", "d.done", "--log", "t.log", "--",
    ]  # fmt: skip
    assert cmd[cmd.index("--") + 1 :] == [
        "py", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "scripts/train.py",
        "--packed", "my data",
    ]  # fmt: skip
    multi = planned_command(
        "py", "scripts/train.py", {"num_nodes": 8, "num_gpus": 8}, [], LaunchFiles("d.done", "t.log", 29400)
    )
    line = shlex.join(multi)
    assert (
        "-- srun --nodes=8 --ntasks=8 --ntasks-per-node=1 --kill-on-bad-exit=1 py -m torch.distributed.run "
        "--nnodes=8 --nproc-per-node=8 --rdzv-backend=c10d '--rdzv-endpoint={head}:{port}' "
        "'--rdzv-id=sftflow-{job_id}' scripts/train.py"
    ) in line
    assert shlex.split(line) == multi  # quoted once, read back unchanged (paths with spaces included)


def fake_scontrol(nodelist: str, names: list[str], addr: str):
    def run(argv, **kwargs):
        if argv[:3] == ["scontrol", "show", "job"]:
            out = f"JobId={argv[3]} JobName=x NodeList={nodelist} NumNodes={len(names)}"
        elif argv[:3] == ["scontrol", "show", "hostnames"]:
            out = "\n".join(names) + "\n"
        elif argv[:3] == ["scontrol", "show", "node"]:
            out = f"NodeName={argv[3]} Arch=x86_64 NodeAddr={addr} NodeHostName={argv[3]}"
        else:
            raise AssertionError(argv)
        return subprocess.CompletedProcess(argv, 0, out, "")

    return run


def test_placeholders_take_the_first_node_a_per_job_port_and_the_job_id():
    planned = planned_command("py", "t.py", {"num_nodes": 2, "num_gpus": 4}, ["--x"], LaunchFiles("d", "l", 29500))
    run = fake_scontrol("gpu[07-08]", ["gpu07", "gpu08"], "10.0.0.7")
    filled = fill_placeholders(planned, 2, 29500, env={"SLURM_JOB_ID": "123456"}, run=run)
    assert "--rdzv-endpoint=10.0.0.7:29956" in filled and "--rdzv-id=sftflow-123456" in filled
    assert not any("{" in arg for arg in filled)
    with pytest.raises(SftflowError, match=r"'training.num_nodes' is 3, but this Slurm job 123456 has 2 node"):
        fill_placeholders(planned, 3, 29500, env={"SLURM_JOB_ID": "123456"}, run=run)
    with pytest.raises(SftflowError, match=r"'training.num_nodes' is 2: a multi-node job runs inside a Slurm"):
        fill_placeholders(planned, 2, 29500, env={})
    single = planned_command("py", "t.py", {"num_nodes": 1, "num_gpus": 1}, [], LaunchFiles("d", "l"))
    assert fill_placeholders(single, 1, 29500, env={}) == single  # nothing to fill, no Slurm needed


def write_done(path: Path, **record) -> list[str]:
    """A command that writes `record` as the done-file, standing in for the training ranks."""
    code = f"import json, pathlib; pathlib.Path({str(path)!r}).write_text(json.dumps({record!r})); print('ranks ran')"
    return [sys.executable, "-c", code]


def test_launcher_exit_codes_and_log(tmp_path):
    log, done = tmp_path / "train_job1.log", tmp_path / "job1.done"
    base = ["--done-file", str(done), "--log", str(log), "--"]
    record = {"job_index": 1, "num_jobs": 2, "end_step": 6, "total_steps": 9, "remaining_steps": 3,
              "checkpoint": "ckpt/step_00000006"}  # fmt: skip
    # the last job finished: 0
    assert launch_main([*base, *write_done(done, **record, complete=True)]) == 0
    text = log.read_text()
    assert "launching: " in text and "ranks ran" in text
    # an earlier job stopped at its deadline: 0 (the next job resumes)
    assert launch_main([*base, *write_done(done, **{**record, "job_index": 0}, complete=False)]) == 0
    # the last job stopped with steps left: 3, and the log says what to do
    assert launch_main([*base, *write_done(done, **record, complete=False)]) == 3
    text = log.read_text()
    assert "ranks ran" in text and "stopped before its deadline at step 6 of 9 (3 steps remain)" in text
    # the ranks failed: 1, naming the log
    assert launch_main([*base, sys.executable, "-c", "raise SystemExit(7)"]) == 1
    assert "training failed (exit code 7)" in log.read_text()
    # a multi-node command outside Slurm: 2, naming the config key; nothing is run
    multi = planned_command(sys.executable, "t.py", {"num_nodes": 2, "num_gpus": 1}, [], LaunchFiles(done, log))
    done.unlink()
    assert launch_main(multi[multi.index("launch") + 1 :]) == 2
    assert "'training.num_nodes' is 2" in log.read_text() and not done.exists()


def test_a_failed_training_names_the_ranks_error_not_only_the_log(tmp_path, capsys):
    """Issue 12 (5): the reason a rank failed reaches the terminal in the launcher's one-line error."""
    log, done = tmp_path / "train_job0.log", tmp_path / "job0.done"
    rank = (
        "import sys; print('2026-01-01 10:00:00,000 INFO sftflow.train: step 1/9'); "
        "print('2026-01-01 10:00:01,000 ERROR sftflow.train: checkpoint ckpt/step_00000004 was trained on different "
        "packed data; delete ckpt'); print('  (or set a new output_dir)'); "
        "print('[rank0]: Traceback (most recent call last):'); print('E1202 torch elastic noise'); "
        "print('torch.distributed.elastic.multiprocessing.errors.ChildFailedError: boom'); sys.exit(1)"
    )
    assert launch_main(["--done-file", str(done), "--log", str(log), "--", sys.executable, "-c", rank]) == 1
    expected = (
        "training failed (exit code 1): checkpoint ckpt/step_00000004 was trained on different packed data; "
        f"delete ckpt\n  (or set a new output_dir)\n  full log: {log}"
    )
    assert expected in capsys.readouterr().err and expected in log.read_text()
    # No error of ours: the last exception line of the traceback (here, out of GPU memory).
    oom = (
        "print('[rank0]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB'); raise SystemExit(1)"
    )
    assert launch_main(["--done-file", str(done), "--log", str(log), "--", sys.executable, "-c", oom]) == 1
    assert "training failed (exit code 1): torch.OutOfMemoryError: CUDA out of memory." in capsys.readouterr().err


def test_the_jobs_threads_are_shared_among_the_processes_of_a_node(tmp_path, monkeypatch):
    """Snakemake sets OMP_NUM_THREADS to the rule's threads (the whole job's cores); each of a node's training
    processes gets its share, never less than one, and other variables pass through."""
    env = {"OMP_NUM_THREADS": "8", "MKL_NUM_THREADS": "8", "PATH": "/bin"}
    assert worker_environment(env, 4) == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "PATH": "/bin"}
    assert worker_environment(env, 1) == env
    assert worker_environment({"OMP_NUM_THREADS": "2"}, 8) == {"OMP_NUM_THREADS": "1"}
    assert worker_environment({}, 8) == {}  # unset: torchrun's own default applies
    # and the launcher hands that environment to the command it runs
    log, done = tmp_path / "l.log", tmp_path / "job0.done"
    seen = tmp_path / "threads.txt"
    code = (
        f"import os, pathlib; pathlib.Path({str(seen)!r}).write_text(os.environ['OMP_NUM_THREADS']); "
        f"pathlib.Path({str(done)!r}).write_text('{{\"complete\": true}}')"
    )
    argv = ["--procs-per-node", "2", "--done-file", str(done), "--log", str(log), "--", sys.executable, "-c", code]
    monkeypatch.setenv("OMP_NUM_THREADS", "6")
    assert launch_main(argv) == 0
    assert seen.read_text() == "3"


def test_ctrl_c_lets_the_ranks_save_and_reports_an_interruption(tmp_path, capsys):
    """The launcher survives the terminal's SIGINT (the ranks get it through torchrun and save before they exit),
    waits for them, and exits 130 with a message saying how to resume, instead of a KeyboardInterrupt traceback
    that would have killed torchrun and the save. Whether the ranks saved comes from the done-file they write
    after their last save, not from the exit code (torchrun's is non-zero after a SIGINT either way)."""
    log, done = tmp_path / "train_job0.log", tmp_path / "job0.done"
    interrupt = "import os, signal, time; os.kill(os.getppid(), signal.SIGINT); time.sleep(0.5); "
    saved = (
        interrupt
        + f"import pathlib; pathlib.Path({str(done)!r}).write_text('{{\"end_step\": 4}}'); raise SystemExit(1)"
    )
    before = signal.getsignal(signal.SIGINT)
    assert launch_main(["--done-file", str(done), "--log", str(log), "--", sys.executable, "-c", saved]) == 130
    expected = (
        "interrupted (Ctrl-C): the training processes saved step 4 and stopped; rerun the same command to resume "
        f"from the latest checkpoint in {tmp_path}"
    )
    assert expected in capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is before
    # Interrupted while the ranks start up (before the trainer can save): no done-file is written this time.
    stale = done.stat().st_mtime - 10
    os.utime(done, (stale, stale))  # an earlier run's done-file does not count
    started = interrupt + "raise KeyboardInterrupt"
    assert launch_main(["--done-file", str(done), "--log", str(log), "--", sys.executable, "-c", started]) == 130
    expected = (
        "interrupted (Ctrl-C): the training processes stopped before saving (the checkpoints saved before are intact)"
    )
    assert expected in capsys.readouterr().err
