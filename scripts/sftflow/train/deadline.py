"""When a training job must stop so that it can still save before its wall-time limit.

The end time comes from the Slurm job (`squeue -o %e`, else `scontrol show job`) when SLURM_JOB_ID
is set, else from `training.time_limit` counted from process start. The job stops before a step when

    now + average step time + save time + training.time_margin_seconds >= end,

so the step, the final save and the margin all fit. Save time is the measured time of the last save;
before any save it is estimated as twice the time the run took to load its checkpoint (0 on a fresh
start, when the margin alone covers it).

Independently, SIGTERM or SIGUSR1 (e.g. `sbatch --signal=USR1@300`, or Slurm's SIGTERM before the kill)
makes the job stop at the next step boundary, save and exit cleanly (`StopSignal`); so does a first Ctrl-C
(SIGINT) in the terminal, while a second one interrupts at once, without saving.
"""

from __future__ import annotations

import datetime
import logging
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable

from sftflow.errors import SftflowError

LOG = logging.getLogger("sftflow.train")

_TIME_RE = re.compile(r"^(?:(\d+)-)?(\d+):(\d{1,2}):(\d{1,2})$")


def parse_time_limit(text: str, key: str = "training.time_limit") -> float:
    """Seconds in "HH:MM:SS", "D-HH:MM:SS" (Slurm style) or "MM:SS"."""
    value = str(text).strip()
    if re.fullmatch(r"\d+:\d{1,2}", value):
        value = "0:" + value
    m = _TIME_RE.match(value)
    if not m:
        raise SftflowError(f'config key \'{key}\': {text!r} is not a duration like "04:00:00" or "1-12:00:00"')
    days, hours, minutes, seconds = (int(g or 0) for g in m.groups())
    if minutes >= 60 or seconds >= 60:
        raise SftflowError(f"config key '{key}': {text!r} has minutes or seconds of 60 or more")
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total <= 0:
        raise SftflowError(f"config key '{key}': {text!r} must be longer than zero")
    return float(total)


def _parse_slurm_time(text: str) -> float | None:
    text = text.strip()
    if not text or text.upper() in ("N/A", "UNKNOWN", "NONE", "UNLIMITED", "INVALID"):
        return None
    try:  # Slurm prints local time without a zone, e.g. 2025-01-31T17:05:00
        return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def slurm_end_time(job_id: str, run: Callable = subprocess.run) -> float | None:
    """The Slurm job's end time (epoch seconds), or None if Slurm cannot tell us (never raises)."""
    queries = (
        (
            ["squeue", "-h", "-j", str(job_id), "-o", "%e"],
            lambda out: out.strip().splitlines()[0] if out.strip() else "",
        ),
        (["scontrol", "show", "job", str(job_id)], lambda out: (re.search(r"\bEndTime=(\S+)", out) or [None, ""])[1]),
    )
    for argv, pick in queries:
        try:
            result = run(argv, capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.SubprocessError) as err:
            LOG.warning("cannot ask Slurm for the job's end time (%s): %s", argv[0], err)
            continue
        if result.returncode == 0:
            end = _parse_slurm_time(pick(result.stdout))
            if end is not None:
                return end
    return None


class Deadline:
    """Decides, before each step, whether there is still time for that step plus a save."""

    def __init__(self, end_time: float | None, margin_seconds: float, clock: Callable[[], float] = time.time) -> None:
        self.end_time = end_time
        self.margin = margin_seconds
        self.clock = clock
        self._step_times: list[float] = []
        self.save_seconds = 0.0
        self._save_measured = False

    @classmethod
    def from_config(
        cls,
        time_limit: str | None,
        margin_seconds: float,
        start_time: float,
        env: dict,
        clock: Callable[[], float] = time.time,
        run: Callable = subprocess.run,
    ) -> Deadline:
        end, source = None, None
        job_id = env.get("SLURM_JOB_ID")
        if job_id:
            end, source = slurm_end_time(job_id, run=run), f"Slurm job {job_id}'s end time"
            if end is None:
                LOG.warning("SLURM_JOB_ID=%s is set but Slurm did not report an end time", job_id)
        if end is None and time_limit:
            end, source = start_time + parse_time_limit(time_limit), f"training.time_limit {time_limit}"
        if end is not None:
            LOG.info(
                "deadline: %s (%s), stopping with %.0f s to spare",
                datetime.datetime.fromtimestamp(end).isoformat(timespec="seconds"),
                source,
                margin_seconds,
            )
        return cls(end, margin_seconds, clock)

    def record_step(self, seconds: float) -> None:
        self._step_times.append(seconds)

    def record_save(self, seconds: float) -> None:
        self.save_seconds, self._save_measured = seconds, True

    def estimate_save_from_load(self, load_seconds: float) -> None:
        if not self._save_measured:
            self.save_seconds = 2.0 * load_seconds

    @property
    def average_step(self) -> float:
        # The first step includes one-off start-up work; drop it once there are others.
        times = self._step_times[1:] if len(self._step_times) > 1 else self._step_times
        return sum(times) / len(times) if times else 0.0

    def seconds_left(self) -> float | None:
        return None if self.end_time is None else self.end_time - self.clock()

    def should_stop(self) -> bool:
        if self.end_time is None:
            return False
        return self.clock() + self.average_step + self.save_seconds + self.margin >= self.end_time


class StopSignal:
    """Records SIGTERM/SIGUSR1/SIGINT so the training loop can stop, save and exit between two steps.

    A second SIGINT (Ctrl-C pressed again) raises KeyboardInterrupt at once: the user gives up the save.
    Handlers are installed only in the main thread (signal's rule) and `restore()` puts the previous
    ones back; the flag is shared with the other ranks by the loop's per-step all-reduce.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            if self.received == name:
                raise KeyboardInterrupt
            LOG.warning(
                "interrupted (SIGINT): stopping after this step and saving a checkpoint; "
                "press Ctrl-C again to stop at once without saving"
            )
        self.received = name

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
