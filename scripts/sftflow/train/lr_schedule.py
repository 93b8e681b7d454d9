"""Learning rate: linear warm-up to the peak, then cosine decay that reaches the minimum after the last step."""

from __future__ import annotations

import math

from torch.optim import Optimizer


def lr_at(step: int, *, peak: float, minimum: float, warmup: int, total: int) -> float:
    """Learning rate of optimizer step `step` (0-based) of `total`."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    decay_steps = max(1, total - warmup)
    progress = min(1.0, max(0.0, (step - warmup) / decay_steps))
    return minimum + (peak - minimum) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosineSchedule:
    """Sets the optimizer's learning rate before each step from the step number alone.

    The schedule is a pure function of the step, so a resumed run gets the same rates; its state
    (the next step) is still saved with the checkpoint for inspection and consistency checks.
    `total` is the run's current total steps: raising max_num_steps later stretches the remaining decay.
    """

    def __init__(self, optimizer: Optimizer, *, peak: float, minimum: float, warmup: int, total: int) -> None:
        self.optimizer = optimizer
        self.peak, self.minimum, self.warmup, self.total = peak, minimum, warmup, total
        self.next_step = 0

    def apply(self, step: int) -> float:
        """Set the rate for optimizer step `step` and return it."""
        lr = lr_at(step, peak=self.peak, minimum=self.minimum, warmup=self.warmup, total=self.total)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.next_step = step + 1
        return lr

    def state_dict(self) -> dict:
        return {"next_step": self.next_step, "total": self.total, "warmup": self.warmup}

    def load_state_dict(self, state: dict) -> None:
        self.next_step = int(state["next_step"])
