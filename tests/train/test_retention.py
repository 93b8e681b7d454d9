"""Checkpoint retention (sftflow.train.retention): ranking, protection, crash-safe removal, the optimizer state
kept only where a resume reads it, and export / averaging / resume after retention."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sftflow.averaging import average_hf_models
from sftflow.errors import SftflowError
from sftflow.train.checkpoint import ENGINE, Checkpointer, complete_checkpoints
from sftflow.train.config import check_training_keys
from sftflow.train.export import export_checkpoint
from sftflow.train.model import build_model
from sftflow.train.retention import (
    RetentionPolicy,
    apply_retention,
    clean_leftovers,
    plan_retention,
    protected_steps,
    remove_averaged,
    remove_tree,
)
from tests.train.conftest import ModelAndOptimizer, logged, run_inprocess, training_config


def read_safetensors_dir(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(str(path)))
    return weights


def _kept(checkpoints: dict[int, dict], **policy) -> list[int]:
    decisions = plan_retention(sorted(checkpoints.items()), RetentionPolicy(**policy))
    return [d.step for d in decisions if d.keep]


LOSSES = {10: {"val_loss": 0.5}, 20: {"val_loss": 0.2}, 30: {"val_loss": 0.9}, 40: {"val_loss": 0.4}, 50: {}}


def test_top_k_by_val_loss_keeps_the_lowest_and_the_newest():
    assert _kept(LOSSES, keep_top_k=2) == [20, 40, 50]  # 50: the newest (resume point), though it has no metric
    assert _kept(LOSSES, keep_top_k=1) == [20, 50]


def test_higher_is_better_reverses_the_ranking():
    assert _kept(LOSSES, keep_top_k=2, higher_is_better=True) == [10, 30, 50]


def test_a_checkpoint_without_the_metric_ranks_below_every_one_with_it():
    steps = {10: {}, 20: {"val_loss": 9.0}, 30: {"val_loss": float("nan")}, 40: {"val_loss": 8.0}}
    assert _kept(steps, keep_top_k=2) == [20, 40]
    assert _kept(steps, keep_top_k=3) == [20, 30, 40]  # among those without it, the newer first


def test_protected_steps_and_the_newest_are_kept_beyond_k():
    assert _kept(LOSSES, keep_top_k=1, protected=frozenset({10, 30})) == [10, 20, 30, 50]


def test_step_ranking_and_null_k():
    assert _kept(LOSSES, keep_top_k=2, metric_name="step") == [40, 50]
    assert _kept(LOSSES, keep_top_k=None) == [10, 20, 30, 40, 50]
    assert _kept(
        {10: {"train_loss": 1.0}, 20: {"train_loss": 3.0}, 30: {}}, keep_top_k=1, metric_name="train:loss"
    ) == [
        10,
        30,
    ]


def test_metric_names_as_nemo_skills_and_nemo_rl_spell_them():
    training = {"keep_top_k": 3, "metric_name": "val:val_loss", "higher_is_better": False}
    assert RetentionPolicy.from_training(training).metric_key == "val_loss"
    assert (
        RetentionPolicy.from_training(training, has_validation=False).metric_name == "step"
    )  # NeMo-RL without a metric
    assert RetentionPolicy.from_training({**training, "metric_name": "train:loss"}).metric_key == "train_loss"


def test_protected_steps_come_from_every_export_key():
    config = {
        "training": {"conversion_step": 7, "export_steps": [5], "average_steps": [2, 3]},
        "eval": {"models": ["final", "step_9", "base"]},
    }
    assert protected_steps(config) == {2, 3, 5, 7, 9}


def test_remove_after_average_needs_average_steps():
    config = {"training": training_config(remove_checkpoints_after_average=True)["training"]}
    from sftflow.config import validate_sections

    config = validate_sections({**config, "packing": {}})
    with pytest.raises(SftflowError, match=r"training.remove_checkpoints_after_average.*training.average_steps"):
        check_training_keys(config, world_size=1, model_config={})


def _fake_checkpoints(root: Path, metrics: dict[int, dict]) -> None:
    for step, values in metrics.items():
        path = root / f"step_{step:08d}"
        (path / "optimizer").mkdir(parents=True)
        (path / "optimizer" / "__0_0.distcp").write_bytes(b"x" * 1000)
        (path / "__0_0.distcp").write_bytes(b"y" * 100)
        (path / "meta.json").write_text(json.dumps({"step": step, "metrics": values, "optimizer_state": True}))


def test_apply_retention_removes_by_rank_and_drops_every_optimizer_state_but_the_newest(tmp_path):
    _fake_checkpoints(tmp_path, LOSSES)
    meta_bytes = (tmp_path / "step_00000030" / "meta.json").stat().st_size
    result = apply_retention(tmp_path, RetentionPolicy(keep_top_k=2, protected=frozenset({10})))
    assert result.removed == [30] and result.optimizer_dropped == [10, 20, 40]
    assert result.freed_bytes == 1100 + meta_bytes + 3 * 1000
    assert [c.step for c in complete_checkpoints(tmp_path)] == [10, 20, 40, 50]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"step_{s:08d}" for s in (10, 20, 40, 50)]
    assert [s for s in (10, 20, 40, 50) if (tmp_path / f"step_{s:08d}" / "optimizer").is_dir()] == [50]
    assert json.loads((tmp_path / "step_00000020" / "meta.json").read_text())["optimizer_state"] is False
    assert (tmp_path / "step_00000020" / "__0_0.distcp").is_file()  # the model stays
    # keep_optimizer_state: all keeps it
    _fake_checkpoints(tmp_path / "all", {1: {}, 2: {}})
    assert apply_retention(tmp_path / "all", RetentionPolicy(keep_top_k=None), "all").optimizer_dropped == []


def test_a_removal_killed_midway_leaves_no_checkpoint_and_the_next_job_finishes_it(tmp_path, world1):
    _fake_checkpoints(tmp_path, {2: {}, 4: {}})
    # what a kill between the rename and the deletion leaves: a marker name, never a step_N directory
    (tmp_path / "step_00000002").rename(tmp_path / "step_00000002.removing")
    (tmp_path / "step_00000004" / "optimizer").rename(tmp_path / "step_00000004" / "optimizer.removing")
    assert [c.step for c in complete_checkpoints(tmp_path)] == [4]
    Checkpointer(tmp_path, world1).clean_partial()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004"]
    assert not (tmp_path / "step_00000004" / "optimizer.removing").exists()
    remove_tree(tmp_path / "step_00000004")
    assert list(tmp_path.iterdir()) == [] and clean_leftovers(tmp_path) == []


def test_remove_after_average_keeps_the_newest(tmp_path):
    _fake_checkpoints(tmp_path, {2: {}, 4: {}, 6: {}})
    meta_bytes = (tmp_path / "step_00000002" / "meta.json").stat().st_size
    record = remove_averaged(tmp_path, [2, 6, 8])
    assert record["removed"] == [2] and record["freed_bytes"] == 1100 + meta_bytes
    assert record["kept"] == {
        "6": "the newest checkpoint: a later run resumes from it",
        "8": "not on disk (already removed)",
    }
    assert [c.step for c in complete_checkpoints(tmp_path)] == [4, 6]


def test_export_average_and_resume_after_retention(tmp_path, world1, packed, tiny_model, caplog):
    """keep_top_k 1 by val_loss with average_steps [2, 4] and validation only at the end: the averaged steps
    survive without their optimizer state, export and average correctly; resuming from one of them is refused,
    naming the key. The trainer warns once that the saves before the end have no validation loss."""
    ckpt = tmp_path / "ckpt"
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"input": f"w{i} w7 w9", "output": f"w{i + 3} w5"}) + "\n" for i in range(3, 9)))
    with caplog.at_level("WARNING", logger="sftflow.train"):
        run_inprocess(world1, ckpt, packed, tiny_model, max_num_steps=6, save_period=2, keep_top_k=1,
                      average_steps=[2, 4], validation_data=str(val), val_period=0)  # fmt: skip
    warnings = [r.getMessage() for r in caplog.records if "rank below" in r.getMessage()]
    assert warnings == [
        "training.val_period is 0 (validation only at the end): checkpoints saved without a validation loss rank "
        "below those with one for training.keep_top_k (1 by val_loss)"
    ]
    found = complete_checkpoints(ckpt)
    assert [c.step for c in found] == [2, 4, 6]
    assert [c.step for c in found if (c.path / "optimizer").is_dir()] == [6]
    metrics = [json.loads((c.path / "meta.json").read_text())["metrics"] for c in found]
    assert ["val_loss" in m for m in metrics] == [False, False, True]  # the end's validation runs before its save
    exports = []
    for c in found[:2]:
        export_checkpoint(c.path, tmp_path / f"hf{c.step}", str(tiny_model))
        exports.append(read_safetensors_dir(tmp_path / f"hf{c.step}"))
    average_hf_models([tmp_path / "hf2", tmp_path / "hf4"], tmp_path / "avg", steps=[2, 4])
    averaged = read_safetensors_dir(tmp_path / "avg")
    assert averaged.keys() == exports[0].keys()
    for name, value in averaged.items():
        torch.testing.assert_close(value, (exports[0][name] + exports[1][name]) / 2, rtol=0, atol=1e-7)
    assert not torch.equal(exports[0]["model.embed_tokens.weight"], exports[1]["model.embed_tokens.weight"])

    model = build_model(str(tiny_model), world1)
    states = {ENGINE: ModelAndOptimizer(model, torch.optim.AdamW(model.parameters()))}
    with pytest.raises(SftflowError, match=r"step_00000004 has no optimizer state \(training.keep_optimizer_state"):
        Checkpointer(ckpt, world1).load(found[1].path, states)
    Checkpointer(ckpt, world1).load(found[2].path, states)  # the newest resumes


def test_keep_top_k_2_by_val_loss_with_average_steps_keeps_exactly_the_best_the_averaged_and_the_newest(
    tmp_path, world1, packed, tiny_model
):
    """Issue 28's run: keep_top_k 2 ranked by the validation loss measured at every save, average_steps [2, 4].
    On disk at the end: the two lowest val_loss checkpoints (from the logged losses), the averaged steps and the
    newest, nothing else; only the newest has its optimizer state, and a later job resumes from it."""
    ckpt = tmp_path / "ckpt"
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"input": f"w{i} w7 w9", "output": f"w{i + 3} w5"}) + "\n" for i in range(3, 9)))
    settings = dict(save_period=2, val_period=2, keep_top_k=2, average_steps=[2, 4], validation_data=str(val),
                    max_num_epochs=100)  # fmt: skip
    run_inprocess(world1, ckpt, packed, tiny_model, max_num_steps=10, **settings)
    val_losses = logged(ckpt, "val_loss")
    assert sorted(val_losses) == [2, 4, 6, 8, 10]
    best_two = sorted(val_losses, key=lambda s: (val_losses[s], -s))[:2]
    expected = sorted(set(best_two) | {2, 4, 10})
    found = complete_checkpoints(ckpt)
    assert [c.step for c in found] == expected and len(expected) < 5  # retention did remove something
    assert [c.step for c in found if (c.path / "optimizer").is_dir()] == [10]
    for c in found:
        assert json.loads((c.path / "meta.json").read_text())["metrics"]["val_loss"] == val_losses[c.step]
    record = run_inprocess(world1, ckpt, packed, tiny_model, max_num_steps=12, **settings)
    assert (record["start_step"], record["end_step"]) == (10, 12)
