"""What the Slurm profile plans for NeMo-Skills' 8 nodes x 8 GPUs example, without a cluster (dry run)."""

from __future__ import annotations

import re

import pytest

from sftflow import stage_config
from tests.conftest import snakemake, write_jsonl

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
    text = dry_run(workdir, EXAMPLE, OUT)
    train = resources(text, "train_job")
    assert len(train) == 4  # num_training_jobs
    for job in train:
        assert job["nodes"] == "8" and job["gres"] == "gpu:8" and job["tasks"] == "8" and job["mpi"] == "srun"
        assert job["tasks_per_gpu"] == "0"  # no --ntasks-per-gpu from the plugin
        assert job["runtime"] == "240"  # training.time_limit 04:00:00, also the trainer's deadline
        assert job["cpus_per_task"] == "128" and job["mem_mb"] == "480000"
        assert job["slurm_partition"] == "batch" and job["slurm_account"] == "my_account"
    # The launch each training job runs, as its shell command: srun starts one torchrun agent per node, which
    # rendezvous on the allocation's first node ({head}, {port} and {job_id} are filled in inside the job).
    launches = re.findall(r"scripts/train\.py launch (.*)", text)
    assert len(launches) == 4
    for i, line in enumerate(launches):
        assert line.startswith(
            f"--num-nodes 8 --master-port 29500 --procs-per-node 8 --done-file {OUT}/checkpoints/job{i}.done"
        )
        assert " -- srun --nodes=8 --ntasks=8 --ntasks-per-node=1 --kill-on-bad-exit=1 " in line
        assert (
            " -m torch.distributed.run --nnodes=8 --nproc-per-node=8 --rdzv-backend=c10d "
            "'--rdzv-endpoint={head}:{port}' '--rdzv-id=sftflow-{job_id}' "
        ) in line
        assert f"--job-index {i} --num-jobs 4 " in line
        assert line.endswith(f" --config {OUT}/config/train.json --config {OUT}/config/train.run.json")
    # the worker's config: the experiment's keys in the training stage files the workflow wrote while planning
    train = stage_config.read(workdir / OUT / "config" / "train.json")["training"]
    run = stage_config.read(workdir / OUT / "config" / "train.run.json")
    assert (run["training"]["num_nodes"], run["training"]["num_gpus"]) == (8, 8)
    assert run["training"]["tensor_model_parallel_size"] == 8 and run["training"]["time_limit"] == "04:00:00"
    assert run["packing"]["max_total_sequence_length"] == 8192 and train["backend"] == "fsdp"
    for job in resources(text, "generate"):
        assert job["nodes"] == "1" and job["gres"] == "gpu:8" and "mpi" not in job
    for rule in ("prepare_data", "pack_data", "convert_step", "average_checkpoints", "eval_summary"):
        for job in resources(text, rule):
            assert "gres" not in job and job["cpus_per_task"] == "4", rule
    assert f"vllm serve {OUT}/averaged_hf_model --host 127.0.0.1 --port '{{port}}' --tensor-parallel-size 8" in text
    assert "--benchmark gsm8k" in text and "--seeds 4" in text


def dry_run(cwd, example: str, out: str) -> str:
    write_jsonl(cwd / "generations" / "output-rs0.jsonl", [{"problem": "1+1", "generation": "\\boxed{2}"}])
    result = snakemake("-n", "-p", "--profile", "profiles/slurm", f"{out}/eval.json", "--configfile", example, cwd=cwd)
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-3000:]
    return text


@pytest.mark.parametrize(
    "example, nodes, layout",
    [
        (
            "llama3.1-8b-8x8-megatron",
            8,
            {
                "backend": "megatron",
                "tensor_model_parallel_size": 4,
                "pipeline_model_parallel_size": 2,
                "sequence_parallel": True,
            },
        ),
        (
            "qwen3-30b-a3b-megatron",
            4,
            {
                "backend": "megatron",
                "tensor_model_parallel_size": 2,
                "expert_model_parallel_size": 8,
                "sequence_parallel": True,
            },
        ),
    ],  # fmt: skip
)
def test_megatron_examples_plan_their_parallel_layout_into_every_training_job(workdir, example, nodes, layout):  # noqa: F811
    out = f"results/{example}"
    text = dry_run(workdir, f"config/examples/{example}.yaml", out)
    train = resources(text, "train_job")
    assert len(train) == 4
    for job in train:
        assert job["nodes"] == str(nodes) and job["gres"] == "gpu:8" and job["tasks"] == str(nodes)
    launches = re.findall(r"scripts/train\.py launch (.*)", text)
    assert len(launches) == 4
    for i, line in enumerate(launches):
        assert f" -- srun --nodes={nodes} --ntasks={nodes} --ntasks-per-node=1 " in line
        assert f" -m torch.distributed.run --nnodes={nodes} --nproc-per-node=8 " in line
        assert f"--job-index {i} --num-jobs 4 " in line
        assert line.endswith(f" --config {out}/config/train.json --config {out}/config/train.run.json")
    training = {
        **stage_config.read(workdir / out / "config" / "train.json")["training"],
        **stage_config.read(workdir / out / "config" / "train.run.json")["training"],
    }
    assert {key: training[key] for key in layout} == layout
    # the final model, step conversions and the average are exported from megatron checkpoints like fsdp ones
    assert len(resources(text, "convert_step")) == 3 and len(resources(text, "average_checkpoints")) == 1
