"""Inference servers for evaluation: their launch commands, and a process that lives only as long as the job.

As in NeMo-Skills, `eval.server_type` picks the server and the eval job starts it on its own node,
waits for its health endpoint, sends the requests and stops it - also when generation fails or the
job is cancelled (SIGTERM from Slurm or Ctrl-C). `openai` starts nothing: requests go to
`eval.server_address`, a server somebody already runs.

Commands are argument lists (never a shell string built from config values). The port is chosen at
run time, so a command carries the placeholder PORT_PLACEHOLDER, which `InferenceServer` replaces.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from sftflow.errors import SftflowError

__all__ = [
    "PORT_PLACEHOLDER",
    "SERVER_TYPES",
    "InferenceServer",
    "Terminated",
    "free_port",
    "server_command",
]

log = logging.getLogger(__name__)

PORT_PLACEHOLDER = "{port}"
HOST = "127.0.0.1"
SERVER_TYPES = ("transformers", "vllm", "sglang", "trtllm", "openai")


def server_command(server_type: str, model: str, gpus: int, extra_args: str = "", python: str = "python") -> list[str]:
    """The command that serves `model` with `server_type` on HOST:PORT_PLACEHOLDER (empty for `openai`).

    `gpus` is `eval.server_gpus` (tensor parallel size for vllm / sglang / trtllm; 0 runs the
    transformers server on the CPU); `extra_args` is `eval.server_args`, split like a shell would.
    """
    try:
        extra = shlex.split(extra_args or "")
    except ValueError as err:
        raise SftflowError(f"eval.server_args: cannot split {extra_args!r} into arguments ({err})") from None
    port = PORT_PLACEHOLDER
    if server_type == "transformers":
        # `transformers serve` is transformers' own OpenAI-compatible server (pip install transformers[serving]);
        # run through the module so that it works from an unactivated virtual environment too.
        device = "cpu" if gpus == 0 else "auto"
        cmd = [python, "-m", "transformers.cli.transformers", "serve", model, "--host", HOST, "--port", port]
        cmd += ["--device", device, "--dtype", "auto", "--log-level", "info"]
    elif server_type == "vllm":
        cmd = ["vllm", "serve", model, "--host", HOST, "--port", port, "--tensor-parallel-size", str(max(gpus, 1))]
        cmd += ["--trust-remote-code", "--seed", "0"]
    elif server_type == "sglang":
        cmd = [python, "-m", "sglang.launch_server", "--model-path", model, "--host", HOST, "--port", port]
        cmd += ["--tp", str(max(gpus, 1)), "--trust-remote-code"]
    elif server_type == "trtllm":
        cmd = ["trtllm-serve", model, "--host", HOST, "--port", port, "--tp_size", str(max(gpus, 1))]
        cmd += ["--backend", "pytorch"]
    elif server_type == "openai":
        if extra:
            raise SftflowError("eval.server_args: must be empty with server_type 'openai' (no server is started)")
        return []
    else:
        raise SftflowError(f"eval.server_type: unknown server type {server_type!r}; known: {', '.join(SERVER_TYPES)}")
    return cmd + extra


def free_port() -> int:
    """A TCP port that is free on HOST right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class Terminated(Exception):
    """SIGTERM arrived (Slurm cancels or times out the job); raised so that the server is stopped."""


class InferenceServer:
    """Runs `command` (with PORT_PLACEHOLDER filled in) until the `with` block ends; logs go to `log_path`.

    Entering waits until GET /health answers 200, failing with the end of the server's log if the
    process exits first or `start_timeout` passes. Leaving stops the whole process group (SIGTERM,
    then SIGKILL after `stop_timeout`), whatever happened inside the block.
    """

    def __init__(
        self,
        command: Sequence[str],
        log_path: str | os.PathLike,
        start_timeout: float = 900.0,
        stop_timeout: float = 30.0,
        port: int | None = None,
    ) -> None:
        if not command:
            raise ValueError("InferenceServer needs a command")
        self.port = port or free_port()
        self.command = [arg.replace(PORT_PLACEHOLDER, str(self.port)) for arg in command]
        self.log_path = Path(log_path)
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.process: subprocess.Popen | None = None
        self._previous_sigterm = None

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}/v1"

    @property
    def health_url(self) -> str:
        return f"http://{HOST}:{self.port}/health"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def death_message(self) -> str:
        code = self.process.poll() if self.process is not None else None
        return (
            f"the inference server exited with code {code}; the end of its log {self.log_path}:\n{_tail(self.log_path)}"
        )

    def __enter__(self) -> InferenceServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("starting the inference server: %s", shlex.join(self.command))
        log.info("server log: %s", self.log_path)
        self._install_sigterm_handler()
        log_file = open(self.log_path, "ab")
        try:
            # A session of its own: stopping it stops whatever it spawned (workers, tensor-parallel ranks).
            self.process = subprocess.Popen(
                self.command,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        except FileNotFoundError:
            log_file.close()
            self._restore_sigterm_handler()
            raise SftflowError(
                f"cannot start the inference server: {self.command[0]!r} not found "
                "(is the server's package installed in this environment?)"
            ) from None
        log_file.close()
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _wait_healthy(self) -> None:
        started = time.monotonic()
        while True:
            if not self.alive():
                raise SftflowError(f"the inference server did not start: {self.death_message()}")
            try:
                with urllib.request.urlopen(self.health_url, timeout=5) as response:
                    if response.status == 200:
                        log.info(
                            "inference server healthy after %.1f s on port %d", time.monotonic() - started, self.port
                        )
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() - started > self.start_timeout:
                raise SftflowError(
                    f"the inference server was not healthy within eval.server_start_timeout = {self.start_timeout:g} s; "
                    f"the end of its log {self.log_path}:\n{_tail(self.log_path)}"
                )
            time.sleep(1.0)

    def stop(self) -> None:
        process, self.process = self.process, None
        try:
            if process is not None and process.poll() is None:
                log.info("stopping the inference server (pid %d)", process.pid)
                _signal_group(process, signal.SIGTERM)
                try:
                    process.wait(timeout=self.stop_timeout)
                except subprocess.TimeoutExpired:
                    log.warning("the inference server ignored SIGTERM for %g s; killing it", self.stop_timeout)
                    _signal_group(process, signal.SIGKILL)
                    process.wait()
            elif process is not None:
                # Already gone; still make sure nothing it started outlives the job.
                _signal_group(process, signal.SIGKILL)
        finally:
            self._restore_sigterm_handler()

    def _install_sigterm_handler(self) -> None:
        if _in_main_thread():

            def on_sigterm(signum, frame):
                raise Terminated("received SIGTERM")

            self._previous_sigterm = signal.signal(signal.SIGTERM, on_sigterm)

    def _restore_sigterm_handler(self) -> None:
        if self._previous_sigterm is not None and _in_main_thread():
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
