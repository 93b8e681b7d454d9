"""Packed bins as megatron-core micro-batches (pure torch: runs and is tested on CPU).

A micro-batch of `train_micro_batch_size` bins becomes one row of the bins' sequences laid end to end,
which megatron-core reads in one of two ways:

* **THD** (Transformer Engine attention): `PackedSeqParams(qkv_format="thd")` with the sequence
  boundaries `cu_seqlens`; attention and RoPE restart at every boundary. With context parallelism each
  sequence is padded to a multiple of 2 x CP and every CP rank keeps chunks r and 2CP-1-r of each
  sequence (the load-balanced split Transformer Engine's THD attention expects); `cu_seqlens_padded`
  gives the padded boundaries, `cu_seqlens` the real ones.
* **Block-diagonal mask** (megatron-core's own attention, no Transformer Engine, CP = 1): a
  [1, 1, T, T] boolean mask, True where a query must not see a key: later tokens and every token
  of another sequence. RoPE then runs over the row's absolute positions; that changes nothing inside
  a sequence, since rotary attention scores depend only on the distance between query and key.

Targets follow `collate_bins`: position t predicts token t+1 of the same sequence where that token is
a loss token; everything else (prompt, sequence ends, padding) carries loss_mask 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sftflow.packing import collate_bins

IGNORE_INDEX = -100


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def cp_chunk_indices(cu_padded: list[int], cp_size: int, cp_rank: int) -> torch.Tensor:
    """Token indices CP rank `cp_rank` keeps: chunks r and 2CP-1-r of every (padded) sequence."""
    keep = []
    for start, end in zip(cu_padded[:-1], cu_padded[1:]):
        length = end - start
        if length % (2 * cp_size):
            raise ValueError(f"sequence of {length} tokens is not padded to a multiple of 2 x CP = {2 * cp_size}")
        chunk = length // (2 * cp_size)
        for c in (cp_rank, 2 * cp_size - 1 - cp_rank):
            keep.append(torch.arange(start + c * chunk, start + (c + 1) * chunk))
    return torch.cat(keep) if keep else torch.zeros(0, dtype=torch.long)


@dataclass(frozen=True)
class ContextShard:
    """This rank's place in context parallelism: `rank` of `size` CP ranks (size 1: the whole row)."""

    size: int = 1
    rank: int = 0


def megatron_micro_batch(
    bins: list[dict],
    pad_token_id: int,
    *,
    context: ContextShard = ContextShard(),
    length_multiple: int = 1,
    pad_to: int = 0,
    block_mask: bool = False,
) -> dict:
    """One micro-batch for megatron-core's GPTModel from `bins` (PackedDataset.get_bin items).

    Returns CPU tensors: tokens, labels (IGNORE targets replaced by 0), loss_mask (float), position_ids,
    padding_mask (bool, True on the padding this function adds: what megatron-core's MoE router leaves out),
    all [1, T_local]; cu_seqlens / cu_seqlens_padded (int32, over the whole row), max_seqlen,
    num_loss_tokens (of this CP rank's part) and, with `block_mask`, attention_mask [1, 1, T, T].
    `context`: with context parallelism, only the chunks this CP rank keeps (cp_chunk_indices);
    `length_multiple`: the row is padded to a multiple of it (e.g. TP with sequence parallelism);
    `pad_to`: and to at least this many tokens (pipeline stages exchange activations of one fixed shape).
    """
    cp_size = context.size
    if block_mask and cp_size > 1:
        raise ValueError("the block-diagonal mask path has no context parallelism")
    seq_multiple = 2 * cp_size if cp_size > 1 else 1
    ids, labels, loss_mask, positions, padding = [], [], [], [], []
    cu, cu_padded = [0], [0]
    for item in bins:
        n = len(item["input_ids"])
        row = collate_bins([item], n, pad_token_id)  # the bin alone: its sequences, no padding
        start = 0
        for length in (int(k) for k in item["seq_lens"]):
            end = start + length
            padded = _round_up(length, seq_multiple)
            pad = padded - length
            seq_targets = row["targets"][0, start:end]
            ids.append(torch.cat([row["input_ids"][0, start:end], torch.full((pad,), pad_token_id)]))
            targets = torch.cat([seq_targets, torch.full((pad,), IGNORE_INDEX)])
            labels.append(targets.clamp(min=0))
            loss_mask.append((targets != IGNORE_INDEX).float())
            positions.append(torch.arange(padded))
            padding.append(torch.arange(padded) >= length)
            cu.append(cu[-1] + length)
            cu_padded.append(cu_padded[-1] + padded)
            start = end
    total = cu_padded[-1]
    row_pad = _round_up(max(total, pad_to), seq_multiple * length_multiple) - total
    if row_pad:  # a padding segment of its own, carrying no loss
        ids.append(torch.full((row_pad,), pad_token_id))
        labels.append(torch.zeros(row_pad, dtype=torch.long))
        loss_mask.append(torch.zeros(row_pad))
        positions.append(torch.arange(row_pad))
        padding.append(torch.ones(row_pad, dtype=torch.bool))
        cu.append(cu[-1] + row_pad)
        cu_padded.append(cu_padded[-1] + row_pad)
    tokens = torch.cat(ids).long()
    batch = {
        "tokens": tokens,
        "labels": torch.cat(labels).long(),
        "loss_mask": torch.cat(loss_mask),
        "position_ids": torch.cat(positions).long(),
        "padding_mask": torch.cat(padding),
    }
    if cp_size > 1:
        keep = cp_chunk_indices(cu_padded, cp_size, context.rank)
        batch = {k: v[keep] for k, v in batch.items()}
    out = {k: v.unsqueeze(0) for k, v in batch.items()}
    lengths = [b - a for a, b in zip(cu_padded[:-1], cu_padded[1:])]
    out.update(
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        cu_seqlens_padded=torch.tensor(cu_padded, dtype=torch.int32),
        max_seqlen=max(lengths),
        num_loss_tokens=int(out["loss_mask"].sum()),
    )
    if block_mask:
        segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        later = torch.triu(torch.ones(total + row_pad, total + row_pad, dtype=torch.bool), diagonal=1)
        other = segment[:, None] != segment[None, :]
        out["attention_mask"] = (later | other)[None, None]
    return out
