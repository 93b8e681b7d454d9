"""Deterministic, resumable order of packed bins, split over data-parallel ranks and micro-batches.

Epoch e visits the bins in the permutation drawn from a generator seeded with (seed, e); an optimizer
step takes the next `global_batch` bins of that permutation (an epoch's last incomplete batch is
dropped). The position is (epoch, bins consumed in the epoch): saved in every checkpoint, it makes a
resumed run read exactly the batches an uninterrupted run would, whatever the number of ranks.

Within a global batch, data-parallel rank r takes the r-th contiguous slice and cuts it into
micro-batches; tensor-parallel ranks of one dp group take the same slice.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from sftflow.errors import SftflowError
from sftflow.train.settings import TrainingConfig


def epoch_permutation(num_bins: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator()
    # Distinct, reproducible streams per (seed, epoch); a plain seed+epoch would repeat across seeds.
    g.manual_seed((seed * 1_000_003 + epoch) % (2**63))
    return torch.randperm(num_bins, generator=g).tolist()


@dataclass
class TrainingPlan:
    """How many steps the run takes and how a global batch splits; errors name the config keys."""

    num_bins: int
    global_batch: int
    micro_batch: int
    dp_size: int
    steps_per_epoch: int
    total_steps: int
    grad_accum: int

    @classmethod
    def make(cls, cfg: TrainingConfig, num_bins: int, dp_size: int) -> TrainingPlan:
        gbs, mbs = cfg.train_global_batch_size, cfg.train_micro_batch_size
        if gbs % (mbs * dp_size):
            raise SftflowError(
                f"config key 'training.train_global_batch_size' ({gbs}) must be divisible by "
                f"train_micro_batch_size x data-parallel size ({mbs} x {dp_size} = {mbs * dp_size})"
            )
        if num_bins < gbs:
            raise SftflowError(
                f"the packed data has {num_bins} rows (bins), fewer than one global batch "
                f"(config key 'training.train_global_batch_size' = {gbs}); lower it or add data"
            )
        steps_per_epoch = num_bins // gbs
        total = min(cfg.max_num_steps, cfg.max_num_epochs * steps_per_epoch)
        return cls(num_bins, gbs, mbs, dp_size, steps_per_epoch, total, gbs // (mbs * dp_size))


def job_target_step(total_steps: int, job_index: int, num_jobs: int) -> int:
    """Job i of N trains until ceil(total * (i+1) / N) (integer arithmetic, no float rounding)."""
    return -(-total_steps * (job_index + 1) // num_jobs)


class BinSampler:
    """Yields, step by step, this rank's micro-batches of bin indices."""

    def __init__(self, plan: TrainingPlan, dp_rank: int, seed: int) -> None:
        self.plan = plan
        self.dp_rank = dp_rank
        self.seed = seed
        self.epoch = 0
        self.consumed = 0
        self._perm_epoch = -1
        self._perm: list[int] = []

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "bins_consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["bins_consumed"])

    def _permutation(self) -> list[int]:
        if self._perm_epoch != self.epoch:
            self._perm, self._perm_epoch = epoch_permutation(self.plan.num_bins, self.seed, self.epoch), self.epoch
        return self._perm

    def next_step(self) -> list[list[int]]:
        """Micro-batches (lists of bin ids) of this rank for the next optimizer step; advances the position."""
        p = self.plan
        if self.consumed + p.global_batch > p.num_bins:
            self.epoch, self.consumed = self.epoch + 1, 0
        batch = self._permutation()[self.consumed : self.consumed + p.global_batch]
        self.consumed += p.global_batch
        local = p.global_batch // p.dp_size
        mine = batch[self.dp_rank * local : (self.dp_rank + 1) * local]
        return [mine[i : i + p.micro_batch] for i in range(0, local, p.micro_batch)]


def eval_batches(num_bins: int, micro_batch: int, dp_rank: int, dp_size: int) -> Iterator[list[int]]:
    """Every bin once, in order, strided over dp ranks (the last batches may be short or empty)."""
    mine = list(range(dp_rank, num_bins, dp_size))
    for i in range(0, len(mine), micro_batch):
        yield mine[i : i + micro_batch]


def eval_micro_batches(dataset, parallel, micro_batch: int) -> list[list[dict]]:
    """This dp rank's micro-batches (lists of bins) for a pass over every bin of `dataset`.

    Every rank gets the same number of micro-batches (the forwards are collective): ranks short of data
    get a one-token dummy bin that carries no loss."""
    pad = int(dataset.index["pad_token_id"])
    per_rank = math.ceil(len(dataset) / parallel.dp_size)
    num_batches = math.ceil(per_rank / micro_batch)
    dummy = {"input_ids": [pad], "loss_mask": [False], "seq_lens": [1]}
    batches = list(eval_batches(len(dataset), micro_batch, parallel.dp_rank, parallel.dp_size))
    return [[dataset.get_bin(i) for i in batches[k]] if k < len(batches) else [dummy] for k in range(num_batches)]
