"""Write and read sftflow-packed-v1 shard directories (format described in sftflow.packing)."""

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

FORMAT = "sftflow-packed-v1"
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


@dataclass(frozen=True)
class BinLayout:
    """Where the sequences go: sequence i is at seq_offsets[i]:seq_offsets[i+1] of the tokens held back to back,
    `seq_order` lists the sequence ids in storage order, and bin b takes the next `bin_sizes[b]` of them."""

    seq_offsets: np.ndarray
    seq_order: np.ndarray
    bin_sizes: np.ndarray

    @classmethod
    def from_bins(cls, lengths: Sequence[int] | np.ndarray, bins: Sequence[Sequence[int]]) -> BinLayout:
        """From each sequence's length and the sequence ids of each bin, in storage order."""
        return cls(
            np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64))]),
            np.array([i for b in bins for i in b], dtype=np.int64),
            np.array([len(b) for b in bins], dtype=np.int64),
        )


def write_packed(
    directory: str | os.PathLike,
    tokens: np.ndarray,
    loss_mask: np.ndarray,
    layout: BinLayout,
    bins_per_shard: int,
    meta: dict[str, Any],
) -> dict:
    """Write shards + index.json into an existing empty `directory`; return the index.

    `tokens`/`loss_mask` hold all sequences back to back, placed into bins by `layout`.
    `meta` supplies packing, max_total_sequence_length, pad_token_id, tokenizer and source.
    """
    return write_shards(directory, ArraySequences(tokens, loss_mask), layout, bins_per_shard, meta)


def write_shards(
    directory: str | os.PathLike,
    source: SequenceSource,
    layout: BinLayout,
    bins_per_shard: int,
    meta: dict[str, Any],
) -> dict:
    """write_packed with the sequences read from `source` a block at a time (memory: one shard's loss mask)."""
    seq_offsets, seq_order, bin_sizes = layout.seq_offsets, layout.seq_order, layout.bin_sizes
    directory = Path(directory)
    bin_starts = np.concatenate([[0], np.cumsum(bin_sizes, dtype=np.int64)])
    shards = []
    for first_bin in range(0, len(bin_sizes), bins_per_shard):
        last_bin = min(first_bin + bins_per_shard, len(bin_sizes))
        seqs = seq_order[bin_starts[first_bin] : bin_starts[last_bin]]
        starts = seq_offsets[seqs]
        seq_lens = seq_offsets[seqs + 1] - starts
        cu = np.concatenate([[0], np.cumsum(seq_lens, dtype=np.int64)])
        name = SHARD_NAME.format(len(shards))
        bin_offsets = bin_starts[first_bin : last_bin + 1] - bin_starts[first_bin]
        loss_tokens = _write_shard(directory / name, source, starts, seq_lens, cu, bin_offsets)
        shards.append(
            {
                "file": name,
                "num_bins": int(last_bin - first_bin),
                "num_sequences": len(seqs),
                "num_tokens": int(cu[-1]),
                "num_loss_tokens": loss_tokens,
            }
        )
    index = {
        "format": FORMAT,
        "packing": bool(meta["packing"]),
        "max_total_sequence_length": int(meta["max_total_sequence_length"]),
        "pad_token_id": int(meta["pad_token_id"]),
        "num_bins": int(len(bin_sizes)),
        "num_sequences": int(len(seq_order)),
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
    """Random access to the bins of a packed directory; shards are memory-mapped lazily on first use."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        index_file = self.path / "index.json"
        if not index_file.is_file():
            raise SftflowError(f"{self.path}: not a packed data directory (no index.json); run the pack_data rule")
        self.index: dict = json.loads(index_file.read_text(encoding="utf-8"))
        if self.index.get("format") != FORMAT:
            raise SftflowError(f"{index_file}: format {self.index.get('format')!r} is not {FORMAT!r}; re-run pack_data")
        self._bin_starts = [0]
        for shard in self.index["shards"]:
            self._bin_starts.append(self._bin_starts[-1] + shard["num_bins"])
        self._cache: dict[int, tuple[Any, torch.Tensor, torch.Tensor]] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self._bin_starts[-1]

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
        """Bin i as {input_ids: LongTensor[n], loss_mask: BoolTensor[n], seq_lens: list[int]}."""
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"bin {i} out of range (dataset has {len(self)} bins)")
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
