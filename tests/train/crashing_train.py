"""scripts/train.py with a crash injected, for the crash-consistency tests (production code has no such hook).

    python tests/train/crashing_train.py step:N|save:N TRAIN_ARGS...

`step:N` SIGKILLs the process right after optimizer step N (before that step is logged or saved);
`save:N` SIGKILLs rank 0 after every rank wrote the checkpoint of step N, before its commit (the rename).
The patches are installed in this process only, around the trainer's own functions.
"""

from __future__ import annotations

import os
import signal
import sys


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_after_step(n: int) -> None:
    """Wrap the engine's train_step; the schedule's apply(step) says which step the next train_step runs."""
    from sftflow.train import trainer
    from sftflow.train.lr_schedule import WarmupCosineSchedule

    running = {"step": None}
    apply = WarmupCosineSchedule.apply

    def remembering_apply(self, step: int) -> float:
        running["step"] = step
        return apply(self, step)

    WarmupCosineSchedule.apply = remembering_apply
    engine_class = trainer.engine_class

    def crashing_engine_class(name: str):
        base = engine_class(name)

        class CrashingEngine(base):
            def train_step(self, micro_bins):
                result = super().train_step(micro_bins)
                if running["step"] + 1 == n:
                    _die()
                return result

        return CrashingEngine

    trainer.engine_class = crashing_engine_class


def kill_before_commit(n: int) -> None:
    from sftflow.train.checkpoint import Checkpointer, step_dir_name

    commit = Checkpointer.commit

    def crashing_commit(self, tmp, final):
        if final.name == step_dir_name(n):
            _die()
        return commit(self, tmp, final)

    Checkpointer.commit = crashing_commit


def install(fault: str) -> None:
    kind, _, step = fault.partition(":")
    {"step": kill_after_step, "save": kill_before_commit}[kind](int(step))


if __name__ == "__main__":
    install(sys.argv.pop(1))
    from sftflow.train.cli import train_main

    sys.exit(train_main())
