"""Training settings the fsdp trainer cannot honour are rejected up front, naming the key and the numbers."""

from __future__ import annotations

import copy

import pytest

from sftflow import config as C
from sftflow.errors import SftflowError
from sftflow.train.config import check_training_keys


@pytest.fixture
def config() -> dict:
    return C.validate({"demo": {"enabled": True}}, C.load_schema())  # every default, the demo on: 1 GPU


def _with(config: dict, **training) -> dict:
    cfg = copy.deepcopy(config)
    cfg["training"].update(training)
    return cfg


def test_defaults_pass(config):
    check_training_keys(config)


@pytest.mark.parametrize(
    "training, message",
    [
        ({"context_parallel_size": 2}, r"'training.context_parallel_size' is 2.*backend: megatron"),
        ({"sequence_parallel": True}, r"'training.sequence_parallel' is true, but backend 'fsdp'"),
        (
            {"num_gpus": 4, "train_global_batch_size": 6, "train_micro_batch_size": 1},
            r"'training.train_global_batch_size' \(6\) must be divisible by .* \(1 x 4 = 4",
        ),
        (
            {
                "num_gpus": 4,
                "tensor_model_parallel_size": 2,
                "train_global_batch_size": 12,
                "train_micro_batch_size": 4,
            },
            r"\(12\) must be divisible by .* \(4 x 2 = 8",
        ),
        (
            {"num_gpus": 3, "tensor_model_parallel_size": 2},
            r"'training.tensor_model_parallel_size' \(2\) must divide the number of GPUs .* = 3",
        ),
        ({"num_gpus": 4, "tensor_model_parallel_size": 4}, r"\(4\) must divide the model's num_key_value_heads \(2\)"),
        ({"min_learning_rate": 1.0}, r"'training.min_learning_rate' \(1.0\) is above"),
        ({"time_limit": "4 hours"}, r"'training.time_limit': '4 hours' is not a duration"),
        (
            {"validation_data": "val.jsonl", "val_set_size": 0.05},
            r"'training.validation_data' \(val.jsonl\) and 'training.val_set_size' \(0.05\) both give validation",
        ),
        ({"val_set_size": 12.5}, r"'training.val_set_size' \(12.5\) is neither a fraction below 1 nor a whole number"),
    ],
)
def test_rejected_settings_name_the_key(config, training, message):
    with pytest.raises(SftflowError, match=message):
        check_training_keys(_with(config, **training))


def test_tp_must_divide_the_heads_of_a_local_base_model(config, tmp_path):
    (tmp_path / "config.json").write_text('{"num_attention_heads": 6, "num_key_value_heads": 6}')
    cfg = _with(config, num_gpus=4, tensor_model_parallel_size=4, train_global_batch_size=4)
    cfg["model"]["base_model"] = str(tmp_path)
    with pytest.raises(SftflowError, match=r"must divide the model's num_attention_heads \(6\)"):
        check_training_keys(cfg)


def test_trainer_uses_the_real_world_size(config):
    check_training_keys(_with(config, train_global_batch_size=6), world_size=2)
    with pytest.raises(SftflowError, match=r"\(1 x 4 = 4"):
        check_training_keys(_with(config, train_global_batch_size=6), world_size=4)


def test_sequences_longer_than_a_sliding_window_are_refused():
    from transformers import MistralConfig, Qwen2Config

    from sftflow.train.model import check_no_sliding_window

    check_no_sliding_window(MistralConfig(sliding_window=4096), 4096)
    with pytest.raises(SftflowError, match=r"'packing.max_total_sequence_length' \(8192\) exceeds .* window \(4096\)"):
        check_no_sliding_window(MistralConfig(sliding_window=4096), 8192)
    check_no_sliding_window(Qwen2Config(sliding_window=4096, use_sliding_window=False), 8192)


@pytest.mark.parametrize(
    "key", ["pipeline_model_parallel_size", "expert_model_parallel_size", "expert_tensor_parallel_size"]
)
def test_fsdp_refuses_megatron_only_parallelism(config, key):
    with pytest.raises(SftflowError, match=rf"'training.{key}' is 2, but backend 'fsdp' has no .*backend: megatron"):
        check_training_keys(_with(config, **{key: 2}))


MOE = {"num_attention_heads": 32, "num_key_value_heads": 4, "num_hidden_layers": 48, "num_experts": 128}
# Qwen3-30B-A3B's config.json (its sizes; NeMo-Skills' MoE example)
QWEN3_30B_A3B = {
    **MOE,
    "model_type": "qwen3_moe",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_experts_per_tok": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-06,
    "norm_topk_prob": True,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
}


@pytest.mark.parametrize(
    "training, model, message",
    [
        (
            {"num_nodes": 3, "num_gpus": 8, "tensor_model_parallel_size": 4, "pipeline_model_parallel_size": 4},
            MOE,
            r"\(4 x 4 x 1 = 16\) must divide the number of GPUs .* = 24\)",
        ),
        (
            {"num_gpus": 8, "expert_model_parallel_size": 8, "expert_tensor_parallel_size": 2},
            MOE,
            r"'training.expert_model_parallel_size' x 'expert_tensor_parallel_size' .*\(8 x 2 x 1 = 16\)",
        ),
        (
            {
                "num_gpus": 8,
                "tensor_model_parallel_size": 2,
                "pipeline_model_parallel_size": 2,
                "train_global_batch_size": 7,
                "train_micro_batch_size": 1,
            },
            MOE,
            r"\(7\) must be divisible by .* \(1 x 2 = 2; .*8 GPUs / \(tensor 2 x pipeline 2 x context 1\)",
        ),
        (
            {"num_gpus": 8, "pipeline_model_parallel_size": 8, "train_global_batch_size": 8},
            {**MOE, "num_hidden_layers": 36},
            r"'training.pipeline_model_parallel_size' \(8\) must divide .*num_hidden_layers \(36\)",
        ),
        (
            {"num_gpus": 8, "tensor_model_parallel_size": 8, "train_global_batch_size": 8},
            MOE,
            r"\(8\) must divide the model's num_key_value_heads \(4\)",
        ),
        (
            {"num_gpus": 8, "expert_model_parallel_size": 8},
            {"num_attention_heads": 32, "num_key_value_heads": 8},
            r"number of experts \(none: not a mixture-of-experts",
        ),
        (
            {"num_gpus": 8, "tensor_model_parallel_size": 2},
            {**MOE, "model_type": "mistral"},
            r"base model's config.json \(config key 'model.base_model'\).*mistral",
        ),
    ],  # fmt: skip
)
def test_megatron_layouts_that_cannot_be_built_name_the_keys_and_numbers(config, training, model, message):
    cfg = _with(config, backend="megatron", train_global_batch_size=64, train_micro_batch_size=1)
    cfg["training"].update(training)
    with pytest.raises(SftflowError, match=message):
        check_training_keys(cfg, model_config=model)


@pytest.mark.parametrize(
    "training",
    [
        {"num_gpus": 8, "expert_model_parallel_size": 8},
        {
            "num_nodes": 2,
            "num_gpus": 8,
            "tensor_model_parallel_size": 2,
            "pipeline_model_parallel_size": 2,
            "context_parallel_size": 2,
            "expert_model_parallel_size": 4,
            "expert_tensor_parallel_size": 2,
            "sequence_parallel": True,
        },
    ],  # fmt: skip
)
def test_megatron_layouts_that_can_be_built_pass(config, training):
    cfg = _with(config, backend="megatron", train_global_batch_size=64, train_micro_batch_size=1)
    cfg["training"].update(training)
    check_training_keys(cfg, model_config=QWEN3_30B_A3B)


def test_megatron_refuses_an_fsdp_attention_kernel(config):
    cfg = _with(config, backend="megatron", attention="flex")
    with pytest.raises(SftflowError, match=r"'training.attention' is 'flex', but backend megatron .* set it to auto"):
        check_training_keys(cfg)
    check_training_keys(_with(config, backend="megatron"))


def test_an_unknown_attention_kernel_is_a_schema_error(config):
    with pytest.raises(SftflowError, match="'training.attention': 'xformers' is not one of"):
        C.validate(_with(config, attention="xformers"), C.load_schema())
