"""How a rule hands its job the config: one file per stage under results/config/, written while planning only when
its content changes, a tracked input of the stage's rules; keys that must rerun nothing are in <stage>.run.json."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import snakemake

CONFIG_DIR = ("results", "config")
DEMO = "output_dir: results\n"  # config/config.yaml as it is
OLD = 1_000_000_000  # a modification time (ns) long before any parse of the tests


def dry_run(workdir, config_text: str, target: str = "results/eval.json") -> str:
    (workdir / "c.yaml").write_text(config_text)
    result = snakemake("-n", "--cores", "1", target, "--configfile", "config/config.yaml", "c.yaml", cwd=workdir)
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-3000:]
    return text


def stage_files(workdir) -> dict[str, tuple[int, str]]:
    """{file name: (mtime in ns, text)} of results/config/."""
    folder = workdir.joinpath(*CONFIG_DIR)
    return {p.name: (p.stat().st_mtime_ns, p.read_text()) for p in sorted(folder.iterdir())}


def age_stage_files(workdir) -> None:
    import os

    for path in workdir.joinpath(*CONFIG_DIR).iterdir():
        os.utime(path, ns=(OLD, OLD))


def reasons(text: str) -> dict[str, str]:
    """{rule: its `reason:` line} of a dry run (the last job of a rule wins)."""
    return dict(re.findall(r"(?ms)^rule (\w+):\n.*?^\s+reason: ([^\n]*)", text))


def test_the_stage_files_change_only_with_their_keys(workdir):
    dry_run(workdir, DEMO)
    written = stage_files(workdir)
    assert sorted(written) == [
        "decontaminate.json",
        "demo.json",
        "eval.json",
        "eval.run.json",
        "pack_data.json",
        "prepare_data.json",
        "resolved.json",
        "train.json",
        "train.run.json",
    ]
    train = json.loads(written["train.json"][1])["training"]
    run = json.loads(written["train.run.json"][1])
    assert "learning_rate" in train and "train_micro_batch_size" not in train and "log_period" not in train
    assert run["training"]["train_micro_batch_size"] and "learning_rate" not in run["training"] and run["packing"]
    assert "max_new_tokens" in json.loads(written["eval.json"][1])
    assert set(json.loads(written["eval.run.json"][1])) >= {"concurrency", "request_timeout"}

    # (1) a second parse with the same config touches nothing
    age_stage_files(workdir)
    dry_run(workdir, DEMO)
    assert {name: mtime for name, (mtime, _) in stage_files(workdir).items()} == dict.fromkeys(written, OLD)

    # an untracked key (micro-batch size, log period) changes only the run file; a tracked one the stage file
    dry_run(workdir, "training:\n  train_micro_batch_size: 1\n  log_period: 3\n")
    changed = {name for name, (mtime, _) in stage_files(workdir).items() if mtime != OLD}
    assert changed == {"train.run.json", "resolved.json"}
    age_stage_files(workdir)
    dry_run(workdir, "training:\n  train_micro_batch_size: 1\n  log_period: 3\n  learning_rate: 0.001\n")
    changed = {name for name, (mtime, _) in stage_files(workdir).items() if mtime != OLD}
    assert changed == {"train.json", "resolved.json"}
    age_stage_files(workdir)
    # packing.enabled / algorithm are the trainer's (how a step's sequences fill bins): not pack_data's file
    dry_run(
        workdir,
        "training:\n  train_micro_batch_size: 1\n  log_period: 3\n  learning_rate: 0.001\n"
        "packing:\n  algorithm: first_fit_decreasing\n  enabled: false\n",
    )
    changed = {name for name, (mtime, _) in stage_files(workdir).items() if mtime != OLD}
    assert changed == {"train.run.json", "resolved.json"}
    age_stage_files(workdir)
    dry_run(workdir, "eval:\n  concurrency: 5\n")  # back to the default training: train.run.json too
    changed = {name for name, (mtime, _) in stage_files(workdir).items() if mtime != OLD}
    assert changed == {"train.json", "train.run.json", "eval.run.json", "resolved.json"}
    age_stage_files(workdir)
    # the held-out validation share is pack_data's (it repacks), and the trainer reads what it holds out
    text = dry_run(workdir, "eval:\n  concurrency: 5\ntraining:\n  val_set_size: 0.1\n  val_period: 5\n")
    changed = {name for name, (mtime, _) in stage_files(workdir).items() if mtime != OLD}
    assert changed == {"pack_data.json", "train.run.json", "resolved.json"}
    assert json.loads(stage_files(workdir)["pack_data.json"][1])["held_out"] == {
        "val_set_size": 0.1,
        "val_set_seed": 42,
    }
    assert "output: results/data/packed_validation, results/data/packed" in text, text[-3000:]


def test_a_refused_config_writes_no_stage_file(workdir):
    (workdir / "bad.yaml").write_text("eval:\n  benchmarks: 'gsm8k:x'\n")
    result = snakemake("-n", "--cores", "1", "--configfile", "config/config.yaml", "bad.yaml", cwd=workdir)
    assert result.returncode != 0
    assert not (workdir / "results").exists()


def test_a_changed_key_reruns_exactly_the_jobs_whose_file_holds_it(workdir):
    # decontamination and the config page, run for real (the cheapest jobs that read a stage file)
    (workdir / "c.yaml").write_text(DEMO)
    targets = ("results/data/contamination.jsonl", "results/report/config.html")
    result = snakemake("--cores", "2", *targets, "--configfile", "config/config.yaml", "c.yaml", cwd=workdir)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    text = dry_run(workdir, DEMO, targets[0])
    assert "Nothing to be done" in text

    # (2) a tracked key: the job reruns, and its reason names the file
    text = dry_run(workdir, "prepare_data:\n  decontamination:\n    ngram_size: 5\n", targets[0])
    assert reasons(text)["decontaminate"] == "Updated input files: results/config/decontaminate.json", text[-3000:]
    assert set(reasons(text)) == {"decontaminate"}

    # a key of another stage (it changes prepare_data.json, not decontaminate.json) reruns nothing here
    text = dry_run(workdir, "prepare_data:\n  max_solution_length: 100\n", targets[0])
    assert "Nothing to be done" in text, text[-3000:]

    # (4) the config page reruns on any config change, and its reason is the file, not the whole config
    text = dry_run(workdir, "eval:\n  max_new_tokens: 17\n", targets[1])
    assert reasons(text) == {"report_config": "Updated input files: results/config/resolved.json"}, text[-3000:]
    assert "max_new_tokens" not in text and "Params have changed" not in text


@pytest.mark.slow  # runs the three demo rules (about 20 s)
def test_the_demo_section_in_another_key_order_reruns_no_demo_rule(workdir):
    """The demo rules read results/config/demo.json (canonical JSON): a config file that lists the same demo
    keys in another order (e.g. a YAML dump with sorted keys) is the same experiment. As `params:`, the section
    was compared as an ordered dict, and the reordered file reran the demo and everything made from it."""
    import yaml

    targets = ["results/demo/base_model", "results/demo/generations/output-rs0.jsonl"]
    result = snakemake("--cores", "1", *targets, cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    config = yaml.safe_load((workdir / "config" / "config.yaml").read_text())
    reordered = dict(reversed(list(config["demo"].items())))
    assert list(reordered) != list(config["demo"])

    def dry_run_alone(demo: dict) -> str:  # the user's file alone, as `--configfile my.yaml` runs
        (workdir / "my.yaml").write_text(yaml.safe_dump({**config, "demo": demo}, sort_keys=False))
        result = snakemake("-n", "--cores", "1", *targets, "--configfile", "my.yaml", cwd=workdir)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout + result.stderr

    text = dry_run_alone(reordered)
    assert "Nothing to be done" in text, reasons(text)
    # a changed demo key is a change: the demo rules rerun, naming the file
    text = dry_run_alone({**reordered, "num_train_problems": 50})
    assert reasons(text)["demo_generations"] == "Updated input files: results/config/demo.json"
