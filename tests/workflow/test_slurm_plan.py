"""What the Slurm profile plans for NeMo-Skills' 8 nodes x 8 GPUs example, without a cluster (dry run)."""

from __future__ import annotations

import re

from tests.conftest import write_jsonl
from tests.workflow.test_workflow import snakemake, workdir  # noqa: F401  (fixture)

EXAMPLE = "config/examples/llama3.1-8b-8x8.yaml"
OUT = "results/llama3.1-8b-8x8"


def resources(text: str, rule: str) -> list[dict[str, str]]:
    """The `resources:` line of every planned job of `rule`, as dicts."""
    found = []
    for block in text.split("\nrule ")[1:]:
        if block.startswith(f"{rule}:"):
            line = next(x for x in block.splitlines() if x.strip().startswith("resources:"))
            found.append(dict(kv.split("=", 1) for kv in re.split(r",\s*", line.split(":", 1)[1].strip())))
    return found


def test_example_plans_8_nodes_x_8_gpus_chained_jobs_and_vllm_eval(workdir):  # noqa: F811
    write_jsonl(workdir / "generations" / "output-rs0.jsonl", [{"problem": "1+1", "generation": "\\boxed{2}"}])
    result = snakemake(
        "-n", "-p", "--profile", "profiles/slurm", f"{OUT}/eval.json", "--configfile", EXAMPLE, cwd=workdir
    )
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-3000:]
    train = resources(text, "train_job")
    assert len(train) == 4  # num_training_jobs
    for job in train:
        assert job["nodes"] == "8" and job["gres"] == "gpu:8" and job["tasks"] == "8" and job["mpi"] == "srun"
        assert job["tasks_per_gpu"] == "0"  # no --ntasks-per-gpu from the plugin
        assert job["runtime"] == "240"  # training.time_limit 04:00:00, also the trainer's deadline
        assert job["cpus_per_task"] == "128" and job["mem_mb"] == "480000"
        assert job["slurm_partition"] == "batch" and job["slurm_account"] == "my_account"
    for job in resources(text, "generate"):
        assert job["nodes"] == "1" and job["gres"] == "gpu:8" and "mpi" not in job
    for rule in ("prepare_data", "pack_data", "convert_step", "average_checkpoints", "eval_summary"):
        for job in resources(text, rule):
            assert "gres" not in job and job["cpus_per_task"] == "4", rule
    assert f"vllm serve {OUT}/averaged_hf_model --host 127.0.0.1 --port '{{port}}' --tensor-parallel-size 8" in text
    assert "--benchmark gsm8k" in text and "--seeds 4" in text
