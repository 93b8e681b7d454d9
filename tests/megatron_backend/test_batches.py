"""Packed bins as megatron-core micro-batches (sftflow.megatron.batches): the same tokens and loss targets as
the fsdp backend's collate_bins, context-parallel chunks that cover every token once, and a block-diagonal
mask under which packed attention (with megatron-core's own RoPE, absolute positions) equals attention over
each sequence alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sftflow.megatron.batches import IGNORE_INDEX, ContextShard, cp_chunk_indices, megatron_micro_batch
from sftflow.packing import collate_bins

PAD = 0


def make_bins(lengths_per_bin: list[list[int]], seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    bins = []
    for lens in lengths_per_bin:
        n = sum(lens)
        ids = torch.randint(3, 50, (n,), generator=g)
        mask = torch.zeros(n, dtype=torch.bool)
        start = 0
        for k in lens:  # prompt = first third of each sequence, the rest is the answer (loss tokens)
            mask[start + k // 3 : start + k] = True
            start += k
        bins.append({"input_ids": ids.tolist(), "loss_mask": mask.tolist(), "seq_lens": lens})
    return bins


def test_tokens_and_loss_targets_are_the_fsdp_backends():
    bins = make_bins([[7, 5, 9], [12], [3, 3]])
    mb = megatron_micro_batch(bins, PAD)
    assert mb["tokens"].shape == (1, 39)
    assert mb["tokens"][0].tolist() == [t for b in bins for t in b["input_ids"]]
    expected = torch.cat([collate_bins([b], len(b["input_ids"]), PAD)["targets"][0] for b in bins])
    assert mb["loss_mask"][0].bool().tolist() == (expected != IGNORE_INDEX).tolist()
    assert mb["labels"][0][expected != IGNORE_INDEX].tolist() == expected[expected != IGNORE_INDEX].tolist()
    assert mb["cu_seqlens"].tolist() == [0, 7, 12, 21, 33, 36, 39]
    assert mb["position_ids"][0, 7:12].tolist() == [0, 1, 2, 3, 4]  # restarts at every sequence
    assert mb["num_loss_tokens"] == int((expected != IGNORE_INDEX).sum()) > 0
    assert mb["max_seqlen"] == 12


def test_row_padding_for_sequence_parallel_is_a_segment_without_loss():
    mb = megatron_micro_batch(make_bins([[7, 6]]), PAD, length_multiple=4)
    assert mb["tokens"].shape == (1, 16)
    assert mb["cu_seqlens"].tolist() == [0, 7, 13, 16] and mb["cu_seqlens_padded"].tolist() == [0, 7, 13, 16]
    assert not mb["loss_mask"][0, 13:].any() and (mb["tokens"][0, 13:] == PAD).all()


@pytest.mark.parametrize("cp", [2, 4])
def test_context_parallel_ranks_hold_balanced_chunks_covering_every_token_once(cp):
    bins = make_bins([[7, 5, 9], [12, 2]])
    full = megatron_micro_batch(bins, PAD, context=ContextShard(cp, 0))
    cu_padded = full["cu_seqlens_padded"].tolist()
    assert all((b - a) % (2 * cp) == 0 for a, b in zip(cu_padded[:-1], cu_padded[1:]))
    assert full["cu_seqlens"].tolist()[:6] == [0, 7, 12, 21, 33, 35]  # real boundaries, for the attention kernel
    parts = [cp_chunk_indices(cu_padded, cp, r) for r in range(cp)]
    assert sorted(torch.cat(parts).tolist()) == list(range(cu_padded[-1]))
    # rank r holds chunks r and 2cp-1-r of each sequence: equal work under causal attention
    first = cu_padded[1] // (2 * cp)
    assert parts[0][:first].tolist() == list(range(first))
    assert parts[0][first : 2 * first].tolist() == list(range((2 * cp - 1) * first, 2 * cp * first))
    per_rank = [megatron_micro_batch(bins, PAD, context=ContextShard(cp, r)) for r in range(cp)]
    unsplit = megatron_micro_batch(bins, PAD, context=ContextShard(1))
    assert sum(m["num_loss_tokens"] for m in per_rank) == unsplit["num_loss_tokens"]
    assert all(m["tokens"].shape[1] == cu_padded[-1] // cp for m in per_rank)


def test_block_mask_with_megatron_rope_equals_attention_over_each_sequence_alone():
    """The no-Transformer-Engine path: one row, absolute RoPE positions (what GPTModel does without THD),
    the block-diagonal causal mask. Per-sequence attention restarts positions at 0."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rope = RotaryEmbedding(kv_channels=16, rotary_percent=1.0, rotary_base=10000, use_cpu_initialization=True)
    lens = [9, 4, 11]
    mb = megatron_micro_batch(make_bins([lens]), PAD, block_mask=True)
    total = sum(lens)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(total, 1, 2, 16, generator=g) for _ in range(3))  # [s, b, heads, dim], megatron order

    def attend(q, k, v, mask=None):
        # RotaryEmbedding.forward moves its frequencies to CUDA; its CPU part, and the layout get_emb gives them:
        freqs = rope.get_freqs_non_repeated(q.shape[0])
        freqs = torch.cat((freqs, freqs), dim=-1)[:, None, None, :]
        # apply_rotary_pos_emb's path without THD (cu_seqlens) or fusion
        q, k = _apply_rotary_pos_emb_bshd(q, freqs), _apply_rotary_pos_emb_bshd(k, freqs)
        q, k, v = (x.permute(1, 2, 0, 3) for x in (q, k, v))  # [b, heads, s, dim]
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=~mask)  # megatron: True = masked out

    packed = attend(q, k, v, mb["attention_mask"])
    start = 0
    for n in lens:
        alone = attend(q[start : start + n], k[start : start + n], v[start : start + n])
        torch.testing.assert_close(packed[:, :, start : start + n], alone, atol=1e-5, rtol=1e-5)
        start += n
    # without the mask the second sequence would see the first: the comparison can fail
    leaky = attend(q, k, v, torch.triu(torch.ones(total, total, dtype=torch.bool), 1)[None, None])
    assert not torch.allclose(leaky[:, :, 9:13], attend(q[9:13], k[9:13], v[9:13]), atol=1e-3)


def test_pipeline_stages_get_micro_batches_of_one_length():
    bins = make_bins([[7, 5], [3]])
    mb = megatron_micro_batch(bins, PAD, pad_to=20, block_mask=True)
    assert mb["tokens"].shape == (1, 20) and mb["attention_mask"].shape == (1, 1, 20, 20)
    assert mb["cu_seqlens"].tolist() == [0, 7, 12, 15, 20] and not mb["loss_mask"][0, 15:].any()
    assert mb["num_loss_tokens"] == megatron_micro_batch(bins, PAD)["num_loss_tokens"]
