"""Several processes (torchrun, gloo on CPU): FSDP2 resumes bitwise, tensor parallelism trains like one process (FSDP2
on 2 data-parallel ranks training like one process: tests/train/test_global_batch.py)."""

from __future__ import annotations

import pytest
import torch

from tests.train.conftest import (
    assert_weights_close,
    final_weights,
    logged,
    make_model,
    make_packed,
    run_inprocess,
    run_train,
    training_config,
    write_config,
)

STEPS = dict(max_num_steps=4, save_period=2)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, world1, packed, tiny_model):
    ckpt = tmp_path_factory.mktemp("single") / "ckpt"
    run_inprocess(world1, ckpt, packed, tiny_model, train_micro_batch_size=8, **STEPS)
    return ckpt


@pytest.mark.slow
def test_fsdp_two_processes_resume_bitwise_across_chained_jobs(tmp_path):
    """With attention dropout, so each rank's own random state must come back from the checkpoint too."""
    model = make_model(tmp_path / "model", attention_dropout=0.2)
    packed = make_packed(tmp_path / "packed", seed=2)
    config = write_config(tmp_path / "config.json", training_config(train_micro_batch_size=2, **STEPS))
    run_train(config, packed, model, tmp_path / "one_job", nproc=2)
    for job in range(2):  # job 0 stops at step 2 and saves; job 1 reloads the shards of both ranks
        run_train(config, packed, model, tmp_path / "chained", job=job, jobs=2, nproc=2)
    reference = final_weights(tmp_path / "one_job")
    for name, tensor in final_weights(tmp_path / "chained").items():
        assert torch.equal(tensor, reference[name]), name
    assert logged(tmp_path / "chained") == logged(tmp_path / "one_job")


@pytest.mark.slow
def test_tensor_parallel_two_ranks_trains_like_one_process(tmp_path, single_process, packed, tiny_model):
    config = write_config(
        tmp_path / "config.json", training_config(train_micro_batch_size=4, tensor_model_parallel_size=2, **STEPS)
    )
    run_train(config, packed, tiny_model, tmp_path / "ckpt", nproc=2)
    for step, loss in logged(single_process).items():
        assert logged(tmp_path / "ckpt")[step] == pytest.approx(loss, rel=1e-6)
    for step, norm in logged(single_process, "grad_norm").items():
        assert logged(tmp_path / "ckpt", "grad_norm")[step] == pytest.approx(norm, rel=1e-5)
    # DCP stores full tensors, so TP shards come back as the full q/k/v/o/MLP weights
    assert_weights_close(final_weights(tmp_path / "ckpt"), final_weights(single_process))
