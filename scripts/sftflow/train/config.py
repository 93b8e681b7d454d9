"""Checks of the `training:` section that a JSON schema cannot express; errors name the key and the numbers.

`check_training_keys(config)` takes the whole workflow config (defaults filled) and is meant to be
called from `sftflow.config.check_cross_keys`, so a bad combination fails before any job starts; the
configured backend's own checks (its check_config, see sftflow.train.engine) run from here.
The trainer runs the same checks again with the real world size and model config.
"""

from __future__ import annotations

import json
from pathlib import Path

from sftflow.errors import SftflowError
from sftflow.train.engine import config_check


def _demo_or_local_model_config(config: dict) -> dict | None:
    """Head counts of the model to train when they are known without downloading anything."""
    base = config.get("model", {}).get("base_model")
    if base is None and config.get("demo", {}).get("enabled"):
        demo = config["demo"]
        return {"num_attention_heads": demo["num_attention_heads"], "num_key_value_heads": demo["num_key_value_heads"]}
    if base and (Path(base) / "config.json").is_file():
        try:
            return json.loads((Path(base) / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
    return None


def check_training_keys(config: dict, world_size: int | None = None, model_config: dict | None = None) -> None:
    """Reject training settings the configured backend cannot run (instead of silently ignoring them).

    `world_size` defaults to training.num_nodes x training.num_gpus; `model_config` (a config.json
    dict) to the demo's sizes or a local base model's config.json when there is one.
    """
    t = config["training"]
    world = world_size if world_size is not None else t["num_nodes"] * t["num_gpus"]
    model_config = model_config if model_config is not None else _demo_or_local_model_config(config)
    config_check(t["backend"])(t, world, model_config)
    _check_common(t)


def _check_common(t: dict) -> None:
    if t["min_learning_rate"] is not None and t["min_learning_rate"] > t["learning_rate"]:
        raise SftflowError(
            f"config key 'training.min_learning_rate' ({t['min_learning_rate']}) is above "
            f"training.learning_rate ({t['learning_rate']})"
        )
    _check_validation(t)
    if t.get("remove_checkpoints_after_average") and not t.get("average_steps"):
        raise SftflowError(
            "config key 'training.remove_checkpoints_after_average' is true but 'training.average_steps' is empty: "
            "nothing is averaged, so nothing would be removed; list the steps to average or set it to false"
        )
    if t["time_limit"] is not None:
        from sftflow.train.deadline import parse_time_limit

        parse_time_limit(t["time_limit"])


def _check_validation(t: dict) -> None:
    size = t.get("val_set_size") or 0
    if size and t.get("validation_data"):
        raise SftflowError(
            f"config keys 'training.validation_data' ({t['validation_data']}) and 'training.val_set_size' ({size}) "
            "both give validation data: set one of them (val_set_size 0 for no held-out share, or validation_data null)"
        )
    if size >= 1 and size != int(size):
        raise SftflowError(
            f"config key 'training.val_set_size' ({size}) is neither a fraction below 1 nor a whole number of rows: "
            "use e.g. 0.05 or 500"
        )


# The training keys that decide what each step computes. A checkpoint made with other values belongs to
# another experiment: resuming it would mix the two (and leave its steps standing as this run's). Keys that
# may change between chained jobs are not here: max_num_steps / max_num_epochs / num_training_jobs (training
# continues, the schedule is stretched and logged), wall time, save / log / validation periods, micro-batch
# size, activation checkpointing and loss_chunk_tokens (same maths); the parallel layout, the packed data and
# the base model are checked on their own when a job resumes.
RESULT_KEYS = (
    "backend",
    "train_global_batch_size",
    "learning_rate",
    "min_learning_rate",
    "warmup_steps",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_eps",
    "max_grad_norm",
    "seed",
    "precision",
    "moe_aux_loss_coeff",
)


def resolve_min_learning_rate(training: dict) -> dict:
    """The section with min_learning_rate's null replaced by learning_rate (the constant schedule it stands for):
    what a checkpoint records and resume checks compare, so that null and the value it means are one setting."""
    training = dict(training)
    if training.get("min_learning_rate") is None and "learning_rate" in training:
        training["min_learning_rate"] = training["learning_rate"]
    return training


def check_training_matches(saved: dict | None, training: dict, checkpoint: Path) -> None:
    """Refuse `checkpoint`, trained with the training section `saved` (its meta.json), if a RESULT_KEYS value
    differs from `training`, naming each changed key, both values and the ways out."""
    training = resolve_min_learning_rate(training)
    changed = [key for key in RESULT_KEYS if saved and key in saved and saved[key] != training.get(key)]
    if changed:
        what = "; ".join(f"training.{key}: {saved[key]!r} there, {training.get(key)!r} now" for key in changed)
        raise SftflowError(
            f"the checkpoints in {checkpoint.parent} were trained with other settings ({what}, latest "
            f"{checkpoint.name}): continuing would mix two experiments. To train with the new settings, set a new "
            f"'output_dir' (keeps the old run), or delete {checkpoint.parent} and the models exported from it "
            "(final_hf_model, averaged_hf_model, hf_models/); to continue the old run, restore the old values"
        )


def check_checkpoint_matches(checkpoint_dir: str | Path, training: dict) -> None:
    """check_training_matches on the latest checkpoint in `checkpoint_dir`, if any. Cheap (reads one meta.json):
    the workflow calls it while planning, so the refusal comes before any job (the trainer checks again when
    it resumes)."""
    if not Path(checkpoint_dir).is_dir():
        return
    from sftflow.train.checkpoint_dir import latest_checkpoint, read_meta

    latest = latest_checkpoint(checkpoint_dir)
    if latest is not None:
        check_training_matches(read_meta(latest.path).get("training"), training, latest.path)
