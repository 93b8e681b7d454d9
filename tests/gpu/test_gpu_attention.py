"""GPU checks of packed-sequence attention isolation (run by tests/gpu/run.sh; skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

PAD_ID = 0


def _model(dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from sftflow.train.attention import VARLEN_ATTENTION, register_attention

    register_attention()
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=PAD_ID,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=VARLEN_ATTENTION, dtype=torch.float32)
    return model.to(device="cuda", dtype=dtype)


def _sequences(lengths: list[int]) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for n in lengths:
        mask = torch.zeros(n, dtype=torch.bool)
        mask[n // 3 :] = True
        out.append({"input_ids": torch.randint(3, 300, (n,), generator=g), "loss_mask": mask, "seq_lens": [n]})
    return out


def _mean_loss(model, batches, kernel: str) -> torch.Tensor:
    from sftflow.train.loss import token_loss_sum
    from sftflow.train.model import model_inputs

    total = sum(
        token_loss_sum(model(**model_inputs(b, torch.device("cuda"), kernel)).logits, b["targets"].cuda())
        for b in batches
    )
    return total / sum(b["num_loss_tokens"] for b in batches)


def _kernels(dtype: torch.dtype) -> list[str]:
    from sftflow.train.attention import KERNELS, kernel_problem

    return [k for k in KERNELS if kernel_problem(k, torch.device("cuda"), dtype) is None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_row_loss_equals_sequences_one_at_a_time(dtype):
    """With every kernel that runs on this GPU in `dtype` (bf16: flash-attn if installed, torch's varlen_attn,
    compiled flex_attention, the SDPA loop; fp32: flex and the loop)."""
    from sftflow.packing import collate_bins

    model = _model(dtype)
    seqs = _sequences([37, 5, 120, 64, 18])
    packed_bin = {
        "input_ids": torch.cat([s["input_ids"] for s in seqs]),
        "loss_mask": torch.cat([s["loss_mask"] for s in seqs]),
        "seq_lens": [len(s["input_ids"]) for s in seqs],
    }
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    with torch.no_grad():
        ref = _mean_loss(model, [collate_bins([s], len(s["input_ids"]), PAD_ID) for s in seqs], "sdpa_loop")
        for kernel in _kernels(dtype):
            packed = _mean_loss(model, [collate_bins([packed_bin], 512, PAD_ID)], kernel)
            torch.testing.assert_close(packed, ref, rtol=tol, atol=tol, msg=kernel)


@pytest.mark.parametrize("kernel", ["flash", "varlen", "flex"])
def test_gpu_kernel_matches_per_segment_sdpa_in_outputs_and_gradients(kernel):
    from sftflow.train.attention import kernel_problem, varlen_attention

    problem = kernel_problem(kernel, torch.device("cuda"), torch.bfloat16)
    if problem:
        pytest.skip(problem)
    g = torch.Generator(device="cuda").manual_seed(0)

    def rand(heads):
        x = torch.randn(1, heads, 300, 64, device="cuda", dtype=torch.bfloat16, generator=g)
        return x.requires_grad_()

    q, k, v = rand(8), rand(4), rand(4)  # grouped-query attention
    cu = torch.tensor([0, 100, 101, 170, 300], dtype=torch.int32, device="cuda")
    results = {}
    for name in (kernel, "sdpa_loop"):
        out, _ = varlen_attention(
            None, q, k, v, None, scaling=0.1, cu_seq_lens_q=cu, max_length_q=130, sftflow_attention=name
        )
        results[name] = (out, *torch.autograd.grad(out.float().square().sum(), (q, k, v)))
    for what, a, b in zip(("out", "dq", "dk", "dv"), results[kernel], results["sdpa_loop"], strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2, msg=f"{kernel} {what}")
