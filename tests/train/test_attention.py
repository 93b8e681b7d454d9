"""Attention isolation of packed rows: packed training equals training the sequences one at a time."""

from __future__ import annotations

import pytest
import torch

from sftflow.packing import collate_bins
from sftflow.train.attention import VARLEN_ATTENTION, register_attention, varlen_attention
from sftflow.train.loss import token_loss_sum
from sftflow.train.model import model_inputs
from tests.train.conftest import PAD_ID, random_sequences, tiny_llama_config

ARCHITECTURES = ["llama", "qwen2", "qwen3", "mistral"]


def _config(arch: str):
    """The tiny Llama's sizes in each supported architecture (Qwen2: q/k/v biases, Qwen3: q/k norms)."""
    from transformers import AutoConfig

    sizes = tiny_llama_config().to_dict()
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    kwargs = {k: sizes[k] for k in (*keep, "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings")}
    if arch == "qwen3":
        kwargs["head_dim"] = 16
    return AutoConfig.for_model(arch, **kwargs)


def _model(attn: str, seed: int = 0, arch: str = "llama"):
    from transformers import AutoModelForCausalLM

    register_attention()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(arch), attn_implementation=attn, dtype=torch.float32)
    if arch == "qwen2":  # random biases, so that a mix-up of heads or tokens would show
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.5)
    return model


def _bins(seqs) -> list[dict]:
    return [
        {"input_ids": torch.as_tensor(ids), "loss_mask": torch.as_tensor(mask), "seq_lens": [len(ids)]}
        for ids, mask in seqs
    ]


def _packed_bin(seqs) -> dict:
    return {
        "input_ids": torch.cat([torch.as_tensor(ids) for ids, _ in seqs]),
        "loss_mask": torch.cat([torch.as_tensor(mask) for _, mask in seqs]),
        "seq_lens": [len(ids) for ids, _ in seqs],
    }


def _loss_and_grads(model, batches, device=torch.device("cpu")):
    model.zero_grad()
    total, count = torch.zeros(()), sum(b["num_loss_tokens"] for b in batches)
    for batch in batches:
        logits = model(**model_inputs(batch, device)).logits
        loss = token_loss_sum(logits, batch["targets"])
        (loss / count).backward()
        total += loss.detach()
    return total / count, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_packed_row_gives_the_same_loss_and_gradients_as_sequences_one_at_a_time(arch):
    model = _model(VARLEN_ATTENTION, arch=arch)
    seqs = random_sequences(5, seed=3, min_len=5, max_len=20)
    seq_len = 128
    # Reference: each sequence alone in its own row, no packing.
    unpacked = [collate_bins([b], len(b["input_ids"]), PAD_ID) for b in _bins(seqs)]
    ref_loss, ref_grads = _loss_and_grads(model, unpacked)
    # Packed: all sequences back to back in one row, plus padding up to seq_len.
    packed = collate_bins([_packed_bin(seqs)], seq_len, PAD_ID)
    assert packed["cu_seqlens"].numel() == len(seqs) + 2  # sequences + one padding segment
    loss, grads = _loss_and_grads(model, [packed])
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-5, msg=name)


def test_two_packed_rows_in_one_batch_equal_the_rows_run_separately():
    model = _model(VARLEN_ATTENTION)
    rows = [_packed_bin(random_sequences(3, seed=s, max_len=15)) for s in (1, 2)]
    both = collate_bins(rows, 64, PAD_ID)
    logits = model(**model_inputs(both, torch.device("cpu"))).logits
    for r, row in enumerate(rows):
        alone = collate_bins([row], 64, PAD_ID)
        ref = model(**model_inputs(alone, torch.device("cpu"))).logits
        torch.testing.assert_close(logits[r], ref[0], rtol=1e-5, atol=1e-5)


def test_changing_one_sequence_does_not_change_the_others_logits():
    model = _model(VARLEN_ATTENTION)
    seqs = random_sequences(3, seed=5, max_len=15)
    base = collate_bins([_packed_bin(seqs)], 64, PAD_ID)
    changed_seqs = [seqs[0], (seqs[1][0][::-1].copy(), seqs[1][1]), seqs[2]]
    changed = collate_bins([_packed_bin(changed_seqs)], 64, PAD_ID)
    a = model(**model_inputs(base, torch.device("cpu"))).logits[0]
    b = model(**model_inputs(changed, torch.device("cpu"))).logits[0]
    first, second = len(seqs[0][0]), len(seqs[0][0]) + len(seqs[1][0])
    torch.testing.assert_close(a[:first], b[:first])
    torch.testing.assert_close(a[second : second + len(seqs[2][0])], b[second : second + len(seqs[2][0])])
    assert not torch.allclose(a[first:second], b[first:second])


def test_varlen_attention_matches_sdpa_with_a_block_diagonal_mask_under_gqa():
    torch.manual_seed(0)
    batch, heads, kv_heads, length, dim = 2, 4, 2, 12, 8
    q = torch.randn(batch, heads, length, dim)
    k = torch.randn(batch, kv_heads, length, dim)
    v = torch.randn(batch, kv_heads, length, dim)
    cu = torch.tensor([0, 5, 12, 15, 24], dtype=torch.int32)  # row 0: 5+7, row 1: 3+9
    module = torch.nn.Module()
    out, _ = varlen_attention(module, q, k, v, None, scaling=dim**-0.5, cu_seq_lens_q=cu)
    seq_id = torch.zeros(batch * length, dtype=torch.long)
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        seq_id[s:e] = i
    seq_id = seq_id.view(batch, length)
    pos = torch.arange(length)
    mask = (seq_id[:, :, None] == seq_id[:, None, :]) & (pos[:, None] >= pos[None, :])
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), attn_mask=mask[:, None]
    )
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_2d_attention_mask_on_a_packed_row_leaks_across_sequences(attn):
    """Why the trainer passes no attention mask: transformers' default path with a 2-D all-ones mask
    attends across the packed sequences, while position_ids alone (no mask) keep them apart."""
    model = _model(attn)
    seqs = random_sequences(3, seed=9, max_len=15)
    packed = collate_bins([_packed_bin(seqs)], sum(len(s[0]) for s in seqs), PAD_ID)
    ids, pos = packed["input_ids"], packed["position_ids"]
    alone = model(input_ids=torch.as_tensor(seqs[1][0])[None], use_cache=False).logits[0]
    start, end = len(seqs[0][0]), len(seqs[0][0]) + len(seqs[1][0])
    leaked = model(input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids), use_cache=False).logits[0]
    isolated = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
    assert (leaked[start:end] - alone).abs().max() > 1e-3
    torch.testing.assert_close(isolated[start:end], alone, rtol=1e-5, atol=1e-5)
