"""The fsdp trainer's bf16 mixed precision (bf16 compute, fp32 master weights, gradients and optimizer state),
run on CPU so that dtype mistakes show here rather than on a GPU.

The product trains in fp32 on CPU (`mixed_precision_dtype`); these tests switch the GPU's bf16 policy on for CPU.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import DTensor

from sftflow.train import fsdp
from sftflow.train.checkpoint import ENGINE, RngState, TrainState
from sftflow.train.settings import TrainingConfig
from tests.train.conftest import (
    Box,
    final_weights,
    logged,
    optimizer_state,
    run_inprocess,
    train_state_of,
    training_config,
)

STEPS = dict(max_num_steps=4, save_period=2, train_micro_batch_size=4)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def test_the_product_trains_in_bf16_on_gpu_only():
    assert fsdp.mixed_precision_dtype("bf16", torch.device("cuda", 0)) == torch.bfloat16
    assert fsdp.mixed_precision_dtype("fp32", torch.device("cuda", 0)) is None
    assert fsdp.mixed_precision_dtype("bf16", torch.device("cpu")) is None


@pytest.fixture
def bf16_on_cpu(monkeypatch):
    def gpu_policy_everywhere(precision: str, device: torch.device):
        return torch.bfloat16 if precision == "bf16" else None

    monkeypatch.setattr(fsdp, "mixed_precision_dtype", gpu_policy_everywhere)


def _engine(tmp_path, world1, packed, tiny_model, **training):
    from sftflow.config import validate_sections
    from sftflow.packing import PackedDataset
    from sftflow.train.engine import Engine
    from sftflow.train.fsdp import FsdpEngine
    from sftflow.train.trainer import JobSpec

    cfg = validate_sections(training_config(precision="bf16", **training))
    spec = JobSpec(
        packed=str(packed), model=str(tiny_model), checkpoint_dir=str(tmp_path / "ckpt"),
        job_index=0, num_jobs=1, done_file=str(tmp_path / "job0.done"),
    )  # fmt: skip
    dataset = PackedDataset(packed)
    engine = FsdpEngine(
        TrainingConfig.from_section(cfg["training"]), spec, world1, int(dataset.index["max_total_sequence_length"]), 0
    )
    assert isinstance(engine, Engine)  # the runtime-checkable protocol, on a built engine
    return engine, [[dataset.get_bin(i) for i in range(4)], [dataset.get_bin(i) for i in range(4, 8)]]


def test_bf16_computes_in_bf16_and_keeps_fp32_weights_gradients_and_optimizer_state(
    bf16_on_cpu, tmp_path, world1, packed, tiny_model
):
    engine, micro_bins = _engine(tmp_path, world1, packed, tiny_model)
    model = engine.model
    assert {_local(p).dtype for p in model.parameters()} == {torch.float32}  # sharded fp32 master weights

    seen: dict[str, set[torch.dtype]] = {"linear inputs": set(), "attention outputs": set(), "logits": set()}
    hooks = [
        module.register_forward_hook(lambda m, args, out: seen["linear inputs"].add(args[0].dtype))
        for module in model.modules()
        if isinstance(module, torch.nn.Linear)
    ]
    hooks += [
        layer.self_attn.register_forward_hook(lambda m, args, out: seen["attention outputs"].add(out[0].dtype))
        for layer in model.model.layers
    ]
    hooks.append(model.lm_head.register_forward_hook(lambda m, args, out: seen["logits"].add(out.dtype)))
    from sftflow.packing import collate_bins

    batch = collate_bins(micro_bins[0], engine.seq_len, engine.pad_id)
    loss = engine.loss_sum(batch)
    for h in hooks:
        h.remove()
    assert seen == {
        "linear inputs": {torch.bfloat16},
        "attention outputs": {torch.bfloat16},
        "logits": {torch.bfloat16},
    }
    assert loss.dtype == torch.float32  # the cross-entropy upcasts the bf16 logits

    (loss / batch["num_loss_tokens"]).backward()
    assert {_local(p.grad).dtype for p in model.parameters()} == {torch.float32}  # reduced in fp32
    model.zero_grad(set_to_none=True)

    _, _, grad_norm = engine.train_step(micro_bins)
    assert grad_norm > 0
    assert {_local(p).dtype for p in model.parameters()} == {torch.float32}
    states = [s for s in engine.optimizer.state.values()]
    assert states and all(_local(s[k]).dtype == torch.float32 for s in states for k in ("exp_avg", "exp_avg_sq"))


def test_bf16_chunked_loss_gives_the_full_logits_loss_and_fp32_gradients(
    bf16_on_cpu, tmp_path, world1, packed, tiny_model
):
    from sftflow.packing import collate_bins

    engine, micro_bins = _engine(tmp_path, world1, packed, tiny_model, loss_chunk_tokens=16)
    batch = collate_bins(micro_bins[0], engine.seq_len, engine.pad_id)
    losses, grads = {}, {}
    for chunk in (16, 0):
        engine.loss_chunk_tokens = chunk
        losses[chunk] = engine.loss_sum(batch)
        losses[chunk].backward()
        grads[chunk] = [_local(p.grad).clone() for p in engine.model.parameters()]
        engine.model.zero_grad(set_to_none=True)
    assert losses[16].dtype == losses[0].dtype == torch.float32
    torch.testing.assert_close(losses[16], losses[0], rtol=1e-3, atol=0)
    for chunked, full in zip(grads[16], grads[0], strict=True):
        # bf16 rounding of differently split matmuls: both are about 1% (in norm) from the fp32 gradients
        assert chunked.dtype == torch.float32
        assert float((chunked - full).norm() / full.norm()) < 2e-2


def _states(engine, world1, step: int, epoch: int, bins_consumed: int, next_step: int) -> dict:
    return {
        ENGINE: engine,
        "sampler": Box(epoch=epoch, bins_consumed=bins_consumed),
        "schedule": Box(next_step=next_step),
        "rng": RngState(world1),
        "train": TrainState(step),
    }


def test_bf16_checkpoint_round_trip_restores_fp32_weights_and_optimizer_state(
    bf16_on_cpu, tmp_path, world1, packed, tiny_model
):
    engine, micro_bins = _engine(tmp_path / "a", world1, packed, tiny_model)
    engine.train_step(micro_bins)
    train_state = {"step": 1, "epoch": 0, "bins_consumed": 8, "scheduler": {"next_step": 1}}
    path, _ = engine.checkpointer.save(1, _states(engine, world1, 1, 0, 8, 1), {})
    other, _ = _engine(tmp_path / "b", world1, packed, tiny_model)
    states = _states(other, world1, 0, 0, 0, 0)
    other.checkpointer.load(path, states)
    assert train_state_of(states) == train_state
    for (name, p), q in zip(engine.model.named_parameters(), other.model.parameters(), strict=True):
        assert _local(q).dtype == torch.float32 and torch.equal(_local(q), _local(p)), name
    a, b = engine.optimizer.state_dict()["state"], other.optimizer.state_dict()["state"]
    assert a.keys() == b.keys()
    for i in a:
        for key in ("exp_avg", "exp_avg_sq"):
            assert _local(b[i][key]).dtype == torch.float32 and torch.equal(_local(b[i][key]), _local(a[i][key]))
    # both go on identically
    assert engine.train_step(micro_bins) == other.train_step(micro_bins)


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory, world1, packed, tiny_model):
    ckpt = tmp_path_factory.mktemp("fp32") / "ckpt"
    run_inprocess(world1, ckpt, packed, tiny_model, precision="fp32", **STEPS)
    return ckpt


def test_bf16_training_follows_the_fp32_loss_and_resumes_exactly(
    bf16_on_cpu, tmp_path, world1, packed, tiny_model, fp32_run
):
    one_job = tmp_path / "one_job"
    run_inprocess(world1, one_job, packed, tiny_model, precision="bf16", **STEPS)
    bf16, fp32 = logged(one_job), logged(fp32_run)
    assert bf16.keys() == fp32.keys() == {1, 2, 3, 4}
    for step in fp32:
        assert bf16[step] == pytest.approx(fp32[step], rel=2e-2)
    assert bf16 != fp32  # bf16 compute really happened
    assert {t.dtype for t in final_weights(one_job).values()} == {torch.float32}
    assert {t.dtype for t in optimizer_state(one_job).values() if t.ndim} == {torch.float32}

    chained = tmp_path / "chained"
    for job in range(2):  # job 0 stops at step 2 and saves; job 1 resumes from the bf16 run's checkpoint
        run_inprocess(world1, chained, packed, tiny_model, job=job, jobs=2, precision="bf16", **STEPS)
    assert logged(chained) == bf16
    reference = final_weights(one_job)
    for name, tensor in final_weights(chained).items():
        assert torch.equal(tensor, reference[name]), name
