"""The demo trained for real by snakemake: chained jobs, final_hf_model, and raising max_num_steps later."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

import pytest
import torch

from tests.conftest import SMALL_TRAINING, copy_with_data, rules_run, snakemake

SMALL = (
    SMALL_TRAINING
    + """
eval:
  models: [final, base]
  server_gpus: 0
  max_new_tokens: 24
  max_samples: 8
  concurrency: 2
"""
)


def metrics(root):
    path = root / "results" / "checkpoints" / "metrics" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_demo_trains_chained_jobs_and_exports_then_continues(small_demo_run, tmp_path):
    # The data stages are the shared run's (the small demo's data); everything from training on runs here.
    workdir = copy_with_data(small_demo_run, tmp_path / "run")
    (workdir / "small.yaml").write_text(SMALL)
    result = snakemake(
        "--cores", "2", "results/final_hf_model", "--configfile", "config/config.yaml", "small.yaml", cwd=workdir
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert rules_run(result.stderr) == ["train_job", "train_job", "convert_final"], result.stderr[-4000:]
    results = workdir / "results"
    jobs = [json.loads((results / "checkpoints" / f"job{i}.done").read_text()) for i in range(2)]
    assert [(j["start_step"], j["end_step"]) for j in jobs] == [(0, 6), (6, 12)]
    assert jobs[1]["complete"] is True
    steps = [m["step"] for m in metrics(workdir) if "loss" in m]
    assert steps == list(range(1, 13))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(results / "final_hf_model")
    tok = AutoTokenizer.from_pretrained(results / "final_hf_model")
    assert model.config.model_type == "llama" and tok.chat_template
    assert (results / "final_hf_model" / "generation_config.json").exists()
    packed_stats = json.loads((results / "data" / "packed" / "stats.json").read_text())
    assert packed_stats["sequences_kept"] > 0 and packed_stats["overlong"]["action"] == "mask"

    # Raising max_num_steps continues from the last checkpoint: job 0 is not redone.
    (workdir / "more.yaml").write_text(SMALL.replace("max_num_steps: 12", "max_num_steps: 16"))
    plan = snakemake(
        "-n", "--cores", "2", "results/final_hf_model", "--configfile", "config/config.yaml", "more.yaml", cwd=workdir
    )
    planned = plan.stdout + plan.stderr
    assert "results/checkpoints/job1.done" in planned and "output: results/checkpoints/job0.done" not in planned
    result = snakemake(
        "--cores", "2", "results/final_hf_model", "--configfile", "config/config.yaml", "more.yaml", cwd=workdir
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    steps = [m["step"] for m in metrics(workdir) if "loss" in m]
    assert steps == list(range(1, 17))  # steps 13..16 added, 1..12 not trained again
    job0 = json.loads((results / "checkpoints" / "job0.done").read_text())
    assert (job0["start_step"], job0["end_step"]) == (0, 6)

    # Evaluation: both models served by a real `transformers serve`, graded, gathered in eval.json.
    result = snakemake(
        "--cores", "2", "results/eval.json", "--configfile", "config/config.yaml", "more.yaml", cwd=workdir
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    summary = json.loads((results / "eval.json").read_text())
    assert set(summary["results"]) == {"final", "base"}
    for model in ("final", "base"):
        scores = summary["results"][model]["demo"]
        assert scores["num_entries"] == 8 and scores["num_samples"] == 1 and 0 <= scores["pass@1"] <= 100
        rows = [
            json.loads(line) for line in (results / "eval" / model / "demo" / "output.jsonl").read_text().splitlines()
        ]
        assert len(rows) == 8 and all({"generation", "predicted_answer", "symbolic_correct"} <= set(r) for r in rows)
        assert all(r["num_generated_tokens"] <= 24 for r in rows)
        assert "inference server healthy" in (results / "logs" / f"generate_{model}_demo.log").read_text()
    assert summary["models"]["base"] == "results/demo/base_model"
    assert "final / demo" in (results / "eval.md").read_text()
    assert "final / demo" in result.stdout  # the table is printed
    assert not (results / "eval" / ".inprogress" / "final" / "demo").exists()

    # A setting that changes the answers reruns every model's evaluation (issue 12: max_samples 8 -> 6 was
    # "Nothing to be done"); one that does not (concurrency) reruns nothing, nor does a training key outside
    # the tracked train.json (the micro-batch size: same maths, in train.run.json).
    more = (workdir / "more.yaml").read_text()
    for name, text, reruns in (("fewer", more.replace("max_samples: 8", "max_samples: 6"), True),
                               ("faster", more.replace("concurrency: 2", "concurrency: 3"), False),
                               ("smaller", more.replace("train_micro_batch_size: 2", "train_micro_batch_size: 1"),
                                False)):  # fmt: skip
        assert text != more
        (workdir / f"{name}.yaml").write_text(text)
        plan = snakemake(
            "-n", "--cores", "2", "results/eval.json", "--configfile", "config/config.yaml", f"{name}.yaml", cwd=workdir
        )
        planned = plan.stdout + plan.stderr
        assert plan.returncode == 0, planned[-3000:]
        for model in ("final", "base"):
            assert (f"output: results/eval/{model}/demo" in planned) is reruns, planned[-3000:]
        if reruns:
            assert "reason: Updated input files: results/config/eval.json" in planned, planned[-3000:]
        assert "train_job" not in planned and "convert_final" not in planned

    # Deleting a stage's target (issue 12: "Nothing to be done"): the workflow names the command that rebuilds
    # it and everything made from it; that command plans exactly that.
    config = ("--configfile", "config/config.yaml", "more.yaml")
    stages = {
        "results/data/sft.jsonl": [
            "prepare_data", "pack_data", "train_job", "convert_final", "generate", "report_data", "report_training"
        ],
        "results/data/packed": ["pack_data", "train_job", "convert_final", "generate", "report_data", "report_training"],
        "results/final_hf_model": ["convert_final", "generate"],
        "results/eval/final/demo": ["generate"],
        "results/report/training_summary.html": ["report_training"],  # a report page: `--report` needs it
        "results/report/config.html": ["report_config"],
    }  # fmt: skip
    for target, rules in stages.items():
        aside = workdir / "aside"
        (workdir / target).rename(aside)
        plan = snakemake("-n", "--cores", "2", "results/eval.json", *config, cwd=workdir)
        text = plan.stdout + plan.stderr
        assert plan.returncode == 0 and "Nothing to be done" in text, text[-3000:]  # Snakemake alone: nothing
        hint = re.search(rf"sftflow: {target} was deleted, .*\n    (snakemake .*)", text)
        assert hint, text[-3000:]
        command = shlex.split(hint.group(1))
        assert command[-2:] == ["--forcerun", target] and command[1:-2] == [
            "-n",
            "--cores",
            "2",
            "results/eval.json",
            *config,
        ]
        plan = snakemake(*command[1:], cwd=workdir)
        text = plan.stdout + plan.stderr
        assert plan.returncode == 0, text[-3000:]
        for rule in [*rules, "eval_summary"]:
            assert f"rule {rule}:" in text, (target, rule, text[-3000:])
        assert "sftflow: " not in text  # asked for, so no hint
        aside.rename(workdir / target)

    # The eval outputs are NeMo-Skills generation files: prepare_data reads them back (rejection sampling).
    prepared = subprocess.run(
        [sys.executable, "scripts/prepare_data.py", "++input_files=results/eval/*/demo/output.jsonl",
         "++output_path=resampled/sft.jsonl", "++add_incorrect=true", "++filters.remove_contaminated=false",
         "++tokenizer=results/final_hf_model"],
        cwd=workdir, capture_output=True, text=True,
    )  # fmt: skip
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    stats = json.loads((workdir / "resampled" / "sft.stats.json").read_text())
    assert stats["rows_read"] == 16  # 8 problems x 2 models
    assert stats["selection"]["correct_seen"] + stats["selection"]["incorrect_seen"] == 16

    # Averaging saved steps: exported step by step, then averaged tensor by tensor.
    (workdir / "avg.yaml").write_text(
        SMALL.replace("  save_period: 5\n", "  save_period: 5\n  average_steps: [10, 5]\n")
    )
    result = snakemake(
        "--cores", "2", "results/averaged_hf_model", "--configfile", "config/config.yaml", "avg.yaml", cwd=workdir
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    record = json.loads((results / "averaged_hf_model" / "sftflow_average.json").read_text())
    assert record["steps"] == [5, 10]
    from safetensors.torch import load_file

    def weights(model_dir):
        (file,) = sorted((results / model_dir).glob("*.safetensors"))
        return load_file(file)

    step5, step10, averaged = weights("hf_models/step_5"), weights("hf_models/step_10"), weights("averaged_hf_model")
    assert averaged.keys() == step5.keys()
    for name, tensor in averaged.items():
        assert torch.allclose(tensor, (step5[name] + step10[name]) / 2, atol=1e-6), name
    assert any(not torch.equal(step5[name], step10[name]) for name in step5)  # the steps do differ

    # remove_checkpoints_after_average: once the averaged model and every export exist, the averaged steps'
    # checkpoints go, the newest stays (a later run resumes from it), and no model made from them is remade.
    avg = (workdir / "avg.yaml").read_text()
    flag = "  average_steps: [10, 5]\n  remove_checkpoints_after_average: true\n"
    (workdir / "avg_rm.yaml").write_text(avg.replace("  average_steps: [10, 5]\n", flag))
    removal = ("results/averaged_hf_model", "results/checkpoints/averaged_removed.json")
    config = ("--configfile", "config/config.yaml", "avg_rm.yaml")
    result = snakemake("--cores", "2", *removal, *config, cwd=workdir)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    ran = rules_run(result.stderr)
    assert ran[-1] == "remove_averaged_checkpoints" and not {"train_job", "convert_step"} & set(ran), ran
    record = json.loads((results / "checkpoints" / "averaged_removed.json").read_text())
    assert record["removed"] == [5, 10] and record["freed_bytes"] > 0
    left = sorted(p.name for p in (results / "checkpoints").glob("step_*"))
    assert left == ["step_00000006", "step_00000012", "step_00000015", "step_00000016"], left
    plan = snakemake("-n", "--cores", "2", *removal, "results/final_hf_model", *config, cwd=workdir)
    assert "Nothing to be done" in plan.stdout + plan.stderr, (plan.stdout + plan.stderr)[-3000:]
