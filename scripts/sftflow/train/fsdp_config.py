"""The fsdp backend's config checks (sftflow.train.engine registers them); imports no torch."""

from __future__ import annotations

from sftflow.errors import SftflowError
from sftflow.train.checks import check_batch, check_tp_divides_heads

# Parallelism the fsdp backend does not have: config key -> what it is.
NOT_IN_FSDP = {
    "context_parallel_size": "context parallelism",
    "pipeline_model_parallel_size": "pipeline parallelism",
    "expert_model_parallel_size": "expert parallelism",
    "expert_tensor_parallel_size": "expert tensor parallelism",
}


def check_config(t: dict, world: int, model_config: dict | None) -> None:
    """Reject training settings the fsdp trainer cannot run (instead of silently ignoring them)."""
    if t["sequence_parallel"]:
        raise SftflowError(
            "config key 'training.sequence_parallel' is true, but backend 'fsdp' has no sequence parallelism: "
            "set it to false, or use backend: megatron"
        )
    for key, what in NOT_IN_FSDP.items():
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
    check_batch(t, world, world // tp, f"tensor_model_parallel_size {tp}")
    check_tp_divides_heads(tp, model_config)
