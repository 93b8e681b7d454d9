"""Bin order, step plan, job targets and the learning-rate schedule."""

from __future__ import annotations

import math

import pytest

from sftflow.errors import SftflowError
from sftflow.train.data import BinSampler, TrainingPlan, eval_batches, job_target_step
from sftflow.train.lr_schedule import lr_at
from sftflow.train.settings import TrainingConfig


def _plan(num_bins=20, gbs=8, mbs=2, dp=1, steps=100, epochs=3) -> TrainingPlan:
    cfg = {
        "train_global_batch_size": gbs,
        "train_micro_batch_size": mbs,
        "max_num_steps": steps,
        "max_num_epochs": epochs,
    }
    return TrainingPlan.make(TrainingConfig.from_section(cfg), num_bins, dp)


def test_total_steps_is_the_smaller_of_max_steps_and_epochs():
    assert (_plan(steps=100).steps_per_epoch, _plan(steps=100).total_steps) == (2, 6)
    assert _plan(steps=5).total_steps == 5
    assert _plan(dp=2, mbs=2).grad_accum == 2


def test_plan_rejects_indivisible_batches_and_too_little_data():
    with pytest.raises(SftflowError, match=r"\(8\) must be divisible .* \(3 x 1 = 3\)"):
        _plan(mbs=3)
    with pytest.raises(SftflowError, match=r"has 5 rows .* = 8"):
        _plan(num_bins=5)


def test_job_targets_split_the_steps_and_end_at_total():
    assert [job_target_step(8, i, 3) for i in range(3)] == [3, 6, 8]
    assert [job_target_step(10**12 + 1, i, 2) for i in range(2)] == [500000000001, 10**12 + 1]
    assert [job_target_step(2, i, 4) for i in range(4)] == [1, 1, 2, 2]


def test_every_epoch_is_a_fresh_permutation_and_drops_the_last_partial_batch():
    plan = _plan(num_bins=20)
    sampler = BinSampler(plan, dp_rank=0, seed=1)
    epochs = []
    for _ in range(3):
        ids = [i for _ in range(plan.steps_per_epoch) for mb in sampler.next_step() for i in mb]
        assert len(ids) == len(set(ids)) == 16
        epochs.append(ids)
    assert epochs[0] != epochs[1] != epochs[2]
    assert BinSampler(plan, 0, seed=2).next_step() != BinSampler(plan, 0, seed=1).next_step()


def test_dp_ranks_split_each_global_batch_without_overlap():
    plan = _plan(num_bins=20, dp=2, mbs=2)
    one = BinSampler(_plan(num_bins=20), 0, seed=3)
    ranks = [BinSampler(plan, r, seed=3) for r in range(2)]
    for _ in range(5):
        together = [i for mb in one.next_step() for i in mb]
        split = [i for r in ranks for mb in r.next_step() for i in mb]
        assert split == together


def test_resumed_sampler_continues_exactly():
    plan = _plan(num_bins=20)
    straight = BinSampler(plan, 0, seed=4)
    first = [straight.next_step() for _ in range(3)]
    state = straight.state_dict()
    rest = [straight.next_step() for _ in range(4)]
    resumed = BinSampler(plan, 0, seed=4)
    resumed.load_state_dict(state)
    assert [resumed.next_step() for _ in range(4)] == rest
    assert first  # (epoch 1 started inside the first 3 steps)
    assert state == {"epoch": 1, "bins_consumed": 8}


def test_eval_batches_cover_every_bin_once_over_ranks():
    got = sorted(i for r in range(3) for b in eval_batches(10, 2, r, 3) for i in b)
    assert got == list(range(10))


def test_warmup_then_cosine_to_min():
    kw = dict(peak=1.0, minimum=0.1, warmup=4, total=14)
    assert [lr_at(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(9, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    values = [lr_at(s, **kw) for s in range(3, 14)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert values[-1] > 0.1 and lr_at(14, **kw) == pytest.approx(0.1)
    assert lr_at(0, peak=1.0, minimum=0.0, warmup=0, total=5) == 1.0
