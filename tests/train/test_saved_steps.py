"""Planning-time check of the steps an export or an average needs (sftflow.averaging.SavePlan, reached through
sftflow.config.check_saved_steps): save_period, max_num_steps, and - once the packed data exists - the data's
epoch length (the early stop at max_num_epochs) and the chained jobs' ends, as the trainer saves them."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from sftflow import config as C
from sftflow.averaging import SavePlan, packed_num_sequences
from sftflow.errors import SftflowError
from sftflow.train.data import job_target_step
from tests.conftest import REPO


def _training(**keys) -> dict:
    return C.validate_section("training", keys)


def _config(tmp_path, num_sequences: int | None = None, eval_models=None, **training) -> dict:
    cfg = copy.deepcopy(yaml.safe_load((REPO / "config" / "config.yaml").read_text()))
    cfg["output_dir"] = str(tmp_path / "results")
    cfg["training"].update(training)
    cfg.setdefault("eval", {})["models"] = eval_models
    if num_sequences is not None:
        packed = tmp_path / "results" / "data" / "packed"
        packed.mkdir(parents=True)
        (packed / "index.json").write_text(json.dumps({"num_sequences": num_sequences}), encoding="utf-8")
    return cfg


def test_without_data_the_last_step_is_max_num_steps():
    plan = SavePlan.from_training(_training(max_num_steps=1000, save_period=100, num_training_jobs=3))
    assert plan.last_step == 1000 and plan.job_ends == ()  # job ends unknown until the data's length is
    assert plan.check(300, "training.conversion_step") == [300]
    assert plan.check([1000, 200], "training.export_steps") == [200, 1000]
    with pytest.raises(SftflowError, match=r"'training.conversion_step': step 333 is never saved"):
        plan.check(333, "training.conversion_step")


def test_the_epoch_length_ends_the_run_early():
    # 1,241 sequences / 64 per step = 19 steps per epoch; 6 epochs = 114 steps, before max_num_steps 1000
    training = _training(max_num_steps=1000, max_num_epochs=6, train_global_batch_size=64, save_period=50)
    plan = SavePlan.from_training(training, num_sequences=1241)
    assert plan.last_step == 6 * (1241 // 64) == 114
    assert plan.check([50, 100, 114], "training.average_steps") == [50, 100, 114]
    with pytest.raises(SftflowError) as err:
        plan.check(150, "training.conversion_step")
    message = str(err.value)
    for part in (
        "config key 'training.conversion_step': step 150 is after the last step (114 = training.max_num_epochs = 6",
        "1241 sequences / training.train_global_batch_size = 64",
        "training.max_num_steps = 1000",
    ):
        assert part in message
    # max_num_steps first: the epochs do not matter
    plan = SavePlan.from_training(training, num_sequences=100_000)
    assert plan.last_step == 1000 and plan.why_last == "training.max_num_steps = 1000"


def test_chained_job_ends_are_saved_only_without_a_deadline():
    training = _training(max_num_steps=100, save_period=40, num_training_jobs=3)
    plan = SavePlan.from_training(training, num_sequences=10_000)
    assert plan.job_ends == tuple(job_target_step(100, i, 3) for i in range(3)) == (34, 67, 100)
    assert plan.check([34, 40, 67, 80, 100], "eval.models") == [34, 40, 67, 80, 100]
    with pytest.raises(SftflowError, match=r"step 35 is never saved.*chained jobs' ends \[34, 67, 100\]"):
        plan.check(35, "eval.models")
    deadline = SavePlan.from_training({**training, "time_limit": "01:00:00"}, num_sequences=10_000)
    assert deadline.job_ends == ()
    with pytest.raises(SftflowError, match=r"'eval.models': step 34 is never saved"):
        deadline.check(34, "eval.models")


def test_every_saved_step_matches_what_the_trainer_saves():
    """SavePlan.saves against a replay of Trainer.train's save condition over its chained jobs."""
    for total, period, jobs in [(114, 50, 1), (100, 40, 3), (7, 3, 4), (20, 5, 2)]:
        saved, step = set(), 0
        for job in range(jobs):
            target = job_target_step(total, job, jobs)
            last_saved = step if step > 0 else -1
            while step < target:
                step += 1
                if step % period == 0 and step < target:
                    saved.add(step)
                    last_saved = step
            if step != last_saved and step > 0:
                saved.add(step)
        training = _training(max_num_steps=total, save_period=period, num_training_jobs=jobs)
        plan = SavePlan.from_training(training, num_sequences=total * 32)  # one epoch = total steps
        assert {s for s in range(1, total + 5) if plan.saves(s)} == saved, (total, period, jobs)


def test_packed_num_sequences_reads_the_index(tmp_path):
    assert packed_num_sequences(tmp_path / "absent") is None
    (tmp_path / "index.json").write_text('{"num_sequences": 1241}', encoding="utf-8")
    assert packed_num_sequences(tmp_path) == 1241
    (tmp_path / "index.json").write_text("{not json", encoding="utf-8")
    assert packed_num_sequences(tmp_path) is None


@pytest.mark.parametrize(
    ("keys", "eval_models", "message"),
    [
        ({"conversion_step": 160}, None, r"'training.conversion_step': step 160 is after the last step \(120 = "),
        ({"export_steps": [40, 160]}, None, r"'training.export_steps': step 160 is after the last step \(120 = "),
        ({"average_steps": [40, 160]}, None, r"'training.average_steps': step 160 is after the last step"),
        ({}, ["final", "step_160"], r"'eval.models': step 160 is after the last step"),
        ({"conversion_step": 50}, None, r"'training.conversion_step': step 50 is never saved.*save_period = 40"),
    ],
)
def test_the_workflow_config_refuses_steps_past_the_data(tmp_path, keys, eval_models, message):
    # 800 sequences / 20 per step = 40 steps per epoch, 3 epochs = 120 steps < max_num_steps 1000
    common = {"max_num_steps": 1000, "max_num_epochs": 3, "train_global_batch_size": 20, "save_period": 40}
    cfg = _config(tmp_path, 800, eval_models, **common, **keys)
    with pytest.raises(SftflowError, match=message):
        C.validate_workflow_config(cfg)
    # before pack_data has run only max_num_steps is known: the same steps pass (the export checks them later)
    if "never saved" not in message:
        C.validate_workflow_config(_config(tmp_path / "nodata", None, eval_models, **common, **keys))


def test_the_workflow_config_accepts_saved_steps(tmp_path):
    cfg = _config(
        tmp_path,
        800,
        ["final", "step_80"],
        max_num_steps=1000,
        max_num_epochs=3,
        train_global_batch_size=20,
        save_period=40,
        conversion_step=120,
        export_steps=[40, 120],
        average_steps=[80, 120],
    )
    C.validate_workflow_config(cfg)
