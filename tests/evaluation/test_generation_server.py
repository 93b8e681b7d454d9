"""The eval path against a real `transformers serve` process on localhost: no mock of client or server.

A tiny random Llama model is served; generate.py starts the server, sends the requests, grades and
writes NeMo-Skills-format outputs. One test kills the server mid-run (after it answered exactly 6 requests:
tests/evaluation/gated_server.py holds the rest, so the run is mid-way on any machine) and checks that the rerun sends
only the missing requests (counted in the server's own access log) and that the outputs equal an
uninterrupted run's (greedy).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sftflow.evaluation.server import server_command
from sftflow.stage_config import write_if_changed
from tests.conftest import REPO, read_jsonl, write_jsonl

# evaluation settings that differ from the schema's defaults (the rest keep them, as in the workflow)
SETTINGS = dict(max_new_tokens=12, concurrency=2, max_retries=2, request_timeout=60)
SETTINGS.update(server_start_timeout=180, grading_timeout=5)
NUM_PROBLEMS = 24


@pytest.fixture(scope="module")
def tiny_model(demo_tokenizer_dir, tmp_path_factory) -> Path:
    from sftflow.demo.model import build_model

    path = tmp_path_factory.mktemp("serve") / "model"
    build_model(
        demo_tokenizer_dir,
        path,
        seed=0,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    return path


@pytest.fixture(scope="module")
def benchmark_file(tmp_path_factory) -> Path:
    rows = [{"problem": f"Compute {i} + {i + 3}.", "expected_answer": str(2 * i + 3)} for i in range(NUM_PROBLEMS)]
    return write_jsonl(tmp_path_factory.mktemp("bench") / "test.jsonl", rows)


def command(
    model: Path, bench: Path, root: Path, run: str, seeds: int = 0, answer: int | None = None, **settings
) -> list[str]:
    """generate.py's command line; with `answer`, the server answers only that many requests
    (tests/evaluation/gated_server.py), so a run can be interrupted mid-way on a machine of any speed."""
    cmd = [sys.executable, str(REPO / "scripts" / "generate.py"), "--model-label", "final", "--model", str(model)]
    cmd += ["--benchmark", "demo", "--benchmark-file", str(bench), "--seeds", str(seeds)]
    cmd += ["--output-dir", str(root / run / "out"), "--resume-dir", str(root / "resume")]
    cmd += ["--server-log", str(root / run / "server.log"), "--log", str(root / run / "generate.log")]
    settings_file = root / run / "settings.json"  # as the workflow's eval stage files: setting name -> value
    write_if_changed(settings_file, {**SETTINGS, **settings})
    cmd += ["--config", str(settings_file), "--"]
    if answer is not None:
        cmd += [sys.executable, str(Path(__file__).with_name("gated_server.py")), "--answer", str(answer), "--"]
    return cmd + server_command("transformers", str(model), 0, python=sys.executable)


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def start(cmd: list[str]) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for_answers(proc: subprocess.Popen, async_file: Path, count: int, timeout: float = 300) -> None:
    """Until `count` answers are in the resume file; fails if the run ends or `timeout` passes first."""
    deadline = time.monotonic() + timeout
    while not (async_file.exists() and len(async_file.read_text().splitlines()) >= count):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)


def completions_served(server_log: Path) -> int:
    return sum("POST /v1/completions" in line for line in server_log.read_text().splitlines())


def server_pids(model: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # The server itself (generate.py's own argv holds the server command too, after '--').
        if argv[1:4] == [b"-m", b"transformers.cli.transformers", b"serve"] and str(model).encode() in argv:
            pids.append(int(proc.name))
    return pids


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "generation_seconds"} for row in rows]


@pytest.mark.slow
def test_kill_server_mid_run_then_rerun_sends_only_missing(tiny_model, benchmark_file, tmp_path):
    # Uninterrupted reference run.
    ref = run(command(tiny_model, benchmark_file, tmp_path / "ref", "run"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    reference = read_jsonl(tmp_path / "ref" / "run" / "out" / "output.jsonl")
    assert len(reference) == NUM_PROBLEMS
    assert completions_served(tmp_path / "ref" / "run" / "server.log") == NUM_PROBLEMS
    assert not (tmp_path / "ref" / "resume").exists()  # removed once everything is written
    for i, row in enumerate(reference):
        assert row["problem"] == f"Compute {i} + {i + 3}." and row["expected_answer"] == str(2 * i + 3)
        assert isinstance(row["generation"], str) and row["num_generated_tokens"] <= SETTINGS["max_new_tokens"]
        assert isinstance(row["symbolic_correct"], bool) and "predicted_answer" in row
    metrics = json.loads((tmp_path / "ref" / "run" / "out" / "metrics.json").read_text())
    assert metrics["metrics"]["num_entries"] == NUM_PROBLEMS and metrics["generation"]["to_send"] == NUM_PROBLEMS

    # Interrupted run: the server answers 6 requests, then is killed with -9 (with the other requests in flight).
    root = tmp_path / "crash"
    async_file = root / "resume" / "output.jsonl-async"
    proc = start(command(tiny_model, benchmark_file, root, "first", answer=6))
    wait_for_answers(proc, async_file, 6)
    pids = server_pids(tiny_model)
    assert pids, "server process not found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "inference server exited" in stderr, stderr[-3000:]
    assert not (root / "first" / "out").exists()  # no partial output
    answered = len(async_file.read_text().splitlines())
    assert answered == 6
    assert not server_pids(tiny_model)

    # The rerun asks only for what is missing, and ends with the same rows as the uninterrupted run.
    rerun = run(command(tiny_model, benchmark_file, root, "second"))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming: {answered} of {NUM_PROBLEMS} answers already on disk; sending {NUM_PROBLEMS - answered}" in (
        rerun.stderr
    )
    assert completions_served(root / "second" / "server.log") == NUM_PROBLEMS - answered
    assert without_timing(read_jsonl(root / "second" / "out" / "output.jsonl")) == without_timing(reference)
    metrics = json.loads((root / "second" / "out" / "metrics.json").read_text())
    assert metrics["generation"]["resumed"] == answered
    assert not server_pids(tiny_model)


@pytest.mark.slow
def test_sampled_seeds_write_one_file_per_seed(tiny_model, benchmark_file, tmp_path):
    result = run(command(tiny_model, benchmark_file, tmp_path, "run", seeds=2, max_samples=8, temperature=1.0))
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "run" / "out"
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "output-rs0.jsonl", "output-rs1.jsonl"]
    rs0, rs1 = read_jsonl(out / "output-rs0.jsonl"), read_jsonl(out / "output-rs1.jsonl")
    assert len(rs0) == len(rs1) == 8
    assert [r["generation"] for r in rs0] != [r["generation"] for r in rs1]  # different seeds sample differently
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["num_samples"] == 2 and "pass@2" in metrics and "majority@2" in metrics
    assert "evaluating 8 of 24 problems" in result.stderr


def test_server_that_cannot_start_is_reported_with_its_log(tiny_model, benchmark_file, tmp_path):
    cmd = command(tiny_model, benchmark_file, tmp_path, "run")
    cmd = cmd[: cmd.index("--") + 1] + [sys.executable, "-c", "import sys; print('bad flag --frobnicate'); sys.exit(3)"]
    result = run(cmd)
    assert result.returncode == 2
    assert "did not start" in result.stderr and "exited with code 3" in result.stderr
    assert "bad flag --frobnicate" in result.stderr
    assert not (tmp_path / "run" / "out").exists()


@pytest.mark.slow
def test_chat_endpoint_gives_the_same_answers_as_rendered_completions(tiny_model, benchmark_file, tmp_path):
    # The server applies the model's chat template to the messages; we render the same template ourselves.
    runs = {}
    for endpoint in ("completions", "chat"):
        result = run(command(tiny_model, benchmark_file, tmp_path / endpoint, "run", endpoint=endpoint, max_samples=6))
        assert result.returncode == 0, result.stderr[-3000:]
        runs[endpoint] = without_timing(read_jsonl(tmp_path / endpoint / "run" / "out" / "output.jsonl"))
    assert len(runs["chat"]) == 6 and runs["chat"] == runs["completions"]


@pytest.mark.slow
def test_openai_server_type_uses_a_running_server_and_starts_none(tiny_model, benchmark_file, tmp_path, monkeypatch):
    from sftflow.evaluation.server import InferenceServer

    reference = run(command(tiny_model, benchmark_file, tmp_path / "ref", "run", max_samples=5))
    assert reference.returncode == 0, reference.stderr[-3000:]
    cmd = server_command("transformers", str(tiny_model), 0, python=sys.executable)
    with InferenceServer(cmd, tmp_path / "user_server.log", start_timeout=180) as server:
        openai = dict(server_address=server.base_url, server_model=str(tiny_model), api_key_env="SFTFLOW_TEST_KEY")
        cmd = command(
            tiny_model, benchmark_file, tmp_path / "openai", "run", max_samples=5, server_type="openai", **openai
        )
        cmd = cmd[: cmd.index("--")]  # no server command
        monkeypatch.setenv("SFTFLOW_TEST_KEY", "sk-test-secret-123")
        result = run(cmd)
        assert server.alive()  # ours, untouched
    assert result.returncode == 0, result.stderr[-3000:]
    assert "starting the inference server" not in result.stderr
    root = tmp_path / "openai" / "run"
    assert without_timing(read_jsonl(root / "out" / "output.jsonl")) == without_timing(
        read_jsonl(tmp_path / "ref" / "run" / "out" / "output.jsonl")
    )
    for path in (root / "generate.log", root / "out" / "metrics.json"):
        assert "sk-test-secret-123" not in path.read_text()
    assert "no server started" in (root / "server.log").read_text()


@pytest.mark.slow
def test_sigterm_stops_the_server_and_keeps_the_answers(tiny_model, benchmark_file, tmp_path):
    # What Slurm does on scancel or at the time limit: SIGTERM to the job's processes.
    async_file = tmp_path / "resume" / "output.jsonl-async"
    # The server answers 3 requests and holds the rest for longer than the test waits: a SIGTERM must not wait
    # for answers in flight beyond a short grace (Slurm kills the job KillWait seconds later).
    proc = start(command(tiny_model, benchmark_file, tmp_path, "run", answer=3, request_timeout=3600))
    wait_for_answers(proc, async_file, 3)
    assert server_pids(tiny_model)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-3000:]
    assert "stopped by SIGTERM" in stderr and "stopping the inference server" in stderr
    assert not server_pids(tiny_model)
    assert async_file.read_text().count("\n") == 3 and not (tmp_path / "run" / "out").exists()
