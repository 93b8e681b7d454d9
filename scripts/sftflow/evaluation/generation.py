"""Generation for evaluation: one OpenAI-compatible client, bounded concurrency, retries, and resume.

A benchmark with `seeds == 0` gets one greedy generation per problem (`output.jsonl`); with
`seeds == N`, N sampled generations (`output-rs0.jsonl` ... `output-rs{N-1}.jsonl`, temperature /
top_p from the config, the file's seed sent with each request), as in NeMo-Skills.

Resume: every answer is appended to `<resume_dir>/<output file>-async` as soon as it arrives, with a
key that hashes the model, the prompt and the sampling parameters. A rerun after a crash reads those
files and sends only the requests whose answers are not there; an answer whose key no longer
matches (a retrained model, a changed prompt or max_new_tokens) is not reused, and is counted.
When every answer is in, the rows are written in benchmark order, graded, and the async files go.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from sftflow.errors import SftflowError

__all__ = [
    "Client",
    "GenerationSettings",
    "Request",
    "ResumeState",
    "build_requests",
    "generate",
    "model_fingerprint",
    "output_name",
]

log = logging.getLogger(__name__)

# HTTP statuses worth retrying: timeouts, conflicts, rate limits and server-side errors.
RETRY_STATUSES = frozenset({408, 409, 425, 429})


@dataclass(frozen=True)
class GenerationSettings:
    """The request side of `eval.*` (see config/README.md for each key)."""

    server_type: str = "transformers"
    model_name: str = ""  # the "model" field of each request
    endpoint: str = "completions"  # or "chat"
    max_new_tokens: int = 2048
    temperature: float = 0.7  # for sampled seeds; greedy uses 0
    top_p: float = 0.95
    concurrency: int = 16
    max_retries: int = 5
    retry_backoff: float = 1.0
    request_timeout: float = 600.0
    api_key_env: str | None = None


@dataclass(frozen=True)
class Request:
    """One generation to ask for: problem `index` of the benchmark, for output file `output` (seed or None)."""

    output: str
    index: int
    seed: int | None
    prompt: str | list[dict]
    key: str


def output_name(seed: int | None) -> str:
    """NeMo-Skills' file names: output.jsonl for greedy, output-rs{seed}.jsonl for sampled seeds."""
    return "output.jsonl" if seed is None else f"output-rs{seed}.jsonl"


def model_fingerprint(model: str) -> str:
    """Identifies the weights being served: file sizes and mtimes for a local directory, else the name."""
    path = Path(model)
    if not path.is_dir():
        return model
    parts = [str(path.resolve())]
    for file in sorted(path.iterdir()):
        if file.suffix in {".safetensors", ".bin", ".json", ".jinja", ".gguf"} and file.is_file():
            stat = file.stat()
            parts.append(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _sampling(settings: GenerationSettings, seed: int | None) -> dict[str, Any]:
    if seed is None:
        return {"temperature": 0.0, "max_new_tokens": settings.max_new_tokens}
    return {
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "seed": seed,
        "max_new_tokens": settings.max_new_tokens,
    }


def build_requests(
    prompts: Sequence[str | list[dict]],
    seeds: int,
    settings: GenerationSettings,
    fingerprint: str,
) -> list[Request]:
    """Every request of one benchmark: each prompt once (greedy, seeds == 0) or once per seed."""
    seed_list: list[int | None] = [None] if seeds == 0 else list(range(seeds))
    requests = []
    for seed in seed_list:
        sampling = _sampling(settings, seed)
        for index, prompt in enumerate(prompts):
            material = json.dumps(
                [fingerprint, settings.endpoint, settings.model_name, index, prompt, sampling], sort_keys=True
            )
            key = hashlib.sha256(material.encode()).hexdigest()[:32]
            requests.append(Request(output_name(seed), index, seed, prompt, key))
    return requests


class _Retryable(Exception):
    pass


class Client:
    """Sends requests to an OpenAI-compatible server with retries and exponential backoff.

    `server_alive`, when given, is asked before each retry: a dead server fails the run at once
    (with `server_death` as the message) instead of after every retry.
    """

    def __init__(
        self,
        base_url: str,
        settings: GenerationSettings,
        server_alive: Callable[[], bool] | None = None,
        server_death: Callable[[], str] | None = None,
    ) -> None:
        import openai

        api_key = "EMPTY"
        if settings.api_key_env:
            api_key = os.environ.get(settings.api_key_env, "")
            if not api_key:
                raise SftflowError(
                    f"eval.api_key_env: environment variable {settings.api_key_env!r} is not set (or empty)"
                )
        self.settings = settings
        self.base_url = base_url
        # Retries are ours (to count them and to stop when the server has died), not the library's.
        self._client = openai.OpenAI(
            base_url=base_url, api_key=api_key, max_retries=0, timeout=settings.request_timeout
        )
        self._openai = openai
        self.server_alive = server_alive
        self.server_death = server_death
        self.stop = threading.Event()
        self.sent = 0
        self.retries = 0
        self._lock = threading.Lock()

    def _body(self, request: Request) -> dict[str, Any]:
        s = self.settings
        sampling = _sampling(s, request.seed)
        body: dict[str, Any] = {
            "model": s.model_name,
            "max_tokens": s.max_new_tokens,
            "temperature": sampling["temperature"],
        }
        if request.seed is not None:
            body["top_p"] = s.top_p
            body["seed"] = request.seed
        if s.server_type == "transformers":
            # transformers serve only samples when the generation config says do_sample; pass it explicitly
            # (unset fields, e.g. eos_token_id, still come from the model's generation_config.json).
            config = {"do_sample": request.seed is not None, "max_new_tokens": s.max_new_tokens}
            if request.seed is not None:
                config.update(temperature=s.temperature, top_p=s.top_p)
            body["extra_body"] = {"generation_config": json.dumps(config)}
        return body

    def _call(self, request: Request) -> dict[str, Any]:
        body = self._body(request)
        started = time.perf_counter()
        openai = self._openai
        try:
            if self.settings.endpoint == "chat":
                response = self._client.chat.completions.create(messages=request.prompt, **body)
                choice = response.choices[0]
                text = choice.message.content or ""
            else:
                response = self._client.completions.create(prompt=request.prompt, **body)
                choice = response.choices[0]
                text = choice.text or ""
        except (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError) as err:
            raise _Retryable(f"{type(err).__name__}: {err}") from err
        except openai.APIStatusError as err:
            if err.status_code in RETRY_STATUSES or err.status_code >= 500:
                raise _Retryable(f"HTTP {err.status_code}: {err}") from err
            raise SftflowError(
                f"the server refused the request for problem {request.index} ({request.output}): "
                f"HTTP {err.status_code}: {err.message}"
            ) from None
        usage = getattr(response, "usage", None)
        return {
            "generation": text,
            "num_generated_tokens": getattr(usage, "completion_tokens", None),
            "finish_reason": choice.finish_reason,
            "generation_seconds": round(time.perf_counter() - started, 4),
        }

    def send(self, request: Request) -> dict[str, Any]:
        attempt = 0
        while True:
            if self.stop.is_set():
                raise SftflowError("generation stopped")
            with self._lock:
                self.sent += 1
            try:
                return self._call(request)
            except _Retryable as err:
                if self.server_alive is not None and not self.server_alive():
                    raise SftflowError(self.server_death() if self.server_death else "the server died") from None
                if attempt >= self.settings.max_retries:
                    raise SftflowError(
                        f"problem {request.index} ({request.output}) failed after {attempt + 1} attempts "
                        f"(eval.max_retries = {self.settings.max_retries}): {err}"
                    ) from None
                delay = min(60.0, self.settings.retry_backoff * 2**attempt) * (0.5 + random.random())
                log.warning(
                    "problem %d (%s): %s; retry %d/%d in %.1f s",
                    request.index,
                    request.output,
                    err,
                    attempt + 1,
                    self.settings.max_retries,
                    delay,
                )
                with self._lock:
                    self.retries += 1
                attempt += 1
                if self.stop.wait(delay):
                    raise SftflowError("generation stopped") from None


@dataclass
class ResumeState:
    """The answers already on disk from an interrupted run, by request key, and what could not be reused."""

    answers: dict[str, dict[str, Any]] = field(default_factory=dict)
    stale: int = 0  # answers whose key matches no current request (model, prompt or sampling changed)
    torn: int = 0  # a last line cut short by the crash

    @classmethod
    def load(cls, resume_dir: Path, requests: Sequence[Request]) -> ResumeState:
        wanted = {r.key for r in requests}
        state = cls()
        for name in sorted({r.output for r in requests}):
            path = resume_dir / f"{name}-async"
            if not path.exists():
                continue
            with open(path, "rb") as f:
                for raw in f:
                    try:
                        entry = orjson.loads(raw)
                    except orjson.JSONDecodeError:
                        state.torn += 1
                        continue
                    if not isinstance(entry, dict) or entry.get("key") not in wanted:
                        state.stale += 1
                        continue
                    state.answers[entry["key"]] = entry["answer"]
        return state


# Seconds a stopping run (SIGTERM, a failed request, a dead server) still waits for answers in flight.
STOP_GRACE_SECONDS = 10.0


def _start_counts(requests: Sequence[Request], pending: list[Request], state: ResumeState, client: Client) -> dict:
    """What generate() starts from (requests, answers resumed, stale / torn lines ignored, to send), logged."""
    counts = {
        "requests": len(requests),
        "resumed": len(requests) - len(pending),
        "stale_answers_ignored": state.stale,
        "torn_lines_ignored": state.torn,
        "to_send": len(pending),
    }
    if counts["resumed"] or state.stale or state.torn:
        log.info(
            "resuming: %d of %d answers already on disk; sending %d (ignored %d stale answers and %d torn lines)",
            counts["resumed"],
            len(requests),
            len(pending),
            state.stale,
            state.torn,
        )
    else:
        log.info(
            "sending %d requests to %s (concurrency %d)", len(pending), client.base_url, client.settings.concurrency
        )
    return counts


def generate(
    requests: Sequence[Request],
    client: Client,
    resume_dir: Path,
    progress_every: float = 10.0,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Answer every request (resuming from `resume_dir`); return ({key: answer}, counts for the log/metrics)."""
    resume_dir.mkdir(parents=True, exist_ok=True)
    state = ResumeState.load(resume_dir, requests)
    pending = [r for r in requests if r.key not in state.answers]
    counts = _start_counts(requests, pending, state, client)
    answers = dict(state.answers)
    handles = {name: open(resume_dir / f"{name}-async", "ab") for name in sorted({r.output for r in pending})}
    started = time.monotonic()
    last_report = started
    done = 0

    def record(future: Future, request: Request) -> None:
        nonlocal done
        answer = future.result()
        handle = handles[request.output]
        handle.write(orjson.dumps({"key": request.key, "index": request.index, "answer": answer}) + b"\n")
        handle.flush()
        answers[request.key] = answer
        done += 1

    pool = ThreadPoolExecutor(max_workers=client.settings.concurrency, thread_name_prefix="generate")
    try:
        futures: dict[Future, Request] = {pool.submit(client.send, r): r for r in pending}
        remaining = set(futures)
        try:
            while remaining:
                finished, remaining = wait(remaining, timeout=progress_every, return_when=FIRST_COMPLETED)
                failures = [f for f in finished if f.exception() is not None]
                for future in finished:
                    if future.exception() is None:
                        record(future, futures[future])
                if failures:
                    raise failures[0].exception()
                now = time.monotonic()
                if now - last_report >= progress_every or not remaining:
                    rate = done / max(now - started, 1e-9)
                    log.info("generated %d / %d (%.2f requests/s)", done, len(pending), rate)
                    last_report = now
        except BaseException:
            # Stop: no new requests, no more retries; keep the answers that arrive within a short grace, for the
            # rerun. Not longer: after a SIGTERM, Slurm kills the job KillWait seconds later (30 by default) and
            # the server must be stopped before that, however long its in-flight requests would still take.
            client.stop.set()
            for future in remaining:
                future.cancel()
            for future in wait(remaining, timeout=STOP_GRACE_SECONDS)[0]:
                if not future.cancelled() and future.exception() is None:
                    record(future, futures[future])
            log.info("stopped after %d new answers; a rerun sends only the %d missing", done, len(pending) - done)
            raise
    finally:
        # Requests still in flight end when the server is stopped (the caller's next step); never wait for them.
        pool.shutdown(wait=False, cancel_futures=True)
        for handle in handles.values():
            handle.close()
    counts["sent"] = client.sent
    counts["retries"] = client.retries
    counts["wall_seconds"] = round(time.monotonic() - started, 3)
    return answers, counts
