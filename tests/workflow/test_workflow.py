"""The workflow as users drive it: dry-run planning, config validation, lint, and the demo's data stage run for real."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import read_jsonl, snakemake


def test_dry_run_plans_every_stage(workdir):
    result = snakemake("-n", "--cores", "1", "results/eval.json", cwd=workdir)
    assert result.returncode == 0, result.stderr
    text = result.stdout + result.stderr
    for rule in (
        "demo_tokenizer",
        "demo_base_model",
        "demo_generations",
        "decontaminate",
        "prepare_data",
        "pack_data",
        "train_job",
        "convert_final",
        "generate",
        "eval_summary",
        "report_data",  # results/eval.json brings the report's pages (issue 12: --report after eval.json)
        "report_training",
        "report_config",
    ):
        assert f"rule {rule}:" in text, rule


def test_a_base_model_only_eval_trains_nothing_and_brings_only_the_config_page(workdir):
    (workdir / "base.yaml").write_text("eval:\n  models: [base]\n")
    result = snakemake("-n", "--cores", "1", "--configfile", "config/config.yaml", "base.yaml", cwd=workdir)
    assert result.returncode == 0, result.stderr
    text = result.stdout + result.stderr
    for rule in ("generate", "eval_summary", "report_config"):
        assert f"rule {rule}:" in text, rule
    for rule in ("train_job", "pack_data", "report_data", "report_training"):
        assert f"rule {rule}:" not in text, rule


def test_dry_run_has_one_training_job_per_chained_job(workdir):
    (workdir / "three.yaml").write_text("training:\n  num_training_jobs: 3\n")
    result = snakemake(
        "-n", "--cores", "1", "results/eval.json", "--configfile", "config/config.yaml", "three.yaml", cwd=workdir
    )
    assert result.returncode == 0, result.stderr
    text = result.stdout + result.stderr
    for job in range(3):
        assert f"results/checkpoints/job{job}.done" in text


@pytest.mark.parametrize(
    "config_text, message",
    [
        (
            "prepare_data:\n  filters:\n    drop_multi_boxd: true\n",
            "unknown config key 'prepare_data.filters.drop_multi_boxd' (did you mean 'drop_multi_boxed'?)",
        ),
        ("training:\n  backend: tpu\n", "config key 'training.backend': 'tpu' is not one of"),
        ("prepare_data:\n  skip_first: -1\n", "config key 'prepare_data.skip_first'"),
        ("demo:\n  enabled: false\n", "config key 'prepare_data.input_files' is null but 'demo.enabled' is false"),
        ("outptu_dir: x\n", "unknown config key 'outptu_dir' (did you mean 'output_dir'?)"),
    ],
)
def test_invalid_config_fails_before_any_job_naming_the_key(workdir, config_text, message):
    (workdir / "bad.yaml").write_text(config_text)
    result = snakemake("-n", "--cores", "1", "--configfile", "bad.yaml", cwd=workdir)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert not (workdir / "results").exists()


def test_user_input_glob_that_matches_nothing_fails_at_planning(workdir):
    (workdir / "mine.yaml").write_text("prepare_data:\n  input_files: nowhere/output-rs*.jsonl\n")
    result = snakemake("-n", "--cores", "1", "--configfile", "config/config.yaml", "mine.yaml", cwd=workdir)
    assert result.returncode != 0
    assert "input_files pattern 'nowhere/output-rs*.jsonl' matches no file" in result.stdout + result.stderr


def test_demo_data_stage_runs_for_real(workdir):
    result = snakemake("--cores", "2", "results/data/sft.jsonl", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    results = workdir / "results"
    stats = json.loads((results / "data" / "sft.stats.json").read_text())
    rows = read_jsonl(results / "data" / "sft.jsonl")
    demo = yaml.safe_load((workdir / "config" / "config.yaml").read_text())["demo"]
    assert stats["rows_written"] == len(rows) > 500
    assert stats["rows_read"] == demo["num_seeds"] * (demo["num_train_problems"] + 6)
    by_stage = {s["stage"]: s for s in stats["funnel"]}
    for stage in (
        "drop_multi_boxed",
        "remove_contaminated",
        "remove_code_errors",
        "remove_matplotlib",
        "remove_verification_code",
        "drop_incorrect_arithmetic",
        "remove_len_outlier_solutions",
        "deduplicate",
    ):
        assert by_stage[stage]["dropped"] > 0, stage
    for stage in ("trim_prefix", "trim_solutions", "split_arithmetic"):
        assert by_stage[stage]["modified"] > 0, stage
    # the planted benchmark problems (verbatim and re-cased/re-spaced copies) are gone
    bench = read_jsonl(results / "benchmarks" / "demo" / "test.jsonl")
    from sftflow.mathtext import normalize_problem

    test_problems = {normalize_problem(b["problem"]) for b in bench}
    contamination = read_jsonl(results / "data" / "contamination.jsonl")
    assert sum(c["contaminated"] for c in contamination) == 6
    # ... and the stats list them for audit: verbatim copies and copies differing in case/spacing/punctuation
    matches = by_stage["remove_contaminated"]["matches"]
    assert len(matches) == 6 and {m["benchmark"] for m in matches} == {"demo"}
    assert {normalize_problem(m["matched_problem"]) for m in matches} <= test_problems
    assert any(m["problem"] != m["matched_problem"] for m in matches)  # a re-cased / re-spaced copy
    assert any(m["problem"] == m["matched_problem"] for m in matches)
    assert not any(
        normalize_problem(r["input"].split("\n\n", 1)[1].split("<|im_end|>")[0]) in test_problems for r in rows
    )
    log = (results / "logs" / "prepare_data.log").read_text()
    assert "wrote" in log and "remove_contaminated" in log
    # every output: the demo model loads and its tokenizer has the chat template
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(results / "demo" / "base_model")
    tok = AutoTokenizer.from_pretrained(results / "demo" / "base_model")
    assert model.config.model_type == "llama" and tok.chat_template
    # rerunning plans nothing
    again = snakemake("-n", "--cores", "2", "results/data/sft.jsonl", cwd=workdir)
    assert "Nothing to be done" in again.stdout + again.stderr
