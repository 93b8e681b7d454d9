"""Checks of the `training:` section that a JSON schema cannot express; errors name the key and the numbers.

`check_training_keys(config)` takes the whole workflow config (defaults filled) and is meant to be
called from `sftflow.config.check_cross_keys`, so a bad combination fails before any job starts.
The trainer runs the same checks again with the real world size and model config.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from sftflow import config as C
from sftflow.errors import SftflowError
from sftflow.megatron.hf_config import num_experts


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


# Parallelism only backend megatron has: config key -> what it is.
MEGATRON_ONLY = {
    "context_parallel_size": "context parallelism",
    "pipeline_model_parallel_size": "pipeline parallelism",
    "expert_model_parallel_size": "expert parallelism",
    "expert_tensor_parallel_size": "expert tensor parallelism",
}


def _check_batch(t: dict, world: int, dp: int, model_parallel: str) -> None:
    gbs, mbs = t["train_global_batch_size"], t["train_micro_batch_size"]
    if gbs % (mbs * dp):
        raise SftflowError(
            f"config key 'training.train_global_batch_size' ({gbs}) must be divisible by "
            f"training.train_micro_batch_size x data-parallel size ({mbs} x {dp} = {mbs * dp}; "
            f"data-parallel size = {world} GPUs / {model_parallel})"
        )


def _check_divides_model(key: str, size: int, model_config: dict | None, *fields: str) -> None:
    """training.<key> (size) must divide each of the model's `fields` that the config knows."""
    if size <= 1 or not model_config:
        return
    for field in fields:
        n = model_config.get(field)
        if isinstance(n, int) and n % size:
            raise SftflowError(f"config key 'training.{key}' ({size}) must divide the model's {field} ({n})")


def check_megatron_layout(t: dict, world: int, model_config: dict | None) -> None:
    """Reject a megatron parallel layout that cannot be built, naming the keys and the numbers."""
    tp, pp, cp = t["tensor_model_parallel_size"], t["pipeline_model_parallel_size"], t["context_parallel_size"]
    ep, etp = t["expert_model_parallel_size"], t["expert_tensor_parallel_size"]
    gpus = f"the number of GPUs (training.num_nodes x training.num_gpus = {world})"
    if world % (tp * pp * cp):
        raise SftflowError(
            "config keys 'training.tensor_model_parallel_size' x 'pipeline_model_parallel_size' x "
            f"'context_parallel_size' ({tp} x {pp} x {cp} = {tp * pp * cp}) must divide {gpus}"
        )
    if world % (ep * etp * pp):
        raise SftflowError(
            "config keys 'training.expert_model_parallel_size' x 'expert_tensor_parallel_size' x "
            f"'pipeline_model_parallel_size' ({ep} x {etp} x {pp} = {ep * etp * pp}) must divide {gpus}"
        )
    _check_batch(t, world, world // (tp * pp * cp), f"(tensor {tp} x pipeline {pp} x context {cp})")
    if not model_config:
        return
    if model_config.get("model_type"):  # the demo's sizes have none; a real config.json does
        from sftflow.megatron.hf_config import model_layout

        model_layout(model_config, "the base model's config.json (config key 'model.base_model')")
    _check_divides_model("tensor_model_parallel_size", tp, model_config, "num_attention_heads", "num_key_value_heads")
    _check_divides_model("pipeline_model_parallel_size", pp, model_config, "num_hidden_layers")
    experts = num_experts(model_config)
    if ep > 1 and (not experts or experts % ep):
        raise SftflowError(
            f"config key 'training.expert_model_parallel_size' ({ep}) must divide the model's number of experts "
            f"({experts or 'none: not a mixture-of-experts model'})"
        )


def check_training_keys(config: dict, world_size: int | None = None, model_config: dict | None = None) -> None:
    """Reject training settings the fsdp trainer cannot run (instead of silently ignoring them).

    `world_size` defaults to training.num_nodes x training.num_gpus; `model_config` (a config.json
    dict) to the demo's sizes or a local base model's config.json when there is one.
    """
    t = config["training"]
    world = world_size if world_size is not None else t["num_nodes"] * t["num_gpus"]
    model_config = model_config if model_config is not None else _demo_or_local_model_config(config)
    if t["backend"] == "megatron":
        if t.get("attention", "auto") != "auto":
            raise SftflowError(
                f"config key 'training.attention' is {t['attention']!r}, but backend megatron chooses its own "
                "attention kernel: set it to auto (or remove it)"
            )
        check_megatron_layout(t, world, model_config)
        _check_common(t)
        return
    if t["sequence_parallel"]:
        raise SftflowError(
            "config key 'training.sequence_parallel' is true, but backend 'fsdp' has no sequence parallelism: "
            "set it to false, or use backend: megatron"
        )
    for key, what in MEGATRON_ONLY.items():
        if t[key] > 1:
            raise SftflowError(
                f"config key 'training.{key}' is {t[key]}, but backend 'fsdp' has no {what}: set it to 1, "
                f"or use backend: megatron for {what}"
            )
    tp = t["tensor_model_parallel_size"]
    if world % tp:
        raise SftflowError(
            f"config key 'training.tensor_model_parallel_size' ({tp}) must divide the number of GPUs "
            f"(training.num_nodes x training.num_gpus = {world})"
        )
    _check_batch(t, world, world // tp, f"tensor_model_parallel_size {tp}")
    _check_common(t)
    _check_divides_model("tensor_model_parallel_size", tp, model_config, "num_attention_heads", "num_key_value_heads")


def _check_common(t: dict) -> None:
    if t["min_learning_rate"] > t["learning_rate"]:
        raise SftflowError(
            f"config key 'training.min_learning_rate' ({t['min_learning_rate']}) is above "
            f"training.learning_rate ({t['learning_rate']})"
        )
    if t["time_limit"] is not None:
        from sftflow.train.deadline import parse_time_limit

        parse_time_limit(t["time_limit"])


def validate_sections(config: dict) -> dict:
    """A defaults-filled, schema-checked copy of {"training": ..., "packing": ...} (as the trainer receives it)."""
    out = copy.deepcopy(config)
    for section in ("training", "packing"):
        out[section] = C.validate(dict(out.get(section) or {}), C.section_schema(section), prefix=section)
    return out


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
)


def check_training_matches(saved: dict | None, training: dict, checkpoint: Path) -> None:
    """Refuse `checkpoint`, trained with the training section `saved` (its meta.json), if a RESULT_KEYS value
    differs from `training`, naming each changed key, both values and the ways out."""
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
    from sftflow.train.checkpoint import latest_checkpoint, read_meta

    latest = latest_checkpoint(checkpoint_dir)
    if latest is not None:
        check_training_matches(read_meta(latest.path).get("training"), training, latest.path)
