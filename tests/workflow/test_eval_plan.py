"""How the eval stage is planned: server command lines in `snakemake -n -p`, models, seeds, config errors."""

from __future__ import annotations

import shlex

import pytest

from sftflow.evaluation.settings import EvalSettings
from tests.conftest import SHARED_DATA, read_jsonl, snakemake


def plan(workdir, config_text: str, target: str = "results/eval.json"):  # noqa: F811
    (workdir / "c.yaml").write_text(config_text)
    return snakemake("-n", "-p", "--cores", "1", target, "--configfile", "config/config.yaml", "c.yaml", cwd=workdir)


@pytest.mark.parametrize(
    "server, expected",
    [
        (
            'server_type: vllm\n  server_gpus: 8\n  server_args: "--max-model-len 8192 --gpu-memory-utilization 0.9"',
            "vllm serve results/final_hf_model --host 127.0.0.1 --port '{port}' --tensor-parallel-size 8 "
            "--trust-remote-code --seed 0 --max-model-len 8192 --gpu-memory-utilization 0.9",
        ),
        (
            "server_type: sglang\n  server_gpus: 4",
            "-m sglang.launch_server --model-path results/final_hf_model --host 127.0.0.1 --port '{port}' --tp 4",
        ),
        (
            "server_type: trtllm\n  server_gpus: 2",
            "trtllm-serve results/final_hf_model --host 127.0.0.1 --port '{port}' --tp_size 2 --backend pytorch",
        ),
        (
            "server_type: transformers\n  server_gpus: 0",
            "-m transformers.cli.transformers serve results/final_hf_model --host 127.0.0.1 --port '{port}' "
            "--device cpu",
        ),
    ],
)
def test_server_command_lines_in_dry_run(workdir, server, expected):  # noqa: F811
    result = plan(workdir, f"eval:\n  {server}\n")
    assert result.returncode == 0, result.stdout + result.stderr
    assert expected in result.stdout + result.stderr


def test_openai_server_type_starts_nothing_and_needs_an_address(workdir):  # noqa: F811
    result = plan(workdir, "eval:\n  server_type: openai\n")
    assert result.returncode != 0
    assert (
        "config key 'eval.server_address' is null, but 'eval.server_type' is 'openai'" in result.stdout + result.stderr
    )
    result = plan(workdir, "eval:\n  server_type: openai\n  server_address: http://h:8000/v1\n  server_model: m\n")
    assert result.returncode == 0, result.stdout + result.stderr
    text = result.stdout + result.stderr
    generate_line = next(line for line in text.splitlines() if "scripts/generate.py" in line)
    assert generate_line.rstrip().endswith("--")  # no server command after '--'


def test_untrusted_config_values_are_quoted(workdir):  # noqa: F811
    result = plan(workdir, "eval:\n  server_args: \"--x '$(touch pwned)'; rm -rf /\"\n  server_model: 'a b;c'\n")
    assert result.returncode == 0, result.stdout + result.stderr
    text = result.stdout + result.stderr
    line = next(line for line in text.splitlines() if "scripts/generate.py" in line)
    words = shlex.split(line)  # what /bin/sh will see: every config value stays one literal argument
    assert words[-5:] == ["--x", "$(touch pwned);", "rm", "-rf", "/"]
    files = [words[i + 1] for i, word in enumerate(words[: words.index("--")]) if word == "--config"]
    assert files == ["results/config/eval.json", "results/config/eval.run.json"]
    assert EvalSettings.from_files(*(workdir / f for f in files)).server_model == "a b;c"


def test_models_and_seeds_fan_out(workdir):  # noqa: F811
    config = (
        "training:\n  max_num_steps: 300\n  save_period: 100\n  average_steps: [100, 200, 300]\n"
        "eval:\n  benchmarks: 'demo:3'\n  models: [averaged, base, final, step_200]\n"
    )
    result = plan(workdir, config)
    text = result.stdout + result.stderr
    assert result.returncode == 0, text
    for model in ("averaged", "base", "final", "step_200"):
        assert f"results/eval/{model}/demo" in text, model
    assert "rule average_checkpoints:" in text and "results/hf_models/step_100" in text
    assert "--seeds 3" in text
    assert "--model results/demo/base_model" in text


@pytest.mark.parametrize(
    "config_text, message",
    [
        ("eval:\n  benchmarks: 'gsm8k:4,aime'\n", "eval.benchmarks: unknown benchmark 'aime'"),
        ("eval:\n  benchmarks: 'gsm8k:x'\n", "eval.benchmarks: bad number of seeds 'x'"),
        ("eval:\n  models: [averaged]\n", "'eval.models' lists 'averaged', but 'training.average_steps' is null"),
        ("eval:\n  models: [last]\n", "config key 'eval.models.0'"),
        (
            "training:\n  save_period: 100\n  max_num_steps: 1000\n  average_steps: [100, 150]\n",
            "step 150 is never saved",
        ),
        ("eval:\n  benchmark_files: {aime: x.jsonl}\n", "config key 'eval.benchmark_files.aime': unknown benchmark"),
        ("eval:\n  server_type: tgi\n", "config key 'eval.server_type'"),
    ],
)
def test_bad_eval_config_fails_at_planning(workdir, config_text, message):  # noqa: F811
    result = plan(workdir, config_text)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr
    assert not (workdir / "results").exists()


@pytest.mark.skipif(not (SHARED_DATA / "gsm8k" / "test.jsonl").exists(), reason="../shared/data absent")
def test_benchmarks_prepared_from_local_files_and_decontaminated_against(workdir):  # noqa: F811
    config = (
        "eval:\n  benchmarks: 'gsm8k:4,math500,demo'\n"
        f"  benchmark_files:\n    gsm8k: {SHARED_DATA / 'gsm8k' / 'test.jsonl'}\n"
        f"    math500: {SHARED_DATA / 'math500' / 'test.jsonl'}\n"
    )
    (workdir / "c.yaml").write_text(config)
    result = snakemake(
        "--cores", "2", "results/data/contamination.jsonl", "--configfile", "config/config.yaml", "c.yaml", cwd=workdir
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    gsm8k = read_jsonl(workdir / "results" / "benchmarks" / "gsm8k" / "test.jsonl")
    math500 = read_jsonl(workdir / "results" / "benchmarks" / "math500" / "test.jsonl")
    assert len(gsm8k) == 1319 and len(math500) == 500
    assert gsm8k[0]["expected_answer"] == "18" and "<<" not in gsm8k[0]["reference_solution"]
    assert all(row["problem"] and row["expected_answer"] for row in gsm8k + math500)
    log = (workdir / "results" / "logs" / "decontaminate.log").read_text()
    assert "'test_problems': 2019" in log  # 1319 + 500 + the demo's 200


def test_a_benchmark_that_cannot_be_downloaded_fails_naming_the_local_option(workdir):  # noqa: F811
    (workdir / "c.yaml").write_text("eval:\n  benchmarks: gsm8k\n")
    result = snakemake(
        "--cores",
        "1",
        "results/benchmarks/gsm8k/test.jsonl",
        "--configfile",
        "config/config.yaml",
        "c.yaml",
        cwd=workdir,
    )
    text = result.stdout + result.stderr
    assert result.returncode != 0
    assert "could not download benchmark 'gsm8k'" in text and "eval.benchmark_files.gsm8k" in text
    assert not (workdir / "results" / "benchmarks" / "gsm8k" / "test.jsonl").exists()
