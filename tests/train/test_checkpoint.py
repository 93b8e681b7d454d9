"""Checkpoint directory rules: only committed checkpoints count, torn ones are ignored and cleaned."""

from __future__ import annotations

import random

import pytest
import torch

from sftflow.train.checkpoint import ENGINE, Checkpointer, RngState, TrainState, complete_checkpoints, latest_checkpoint
from tests.train.conftest import Box, ModelAndOptimizer, run_inprocess, train_state_of


def _full(tensor):
    """The whole tensor, whether FSDP sharded it (DTensor) or not (one fp32 process is not sharded)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _states(model, optimizer, world1, step: int, epoch: int, bins_consumed: int, next_step: int) -> dict:
    return {
        ENGINE: ModelAndOptimizer(model, optimizer),
        "sampler": Box(epoch=epoch, bins_consumed=bins_consumed),
        "schedule": Box(next_step=next_step),
        "rng": RngState(world1),
        "train": TrainState(step),
    }


def test_torn_and_unrelated_directories_are_not_checkpoints(tmp_path, world1, packed, tiny_model):
    ckpt = tmp_path / "ckpt"
    run_inprocess(world1, ckpt, packed, tiny_model, max_num_steps=2, save_period=2)
    good = latest_checkpoint(ckpt)
    assert good.step == 2
    (ckpt / "step_00000009.tmp").mkdir()  # killed while writing
    (ckpt / "step_00000009.tmp" / ".metadata").write_bytes(b"")
    (ckpt / "step_00000008").mkdir()  # no DCP metadata: not a finished checkpoint
    (ckpt / "step_7").mkdir()
    assert [c.step for c in complete_checkpoints(ckpt)] == [2]
    Checkpointer(ckpt, world1).clean_partial()
    assert not (ckpt / "step_00000009.tmp").exists()
    # a new job resumes from step 2, not from the torn step 9
    record = run_inprocess(world1, ckpt, packed, tiny_model, max_num_steps=3)
    assert record["start_step"] == 2 and record["end_step"] == 3


def test_save_then_load_restores_model_optimizer_rng_and_train_state(tmp_path, world1, tiny_model):
    from sftflow.train.model import build_model

    model = build_model(str(tiny_model), world1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(input_ids=torch.randint(3, 300, (1, 16)), use_cache=False).logits.sum().backward()
    opt.step()
    torch.manual_seed(123)
    random.seed(5)
    path, _ = Checkpointer(tmp_path, world1).save(1, _states(model, opt, world1, 1, 2, 16, 1), {})
    expect_torch, expect_py = torch.rand(3), random.random()
    weights = {k: _full(v).clone() for k, v in model.state_dict().items()}

    other = build_model(str(tiny_model), world1)
    other_opt = torch.optim.AdamW(other.parameters(), lr=1e-2)
    torch.manual_seed(0)
    random.seed(0)
    states = _states(other, other_opt, world1, 0, 0, 0, 0)
    Checkpointer(tmp_path, world1).load(path, states)
    state = train_state_of(states)
    assert state == {"step": 1, "epoch": 2, "bins_consumed": 16, "scheduler": {"next_step": 1}}
    assert torch.equal(torch.rand(3), expect_torch) and random.random() == expect_py
    for k, v in other.state_dict().items():
        assert torch.equal(_full(v), weights[k]), k
    a = opt.state_dict()["state"]
    b = other_opt.state_dict()["state"]
    for i in a:
        assert torch.equal(_full(a[i]["exp_avg"]), _full(b[i]["exp_avg"]))


class _NotPlainData:
    def __reduce__(self):  # what a tampered checkpoint would carry: code run at unpickling time
        return (print, ("unpickled!",))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_non_tensor_entries_are_loaded_without_arbitrary_unpickling(tmp_path):
    import torch.distributed.checkpoint as dcp

    from sftflow.train.checkpoint import SafeLoadPlanner

    dcp.save({"lr": 0.5, "betas": (0.9, 0.98), "bad": _NotPlainData()}, checkpoint_id=str(tmp_path), no_dist=True)
    plain = {"lr": 0.0, "betas": None}
    dcp.load(plain, checkpoint_id=str(tmp_path), planner=SafeLoadPlanner(), no_dist=True)
    assert plain == {"lr": 0.5, "betas": (0.9, 0.98)}
    # DCP re-raises the UnpicklingError inside a CheckpointException (a BaseException)
    with pytest.raises(BaseException, match="Unsupported global: GLOBAL print"):
        dcp.load({"bad": None}, checkpoint_id=str(tmp_path), planner=SafeLoadPlanner(), no_dist=True)
