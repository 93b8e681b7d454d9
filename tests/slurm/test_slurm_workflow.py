"""`snakemake --profile profiles/slurm` against a live two-node Slurm cluster on localhost (tests/slurm/cluster.py).

Every job of the small demo runs as its own Slurm job under the cluster's account (checked with `sacct`,
which the plugin also uses for its status checks), the chained training jobs run in order, and
results/eval.json equals a local run's (the shared small demo run, tests/conftest.py). A second test trains across two Slurm nodes: srun starts one
torchrun agent per node and the ranks rendezvous over c10d. A third gives every training job Slurm's
shortest wall time: the jobs stop, save and resume mid-training, and the weights equal an uninterrupted
run's. A fourth has Slurm cancel a training job mid-training (as preemption does): the trainer saves on
Slurm's SIGTERM, Snakemake resubmits the job, and it resumes from that checkpoint. The last three use the
options for clusters without accounting (squeue status, no account), and start from a copy of the shared
small demo run's data stages (small_demo_run, tests/conftest.py): they train on Slurm, and check that nothing else
ran there; the first test runs the data stages on Slurm.

No test depends on the machine's speed: the wall-time and cancel tests train towards far more steps than
any machine reaches, so the deadline or the cancel always lands mid-training, and they assert on the steps
that were actually trained.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import (
    DATA_RULES,
    SLURM,
    SMALL_RUN,
    SMALL_TRAINING,
    SNAKEMAKE,
    copy_with_data,
    rules_run,
    snakemake,
)
from tests.slurm.cluster import ACCOUNT

# One cluster for the whole run (tests/slurm/conftest.py), shared by these tests on every pytest-xdist worker.
pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# Options for a cluster without accounting: status from squeue, no account to guess (see README).
NO_ACCOUNTING = ("--slurm-status-command", "squeue", "--slurm-no-account")


def slurm_command(target: str, configfile: str, options=NO_ACCOUNTING) -> list[str]:
    """`snakemake --profile profiles/slurm TARGET`, polling the test cluster every 2 s."""
    cmd = [SNAKEMAKE, "--profile", "profiles/slurm", target, *options]
    cmd += ["--slurm-init-seconds-before-status-checks", "2", "--seconds-between-status-checks", "2"]
    return cmd + ["--configfile", "config/config.yaml", configfile]  # the demo, then the test's keys


def run_on_slurm(
    cluster, root: Path, target: str, configfile: str, options=NO_ACCOUNTING
) -> subprocess.CompletedProcess:
    """slurm_command run to the end in the workflow copy `root`, against `cluster`."""
    cmd = slurm_command(target, configfile, options)
    return subprocess.run(cmd, cwd=root, env=cluster.env(), capture_output=True, text=True, timeout=1500)


def slurm_jobs_by_rule(root: Path) -> dict[str, str]:
    """Slurm job id -> "rule[/wildcards]", from the plugin's per-job logs (.snakemake/slurm_logs/rule_*/...)."""
    found = {}
    for log in (root / ".snakemake" / "slurm_logs").rglob("*.log"):
        rel = log.relative_to(root / ".snakemake" / "slurm_logs")
        found[log.stem] = "/".join(rel.parts[:-1]).removeprefix("rule_")
    return found


def test_profile_runs_every_job_on_slurm_and_matches_a_local_run(slurm_cluster, workdir, small_demo_run):  # noqa: F811
    # The plugin's defaults: job status from sacct; the account named in the config (validated with sacctmgr).
    (workdir / "c.yaml").write_text(SMALL_RUN + f"  account: {ACCOUNT}\n")
    result = run_on_slurm(slurm_cluster, workdir, "results/eval.json", "c.yaml", options=())
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]

    # One Slurm job per Snakemake job, all COMPLETED under the account, read back with sacct.
    completed = {job["JobID"]: job for job in slurm_cluster.completed_jobs()}
    by_rule = slurm_jobs_by_rule(workdir)
    rules = sorted(r.split("/")[0] for r in by_rule.values())
    assert rules == sorted(
        [*DATA_RULES, "train_job", "train_job", "convert_final", "generate", "generate", "eval_summary"]
        + ["report_data", "report_training", "report_config"]  # eval.json brings the report's pages
    ), by_rule
    for job_id, rule in by_rule.items():
        assert completed[job_id]["State"] == "COMPLETED", (rule, completed[job_id])
        assert completed[job_id]["Account"] == ACCOUNT, (rule, completed[job_id])
    submitted = re.findall(r"submitted with SLURM jobid (\d+)", result.stdout + result.stderr)
    assert sorted(submitted) == sorted(by_rule)

    # The chained training jobs ran in order, each as its own Slurm job.
    # On Slurm every job has a deadline (its wall time), so job 0 trains on past its share (6 steps) to the
    # end, and job 1 finds nothing left (tests/slurm/...wall_time... shows a chain that needs every job).
    done = [json.loads((workdir / "results" / "checkpoints" / f"job{i}.done").read_text()) for i in range(2)]
    assert [(d["start_step"], d["end_step"]) for d in done] == [(0, 12), (12, 12)]
    train = sorted(
        (completed[j]["Start"], completed[j]["End"]) for j, r in by_rule.items() if r.startswith("train_job")
    )
    assert len(train) == 2 and train[0][1] <= train[1][0]  # the second started after the first ended

    # The same config run locally (the shared finished run; its own jobs split the steps 6 + 6) gives the
    # same evaluation: the same scores and the same answers, model by model.
    def scores(root: Path) -> dict:
        summary = json.loads((root / "results" / "eval.json").read_text())
        timing = ("avg_gen_seconds", "total_gen_seconds")
        return {m: {b: {k: v for k, v in r.items() if k not in timing} for b, r in per.items()}
                for m, per in summary["results"].items()}  # fmt: skip

    assert scores(workdir) == scores(small_demo_run) and set(scores(workdir)) == {"final", "base"}
    for model in ("final", "base"):
        outputs = [
            [
                {k: v for k, v in json.loads(line).items() if k != "generation_seconds"}
                for line in (root / "results" / "eval" / model / "demo" / "output.jsonl").read_text().splitlines()
            ]
            for root in (workdir, small_demo_run)
        ]
        assert outputs[0] == outputs[1] and outputs[0], model


@pytest.fixture
def run_dir(small_demo_run, tmp_path) -> Path:
    """A workflow copy whose data stages are done (the shared small demo run's): the tests below train on
    Slurm, and every one of them uses the small demo's data. (The test above runs the data stages on Slurm.)"""
    return copy_with_data(small_demo_run, tmp_path / "run")


def only_training_ran(by_rule: dict[str, str]) -> None:
    """The copy's data stages were up to date: Slurm ran training jobs only."""
    assert by_rule and all(rule.startswith("train_job") for rule in by_rule.values()), by_rule


def test_training_spans_two_slurm_nodes(slurm_cluster, run_dir):
    config = SMALL_TRAINING.replace("num_training_jobs: 2", "num_training_jobs: 1").replace(
        "max_num_steps: 12", "max_num_steps: 4\n  num_nodes: 2\n  num_gpus: 1"
    )
    (run_dir / "c.yaml").write_text(config + SLURM)
    result = run_on_slurm(slurm_cluster, run_dir, "results/checkpoints/job0.done", "c.yaml")
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    done = json.loads((run_dir / "results" / "checkpoints" / "job0.done").read_text())
    assert done["complete"] and done["end_step"] == 4
    assert sorted(done["ranks"]) == ["node1/0", "node2/0"]  # rank 0 and rank 1 on different Slurm nodes
    log = (run_dir / "results" / "logs" / "train_job0.log").read_text()
    assert "launching: srun --nodes=2 --ntasks=2 --ntasks-per-node=1" in log
    assert "--nnodes=2 --nproc-per-node=1 --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:" in log
    only_training_ran(slurm_jobs_by_rule(run_dir))
    (train_job,) = [j for j, rule in slurm_jobs_by_rule(run_dir).items() if rule.startswith("train_job")]
    (record,) = [j for j in slurm_cluster.completed_jobs() if j["JobID"] == train_job]
    assert record["NNodes"] == "2" and record["State"] == "COMPLETED"


# Far more steps and epochs than any machine trains in these tests: a job ends only when Slurm's wall time
# (1 minute) or scancel stops it, whatever the machine's speed. The rate warms up linearly over 1000 steps to
# a peak equal to its minimum, so every step has its own rate (a resume at the wrong step shows in the
# weights), and no rate depends on max_num_steps: a run of exactly N steps is the reference for step N.
ENDLESS = """
training:
  num_training_jobs: 3
  max_num_steps: 10000000
  max_num_epochs: 1000000
  save_period: 10000000
  time_margin_seconds: 10
  train_global_batch_size: 4
  train_micro_batch_size: 2
  learning_rate: 0.002
  min_learning_rate: 0.002
  warmup_steps: 1000
"""
ONE_MINUTE = SLURM.replace("train_runtime: 20", "train_runtime: 1")


def endless_training(**replace: str) -> str:
    """SMALL_TRAINING's demo data with ENDLESS training, `key: value` lines replaced."""
    config = SMALL_TRAINING.split("training:")[0] + ENDLESS
    for key, value in replace.items():
        assert f"  {key}: " in config, key
        config = re.sub(rf"(?m)^  {key}: .*$", f"  {key}: {value}", config)
    return config


def trained_steps(checkpoints: Path) -> list[int]:
    """The step of every training-loss record in metrics.jsonl, in the order they were written."""
    rows = [json.loads(line) for line in (checkpoints / "metrics" / "metrics.jsonl").read_text().splitlines()]
    return [row["step"] for row in rows if "loss" in row]


def exported_weights(root: Path, step: int, output: Path) -> dict:
    """Checkpoint `step` of the workflow copy `root`, exported to an HF folder with convert_checkpoint.py."""
    from safetensors.torch import load_file

    results = root / "results"
    cmd = [sys.executable, "scripts/convert_checkpoint.py", "--checkpoint-dir", str(results / "checkpoints")]
    cmd += ["--model", str(results / "demo" / "base_model"), "--tokenizer", str(results / "demo" / "tokenizer")]
    cmd += ["--step", str(step), "--output", str(output)]
    result = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    weights = {}
    for shard in sorted(output.glob("*.safetensors")):
        weights.update(load_file(shard))
    return weights


def test_a_training_job_cancelled_by_slurm_is_resubmitted_and_resumes(slurm_cluster, run_dir):
    """Slurm kills the running training job mid-training (`scancel`, as preemption does: SIGTERM, then SIGKILL
    after KillWait). The trainer saves at the next step boundary; Snakemake (retries: 2 in the profile)
    resubmits the job, and the resubmission resumes from that checkpoint (the only one: save_period is never
    reached), then trains until its wall time and saves. Training never ends by itself, so the cancel lands
    mid-training on any machine."""
    (run_dir / "c.yaml").write_text(endless_training() + ONE_MINUTE)
    cmd = slurm_command("results/checkpoints/job0.done", "c.yaml")
    output = run_dir / "snakemake.out"
    checkpoints = run_dir / "results" / "checkpoints"
    with open(output, "w") as out:
        proc = subprocess.Popen(cmd, cwd=run_dir, env=slurm_cluster.env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 900
        while not ((checkpoints / "metrics" / "metrics.jsonl").exists() and trained_steps(checkpoints)):
            assert proc.poll() is None, output.read_text()[-4000:]
            assert time.monotonic() < deadline, "training never logged a step"
            time.sleep(0.2)
        (killed,) = [j for j, rule in slurm_jobs_by_rule(run_dir).items() if rule.startswith("train_job")]
        subprocess.run(["scancel", killed], env=slurm_cluster.env(), check=True)
        assert proc.wait(timeout=900) == 0, output.read_text()[-5000:]
    finally:
        if proc.poll() is None:
            proc.kill()

    jobs = {j["JobID"]: j for j in slurm_cluster.completed_jobs()}
    only_training_ran(slurm_jobs_by_rule(run_dir))
    train_jobs = sorted(
        (int(j), rule) for j, rule in slurm_jobs_by_rule(run_dir).items() if rule.startswith("train_job")
    )
    assert len(train_jobs) == 2 and str(train_jobs[0][0]) == killed  # the killed job, then its resubmission
    assert jobs[killed]["State"].startswith("CANCELLED") and jobs[str(train_jobs[1][0])]["State"] == "COMPLETED", jobs
    done = json.loads((checkpoints / "job0.done").read_text())
    start, end = done["start_step"], done["end_step"]
    assert 1 <= start < end and not done["complete"]  # resumed mid-training, stopped at its own deadline
    # Saved on the SIGTERM, at the step the cancelled job had reached (CANCELLED, so not at its deadline; no
    # periodic save is due), and the resubmission went on from it.
    saved = sorted(int(p.name.removeprefix("step_")) for p in checkpoints.glob("step_*"))
    assert saved == [start, end] and not list(checkpoints.glob("*.tmp"))
    assert trained_steps(checkpoints) == list(range(1, end + 1))  # no step lost, none trained twice
    # (Snakemake deletes the cancelled attempt's log before the retry; the resubmission's log is this one.)
    log = (run_dir / "results" / "logs" / "train_job0.log").read_text()
    assert f"resumed from results/checkpoints/step_{start:08d} (step {start}," in log, log[-3000:]
    assert f"stopping at step {end} before the deadline" in log, log[-3000:]


def test_wall_time_stops_saves_resumes_and_ends_with_uninterrupted_weights(
    slurm_cluster, run_dir, small_demo_run, tmp_path
):
    """Slurm's smallest limit (1 minute) per training job, and more steps than any machine trains in it: each
    job stops, saves and exits before its limit, the next resumes exactly there, and the weights at the last
    saved step equal those of one uninterrupted local run of that many steps."""
    (run_dir / "c.yaml").write_text(endless_training() + ONE_MINUTE)
    result = run_on_slurm(slurm_cluster, run_dir, "results/checkpoints/job1.done", "c.yaml")
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]

    checkpoints = run_dir / "results" / "checkpoints"
    done = [json.loads((checkpoints / f"job{i}.done").read_text()) for i in range(2)]
    stops = [d["end_step"] for d in done]
    assert [d["start_step"] for d in done] == [0, stops[0]]  # job 1 resumed where job 0 stopped
    assert 0 < stops[0] < stops[1] and not any(d["complete"] for d in done)
    for i, stop in enumerate(stops):
        log = (run_dir / "results" / "logs" / f"train_job{i}.log").read_text()
        assert re.search(r"deadline: \S+ \(Slurm job \d+'s end time\)", log), log[-3000:]
        assert f"stopping at step {stop} before the deadline" in log, log[-3000:]
        assert f"saved results/checkpoints/step_{stop:08d}" in log, log[-3000:]
    assert trained_steps(checkpoints) == list(range(1, stops[1] + 1))  # no step lost, none trained twice

    # Each job ended COMPLETED, by itself, inside its 1-minute limit.
    by_rule = slurm_jobs_by_rule(run_dir)
    only_training_ran(by_rule)
    train_jobs = [j for j in slurm_cluster.completed_jobs() if by_rule.get(j["JobID"], "").startswith("train_job")]
    assert sorted(by_rule[j["JobID"]] for j in train_jobs) == ["train_job/0", "train_job/1"]
    for job in train_jobs:
        assert job["State"] == "COMPLETED" and job["Timelimit"] == "00:01:00", job

    # The same config, uninterrupted (one local job, no wall time) for exactly that many steps and on as many
    # cores (slurm.cpus_per_gpu also sets a local job's threads), ends with the same weights.
    local = copy_with_data(small_demo_run, tmp_path / "local")
    (local / "c.yaml").write_text(endless_training(num_training_jobs="1", max_num_steps=str(stops[1])) + SLURM)
    result = snakemake(
        "--cores", "2", "results/checkpoints/job0.done", "--configfile", "config/config.yaml", "c.yaml", cwd=local
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert rules_run(result.stderr) == ["train_job"], result.stderr[-4000:]  # on the same data, made once
    chained = exported_weights(run_dir, stops[1], tmp_path / "chained_hf")
    uninterrupted = exported_weights(local, stops[1], tmp_path / "uninterrupted_hf")
    assert chained.keys() == uninterrupted.keys() and chained
    for name in chained:
        assert torch.equal(chained[name], uninterrupted[name]), name
