"""Packing stage: tokenize SFT rows with an assistant-only loss mask and store them, one sequence per bin, in shards.

pack_data no longer packs: it stores the sequences in the prepared file's row order, and the trainer packs
each optimizer step's sequences (packing.enabled, packing.algorithm, packing.max_total_sequence_length) with
the packers of ``binpack`` and ``collate_bins``.

On-disk format ``sftflow-packed-v2`` (the contract between pack_data and the trainer)
------------------------------------------------------------------------------------
The output is a directory, written atomically (built under a temporary name, renamed on success):

``shard_00000.safetensors``, ``shard_00001.safetensors``, ...
    Each shard holds ``sequences_per_shard`` sequences (the last one possibly fewer) as four tensors:

    - ``tokens``      int32 [T]   token ids of the shard's sequences, concatenated in order, with no padding.
    - ``loss_mask``   uint8 [T]   1 where the token is a training target (assistant content and its
      end-of-turn text), 0 elsewhere (all 0 in a sequence masked as over-long).
    - ``cu_seqlens``  int64 [S+1] token offset of each sequence inside the shard; starts at 0 and ends at T.
    - ``bin_offsets`` int64 [S+1] ``0, 1, ..., S``: bin b is sequence b (the layout of the earlier,
      packed format, with bins of one sequence).

    Sequence i of the dataset is row i of the prepared file among the rows kept (over-long rows dropped
    with ``packing.overlong: drop`` and rows without predictable loss tokens are left out); there is no
    shuffle. Every sequence has at most ``max_total_sequence_length`` tokens.

``index.json``
    ``{"format": "sftflow-packed-v2", "max_total_sequence_length": L, "pad_token_id": int, "num_bins": S,
    "num_sequences": S, "num_tokens": T, "num_loss_tokens": N, "shards": [{"file", "num_bins",
    "num_sequences", "num_tokens", "num_loss_tokens"}, ...], "tokenizer": str, "source": str}``.
    ``pad_token_id`` is the tokenizer's pad id, else its eos id. ``num_loss_tokens`` counts the tokens
    that can actually be predicted: loss-mask tokens that are not the first token of their sequence
    (the first token has no earlier token in its sequence to predict it from). It equals the sum of
    ``collate_bins(...)["num_loss_tokens"]`` over all bins.

``stats.json``
    Counts and timings of the run (see ``pack_jsonl``); also logged as a readable summary.

Held-out validation rows (``training.val_set_size``, ``held_out``): pack_data can hold whole problems out of the
prepared file and pack them, in the same format, into a second directory (the workflow's
``results/data/packed_validation``, with ``held_out.json``); they are left out of the training directory.

Reading: ``PackedDataset(path)``: ``len()`` / ``num_sequences``, ``lengths()`` (every sequence's length),
``get_bin(i)`` (sequence i as a bin of one), and ``collate_bins(bins, seq_len, pad_token_id)``. A
``sftflow-packed-v1`` directory (bins packed by pack_data) is refused: re-run pack_data.
"""

import importlib

# Where each public name lives. They load on first use, so that a torch-free stage (pack_data, prepare_data)
# importing one submodule does not import torch through collate.
_EXPORTS = {
    "FORMAT": "shards",
    "PackedDataset": "shards",
    "assign_bins": "binpack",
    "collate_bins": "collate",
    "pack_jsonl": "pipeline",
    "pack_lengths": "binpack",
    "summary_lines": "pipeline",
    "write_packed": "shards",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sftflow.packing' has no attribute {name!r}")
    return getattr(importlib.import_module(f"sftflow.packing.{_EXPORTS[name]}"), name)
