"""The two safetensors jobs the `safetensors` library does not do: find an HF model's weight files, write a file tensor by tensor.

Reading tensors is the library's (`safe_open`); so is writing whole dicts (`save_file`). What is here:

* `read_weight_index`: the weight files of an HF model directory, from `model.safetensors.index.json` or
  the single `model.safetensors` - the one place that parses the index.
* `StreamingSafetensorsWriter`: a safetensors file written header first, then each tensor's bytes in
  pieces, so a tensor never has to be in memory whole (`save_file` needs every tensor of the file at
  once). The bytes are those `save_file` writes for the same tensors and metadata.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from math import prod
from pathlib import Path

from sftflow.errors import SftflowError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# safetensors dtype code -> bytes per element
ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "U64": 8,
    "I32": 4,
    "U32": 4,
    "I16": 2,
    "U16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


@dataclass(frozen=True)
class WeightIndex:
    """The safetensors weight files of an HF model directory and, when sharded, its index."""

    files: list[str]  # file names, sorted
    weight_map: dict[str, str] | None  # tensor name -> file name; None for a single model.safetensors
    metadata: dict | None  # the index's "metadata"; None for a single file


def read_weight_index(
    model_dir: str | Path, expected: str = "an HF model directory with safetensors weights"
) -> WeightIndex:
    """The weight files of `model_dir`: its index's shards, else model.safetensors; SftflowError (saying what was
    `expected` there) when it has neither or the index is not one."""
    model_dir = Path(model_dir)
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            weight_map = dict(index["weight_map"])
            metadata = dict(index.get("metadata") or {})
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise SftflowError(f"{index_path}: not a safetensors index ({err!r})") from None
        return WeightIndex(sorted(set(weight_map.values())), weight_map, metadata)
    if (model_dir / SINGLE_FILE).is_file():
        return WeightIndex([SINGLE_FILE], None, None)
    raise SftflowError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE}; expected {expected}")


def library_order(tensors: Sequence[tuple[str, str, tuple[int, ...]]]) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) in the order save_file lays tensors out: widest dtype first, then by name (aligned)."""
    return sorted(tensors, key=lambda t: (-ITEMSIZE[t[1]], t[0]))


class StreamingSafetensorsWriter:
    """Write a safetensors file tensor by tensor: the header (names, dtypes, shapes) first, then the bytes in order.

    `tensors` are (name, dtype code, shape); they are laid out as save_file lays them out (`library_order`),
    and their bytes must be written in that order (`names`), each in as many pieces as the caller likes.
    """

    def __init__(self, path: str | Path, tensors: Sequence[tuple[str, str, tuple[int, ...]]], metadata: dict) -> None:
        header: dict = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}}
        self.expected: list[tuple[str, int]] = []
        offset = 0
        for name, dtype, shape in library_order(tensors):
            nbytes = prod(shape) * ITEMSIZE[dtype]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self.expected.append((name, nbytes))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # keep the data buffer 8-byte aligned, as the safetensors library does
        self.names = [name for name, _ in self.expected]
        self.data_bytes = offset
        self.path = Path(path)
        self._file = open(path, "wb")  # noqa: SIM115 (closed by __exit__)
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0  # index in self.expected of the tensor being written
        self._written = 0  # bytes of it written so far
        self._skip_empty()

    def _skip_empty(self) -> None:
        while self._next < len(self.expected) and self.expected[self._next][1] == 0:
            self._next += 1

    def write(self, name: str, data) -> None:
        """Append (part of) tensor `name`'s bytes (any C-contiguous buffer, little-endian); header order only."""
        view = memoryview(data).cast("B")
        if not len(view):
            return
        expected_name, nbytes = self.expected[self._next] if self._next < len(self.expected) else (None, 0)
        if name != expected_name or self._written + len(view) > nbytes:
            raise RuntimeError(
                f"internal error: {self.path}: got {len(view)} bytes of {name}, expected {expected_name}"
            )
        self._file.write(view)
        self._written += len(view)
        if self._written == nbytes:
            self._next, self._written = self._next + 1, 0
            self._skip_empty()

    def __enter__(self) -> StreamingSafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._file.close()
        if exc_type is None and self._next != len(self.expected):
            raise RuntimeError(
                f"internal error: {self.path}: only {self._next} of {len(self.expected)} tensors written"
            )
