"""collate_bins semantics on hand-made bins: targets, position ids, cu_seqlens, padding."""

from __future__ import annotations

import pytest
import torch

from sftflow.packing import collate_bins

PAD = 99


def make_bin(seqs: list[tuple[list[int], list[int]]]) -> dict:
    ids = [t for s, _ in seqs for t in s]
    mask = [m for _, ms in seqs for m in ms]
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "loss_mask": torch.tensor(mask, dtype=torch.bool),
        "seq_lens": [len(s) for s, _ in seqs],
    }


def test_two_rows_pinned():
    bins = [
        make_bin([([10, 11, 12], [0, 1, 1]), ([20, 21], [1, 1])]),  # 5 tokens + 3 padding
        make_bin([(list(range(30, 38)), [0, 0, 1, 1, 1, 1, 1, 1])]),  # exactly full
    ]
    out = collate_bins(bins, 8, PAD)
    assert out["input_ids"].tolist() == [[10, 11, 12, 20, 21, PAD, PAD, PAD], list(range(30, 38))]
    # position 2 (last of seq 0) must not predict 20 even though 20 is a loss token: no crossing;
    # 20 itself is the first token of its sequence, so nothing can predict it.
    assert out["targets"].tolist() == [
        [11, 12, -100, 21, -100, -100, -100, -100],
        [-100, 32, 33, 34, 35, 36, 37, -100],
    ]
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4], list(range(8))]
    assert out["cu_seqlens"].dtype == torch.int32
    assert out["cu_seqlens"].tolist() == [0, 3, 5, 8, 16]
    assert out["max_seqlen"] == 8
    assert out["num_loss_tokens"] == 9 == int((out["targets"] != -100).sum())
    assert out["input_ids"].dtype == out["targets"].dtype == out["position_ids"].dtype == torch.int64


def test_targets_never_cross_sequences():
    torch.manual_seed(0)
    lens = [3, 1, 4, 2, 5]
    ids = torch.randint(0, 50, (sum(lens),))
    mask = torch.ones(sum(lens), dtype=torch.bool)  # every token a loss token: only boundaries stop targets
    out = collate_bins([{"input_ids": ids, "loss_mask": mask, "seq_lens": lens}], 20, PAD)
    seq_of = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    targets = out["targets"][0]
    for t in range(sum(lens)):
        same = t + 1 < sum(lens) and seq_of[t + 1] == seq_of[t]
        assert targets[t].item() == (ids[t + 1].item() if same else -100)
    assert (targets[sum(lens) :] == -100).all()
    assert out["num_loss_tokens"] == sum(n - 1 for n in lens)
    starts = [0, 3, 4, 8, 10]
    assert all(out["position_ids"][0, s].item() == 0 for s in starts)
    assert out["cu_seqlens"].tolist() == [0, 3, 4, 8, 10, 15, 20]
    assert out["max_seqlen"] == 5


def test_empty_bin_is_all_padding_and_wider_rows():
    out = collate_bins([make_bin([]), make_bin([([1, 2], [0, 1])])], 4, PAD)
    assert out["input_ids"].tolist() == [[PAD] * 4, [1, 2, PAD, PAD]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert out["cu_seqlens"].tolist() == [0, 4, 6, 8]
    assert out["num_loss_tokens"] == 1


def test_bad_bins_raise():
    with pytest.raises(ValueError, match="more than seq_len"):
        collate_bins([make_bin([([1] * 5, [1] * 5)])], 4, PAD)
    bad = make_bin([([1, 2, 3], [0, 1, 1])])
    bad["seq_lens"] = [2]
    with pytest.raises(ValueError, match="seq_lens"):
        collate_bins([bad], 4, PAD)
