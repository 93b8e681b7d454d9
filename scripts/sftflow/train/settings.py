"""TrainingConfig: the `training:` config section, typed, built once where a job starts (the Trainer, the launcher).

The fields are the schema's keys (config/schema.yaml is the only list of keys and their defaults:
`from_section` fills and checks them there, and a key the schema has but this class lacks is a TypeError at
the first job, caught by the tests). See config/README.md for what each key means.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from sftflow import config as C
from sftflow.train.config import resolve_min_learning_rate


@dataclass(frozen=True)
class TrainingConfig:
    backend: str
    num_nodes: int
    num_gpus: int
    num_training_jobs: int
    max_num_epochs: int
    max_num_steps: int
    train_global_batch_size: int
    train_micro_batch_size: int
    learning_rate: float
    min_learning_rate: float  # null in the config: learning_rate (a constant schedule)
    warmup_steps: int
    weight_decay: float
    adam_beta1: float
    adam_beta2: float
    adam_eps: float
    max_grad_norm: float | None
    seed: int
    precision: str
    attention: str
    activation_checkpointing: bool
    loss_chunk_tokens: int | None
    tensor_model_parallel_size: int
    sequence_parallel: bool
    context_parallel_size: int
    pipeline_model_parallel_size: int
    expert_model_parallel_size: int
    expert_tensor_parallel_size: int
    moe_aux_loss_coeff: float | None  # null: the model's router_aux_loss_coef
    save_period: int
    keep_top_k: int | None  # null: keep every checkpoint
    metric_name: str
    higher_is_better: bool
    keep_optimizer_state: str
    remove_checkpoints_after_average: bool
    validation_data: str | None
    val_set_size: float  # 0: none; < 1: a fraction of the prepared rows; >= 1: a row count (pack_data holds them out)
    val_set_seed: int
    val_period: int
    val_batches: int  # <= 0: the whole validation set
    val_global_batch_size: int
    val_micro_batch_size: int
    val_at_start: bool
    val_at_end: bool
    time_limit: str | None
    time_margin_seconds: float
    log_period: int
    conversion_step: int | None
    export_steps: list | None
    average_steps: list | None

    @classmethod
    def from_section(cls, training: Mapping) -> TrainingConfig:
        """From a `training:` section (missing keys take the schema defaults; errors name training.<key>). A job
        builds it once, in the Trainer, and hands the object on (engines, TrainingPlan, init_parallel)."""
        return cls(**resolve_min_learning_rate(C.validate_section("training", training)))

    def as_dict(self) -> dict[str, Any]:
        """The section as plain data (what checkpoints record in meta.json and resume checks compare)."""
        return asdict(self)
