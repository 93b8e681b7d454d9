"""Checkpoints of another experiment are refused, naming the changed keys; raising the step count continues
and says how the schedule changed (issue 12: a changed learning rate left old checkpoints standing as this
run's; raising max_num_steps restarted the cosine schedule without a word)."""

from __future__ import annotations

import json
import logging

import pytest

from sftflow.config import validate_sections
from sftflow.errors import SftflowError
from sftflow.train.checkpoint import latest_checkpoint, read_meta
from sftflow.train.config import check_checkpoint_matches
from sftflow.train.lr_schedule import lr_at
from tests.train.conftest import logged, run_inprocess, training_config


def training(**keys) -> dict:
    """The training section a job of run_inprocess(**keys) gets (defaults filled)."""
    return validate_sections(training_config(**keys))["training"]


def test_a_changed_learning_rate_is_refused_naming_both_values(tmp_path, world1, packed, tiny_model):
    ckpt = tmp_path / "ckpt"
    run_inprocess(world1, ckpt, packed, tiny_model, max_num_steps=4)
    with pytest.raises(SftflowError) as err:
        run_inprocess(world1, ckpt, packed, tiny_model, max_num_steps=6, learning_rate=1e-3, seed=8)
    message = str(err.value)
    assert f"the checkpoints in {ckpt} were trained with other settings" in message
    assert "training.learning_rate: 0.003 there, 0.001 now; training.seed: 7 there, 8 now" in message
    assert "set a new 'output_dir'" in message and f"delete {ckpt}" in message
    assert latest_checkpoint(ckpt).step == 4  # nothing trained, nothing overwritten
    # The planning-time check (rules/common.smk) says the same from the meta.json alone.
    with pytest.raises(SftflowError, match=r"training.learning_rate: 0.003 there, 0.001 now"):
        check_checkpoint_matches(ckpt, training(max_num_steps=6, learning_rate=1e-3, seed=7))
    # What may change between chained jobs passes: steps, epochs, jobs, periods, micro-batch size.
    check_checkpoint_matches(
        ckpt, training(max_num_steps=60, max_num_epochs=99, save_period=3, train_micro_batch_size=1)
    )
    check_checkpoint_matches(tmp_path / "nowhere", training())


def test_raising_max_num_steps_continues_and_records_the_schedule_change(tmp_path, world1, packed, tiny_model, caplog):
    ckpt = tmp_path / "ckpt"
    run_inprocess(world1, ckpt, packed, tiny_model, max_num_steps=4)
    with caplog.at_level(logging.WARNING, logger="sftflow.train"):
        record = run_inprocess(world1, ckpt, packed, tiny_model, max_num_steps=6)
    assert (record["start_step"], record["end_step"]) == (4, 6)
    old, new = (lr_at(4, peak=3e-3, minimum=3e-4, warmup=2, total=t) for t in (4, 6))
    assert "the schedule changes at step 4: total steps 4 -> 6" in caplog.text
    assert f"the learning rate of step 5 is {new:.6g} instead of {old:.6g}" in caplog.text
    assert logged(ckpt, "lr")[5] == pytest.approx(new)
    meta = read_meta(latest_checkpoint(ckpt).path)
    change = {"step": 4, "total_steps_before": 4, "total_steps_after": 6}
    assert meta["schedule_changes"] == [change]
    done = json.loads((ckpt / "job0.done").read_text())
    assert done["end_step"] == 6 and done["schedule_changes"] == [change]
    # ... and the report's training summary shows it (read from the done files, as rule report_training does).
    from sftflow.report.inputs import read_job_records
    from sftflow.report.training import schedule_changes_frame

    frame = schedule_changes_frame(read_job_records(ckpt))
    assert frame.to_dict("records") == [{"at step": 4, "total steps before": 4, "total steps after": 6}]
