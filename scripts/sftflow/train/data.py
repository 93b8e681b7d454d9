"""Which sequences each optimizer step trains on, and how they are packed and split over the ranks.

The global batch counts sequences, as NeMo-RL's `train_global_batch_size` does. Epoch e visits the
sequences in the permutation drawn from a generator seeded with (seed, e); an optimizer step takes the next
`train_global_batch_size` sequences of that permutation, and an epoch's last incomplete batch is dropped
(NeMo-RL's DataLoader(batch_size=train_global_batch_size, shuffle=True, drop_last=True)). The position is
(epoch, sequences consumed in the epoch): saved in every checkpoint, it makes a resumed run read exactly the
steps an uninterrupted run would, whatever the number of ranks.

A step's sequences are packed (packing.algorithm) into bins of at most max_total_sequence_length tokens
(one sequence per bin with packing disabled). The packing depends on the step's sequences only, never on
the number of ranks: the bins, longest first, are dealt to the data-parallel ranks in turn, and each rank
runs micro-batches of train_micro_batch_size bins. A rank dealt fewer bins runs empty micro-batches (one
padding token, no loss) so that every rank takes part in the same number of forward/backward passes.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from sftflow.errors import SftflowError
from sftflow.train.settings import TrainingConfig


def epoch_permutation(num_sequences: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator()
    # Distinct, reproducible streams per (seed, epoch); a plain seed+epoch would repeat across seeds.
    g.manual_seed((seed * 1_000_003 + epoch) % (2**63))
    return torch.randperm(num_sequences, generator=g).tolist()


def samples_digest(sample_ids: Sequence[int]) -> str:
    """16 hex characters identifying a step's sequence ids, in the order the step took them."""
    return hashlib.sha256(",".join(str(int(i)) for i in sample_ids).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Packer:
    """How a set of sequences becomes bins: packing on or off, the algorithm, and the bin capacity in tokens."""

    enabled: bool
    algorithm: str
    capacity: int

    def bins(self, ids: Sequence[int], lengths: np.ndarray) -> list[list[int]]:
        """The sequence ids `ids` (whose lengths are lengths[ids]) in bins, fullest first; each id once."""
        from sftflow.packing.binpack import pack_lengths

        ids = list(ids)
        if not ids:
            return []
        step_lengths = lengths[np.asarray(ids, dtype=np.int64)]
        if step_lengths.max() > self.capacity:
            raise SftflowError(
                f"a sequence of {int(step_lengths.max())} tokens is longer than packing.max_total_sequence_length "
                f"({self.capacity}); the packed data was made with another length: re-run pack_data"
            )
        if not self.enabled:
            groups = [[k] for k in range(len(ids))]
        else:
            groups = pack_lengths(step_lengths, self.capacity, self.algorithm)
        tokens = [int(step_lengths[g].sum()) for g in groups]
        # Fullest bins first (ties in the packer's order), so that dealing them out balances the ranks' tokens.
        order = sorted(range(len(groups)), key=lambda b: -tokens[b])
        return [[ids[k] for k in groups[b]] for b in order]


@dataclass
class TrainingPlan:
    """How many steps the run takes and how a step is laid out; errors name the config keys."""

    num_sequences: int
    global_batch: int
    micro_batch: int
    dp_size: int
    steps_per_epoch: int
    total_steps: int

    @classmethod
    def make(cls, cfg: TrainingConfig, num_sequences: int, dp_size: int) -> TrainingPlan:
        gbs = cfg.train_global_batch_size
        if num_sequences < gbs:
            raise SftflowError(
                f"the packed data has {num_sequences} sequences, fewer than one global batch "
                f"(config key 'training.train_global_batch_size' = {gbs} sequences); lower it or add data"
            )
        steps_per_epoch = num_sequences // gbs
        total = min(cfg.max_num_steps, cfg.max_num_epochs * steps_per_epoch)
        return cls(num_sequences, gbs, cfg.train_micro_batch_size, dp_size, steps_per_epoch, total)


def job_target_step(total_steps: int, job_index: int, num_jobs: int) -> int:
    """Job i of N trains until ceil(total * (i+1) / N) (integer arithmetic, no float rounding)."""
    return -(-total_steps * (job_index + 1) // num_jobs)


@dataclass
class StepBatch:
    """One optimizer step: its sequences (in permutation order), their bins and each rank's share of them."""

    epoch: int
    sample_ids: list[int]
    bins: list[list[int]]  # every bin of the step, fullest first
    tokens: int
    dp_size: int
    micro_batch: int
    rank_bins: list[list[list[int]]] = field(init=False)

    def __post_init__(self) -> None:
        self.rank_bins = [self.bins[r :: self.dp_size] for r in range(self.dp_size)]

    @property
    def micro_batches_per_rank(self) -> int:
        """Forward/backward passes every rank runs this step (the most any rank needs)."""
        return max(math.ceil(len(b) / self.micro_batch) for b in self.rank_bins)

    @property
    def micro_batches(self) -> int:
        """Micro-batches that hold data, over all ranks."""
        return sum(math.ceil(len(b) / self.micro_batch) for b in self.rank_bins)

    def rank_micro_batches(self, dp_rank: int) -> list[list[list[int]]]:
        """Rank `dp_rank`'s micro-batches, each a list of bins (lists of sequence ids); empty ones pad it to
        micro_batches_per_rank."""
        mine = self.rank_bins[dp_rank]
        micro = [mine[i : i + self.micro_batch] for i in range(0, len(mine), self.micro_batch)]
        return micro + [[] for _ in range(self.micro_batches_per_rank - len(micro))]

    @property
    def digest(self) -> str:
        return samples_digest(self.sample_ids)


class StepSampler:
    """The steps of the run, in order, from a resumable position (epoch, sequences consumed in it)."""

    def __init__(self, plan: TrainingPlan, lengths: np.ndarray, seed: int, packer: Packer) -> None:
        if len(lengths) != plan.num_sequences:
            raise ValueError(f"{len(lengths)} lengths for a plan over {plan.num_sequences} sequences")
        self.plan, self.lengths, self.seed, self.packer = plan, np.asarray(lengths, dtype=np.int64), seed, packer
        self.epoch = 0
        self.consumed = 0
        self._perm_epoch = -1
        self._perm: list[int] = []

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "sequences_consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["sequences_consumed"])

    def _permutation(self) -> list[int]:
        if self._perm_epoch != self.epoch:
            self._perm = epoch_permutation(self.plan.num_sequences, self.seed, self.epoch)
            self._perm_epoch = self.epoch
        return self._perm

    def next_step(self) -> StepBatch:
        """The next optimizer step (the same on every rank); advances the position."""
        p = self.plan
        if self.consumed + p.global_batch > p.num_sequences:
            self.epoch, self.consumed = self.epoch + 1, 0
        ids = self._permutation()[self.consumed : self.consumed + p.global_batch]
        self.consumed += p.global_batch
        bins = self.packer.bins(ids, self.lengths)
        tokens = int(self.lengths[np.asarray(ids, dtype=np.int64)].sum())
        return StepBatch(self.epoch, ids, bins, tokens, p.dp_size, p.micro_batch)


def join_sequences(dataset, ids: Sequence[int]) -> dict:
    """One bin made of the sequences `ids` of `dataset` laid end to end (a bin as collate_bins reads it); an
    empty `ids` gives the one-token bin with no loss that pads a rank short of data."""
    if not ids:
        return {
            "input_ids": torch.tensor([int(dataset.index["pad_token_id"])]),
            "loss_mask": torch.tensor([False]),
            "seq_lens": [1],
        }
    parts = [dataset.get_bin(i) for i in ids]
    return {
        "input_ids": torch.cat([p["input_ids"] for p in parts]),
        "loss_mask": torch.cat([p["loss_mask"] for p in parts]),
        "seq_lens": [n for p in parts for n in p["seq_lens"]],
    }


def validation_batches(lengths: np.ndarray, packer: Packer, cfg: TrainingConfig, dp_size: int) -> list[StepBatch]:
    """The batches one validation runs, as NeMo-RL's validate() reads them: the validation sequences in file
    order, val_global_batch_size per batch (the last may be short), the first val_batches of them (every one
    when val_batches <= 0), the same every time. Each is packed into bins and dealt to the dp ranks as a
    training step is, in micro-batches of val_micro_batch_size bins."""
    lengths = np.asarray(lengths, dtype=np.int64)
    size = cfg.val_global_batch_size
    count = math.ceil(len(lengths) / size)
    if cfg.val_batches > 0:
        count = min(count, cfg.val_batches)
    batches = []
    for k in range(count):
        ids = list(range(k * size, min((k + 1) * size, len(lengths))))
        tokens = int(lengths[ids].sum())
        batches.append(StepBatch(0, ids, packer.bins(ids, lengths), tokens, dp_size, cfg.val_micro_batch_size))
    return batches
