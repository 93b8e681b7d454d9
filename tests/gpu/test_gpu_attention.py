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

    from sftflow.train.model import VARLEN_ATTENTION, register_attention

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


def _mean_loss(model, batches) -> torch.Tensor:
    from sftflow.train.model import model_inputs
    from sftflow.train.trainer import token_loss_sum

    total = sum(
        token_loss_sum(model(**model_inputs(b, torch.device("cuda"))).logits, b["targets"].cuda()) for b in batches
    )
    return total / sum(b["num_loss_tokens"] for b in batches)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_row_loss_equals_sequences_one_at_a_time(dtype):
    """bf16 takes the flash_attn_varlen_func path when flash-attn is installed, fp32 the per-segment SDPA one."""
    from sftflow.packing import collate_bins

    model = _model(dtype)
    seqs = _sequences([37, 5, 120, 64, 18])
    packed_bin = {
        "input_ids": torch.cat([s["input_ids"] for s in seqs]),
        "loss_mask": torch.cat([s["loss_mask"] for s in seqs]),
        "seq_lens": [len(s["input_ids"]) for s in seqs],
    }
    with torch.no_grad():
        ref = _mean_loss(model, [collate_bins([s], len(s["input_ids"]), PAD_ID) for s in seqs])
        packed = _mean_loss(model, [collate_bins([packed_bin], 512, PAD_ID)])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(packed, ref, rtol=tol, atol=tol)


def test_flash_varlen_matches_per_segment_sdpa():
    pytest.importorskip("flash_attn")
    import sftflow.train.model as M

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 8, 300, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(1, 4, 300, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, 4, 300, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    cu = torch.tensor([0, 100, 170, 300], dtype=torch.int32, device="cuda")
    flash, _ = M.varlen_attention(None, q, k, v, None, scaling=0.125, cu_seq_lens_q=cu, max_length_q=130)
    saved, M.flash_attn_varlen_func = M.flash_attn_varlen_func, None
    try:
        sdpa, _ = M.varlen_attention(None, q, k, v, None, scaling=0.125, cu_seq_lens_q=cu, max_length_q=130)
    finally:
        M.flash_attn_varlen_func = saved
    torch.testing.assert_close(flash.float(), sdpa.float(), rtol=2e-2, atol=2e-2)
