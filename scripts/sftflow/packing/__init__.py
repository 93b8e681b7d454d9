"""Packing stage: tokenize SFT rows with an assistant-only loss mask, pack them into fixed-length bins, shard them.

On-disk format ``sftflow-packed-v1`` (the contract between pack_data and the trainer)
------------------------------------------------------------------------------------
The output is a directory, written atomically (built under a temporary name, renamed on success):

``shard_00000.safetensors``, ``shard_00001.safetensors``, ...
    Each shard holds ``bins_per_shard`` bins (the last one possibly fewer) as four tensors:

    - ``tokens``      int32 [T]   token ids of all the shard's sequences, concatenated bin after bin,
      sequence after sequence, with no padding.
    - ``loss_mask``   uint8 [T]   1 where the token is a training target (assistant content and its
      end-of-turn text), 0 elsewhere.
    - ``cu_seqlens``  int64 [S+1] token offset of each sequence inside the shard; starts at 0 and ends at T.
    - ``bin_offsets`` int64 [B+1] bin b holds sequences ``bin_offsets[b]`` .. ``bin_offsets[b+1]-1``;
      starts at 0 and ends at S.

    A bin's sequences add up to at most ``max_total_sequence_length`` tokens. With packing disabled each
    bin holds exactly one sequence. Bins are stored in a shuffled order (``packing.seed``); within a bin,
    sequences are in the order the packer placed them (longest first).

``index.json``
    ``{"format": "sftflow-packed-v1", "packing": bool, "max_total_sequence_length": L, "pad_token_id": int,
    "num_bins": B, "num_sequences": S, "num_tokens": T, "num_loss_tokens": N, "shards": [{"file",
    "num_bins", "num_sequences", "num_tokens", "num_loss_tokens"}, ...], "tokenizer": str, "source": str}``.
    ``pad_token_id`` is the tokenizer's pad id, else its eos id. ``num_loss_tokens`` counts the tokens
    that can actually be predicted: loss-mask tokens that are not the first token of their sequence
    (the first token has no earlier token in its sequence to predict it from). It equals the sum of
    ``collate_bins(...)["num_loss_tokens"]`` over all bins.

``stats.json``
    Counts and timings of the run (see ``pack_jsonl``); also logged as a readable summary.

Reading: ``PackedDataset(path).get_bin(i)`` and ``collate_bins(bins, seq_len, pad_token_id)``.
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
