"""The spool of prepare_data's formatted records and NeMo-Skills' output order over it, in a few bytes per row.

The records, their offsets and their problem and row digests wait in files beside the output; memory holds 1 byte
per row while reading (has code), one 8-byte sort key per row while grouping, and a 4-byte row number per output row
with the rows' 8-byte offsets while copying. Problems and rows are told apart by their 128-bit digests
(sftflow.prepare.digests).
"""

from __future__ import annotations

import functools
import os
from array import array
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from sftflow.errors import SftflowError

BLOCK_ROWS = 1 << 18  # rows per block when a per-row file or array is streamed through
BUCKET_ROWS = 1 << 16  # rows per bucket when grouping: the largest transient, ~150 bytes per bucket row
MAX_BUCKETS = 256  # open files while partitioning; past 2^24 rows the buckets grow instead
COPY_ROWS = 4096  # records gathered per write of the output
DROPPED = np.uint64(2**64 - 1)  # the sort key of a duplicate: sorts after every kept row
LOW32 = np.uint64(2**32 - 1)
KEY_BYTES = 32  # a row's (problem digest, row digest) in the keys file


class Spool:
    """Formatted records appended to a file, with what ordering them needs: their offsets and (problem, row)
    digests in two more files, and a has-code flag per row in memory."""

    def __init__(self, path: Path):
        self.path = path
        self.keys_path = path.with_name(path.name + ".keys")
        self.offsets_path = path.with_name(path.name + ".offsets")
        self.rows = 0
        self.size = 0
        self.has_code = bytearray()
        self._offsets = array("q")
        self._records = open(path, "wb", buffering=1 << 20)
        self._keys = open(self.keys_path, "wb", buffering=1 << 20)
        self._offsets_file = open(self.offsets_path, "wb")

    def add(self, record: bytes, problem: bytes, digest: bytes, has_code: bool) -> None:
        """One row: add_block of a block of one."""
        self.add_block(record, array("q", [len(record)]), problem + digest, bytes([has_code]))

    def add_block(self, records: bytes, lengths, keys: bytes, has_code: bytes) -> None:
        """Rows given as their records joined (`lengths`: each record's length), their (problem digest, row digest)
        pairs joined (KEY_BYTES a row) and their has-code flags (a byte a row): one write per file."""
        lengths = np.frombuffer(lengths, dtype=np.int64)
        if not len(lengths):
            return
        starts = np.empty(len(lengths), dtype=np.int64)
        starts[0] = self.size
        np.cumsum(lengths[:-1], out=starts[1:])
        starts[1:] += self.size
        size = self.size + int(lengths.sum())
        if size - self.size != len(records) or len(keys) != KEY_BYTES * len(lengths) or len(has_code) != len(lengths):
            raise RuntimeError("internal error: a spool block's records, keys and flags do not match its lengths")
        self._offsets.frombytes(starts.tobytes())
        if len(self._offsets) >= BLOCK_ROWS:
            self._offsets.tofile(self._offsets_file)
            del self._offsets[:]
        self._records.write(records)
        self._keys.write(keys)
        self.has_code += has_code
        self.size = size
        self.rows += len(lengths)

    def close(self) -> None:
        """Finish the files (the offsets end with the spool's size, so that row r spans offsets r to r + 1)."""
        if self._records.closed:
            return
        self._offsets.append(self.size)
        self._offsets.tofile(self._offsets_file)
        del self._offsets[:]
        for f in (self._records, self._keys, self._offsets_file):
            f.close()
        if self.rows >= 2**32 - 1:  # sort keys hold a row number in 32 bits
            raise SftflowError(f"{self.rows} rows reach deduplication: prepare_data orders at most 2^32 - 2")

    def remove(self) -> None:
        for f in (self._records, self._keys, self._offsets_file):
            f.close()
        for path in (self.path, self.keys_path, self.offsets_path):
            path.unlink(missing_ok=True)

    def grouped_rows(self, deduplicate: bool) -> tuple[np.ndarray, np.ndarray, int]:
        """The row numbers grouped by problem (problems in order of first appearance, each problem's rows in file
        order), without the repeats of a (problem, solution) pair; where each problem's rows start; how many
        repeats were dropped."""
        keys = np.full(self.rows, DROPPED, dtype=np.uint64)  # (first row of the problem << 32) | row
        dropped = sum(_key_bucket(entries, keys, deduplicate) for entries in self._buckets())
        keys.sort()
        keys = keys[: self.rows - dropped]
        rows = np.empty(len(keys), dtype=np.uint32)
        new_problem = np.empty(len(keys), dtype=bool)
        for start in range(0, len(keys), BLOCK_ROWS):
            block = keys[start : start + BLOCK_ROWS]
            rows[start : start + len(block)] = block & LOW32
            first = block >> np.uint64(32)
            new_problem[start] = start == 0 or first[0] != keys[start - 1] >> np.uint64(32)
            new_problem[start + 1 : start + len(block)] = first[1:] != first[:-1]
        return rows, np.flatnonzero(new_problem), dropped

    def _buckets(self) -> Iterator[np.ndarray]:
        """The rows as (problem digest, row digest, row number) in five uint64 columns, in buckets by problem, each
        bucket in file order: a problem's rows, and so every repeat of a row, fall in one bucket."""
        count = min(-(-self.rows // BUCKET_ROWS), MAX_BUCKETS)
        if count <= 1:
            yield _numbered(np.fromfile(self.keys_path, dtype=np.uint64).reshape(-1, 4), 0)
            return
        paths = [self.keys_path.with_name(f"{self.keys_path.name}.{b}") for b in range(count)]
        files = []
        try:
            for path in paths:
                files.append(open(path, "wb"))
            with open(self.keys_path, "rb") as f:
                start = 0
                while block := f.read(BUCKET_ROWS * 4 * 8):
                    entries = _numbered(np.frombuffer(block, dtype=np.uint64).reshape(-1, 4), start)
                    start += len(entries)
                    bucket = entries[:, 0] % np.uint64(count)
                    order = np.argsort(bucket, kind="stable")
                    bounds = np.searchsorted(bucket[order], np.arange(count + 1, dtype=np.uint64))
                    for b in np.flatnonzero(np.diff(bounds)):
                        files[b].write(entries[order[bounds[b] : bounds[b + 1]]].tobytes())
            for f in files:
                f.close()
            for path in paths:
                yield np.fromfile(path, dtype=np.uint64).reshape(-1, 5)
                path.unlink()
        finally:
            for f in files:
                f.close()
            for path in paths:
                path.unlink(missing_ok=True)

    def copy(self, rows: np.ndarray, output: Path) -> None:
        """Write the records of `rows`, in that order, to `output`. Records are read with pread, not through a
        memory map: the kernel maps pages around each one a map touches, which would count towards this process's
        memory (hundreds of MiB per few thousand shuffled records)."""
        offsets = np.fromfile(self.offsets_path, dtype=np.int64)
        with open(self.path, "rb") as spool, open(output, "wb") as out:
            for start in range(0, len(rows), COPY_ROWS):
                block = rows[start : start + COPY_ROWS]
                begins, ends = offsets[block], offsets[block + np.uint32(1)]
                runs = np.flatnonzero(np.append(True, begins[1:] != ends[:-1]))  # neighbours are read in one go
                run_ends = np.append(runs[1:], len(block)) - 1
                data = b"".join(
                    [os.pread(spool.fileno(), e - b, b) for b, e in zip(begins[runs].tolist(), ends[run_ends].tolist())]
                )
                if len(data) != int((ends - begins).sum()):
                    raise RuntimeError(f"internal error: {self.path} is shorter than its offsets say")
                out.write(data)


def _numbered(digests: np.ndarray, start: int) -> np.ndarray:
    entries = np.empty((len(digests), 5), dtype=np.uint64)
    entries[:, :4] = digests
    entries[:, 4] = np.arange(start, start + len(digests), dtype=np.uint64)
    return entries


def _key_bucket(entries: np.ndarray, keys: np.ndarray, deduplicate: bool) -> int:
    """Set the sort keys of one bucket's rows (repeats of an earlier row get DROPPED); return the repeats."""
    if not len(entries):
        return 0
    columns = (4, 3, 2, 1, 0) if deduplicate else (4, 1, 0)  # sorted by problem, then row digest, then row
    entries = entries[np.lexsort([entries[:, c] for c in columns])]
    rows = entries[:, 4]
    new_problem = np.ones(len(entries), dtype=bool)
    new_problem[1:] = (entries[1:, 0] != entries[:-1, 0]) | (entries[1:, 1] != entries[:-1, 1])
    starts = np.flatnonzero(new_problem)
    first_rows = np.repeat(np.minimum.reduceat(rows, starts), np.diff(np.append(starts, len(rows))))
    keys[rows] = (first_rows << np.uint64(32)) | rows
    if not deduplicate:
        return 0
    new_row = new_problem
    new_row[1:] |= (entries[1:, 2] != entries[:-1, 2]) | (entries[1:, 3] != entries[:-1, 3])
    repeats = rows[~new_row]  # every row after the first of its (problem, solution) pair
    keys[repeats] = DROPPED
    return len(repeats)


def pick_code_text(rows: np.ndarray, starts: np.ndarray, has_code: np.ndarray, choose) -> tuple[np.ndarray, np.ndarray]:
    """Each problem's rows reduced to `choose(flags)` of them (code_text_choice on their has-code flags), in place;
    the new starts (a problem may keep no row). Problems with the same flags choose alike: the choice is cached."""
    picks = functools.lru_cache(maxsize=1 << 12)(lambda flags: np.array(choose(list(flags)), dtype=np.intp))
    new_starts = np.empty_like(starts)
    kept = 0
    for problem, (start, end) in enumerate(zip(starts.tolist(), [*starts[1:].tolist(), len(rows)])):
        group = rows[start:end]
        chosen = group[picks(has_code[group].tobytes())]
        new_starts[problem] = kept
        rows[kept : kept + len(chosen)] = chosen
        kept += len(chosen)
    return rows[:kept], new_starts


def pick_fair(rows: np.ndarray, starts: np.ndarray, n: int) -> np.ndarray:
    """Round robin over the problems until `n` rows: every problem's first row, then every second row, ..."""
    sizes = np.diff(np.append(starts, len(rows)))
    active = np.flatnonzero(sizes)
    picked, depth = [], 0
    while n > 0 and len(active):
        take = active[:n]
        picked.append(rows[starts[take] + depth])
        n -= len(take)
        depth += 1
        active = active[sizes[active] > depth]
    return np.concatenate(picked) if picked else rows[:0]
