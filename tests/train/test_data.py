"""The step plan in sequences, the per-step packing and its split over ranks, job targets and the learning-rate
schedule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sftflow.errors import SftflowError
from sftflow.train.data import Packer, StepSampler, TrainingPlan, job_target_step, validation_batches
from sftflow.train.lr_schedule import lr_at
from sftflow.train.settings import TrainingConfig
from tests.train.conftest import replay_digests

CAPACITY = 64


def _plan(num_sequences=20, gbs=8, mbs=2, dp=1, steps=100, epochs=3) -> TrainingPlan:
    cfg = {
        "train_global_batch_size": gbs,
        "train_micro_batch_size": mbs,
        "max_num_steps": steps,
        "max_num_epochs": epochs,
    }
    return TrainingPlan.make(TrainingConfig.from_section(cfg), num_sequences, dp)


def _lengths(n=20, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, CAPACITY + 1, size=n).astype(np.int64)


def _sampler(plan, lengths=None, seed=1, enabled=True, algorithm="best_fit_decreasing") -> StepSampler:
    lengths = _lengths(plan.num_sequences) if lengths is None else lengths
    return StepSampler(plan, lengths, seed, Packer(enabled, algorithm, CAPACITY))


def test_total_steps_is_the_smaller_of_max_steps_and_epochs_of_whole_batches():
    assert (_plan(steps=100).steps_per_epoch, _plan(steps=100).total_steps) == (2, 6)
    assert _plan(steps=5).total_steps == 5
    # Any global batch works with any micro-batch and dp size: a step's bins are dealt out, not divided.
    assert _plan(gbs=7, mbs=3, dp=2).steps_per_epoch == 2


def test_less_data_than_one_global_batch_is_an_error_naming_the_key():
    with pytest.raises(SftflowError, match=r"has 5 sequences, fewer .*train_global_batch_size' = 8 sequences"):
        _plan(num_sequences=5)


def test_job_targets_split_the_steps_and_end_at_total():
    assert [job_target_step(8, i, 3) for i in range(3)] == [3, 6, 8]
    assert [job_target_step(10**12 + 1, i, 2) for i in range(2)] == [500000000001, 10**12 + 1]
    assert [job_target_step(2, i, 4) for i in range(4)] == [1, 1, 2, 2]


def test_each_step_takes_exactly_the_global_batch_of_a_fresh_permutation_per_epoch():
    plan = _plan(num_sequences=20)
    sampler = _sampler(plan)
    epochs = []
    for _ in range(3):
        steps = [sampler.next_step() for _ in range(plan.steps_per_epoch)]
        ids = [i for s in steps for i in s.sample_ids]
        assert all(len(s.sample_ids) == 8 for s in steps)
        assert len(ids) == len(set(ids)) == 16  # 20 sequences: the last 4 of each epoch are dropped
        assert {s.epoch for s in steps} == {len(epochs)}
        epochs.append(ids)
    assert epochs[0] != epochs[1] != epochs[2]
    assert _sampler(plan, seed=2).next_step().sample_ids != _sampler(plan, seed=1).next_step().sample_ids


def test_the_digests_equal_an_independent_replay_of_the_permutation():
    plan = _plan(num_sequences=21, gbs=5, epochs=10)
    sampler = _sampler(plan, seed=9)
    steps = [sampler.next_step() for _ in range(12)]
    assert [(s.sample_ids, s.digest) for s in steps] == replay_digests(21, 9, 5, 12)


def test_every_sequence_of_a_step_is_in_exactly_one_bin_within_the_capacity():
    lengths = _lengths(40, seed=3)
    for algorithm in ("best_fit_decreasing", "first_fit_decreasing"):
        step = _sampler(_plan(num_sequences=40, gbs=16), lengths, algorithm=algorithm).next_step()
        assert sorted(i for b in step.bins for i in b) == sorted(step.sample_ids)
        sizes = [int(lengths[b].sum()) for b in step.bins]
        assert max(sizes) <= CAPACITY and sizes == sorted(sizes, reverse=True)
        assert len(step.bins) < 16  # some sequences share a bin
        assert step.tokens == int(lengths[step.sample_ids].sum())


def test_with_packing_disabled_every_sequence_is_its_own_bin():
    step = _sampler(_plan(num_sequences=40, gbs=16), enabled=False).next_step()
    assert len(step.bins) == 16 and all(len(b) == 1 for b in step.bins)


def test_the_bins_do_not_depend_on_the_data_parallel_size_and_ranks_stay_in_step():
    lengths = _lengths(40, seed=4)
    one = _sampler(_plan(num_sequences=40, gbs=16, mbs=2, dp=1), lengths).next_step()
    three = _sampler(_plan(num_sequences=40, gbs=16, mbs=2, dp=3), lengths).next_step()
    assert three.bins == one.bins and three.sample_ids == one.sample_ids
    per_rank = [three.rank_micro_batches(r) for r in range(3)]
    assert len({len(m) for m in per_rank}) == 1  # the same number of passes on every rank
    assert len(per_rank[0]) == three.micro_batches_per_rank == math.ceil(math.ceil(len(one.bins) / 3) / 2)
    dealt = [b for micro in per_rank for mb in micro for b in mb]
    assert sorted(map(tuple, dealt)) == sorted(map(tuple, one.bins))  # each bin on exactly one rank
    assert three.micro_batches == sum(1 for micro in per_rank for mb in micro if mb)
    assert all(len(mb) <= 2 for micro in per_rank for mb in micro)


def test_a_rank_without_bins_runs_empty_micro_batches():
    lengths = np.full(8, CAPACITY // 4, dtype=np.int64)  # 4 sequences fill a bin: one step of 8 is 2 bins
    step = _sampler(_plan(num_sequences=8, gbs=8, mbs=1, dp=3, epochs=1), lengths).next_step()
    assert len(step.bins) == 2
    assert [step.rank_micro_batches(r) for r in range(3)][2] == [[]]
    assert (step.micro_batches, step.micro_batches_per_rank) == (2, 1)


def test_resumed_sampler_continues_exactly():
    plan = _plan(num_sequences=20)
    straight = _sampler(plan, seed=4)
    first = [straight.next_step() for _ in range(3)]
    state = straight.state_dict()
    rest = [straight.next_step() for _ in range(4)]
    resumed = _sampler(plan, seed=4)
    resumed.load_state_dict(state)
    assert [(s.sample_ids, s.bins) for s in (resumed.next_step() for _ in range(4))] == [
        (s.sample_ids, s.bins) for s in rest
    ]
    assert first[-1].epoch == 1  # epoch 1 started inside the first 3 steps
    assert state == {"epoch": 1, "sequences_consumed": 8}


def test_a_sequence_longer_than_the_bins_is_an_error_naming_the_key():
    lengths = np.full(8, CAPACITY + 1, dtype=np.int64)
    with pytest.raises(SftflowError, match="packing.max_total_sequence_length"):
        _sampler(_plan(num_sequences=8, gbs=8), lengths).next_step()


@pytest.mark.parametrize(
    "val_batches, expected", [(2, [[0, 1, 2, 3], [4, 5, 6, 7]]), (0, [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]])]
)
def test_validation_batches_are_the_first_val_batches_in_file_order(val_batches, expected):
    """val_global_batch_size sequences per batch in file order (the last short), val_batches of them (<= 0:
    all); each packed like a step, every bin once over the dp ranks in micro-batches of val_micro_batch_size."""
    lengths = _lengths(10)
    cfg = TrainingConfig.from_section(
        {"val_batches": val_batches, "val_global_batch_size": 4, "val_micro_batch_size": 1}
    )
    batches = validation_batches(lengths, Packer(True, "best_fit_decreasing", CAPACITY), cfg, dp_size=3)
    assert [b.sample_ids for b in batches] == expected
    for batch in batches:
        assert batch.tokens == int(lengths[batch.sample_ids].sum())
        dealt = [i for r in range(3) for micro in batch.rank_micro_batches(r) for bin_ in micro for i in bin_]
        assert sorted(dealt) == batch.sample_ids
        assert all(len(micro) <= 1 for r in range(3) for micro in batch.rank_micro_batches(r))


def test_warmup_then_cosine_to_min():
    kw = dict(peak=1.0, minimum=0.1, warmup=4, total=14)
    assert [lr_at(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(9, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    values = [lr_at(s, **kw) for s in range(3, 14)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert values[-1] > 0.1 and lr_at(14, **kw) == pytest.approx(0.1)
    assert lr_at(0, peak=1.0, minimum=0.0, warmup=0, total=5) == 1.0
