"""Requests, resume keys, retries and server commands, against a small real HTTP server on localhost."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from sftflow.errors import SftflowError
from sftflow.evaluation.generation import (
    Client,
    GenerationSettings,
    ResumeState,
    build_requests,
    generate,
    model_fingerprint,
    output_name,
)
from sftflow.evaluation.server import PORT_PLACEHOLDER, InferenceServer, server_command

SETTINGS = GenerationSettings(model_name="m", concurrency=3, max_retries=3, retry_backoff=0.01, request_timeout=5)


class FlakyOpenAI(BaseHTTPRequestHandler):
    """/v1/completions answering "echo:<prompt>"; the first `failures` calls per prompt get `status`."""

    failures = 0
    status = 503
    seen: dict[str, int] = {}
    bodies: list[dict] = []
    lock = threading.Lock()

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            type(self).bodies.append(body)
            count = self.seen.get(body["prompt"], 0)
            self.seen[body["prompt"]] = count + 1
        if count < self.failures:
            payload, code = {"error": {"message": "busy", "type": "server_error"}}, self.status
        else:
            payload, code = (
                {
                    "id": "x",
                    "object": "text_completion",
                    "created": 0,
                    "model": body["model"],
                    "choices": [{"index": 0, "text": "echo:" + body["prompt"], "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4},
                },
                200,
            )
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def flaky_server():
    def start(failures: int, status: int = 503):
        handler = type("Handler", (FlakyOpenAI,), {"failures": failures, "status": status, "seen": {}, "bodies": []})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/v1", handler

    servers = []
    yield start
    for server in servers:
        server.shutdown()


def test_request_keys_depend_on_model_prompt_index_and_sampling():
    prompts = ["a", "b", "a"]
    greedy = build_requests(prompts, 0, SETTINGS, "fp")
    assert [r.output for r in greedy] == ["output.jsonl"] * 3
    assert len({r.key for r in greedy}) == 3  # same prompt at two indices: two requests
    sampled = build_requests(prompts, 2, SETTINGS, "fp")
    assert [r.output for r in sampled] == ["output-rs0.jsonl"] * 3 + ["output-rs1.jsonl"] * 3
    assert [r.seed for r in sampled] == [0, 0, 0, 1, 1, 1]
    assert {r.key for r in sampled}.isdisjoint({r.key for r in greedy})
    assert build_requests(prompts, 0, SETTINGS, "fp") == greedy  # deterministic
    assert {r.key for r in build_requests(prompts, 0, SETTINGS, "other-model")}.isdisjoint({r.key for r in greedy})
    longer = GenerationSettings(**{**SETTINGS.__dict__, "max_new_tokens": 4096})
    assert {r.key for r in build_requests(prompts, 0, longer, "fp")}.isdisjoint({r.key for r in greedy})
    assert output_name(None) == "output.jsonl" and output_name(3) == "output-rs3.jsonl"


def test_model_fingerprint_changes_when_weights_change(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"1234")
    before = model_fingerprint(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"123456")
    assert model_fingerprint(str(tmp_path)) != before
    assert model_fingerprint("org/hub-model") == "org/hub-model"


def test_retries_transient_errors_then_succeeds(flaky_server, tmp_path):
    url, handler = flaky_server(failures=2, status=503)
    requests = build_requests([f"p{i}" for i in range(5)], 0, SETTINGS, "fp")
    client = Client(url, SETTINGS)
    answers, counts = generate(requests, client, tmp_path / "resume")
    assert [answers[r.key]["generation"] for r in requests] == [f"echo:p{i}" for i in range(5)]
    assert counts["retries"] == 10 and counts["sent"] == 15 and counts["to_send"] == 5
    assert answers[requests[0].key]["num_generated_tokens"] == 3
    assert all(b["temperature"] == 0.0 and "seed" not in b for b in handler.bodies)


def test_sampled_requests_carry_seed_and_sampling_parameters(flaky_server, tmp_path):
    url, handler = flaky_server(failures=0)
    requests = build_requests(["p"], 2, SETTINGS, "fp")
    generate(requests, Client(url, SETTINGS), tmp_path / "resume")
    sent = sorted(handler.bodies, key=lambda b: b["seed"])
    assert [(b["seed"], b["temperature"], b["top_p"], b["max_tokens"]) for b in sent] == [
        (0, 0.7, 0.95, 2048),
        (1, 0.7, 0.95, 2048),
    ]
    # transformers serve only samples when its generation config says so
    assert json.loads(sent[0]["generation_config"]) == {
        "do_sample": True,
        "max_new_tokens": 2048,
        "temperature": 0.7,
        "top_p": 0.95,
    }


def test_gives_up_after_max_retries_keeping_answers_that_arrived(flaky_server, tmp_path):
    url, _ = flaky_server(failures=100, status=429)
    requests = build_requests(["p"], 0, SETTINGS, "fp")
    with pytest.raises(
        SftflowError, match=r"failed after 4 attempts \(eval.max_retries = 3\): HTTP 429|RateLimitError"
    ):
        generate(requests, Client(url, SETTINGS), tmp_path / "resume")


def test_client_errors_are_not_retried(flaky_server, tmp_path):
    url, handler = flaky_server(failures=100, status=400)
    requests = build_requests(["p"], 0, SETTINGS, "fp")
    with pytest.raises(SftflowError, match="the server refused the request for problem 0 .* HTTP 400"):
        generate(requests, Client(url, SETTINGS), tmp_path / "resume")
    assert len(handler.bodies) == 1


def test_resume_skips_answered_ignores_stale_and_torn_lines(flaky_server, tmp_path):
    url, handler = flaky_server(failures=0)
    requests = build_requests([f"p{i}" for i in range(4)], 0, SETTINGS, "fp")
    resume = tmp_path / "resume"
    resume.mkdir()
    lines = [
        json.dumps({"key": requests[1].key, "index": 1, "answer": {"generation": "old1"}}),
        json.dumps({"key": "not-a-current-key", "index": 2, "answer": {"generation": "stale"}}),
        '{"key": "' + requests[3].key + '", "ind',  # cut short by a crash
    ]
    (resume / "output.jsonl-async").write_text("\n".join(lines) + "\n")
    state = ResumeState.load(resume, requests)
    assert set(state.answers) == {requests[1].key} and state.stale == 1 and state.torn == 1
    answers, counts = generate(requests, Client(url, SETTINGS), resume)
    assert counts["resumed"] == 1 and counts["to_send"] == 3
    assert sorted(b["prompt"] for b in handler.bodies) == ["p0", "p2", "p3"]
    assert answers[requests[1].key]["generation"] == "old1"


def test_api_key_comes_from_the_named_environment_variable(monkeypatch):
    settings = GenerationSettings(api_key_env="MY_EVAL_KEY")
    monkeypatch.delenv("MY_EVAL_KEY", raising=False)
    with pytest.raises(SftflowError, match="eval.api_key_env: environment variable 'MY_EVAL_KEY' is not set"):
        Client("http://127.0.0.1:9/v1", settings)
    monkeypatch.setenv("MY_EVAL_KEY", "sk-secret")
    assert Client("http://127.0.0.1:9/v1", settings)._client.api_key == "sk-secret"


@pytest.mark.parametrize(
    "server_type, gpus, expected_start",
    [
        ("vllm", 4, ["vllm", "serve", "/m", "--host", "127.0.0.1", "--port", PORT_PLACEHOLDER]),
        ("trtllm", 2, ["trtllm-serve", "/m", "--host", "127.0.0.1", "--port", PORT_PLACEHOLDER]),
        ("sglang", 1, ["py", "-m", "sglang.launch_server", "--model-path", "/m"]),
        ("transformers", 0, ["py", "-m", "transformers.cli.transformers", "serve", "/m"]),
    ],
)
def test_server_commands(server_type, gpus, expected_start):
    cmd = server_command(server_type, "/m", gpus, "--extra 'two words'", python="py")
    assert cmd[: len(expected_start)] == expected_start
    assert cmd[-2:] == ["--extra", "two words"]
    assert server_command("openai", "/m", 1) == []


def test_server_command_errors():
    with pytest.raises(SftflowError, match="eval.server_args: cannot split"):
        server_command("vllm", "/m", 1, "--x 'unclosed")
    with pytest.raises(SftflowError, match="eval.server_args: must be empty with server_type 'openai'"):
        server_command("openai", "/m", 1, "--x")
    with pytest.raises(SftflowError, match="cannot start the inference server: 'no-such-server-binary' not found"):
        with InferenceServer(["no-such-server-binary", "--port", PORT_PLACEHOLDER], Path("/tmp/unused.log")):
            pass


def test_server_health_timeout_stops_the_process(tmp_path):
    import sys
    import time

    script = "import time; print('loading forever', flush=True); time.sleep(600)"
    server = InferenceServer([sys.executable, "-c", script], tmp_path / "server.log", start_timeout=2)
    started = time.monotonic()
    with pytest.raises(SftflowError, match=r"not healthy within eval.server_start_timeout = 2 s[\s\S]*loading forever"):
        with server:
            pass
    assert time.monotonic() - started < 30
    assert server.process is None  # stopped
