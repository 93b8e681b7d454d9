"""The global batch in sequences, as NeMo-RL's: 3 steps of 8 sequences on 1 and 2 data-parallel ranks, in 1 job
and in 2 chained jobs. Every step's sample ids match an independent replay of the seeded permutation, the
weights of 1 and 2 jobs are bitwise equal, and those of 1 and 2 ranks agree within the DP tests' tolerance, as does
the validation loss at the end (a held-out set in 3 batches of 5, 5 and 2 sequences, dealt over the ranks)."""

from __future__ import annotations

import pytest
import torch

from sftflow.packing import PackedDataset
from tests.train.conftest import (
    assert_weights_close,
    final_weights,
    logged,
    make_packed,
    metrics_rows,
    replay_digests,
    run_inprocess,
    run_train,
    training_config,
    write_config,
)

GBS, STEPS, SEED = 8, 3, 7
RUN = dict(train_global_batch_size=GBS, train_micro_batch_size=1, max_num_steps=STEPS, save_period=2, seed=SEED,
           val_batches=0, val_global_batch_size=5)  # fmt: skip


def check_steps(ckpt, packed) -> None:
    """Each step's logged counts against the replayed sample ids and the sequences' own lengths and masks."""
    data = PackedDataset(packed)
    rows = metrics_rows(ckpt)
    assert sorted(rows) == [1, 2, 3]
    for step, (ids, digest) in enumerate(replay_digests(len(data), SEED, GBS, STEPS), start=1):
        seqs = [data.get_bin(i) for i in ids]
        row = rows[step]
        assert row["samples_digest"] == digest
        assert row["sequences"] == GBS
        assert row["tokens"] == sum(len(s["input_ids"]) for s in seqs)
        assert row["loss_tokens"] == sum(int(s["loss_mask"][1:].sum()) for s in seqs)
        assert row["bins"] <= row["micro_batches"] <= GBS  # micro-batch of 1 bin: one per bin, over all ranks
        assert row["fill_ratio"] == pytest.approx(
            row["tokens"] / (row["bins"] * data.index["max_total_sequence_length"])
        )
        assert row["overlong_masked"] == 0


@pytest.fixture(scope="module")
def val_packed(tmp_path_factory):
    return make_packed(tmp_path_factory.mktemp("val") / "packed", num_sequences=12, seed=9)


@pytest.fixture(scope="module")
def dp1(tmp_path_factory, world1, packed, tiny_model, val_packed):
    tmp = tmp_path_factory.mktemp("dp1")
    run_inprocess(world1, tmp / "one", packed, tiny_model, validation_packed=val_packed, **RUN)
    for job in range(2):
        run_inprocess(world1, tmp / "two", packed, tiny_model, job=job, jobs=2, validation_packed=val_packed, **RUN)
    return tmp


def test_one_rank_one_job_and_two_chained_jobs_replay_the_same_steps_bitwise(dp1, packed):
    for run in ("one", "two"):
        check_steps(dp1 / run, packed)
    one, two = final_weights(dp1 / "one"), final_weights(dp1 / "two")
    assert all(torch.equal(one[name], two[name]) for name in one)
    timing = {"step_seconds", "tokens_per_second", "elapsed_seconds", "mfu"}
    untimed = [{s: {k: v for k, v in r.items() if k not in timing} for s, r in metrics_rows(dp1 / run).items()}
               for run in ("one", "two")]  # fmt: skip
    assert untimed[0] == untimed[1]  # loss, grad norm, lr, counts and digests of every step
    assert logged(dp1 / "one", "val_loss") == logged(dp1 / "two", "val_loss") and logged(dp1 / "one", "val_loss")


@pytest.mark.slow
def test_two_ranks_one_job_and_two_chained_jobs_train_the_same_steps(tmp_path, dp1, packed, tiny_model, val_packed):
    config = write_config(tmp_path / "config.json", training_config(**RUN))
    extra = ("--validation-packed", str(val_packed))
    run_train(config, packed, tiny_model, tmp_path / "one", nproc=2, extra=extra)
    for job in range(2):
        run_train(config, packed, tiny_model, tmp_path / "two", job=job, jobs=2, nproc=2, extra=extra)
    for run in ("one", "two"):
        check_steps(tmp_path / run, packed)
        rows = metrics_rows(tmp_path / run)
        assert all(r["micro_batches_per_rank"] == -(-r["bins"] // 2) for r in rows.values())  # bins dealt over 2
    one, two = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert all(torch.equal(one[name], two[name]) for name in one)
    assert_weights_close(one, final_weights(dp1 / "one"))
    for step, row in metrics_rows(dp1 / "one").items():  # (this is also the fsdp DP2-trains-like-DP1 test)
        assert metrics_rows(tmp_path / "one")[step]["loss"] == pytest.approx(row["loss"], rel=1e-6)
        assert metrics_rows(tmp_path / "one")[step]["grad_norm"] == pytest.approx(row["grad_norm"], rel=1e-5)
    ((val_step, val_loss),) = logged(dp1 / "one", "val_loss").items()  # val_at_end: after step 3
    assert val_step == STEPS and logged(tmp_path / "one", "val_loss")[STEPS] == pytest.approx(val_loss, rel=1e-6)
    assert logged(tmp_path / "one", "val_loss_tokens") == logged(dp1 / "one", "val_loss_tokens")
