"""The megatron backend's config checks (sftflow.train.engine registers them); imports neither torch nor
megatron-core."""

from __future__ import annotations

from sftflow.errors import SftflowError
from sftflow.megatron.hf_config import model_layout, num_experts
from sftflow.train.checks import check_batch, check_divides_model, check_tp_divides_heads


def check_config(t: dict, world: int, model_config: dict | None) -> None:
    """Reject training settings backend megatron cannot run, naming the keys and the numbers."""
    if t.get("attention", "auto") != "auto":
        raise SftflowError(
            f"config key 'training.attention' is {t['attention']!r}, but backend megatron chooses its own "
            "attention kernel: set it to auto (or remove it)"
        )
    check_megatron_layout(t, world, model_config)


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
    check_batch(t, world, world // (tp * pp * cp), f"(tensor {tp} x pipeline {pp} x context {cp})")
    if not model_config:
        return
    if model_config.get("model_type"):  # the demo's sizes have none; a real config.json does
        model_layout(model_config, "the base model's config.json (config key 'model.base_model')")
    check_tp_divides_heads(tp, model_config)
    check_divides_model("pipeline_model_parallel_size", pp, model_config, "num_hidden_layers")
    experts = num_experts(model_config)
    if ep > 1 and (not experts or experts % ep):
        raise SftflowError(
            f"config key 'training.expert_model_parallel_size' ({ep}) must divide the model's number of experts "
            f"({experts or 'none: not a mixture-of-experts model'})"
        )
