"""`snakemake --profile profiles/slurm` against a live two-node Slurm cluster on localhost (tests/slurm/cluster.py).

Every job of the small demo runs as its own Slurm job (checked with `sacct --completion`), the chained
training jobs run in order, and results/eval.json equals a local run's. A second test trains across two
Slurm nodes: srun starts one torchrun agent per node and the ranks rendezvous over c10d.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.workflow.test_demo_training import SMALL_TRAINING
from tests.workflow.test_workflow import SNAKEMAKE, copy_workflow, snakemake, workdir  # noqa: F401  (fixture)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# Resources sized for the test cluster (2 nodes x 2 CPUs, 8 GB each): config keys, not profile edits.
SLURM = """
slurm:
  gpus: false
  cpu_cpus: 1
  cpu_mem_mb: 1500
  cpus_per_gpu: 1
  mem_mb_per_gpu: 3000
  cpu_runtime: 20
  train_runtime: 20
  eval_runtime: 20
"""
EVAL = """
eval:
  models: [final]
  server_gpus: 0
  max_new_tokens: 24
  max_samples: 8
  concurrency: 2
"""
# Options for a cluster without accounting: status from squeue, no account to guess (see README).
NO_ACCOUNTING = ("--slurm-status-command", "squeue", "--slurm-no-account")


def run_on_slurm(cluster, workdir: Path, target: str, configfile: str) -> subprocess.CompletedProcess:  # noqa: F811
    cmd = [SNAKEMAKE, "--profile", "profiles/slurm", target, *NO_ACCOUNTING]
    cmd += ["--slurm-init-seconds-before-status-checks", "2", "--seconds-between-status-checks", "2"]
    cmd += ["--configfile", configfile]
    return subprocess.run(cmd, cwd=workdir, env=cluster.env(), capture_output=True, text=True, timeout=1500)


def slurm_jobs_by_rule(root: Path) -> dict[str, str]:
    """Slurm job id -> "rule[/wildcards]", from the plugin's per-job logs (.snakemake/slurm_logs/rule_*/...)."""
    found = {}
    for log in (root / ".snakemake" / "slurm_logs").rglob("*.log"):
        rel = log.relative_to(root / ".snakemake" / "slurm_logs")
        found[log.stem] = "/".join(rel.parts[:-1]).removeprefix("rule_")
    return found


def test_profile_runs_every_job_on_slurm_and_matches_a_local_run(slurm_cluster, workdir, tmp_path):  # noqa: F811
    config = SMALL_TRAINING + EVAL + SLURM
    (workdir / "c.yaml").write_text(config)
    result = run_on_slurm(slurm_cluster, workdir, "results/eval.json", "c.yaml")
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]

    # One Slurm job per Snakemake job, all COMPLETED, read back with sacct.
    completed = {job["JobID"]: job for job in slurm_cluster.completed_jobs()}
    by_rule = slurm_jobs_by_rule(workdir)
    rules = sorted(r.split("/")[0] for r in by_rule.values())
    assert rules == sorted(
        ["demo_tokenizer", "demo_base_model", "demo_generations", "decontaminate", "prepare_data", "pack_data"]
        + ["train_job", "train_job", "convert_final", "generate", "eval_summary"]
    ), by_rule
    for job_id, rule in by_rule.items():
        assert completed[job_id]["State"] == "COMPLETED", (rule, completed[job_id])
    submitted = re.findall(r"submitted with SLURM jobid (\d+)", result.stdout + result.stderr)
    assert sorted(submitted) == sorted(by_rule)

    # The chained training jobs ran in order, each as its own Slurm job.
    done = [json.loads((workdir / "results" / "checkpoints" / f"job{i}.done").read_text()) for i in range(2)]
    assert [(d["start_step"], d["end_step"]) for d in done] == [(0, 6), (6, 12)]
    train = sorted(
        (completed[j]["Start"], completed[j]["End"]) for j, r in by_rule.items() if r.startswith("train_job")
    )
    assert len(train) == 2 and train[0][1] <= train[1][0]  # the second started after the first ended

    # The same config run locally gives the same evaluation.
    local = copy_workflow(tmp_path / "local")
    (local / "c.yaml").write_text(config)
    result = snakemake("--cores", "2", "results/eval.json", "--configfile", "c.yaml", cwd=local)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]

    def scores(root: Path) -> dict:
        summary = json.loads((root / "results" / "eval.json").read_text())
        timing = ("avg_gen_seconds", "total_gen_seconds")
        return {m: {b: {k: v for k, v in r.items() if k not in timing} for b, r in per.items()}
                for m, per in summary["results"].items()}  # fmt: skip

    assert scores(workdir) == scores(local)
    outputs = [(root / "results" / "eval" / "final" / "demo" / "output.jsonl").read_text() for root in (workdir, local)]
    strip = [
        [{k: v for k, v in json.loads(x).items() if k != "generation_seconds"} for x in o.splitlines()] for o in outputs
    ]
    assert strip[0] == strip[1]


def test_training_spans_two_slurm_nodes(slurm_cluster, workdir):  # noqa: F811
    config = SMALL_TRAINING.replace("num_training_jobs: 2", "num_training_jobs: 1").replace(
        "max_num_steps: 12", "max_num_steps: 4\n  num_nodes: 2\n  num_gpus: 1"
    )
    (workdir / "c.yaml").write_text(config + SLURM)
    result = run_on_slurm(slurm_cluster, workdir, "results/checkpoints/job0.done", "c.yaml")
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    done = json.loads((workdir / "results" / "checkpoints" / "job0.done").read_text())
    assert done["complete"] and done["end_step"] == 4
    assert sorted(done["ranks"]) == ["node1/0", "node2/0"]  # rank 0 and rank 1 on different Slurm nodes
    log = (workdir / "results" / "logs" / "train_job0.log").read_text()
    assert "launching: srun --nodes=2 --ntasks=2 --ntasks-per-node=1" in log
    assert "--nnodes=2 --nproc-per-node=1 --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:" in log
    (train_job,) = [j for j, rule in slurm_jobs_by_rule(workdir).items() if rule.startswith("train_job")]
    (record,) = [j for j in slurm_cluster.completed_jobs() if j["JobID"] == train_job]
    assert record["NNodes"] == "2" and record["State"] == "COMPLETED"
