"""Deadlines: time_limit parsing, the Slurm end time, and the stop-before-deadline rule."""

from __future__ import annotations

import datetime
import os
import signal
import subprocess

import pytest

from sftflow.errors import SftflowError
from sftflow.train.deadline import Deadline, StopSignal, parse_time_limit, slurm_end_time


@pytest.mark.parametrize(
    "text, seconds",
    [("04:00:00", 14400), ("1-12:00:00", 129600), ("0:30:05", 1805), ("45:00", 2700), ("100:00:00", 360000)],
)
def test_parse_time_limit(text, seconds):
    assert parse_time_limit(text) == seconds


@pytest.mark.parametrize("text", ["4h", "04:61:00", "00:00:00", "1-2", "", "-1:00:00"])
def test_bad_time_limit_names_the_key(text):
    with pytest.raises(SftflowError, match="training.time_limit"):
        parse_time_limit(text)


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_stops_when_a_step_plus_a_save_plus_the_margin_no_longer_fit():
    clock = Clock()
    deadline = Deadline(end_time=1000.0 + 600, margin_seconds=60, clock=clock)
    for seconds in (30.0, 10.0, 10.0):  # the first step (start-up) is left out of the average
        deadline.record_step(seconds)
    deadline.record_save(20.0)
    assert deadline.average_step == 10.0
    clock.now = 1000 + 600 - 60 - 20 - 10 - 0.5
    assert not deadline.should_stop()
    clock.now += 1.0
    assert deadline.should_stop()


def test_save_time_is_estimated_from_the_load_until_a_save_is_measured():
    deadline = Deadline(end_time=100.0, margin_seconds=0, clock=Clock(0.0))
    deadline.estimate_save_from_load(7.0)
    assert deadline.save_seconds == 14.0
    deadline.record_save(3.0)
    deadline.estimate_save_from_load(7.0)
    assert deadline.save_seconds == 3.0


def test_no_limit_never_stops():
    assert not Deadline(None, 60, clock=Clock()).should_stop()


def test_time_limit_counts_from_process_start():
    deadline = Deadline.from_config("01:00:00", 60, start_time=500.0, env={}, clock=Clock(500.0))
    assert deadline.end_time == 500.0 + 3600


def _fake_run(outputs: dict):
    calls = []

    def run(argv, **kwargs):
        calls.append(argv)
        assert isinstance(argv, list)  # never a shell string
        out = outputs.get(argv[0])
        if isinstance(out, Exception):
            raise out
        return subprocess.CompletedProcess(argv, 0 if out is not None else 1, stdout=out or "", stderr="")

    return run, calls


def test_slurm_end_time_from_squeue():
    run, calls = _fake_run({"squeue": "2030-01-02T03:04:05\n"})
    assert slurm_end_time("42", run=run) == datetime.datetime(2030, 1, 2, 3, 4, 5).timestamp()
    assert calls == [["squeue", "-h", "-j", "42", "-o", "%e"]]


def test_slurm_falls_back_to_scontrol_then_to_time_limit():
    run, _ = _fake_run(
        {"squeue": FileNotFoundError("squeue"), "scontrol": "JobId=42 EndTime=2030-01-02T03:04:05 Deadline=N/A"}
    )
    assert slurm_end_time("42", run=run) == datetime.datetime(2030, 1, 2, 3, 4, 5).timestamp()
    run, _ = _fake_run({"squeue": "N/A\n", "scontrol": subprocess.TimeoutExpired("scontrol", 30)})
    assert slurm_end_time("42", run=run) is None
    deadline = Deadline.from_config("00:10:00", 0, start_time=0.0, env={"SLURM_JOB_ID": "42"}, run=run)
    assert deadline.end_time == 600.0


def test_slurm_end_time_wins_over_time_limit():
    run, _ = _fake_run({"squeue": "2030-01-02T03:04:05"})
    deadline = Deadline.from_config("00:10:00", 0, start_time=0.0, env={"SLURM_JOB_ID": "7"}, run=run)
    assert deadline.end_time == datetime.datetime(2030, 1, 2, 3, 4, 5).timestamp()


def test_first_ctrl_c_asks_for_a_save_the_second_interrupts_at_once(caplog):
    before = signal.getsignal(signal.SIGINT)
    stop = StopSignal()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # delivered to the main thread before kill returns
        assert stop.received == "SIGINT"
        assert "press Ctrl-C again to stop at once without saving" in caplog.text
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is before
