"""Config checks that every backend's check_config shares: batch divisibility and sizes that must divide the model.

Imports no torch (the workflow runs these checks while planning).
"""

from __future__ import annotations

from sftflow.errors import SftflowError


def check_batch(t: dict, world: int, dp: int, model_parallel: str) -> None:
    """train_global_batch_size must split evenly into micro-batches over the `dp` data-parallel ranks."""
    gbs, mbs = t["train_global_batch_size"], t["train_micro_batch_size"]
    if gbs % (mbs * dp):
        raise SftflowError(
            f"config key 'training.train_global_batch_size' ({gbs}) must be divisible by "
            f"training.train_micro_batch_size x data-parallel size ({mbs} x {dp} = {mbs * dp}; "
            f"data-parallel size = {world} GPUs / {model_parallel})"
        )


def check_divides_model(key: str, size: int, model_config: dict | None, *fields: str) -> None:
    """training.<key> (size) must divide each of the model's `fields` that the config knows."""
    if size <= 1 or not model_config:
        return
    for field in fields:
        n = model_config.get(field)
        if isinstance(n, int) and n % size:
            raise SftflowError(f"config key 'training.{key}' ({size}) must divide the model's {field} ({n})")


def check_tp_divides_heads(tp: int, model_config: dict | None) -> None:
    """Tensor parallelism splits attention by heads: it must divide the query and the key/value heads."""
    check_divides_model("tensor_model_parallel_size", tp, model_config, "num_attention_heads", "num_key_value_heads")
