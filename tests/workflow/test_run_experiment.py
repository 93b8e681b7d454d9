"""scripts/run_experiment.py: the DAG through Snakemake's Python API with per-experiment overrides."""

from __future__ import annotations

import json
import subprocess
import sys


def run(workdir, *args):  # noqa: F811
    cmd = [sys.executable, "scripts/run_experiment.py", *args]
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=600)


def test_overrides_reach_the_run(workdir):  # noqa: F811
    result = run(
        workdir,
        "results/small/data/sft.jsonl",
        "--set", "output_dir=results/small",
        "--set", "demo.num_train_problems=300",
        "--set", "demo.num_seeds=2",
        "--set", "prepare_data.filters.split_arithmetic=false",
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    stats = json.loads((workdir / "results" / "small" / "data" / "sft.stats.json").read_text())
    assert stats["rows_read"] == 2 * (300 + 6)  # two seeds of 300 problems plus the 6 planted test problems
    assert "split_arithmetic" not in {s["stage"] for s in stats["funnel"]}
    assert not (workdir / "results" / "data").exists()  # everything went to the experiment's output_dir


def test_dry_run_plans_the_whole_chain_and_bad_overrides_name_the_key(workdir):  # noqa: F811
    result = run(workdir, "results/eval.json", "--executor", "dryrun", "--set", "training.num_training_jobs=3")
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-3000:]
    for job in range(3):
        assert f"results/checkpoints/job{job}.done" in text
    assert "eval_summary" in text
    # a dry run runs nothing; planning writes only the stage config files (a changed one is a rerun trigger)
    assert [p.name for p in (workdir / "results").iterdir()] == ["config"]
    result = run(workdir, "results/eval.json", "--executor", "dryrun", "--set", "training.learning_rat=0.1")
    assert result.returncode == 1
    assert "unknown config key 'training.learning_rat' (did you mean 'learning_rate'?)" in result.stdout + result.stderr
