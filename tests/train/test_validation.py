"""Validation as NeMo-RL computes it: which sequences (val_batches x val_global_batch_size, file order), the
token-weighted loss, when (val_at_start, val_period, val_at_end, before the save of the same step), and what is
recorded (Trainer.val_losses, metrics.jsonl)."""

from __future__ import annotations

import json

import pytest
import torch

from sftflow.errors import SftflowError
from tests.train.conftest import inprocess_trainer, logged, make_packed, run_inprocess


@pytest.fixture(scope="module")
def val_packed(tmp_path_factory):
    return make_packed(tmp_path_factory.mktemp("val") / "packed", num_sequences=20, seed=5)


def hf_loss(model_dir, packed, ids) -> tuple[float, int]:
    """Token-mean loss and loss tokens of sequences `ids` of `packed`, one at a time, with the plain HF model."""
    from transformers import AutoModelForCausalLM

    from sftflow.packing import PackedDataset

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    data = PackedDataset(packed)
    total, count = 0.0, 0
    for i in ids:
        b = data.get_bin(i)
        tokens, mask = b["input_ids"], b["loss_mask"]
        with torch.no_grad():
            logits = model(input_ids=tokens[None], use_cache=False).logits[0]
        targets = torch.where(mask[1:], tokens[1:], -100)
        total += float(torch.nn.functional.cross_entropy(logits[:-1], targets, reduction="sum"))
        count += int((targets != -100).sum())
    return total / count, count


def test_val_at_start_is_the_token_mean_over_the_first_val_batches_x_val_global_batch_size(
    tmp_path, world1, packed, tiny_model, val_packed
):
    ckpt = tmp_path / "ckpt"
    trainer = inprocess_trainer(
        world1, ckpt, packed, tiny_model, validation_packed=val_packed, max_num_steps=1,
        val_at_start=True, val_batches=2, val_global_batch_size=3, val_at_end=False,
    )  # fmt: skip
    trainer.train()
    expected, count = hf_loss(tiny_model, val_packed, range(6))  # the base model: step 0 is before any update
    assert trainer.val_losses == {0: pytest.approx(expected, rel=1e-5)}
    rows = [json.loads(line) for line in (ckpt / "metrics" / "metrics.jsonl").read_text().splitlines()]
    (row,) = [r for r in rows if "val_loss" in r]
    assert (row["step"], row["val_loss_tokens"], row["val_sequences"]) == (0, count, 6)
    # Control: the choice of sequences matters (the whole set, or the next ones, give another loss).
    assert abs(hf_loss(tiny_model, val_packed, range(20))[0] - expected) > 1e-3
    assert abs(hf_loss(tiny_model, val_packed, range(1, 7))[0] - expected) > 1e-3


def test_the_loss_does_not_depend_on_val_micro_batch_size(tmp_path, world1, packed, tiny_model, val_packed):
    losses = {}
    for micro in (1, 2):
        trainer = inprocess_trainer(
            world1, tmp_path / f"m{micro}", packed, tiny_model, validation_packed=val_packed,
            val_batches=0, val_global_batch_size=8, val_micro_batch_size=micro,
        )  # fmt: skip
        assert [b.sample_ids for b in trainer.validation_batches] == [list(range(8)), list(range(8, 16)), list(range(16, 20))]  # fmt: skip
        losses[micro] = trainer.validate(0)
        trainer.metrics.close()
    assert losses[1] == pytest.approx(losses[2], rel=1e-6)
    assert losses[1] == pytest.approx(hf_loss(tiny_model, val_packed, range(20))[0], rel=1e-5)


def test_val_period_val_at_end_and_val_at_start_only_from_scratch(tmp_path, world1, packed, tiny_model, val_packed):
    ckpt = tmp_path / "ckpt"
    common = dict(validation_packed=val_packed, val_period=2, val_at_start=True, save_period=2)
    first = inprocess_trainer(world1, ckpt, packed, tiny_model, max_num_steps=3, **common)
    saved = []  # the validation losses known when each checkpoint is saved (retention ranks by them)
    save = first.save
    first.save = lambda step: (saved.append((step, dict(first.val_losses))), save(step))[1]
    first.train()
    assert sorted(first.val_losses) == [0, 2, 3]  # at start, every val_period steps, at the end (val_at_end)
    assert [(step, sorted(known)) for step, known in saved] == [(2, [0, 2]), (3, [0, 2, 3])]

    # A resumed run does not validate at start again; without val_at_end the last step 5 is not validated.
    second = inprocess_trainer(world1, ckpt, packed, tiny_model, max_num_steps=5, val_at_end=False, **common)
    second.train()
    assert sorted(second.val_losses) == [4]
    assert sorted(logged(ckpt, "val_loss")) == [0, 2, 3, 4]
    assert logged(ckpt, "val_loss")[2] == pytest.approx(first.val_losses[2])


def test_no_validation_data_means_no_validation(tmp_path, world1, packed, tiny_model):
    trainer = inprocess_trainer(world1, tmp_path / "ckpt", packed, tiny_model, max_num_steps=2, val_period=1)
    trainer.train()
    assert trainer.val_losses == {} and trainer.validate(2) is None
    assert logged(tmp_path / "ckpt", "val_loss") == {}


def test_validation_data_and_a_held_out_share_together_are_refused(tmp_path, world1, packed, tiny_model, val_packed):
    val = tmp_path / "val.jsonl"
    val.write_text(json.dumps({"input": "w3 w4", "output": "w5 w6"}) + "\n")
    with pytest.raises(SftflowError, match=r"'training.validation_data'.*'training.val_set_size'"):
        run_inprocess(
            world1, tmp_path / "ckpt", packed, tiny_model, validation_packed=val_packed, validation_data=str(val)
        )
