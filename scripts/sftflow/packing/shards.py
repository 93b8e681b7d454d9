"""Write and read sftflow-packed-v2 shard directories (format described in sftflow.packing)."""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from safetensors import safe_open

from sftflow.errors import SftflowError
from sftflow.safetensors_io import StreamingSafetensorsWriter

if TYPE_CHECKING:  # torch loads only where bins are read (the trainer): pack_data writes shards without it
    import torch

FORMAT = "sftflow-packed-v2"
_V1 = "sftflow-packed-v1"  # the earlier format, bins packed by pack_data: refused with the reason
SHARD_NAME = "shard_{:05d}.safetensors"
# Sequences read from the source and written per step: bounds the index arrays and token copies.
WRITE_BLOCK_SEQUENCES = 4096


def trainable_loss_tokens(loss_mask: np.ndarray, seq_offsets: np.ndarray) -> int:
    """Loss tokens that are not the first token of their sequence (only those can be predicted)."""
    firsts = seq_offsets[:-1][seq_offsets[:-1] < seq_offsets[1:]]
    return int(loss_mask.sum(dtype=np.int64) - loss_mask[firsts].sum(dtype=np.int64))


class SequenceSource(Protocol):
    """Where write_shards reads sequences from: in-memory arrays or pack_jsonl's on-disk spool."""

    def read(self, field: str, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """`field` ("tokens", int32, or "loss_mask", uint8) of the sequences at token offsets `starts`, back to back."""
        ...


@dataclass
class ArraySequences:
    """All sequences' tokens and loss masks held in memory, back to back."""

    tokens: np.ndarray
    loss_mask: np.ndarray

    def read(self, field: str, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        from sftflow.packing.stream import gather_sequences

        return gather_sequences(getattr(self, field), starts, lengths)


def write_packed(
    directory: str | os.PathLike,
    tokens: np.ndarray,
    loss_mask: np.ndarray,
    lengths: Sequence[int] | np.ndarray,
    sequences_per_shard: int,
    meta: dict[str, Any],
) -> dict:
    """Write shards + index.json into an existing empty `directory`; return the index.

    `tokens`/`loss_mask` hold all sequences back to back, sequence i of `lengths[i]` tokens; they are stored
    one per bin, in this order. `meta` supplies max_total_sequence_length, pad_token_id, tokenizer and source.
    """
    seq_offsets = np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64))])
    return write_shards(directory, ArraySequences(tokens, loss_mask), seq_offsets, sequences_per_shard, meta)


def write_shards(
    directory: str | os.PathLike,
    source: SequenceSource,
    seq_offsets: np.ndarray,
    sequences_per_shard: int,
    meta: dict[str, Any],
) -> dict:
    """write_packed with the sequences read from `source` a block at a time (memory: one shard's loss mask).

    Sequence i is at seq_offsets[i]:seq_offsets[i+1] of `source`'s tokens; shard k holds sequences
    k * sequences_per_shard onwards, each its own bin.
    """
    directory = Path(directory)
    num_sequences = len(seq_offsets) - 1
    shards = []
    for first in range(0, num_sequences, sequences_per_shard):
        last = min(first + sequences_per_shard, num_sequences)
        starts = seq_offsets[first:last]
        seq_lens = seq_offsets[first + 1 : last + 1] - starts
        cu = seq_offsets[first : last + 1] - seq_offsets[first]
        name = SHARD_NAME.format(len(shards))
        bin_offsets = np.arange(last - first + 1, dtype=np.int64)  # one sequence per bin
        loss_tokens = _write_shard(directory / name, source, starts, seq_lens, cu, bin_offsets)
        shards.append(
            {
                "file": name,
                "num_bins": last - first,
                "num_sequences": last - first,
                "num_tokens": int(cu[-1]),
                "num_loss_tokens": loss_tokens,
            }
        )
    index = {
        "format": FORMAT,
        "max_total_sequence_length": int(meta["max_total_sequence_length"]),
        "pad_token_id": int(meta["pad_token_id"]),
        "num_bins": num_sequences,
        "num_sequences": num_sequences,
        "num_tokens": int(sum(s["num_tokens"] for s in shards)),
        "num_loss_tokens": int(sum(s["num_loss_tokens"] for s in shards)),
        "shards": shards,
        "tokenizer": str(meta["tokenizer"]),
        "source": str(meta["source"]),
    }
    (directory / "index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return index


def _write_shard(
    path: Path,
    source: SequenceSource,
    starts: np.ndarray,
    seq_lens: np.ndarray,
    cu: np.ndarray,
    bin_offsets: np.ndarray,
) -> int:
    """Write one shard as safetensors, streamed a block of sequences at a time; return its loss tokens.

    The bytes are those of safetensors' save_file, without holding the shard's tokens or loss mask in
    memory: the file holds all the tokens before all the masks, so the sequences are read twice.
    """
    n = int(cu[-1])
    layout = [("bin_offsets", "I64", (len(bin_offsets),)), ("cu_seqlens", "I64", (len(cu),))]
    layout += [("tokens", "I32", (n,)), ("loss_mask", "U8", (n,))]
    loss_tokens = 0
    with StreamingSafetensorsWriter(path, layout, {"format": FORMAT}) as writer:
        writer.write("bin_offsets", np.ascontiguousarray(bin_offsets, dtype="<i8"))
        writer.write("cu_seqlens", np.ascontiguousarray(cu, dtype="<i8"))
        for field in ("tokens", "loss_mask"):
            for first in range(0, len(starts), WRITE_BLOCK_SEQUENCES):
                block = slice(first, first + WRITE_BLOCK_SEQUENCES)
                values = source.read(field, starts[block], seq_lens[block])
                if field == "loss_mask":
                    loss_tokens += trainable_loss_tokens(
                        values, cu[first : first + WRITE_BLOCK_SEQUENCES + 1] - cu[first]
                    )
                writer.write(field, np.ascontiguousarray(values, dtype="<i4" if field == "tokens" else np.uint8))
    return loss_tokens


class PackedDataset:
    """Random access to the sequences of a pack_data directory (bin i holds sequence i, in the prepared file's
    order); shards are memory-mapped lazily on first use."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        index_file = self.path / "index.json"
        if not index_file.is_file():
            raise SftflowError(f"{self.path}: not a packed data directory (no index.json); run the pack_data rule")
        self.index: dict = json.loads(index_file.read_text(encoding="utf-8"))
        found = self.index.get("format")
        if found != FORMAT:
            why = " (bins packed offline: the trainer now packs each step's sequences itself)" if found == _V1 else ""
            raise SftflowError(
                f"{index_file}: format {found!r} is not {FORMAT!r}{why}; re-run pack_data (delete {self.path} and "
                "run the pack_data rule, or scripts/pack_data.py)"
            )
        self._bin_starts = [0]
        for shard in self.index["shards"]:
            self._bin_starts.append(self._bin_starts[-1] + shard["num_bins"])
        self._cache: dict[int, tuple[Any, torch.Tensor, torch.Tensor]] = {}
        self._pid = os.getpid()
        self._lengths: np.ndarray | None = None

    def __len__(self) -> int:
        return self._bin_starts[-1]

    @property
    def num_sequences(self) -> int:
        """The number of sequences (= bins = len(self): one sequence per bin)."""
        return len(self)

    def lengths(self) -> np.ndarray:
        """Every sequence's length in tokens, in order (int64, from the shards' cu_seqlens; computed once)."""
        if self._lengths is None:
            parts = []
            for k, shard in enumerate(self.index["shards"]):
                cu_seqlens = self._shard(k)[2].numpy()
                if len(cu_seqlens) != shard["num_bins"] + 1:
                    raise SftflowError(
                        f"{self.path / shard['file']}: {len(cu_seqlens) - 1} sequences, but index.json says "
                        f"{shard['num_bins']} bins of one sequence; re-run pack_data"
                    )
                parts.append(np.diff(cu_seqlens).astype(np.int64))
            self._lengths = np.concatenate(parts) if parts else np.zeros(0, np.int64)
            self._lengths.flags.writeable = False
        return self._lengths

    def _shard(self, k: int) -> tuple[Any, torch.Tensor, torch.Tensor]:
        # DataLoader workers fork: each process opens its own handles rather than sharing the parent's.
        if os.getpid() != self._pid:
            self._cache, self._pid = {}, os.getpid()
        cached = self._cache.get(k)
        if cached is None:
            handle = safe_open(str(self.path / self.index["shards"][k]["file"]), framework="pt")
            # The offset tables are small (8 bytes per sequence/bin): load them whole; tokens stay mapped.
            cached = (handle, handle.get_tensor("bin_offsets"), handle.get_tensor("cu_seqlens"))
            self._cache[k] = cached
        return cached

    def get_bin(self, i: int) -> dict:
        """Sequence i as a bin of one: {input_ids: LongTensor[n], loss_mask: BoolTensor[n], seq_lens: [n]}."""
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"sequence {i} out of range (dataset has {len(self)} sequences)")
        k = bisect.bisect_right(self._bin_starts, i) - 1
        handle, bin_offsets, cu_seqlens = self._shard(k)
        b = i - self._bin_starts[k]
        s0, s1 = int(bin_offsets[b]), int(bin_offsets[b + 1])
        offsets = cu_seqlens[s0 : s1 + 1]
        t0, t1 = int(offsets[0]), int(offsets[-1])
        import torch

        return {
            "input_ids": handle.get_slice("tokens")[t0:t1].to(torch.long),
            "loss_mask": handle.get_slice("loss_mask")[t0:t1].to(torch.bool),
            "seq_lens": (offsets[1:] - offsets[:-1]).tolist(),
        }

    def __getitem__(self, i: int) -> dict:
        return self.get_bin(i)

    def __getstate__(self) -> dict:
        # Open safetensors handles cannot be pickled (spawned DataLoader workers): reopen lazily instead.
        return {**self.__dict__, "_cache": {}}
