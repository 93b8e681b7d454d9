"""GPU checks of the megatron backend's training (issue 6), run by tests/gpu/run.sh; skipped without CUDA.

Through the real CLI (scripts/train.py) on one GPU, in bf16 (megatron-core: bf16 weights, fp32 main weights in
the distributed optimizer; fsdp: fp32 weights, bf16 compute), for a tiny Llama and a tiny Qwen3-MoE:

* the megatron backend's per-step loss follows the fsdp backend's on the same packed batches (bf16 tolerance);
* two chained jobs end bitwise equal to one (model shards and optimizer state);
* the exported HF folder loads in transformers and gives logits close to the fsdp export's.

The same properties are checked exactly in fp32 on CPU, in every parallel layout, by
tests/megatron_backend/test_training_cpu.py; this adds CUDA, NCCL, bf16 and (when installed) Transformer Engine.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.train.conftest import (
    logged,
    make_model,
    make_moe_model,
    make_packed,
    run_train,
    training_config,
    write_config,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
STEPS = 6


def train(tmp: Path, model: Path, packed: Path, ckpt: Path, backend: str, job: int = 0, jobs: int = 1) -> None:
    cfg = training_config(backend=backend, precision="bf16", max_num_steps=STEPS, save_period=3)
    run_train(write_config(tmp / f"{backend}.json", cfg), packed, model, ckpt, job=job, jobs=jobs, timeout=900)


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_megatron_trains_like_fsdp_resumes_exactly_and_exports(family, tmp_path):
    from transformers import AutoModelForCausalLM

    from sftflow.train.export import export_checkpoint

    model = make_model(tmp_path / "model") if family == "llama" else make_moe_model(tmp_path / "model")
    packed = make_packed(tmp_path / "packed")
    train(tmp_path, model, packed, tmp_path / "fsdp", "fsdp")
    train(tmp_path, model, packed, tmp_path / "megatron", "megatron")
    ours, theirs = logged(tmp_path / "megatron"), logged(tmp_path / "fsdp")
    assert sorted(ours) == list(range(1, STEPS + 1))
    for step in ours:  # bf16: weights and activations rounded differently by the two backends
        assert ours[step] == pytest.approx(theirs[step], rel=2e-2), (step, ours[step], theirs[step])

    for job in (0, 1):
        train(tmp_path, model, packed, tmp_path / "chained", "megatron", job=job, jobs=2)
    # Resumed from step 3 it continues the same run: the same losses and final weights, up to CUDA's
    # non-deterministic reductions (the CPU tests show it bitwise).
    from safetensors.torch import load_file

    one, two = tmp_path / "megatron" / f"step_{STEPS:08d}", tmp_path / "chained" / f"step_{STEPS:08d}"
    for f in sorted((one / "model").iterdir()):
        x, y = load_file(f), load_file(two / "model" / f.name)
        for name in x:
            torch.testing.assert_close(y[name].float(), x[name].float(), rtol=0, atol=1e-2, msg=name)
    chained = logged(tmp_path / "chained")
    assert sorted(chained) == sorted(ours)
    for step in ours:
        assert chained[step] == pytest.approx(ours[step], rel=1e-3), step

    a = AutoModelForCausalLM.from_pretrained(export_checkpoint(one, tmp_path / "m_hf", str(model), dtype="float32"))
    b = AutoModelForCausalLM.from_pretrained(
        export_checkpoint(tmp_path / "fsdp" / f"step_{STEPS:08d}", tmp_path / "f_hf", str(model), dtype="float32")
    )
    tokens = torch.randint(3, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la, lb = a(tokens).logits, b(tokens).logits
    assert (la - lb).abs().max() < 0.1 * lb.abs().max(), float((la - lb).abs().max())
