"""Turn packed bins into fixed-shape training batches whose targets and attention never cross sequences."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def collate_bins(bins: list[dict], seq_len: int, pad_token_id: int) -> dict:
    """Stack bins (from PackedDataset.get_bin) into [len(bins), seq_len] tensors.

    Returns:
      input_ids    int64, padded on the right with pad_token_id.
      targets      int64; targets[b, t] = input_ids[b, t+1] when t+1 is a loss token of the same
                   sequence as t, else -100 (so padding, sequence ends and the last column are -100).
      position_ids int64; 0, 1, ... from every sequence start; padding continues counting from the
                   last sequence of its row.
      cu_seqlens   int32; boundaries of every sequence and of each row's padding segment, over the
                   batch flattened row after row (starts at 0, ends at len(bins) * seq_len), for
                   variable-length attention.
      max_seqlen   int, the longest segment in cu_seqlens.
      num_loss_tokens int, (targets != -100).sum().
    """
    batch = len(bins)
    input_ids = torch.full((batch, seq_len), pad_token_id, dtype=torch.long)
    targets = torch.full((batch, seq_len), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((batch, seq_len), dtype=torch.long)
    cu_seqlens = [0]
    max_seqlen = 0
    for row, item in enumerate(bins):
        ids = torch.as_tensor(item["input_ids"], dtype=torch.long)
        mask = torch.as_tensor(item["loss_mask"]).to(torch.bool)
        lens = [int(n) for n in item["seq_lens"]]
        n = ids.numel()
        if sum(lens) != n or mask.numel() != n or any(k <= 0 for k in lens):
            raise ValueError(f"bin {row}: seq_lens {lens} do not split its {n} tokens into non-empty sequences")
        if n > seq_len:
            raise ValueError(f"bin {row} has {n} tokens, more than seq_len={seq_len}")
        input_ids[row, :n] = ids
        base = row * seq_len
        start = 0
        for length in lens:
            end = start + length
            position_ids[row, start:end] = torch.arange(length)
            # Position t predicts token t+1 only inside the sequence; the sequence's last position
            # keeps -100, which is what stops targets from leaking into the next sequence.
            nxt = ids[start + 1 : end]
            targets[row, start : end - 1] = torch.where(mask[start + 1 : end], nxt, IGNORE_INDEX)
            cu_seqlens.append(base + end)
            max_seqlen = max(max_seqlen, length)
            start = end
        pad = seq_len - n
        if pad:
            last = lens[-1] if lens else 0
            position_ids[row, n:] = torch.arange(last, last + pad)
            cu_seqlens.append(base + seq_len)
            max_seqlen = max(max_seqlen, pad)
    return {
        "input_ids": input_ids,
        "targets": targets,
        "position_ids": position_ids,
        "cu_seqlens": torch.tensor(cu_seqlens, dtype=torch.int32),
        "max_seqlen": int(max_seqlen),
        "num_loss_tokens": int((targets != IGNORE_INDEX).sum()),
    }
