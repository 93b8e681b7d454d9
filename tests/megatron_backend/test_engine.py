"""The megatron backend's parts that run without a GPU: the worker's refusal on CPU, and the resume checks
that keep a checkpoint from being continued under another backend or other parallel sizes. (Training
itself is megatron-core's CUDA path: tests/gpu/test_gpu_megatron_train.py.)"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from sftflow.errors import SftflowError
from sftflow.train.checkpoint import check_layout
from tests.conftest import REPO
from tests.train.conftest import subprocess_env, train_command, training_config, write_config

LAYOUT = {
    "world_size": 8,
    "tensor_model_parallel_size": 2,
    "pipeline_model_parallel_size": 2,
    "context_parallel_size": 1,
    "expert_model_parallel_size": 1,
    "expert_tensor_parallel_size": 1,
}


def test_megatron_on_a_machine_without_cuda_fails_naming_the_key_and_writes_nothing(tmp_path, packed, tiny_model):
    config = write_config(tmp_path / "train.json", training_config(backend="megatron"))
    ckpt = tmp_path / "ckpt"
    cmd = train_command(config, packed, tiny_model, ckpt)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env(), cwd=REPO)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "config key 'training.backend' is 'megatron', but this process sees no CUDA GPU" in result.stderr
    assert not (ckpt / "job0.done").exists() and not list(Path(ckpt).glob("step_*"))


def test_resume_refuses_another_backend_or_other_parallel_sizes(tmp_path):
    path = tmp_path / "step_00000010"
    check_layout({"backend": "megatron", **LAYOUT}, {"backend": "megatron", **LAYOUT}, path)
    check_layout({}, {"backend": "fsdp"}, path)  # fsdp checkpoints written before the key existed
    with pytest.raises(
        SftflowError, match=r"written by backend 'fsdp', not 'megatron' \(config key 'training.backend'"
    ):
        check_layout({"tensor_model_parallel_size": 2}, {"backend": "megatron", **LAYOUT}, path)
    with pytest.raises(SftflowError, match=r"written by backend 'megatron', not 'fsdp'"):
        check_layout({"backend": "megatron", **LAYOUT}, {"backend": "fsdp"}, path)
    changed = {**LAYOUT, "world_size": 16, "pipeline_model_parallel_size": 4}
    with pytest.raises(
        SftflowError,
        match=r"other parallel sizes \(GPUs \(training.num_nodes x training.num_gpus\): 8 -> 16; "
        r"training.pipeline_model_parallel_size: 2 -> 4\)",
    ):
        check_layout({"backend": "megatron", **LAYOUT}, {"backend": "megatron", **changed}, path)


def test_a_base_model_that_is_neither_local_nor_fetchable_names_the_key(tmp_path, monkeypatch, tiny_model):
    import huggingface_hub.constants

    from sftflow.megatron.weights import local_model_dir

    assert local_model_dir(str(tiny_model)) == tiny_model
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with pytest.raises(SftflowError, match=r"config key 'model.base_model': 'nobody/no-such-model' is not a local"):
        local_model_dir("nobody/no-such-model")
