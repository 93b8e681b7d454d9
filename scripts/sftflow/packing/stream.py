"""Pass 1 of packing: tokenize chunks of rows in worker processes and spool the kept sequences to disk in order."""

from __future__ import annotations

import collections
import contextlib
import mmap
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sftflow.errors import SftflowError
from sftflow.io import check_input_file, parse_json_object
from sftflow.packing.tokenize import Segments, message_count, row_segments, tokenize_flat

# Sequences gathered from the spool per mapping of a part file (see TokenSpool._gather).
READ_SEQUENCES = 256

# packing.overlong's values (config/schema.yaml lists the same).
OVERLONG = ("mask", "truncate", "drop")

# What pack_jsonl counts about the rows it reads (summed over chunks; see pipeline._stats).
COUNTERS = (
    "rows",
    "overlong",
    "truncated_tokens",
    "dropped_overlong",
    "dropped_overlong_tokens",
    "dropped_no_loss",
    "dropped_no_loss_truncated",
    "masked",
    "masked_tokens",
)


def available_cpus() -> int:
    """Cores this process may run on (Slurm's and taskset's limits included)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def read_chunks(
    path: Path, chunk_rows: int, chunk_bytes: int, keep: np.ndarray | None = None
) -> Iterator[list[tuple[int, bytes]]]:
    """The non-blank lines of `path` as (line number, raw bytes), in chunks of at most chunk_rows rows / ~chunk_bytes;
    with `keep` (bool by line number), only the lines it marks."""
    path = check_input_file(path)
    chunk: list[tuple[int, bytes]] = []
    size = 0
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            if not raw.strip() or (keep is not None and not keep[line_number]):
                continue
            chunk.append((line_number, raw))
            size += len(raw)
            if len(chunk) >= chunk_rows or size >= chunk_bytes:
                yield chunk
                chunk, size = [], 0
    if chunk:
        yield chunk


@dataclass
class ChunkResult:
    """Where one chunk's kept sequences went in the spool (back to back), their lengths and the chunk's counters."""

    part: str  # the spool part of the process that tokenized the chunk
    offset: int  # token offset of the chunk's first sequence in that part
    lengths: np.ndarray  # int32, one per kept sequence
    counts: dict[str, int]


@dataclass
class ChunkTokenizer:
    """Everything a worker needs to turn a chunk of raw lines into spooled sequences (inherited through fork)."""

    source: str
    tokenizer: Any
    chat_template_kwargs: dict | None
    max_len: int
    overlong: str
    spool: TokenSpool

    def _segments(self, lines: list[tuple[int, bytes]]) -> tuple[list[Segments], np.ndarray]:
        # Each line parsed and split in file order: the first bad line is the one reported, whether it
        # is bad JSON or a bad row. Also each row's number of chat messages (for overlong: mask).
        rows_segments = []
        messages = np.zeros(len(lines), np.int64)
        for k, (line_number, raw) in enumerate(lines):
            where = f"{self.source}:{line_number}"
            row, reason = parse_json_object(raw)
            if reason is not None:
                raise SftflowError(f"{where}: {reason}")
            rows_segments.append(row_segments(row, where, self.tokenizer, self.chat_template_kwargs))
            messages[k] = message_count(row)
        return rows_segments, messages

    def __call__(self, lines: list[tuple[int, bytes]]) -> ChunkResult:
        """Tokenize the chunk and append its kept sequences to this process's spool part; only lengths come back."""
        rows_segments, messages = self._segments(lines)
        ids, mask, lengths = tokenize_flat(self.tokenizer, rows_segments)
        starts = np.cumsum(lengths) - lengths
        counts, kept_lengths, masked = self._keep(mask, starts, lengths, messages)
        if masked.any():  # kept for the step's sequence count, never trained on
            mask[_ranges(starts[masked], kept_lengths[masked])] = 0
        keep = kept_lengths > 0
        if not keep.any():
            return ChunkResult("", 0, np.zeros(0, np.int32), counts)
        if not keep.all() or (kept_lengths < lengths).any():  # some rows dropped or cut
            index = _ranges(starts[keep], kept_lengths[keep])
            ids, mask = ids[index], mask[index]
        part, offset = self.spool.append(ids, mask)
        return ChunkResult(part, offset, kept_lengths[keep].astype(np.int32), counts)

    def _keep(
        self, mask: np.ndarray, starts: np.ndarray, lengths: np.ndarray, messages: np.ndarray
    ) -> tuple[dict[str, int], np.ndarray, np.ndarray]:
        """Counters, each row's kept length (0: dropped) and which rows are masked. Over-long rows are cut to
        max_len (truncate), dropped (drop) or cut to masked_length tokens and masked (mask); rows without
        predictable loss tokens are dropped, masked rows aside (they have none on purpose)."""
        counts = dict.fromkeys(COUNTERS, 0)
        counts["rows"] = len(lengths)
        overlong = lengths > self.max_len
        counts["overlong"] = int(overlong.sum())
        no_rows = np.zeros_like(overlong)
        dropped = overlong if self.overlong == "drop" else no_rows
        masked = overlong if self.overlong == "mask" else no_rows
        kept = np.minimum(lengths, self.max_len)
        if self.overlong == "drop":
            counts["dropped_overlong"] = counts["overlong"]
            counts["dropped_overlong_tokens"] = int(lengths[overlong].sum())
            kept[overlong] = 0
        elif self.overlong == "mask":
            kept[overlong] = masked_length(messages[overlong], self.max_len)
            counts["masked"] = counts["overlong"]
            counts["masked_tokens"] = int((lengths[overlong] - kept[overlong]).sum())
        else:
            counts["truncated_tokens"] = int((lengths[overlong] - self.max_len).sum())
        # A sequence whose only loss tokens are at position 0 (or none, after truncation) would
        # contribute nothing but padding-like compute; never keep it silently. Loss tokens at
        # positions 1..kept-1 of each row, from the running count of loss tokens:
        running = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
        predictable = running[starts + kept] - running[starts + np.minimum(kept, 1)]
        no_loss = ~dropped & ~masked & (predictable == 0)
        counts["dropped_no_loss"] = int(no_loss.sum())
        if self.overlong == "truncate":
            counts["dropped_no_loss_truncated"] = int((no_loss & overlong).sum())
        kept[no_loss] = 0
        return counts, kept, masked


def masked_length(messages: np.ndarray, max_len: int) -> np.ndarray:
    """Tokens an over-long sequence keeps under overlong: mask, for rows of `messages` chat messages.

    NeMo-Skills' start_sft.py keeps the first min(4, max_len // m) tokens of each of the m messages of an
    over-long conversation, with loss multiplier 0. The rows here are rendered text, not messages, so
    the sequence keeps as many tokens from its start: min(4, max_len // m) x m, at least 1 (a row with
    more messages than max_len tokens would otherwise become empty).
    """
    messages = np.asarray(messages, dtype=np.int64)
    return np.maximum(np.minimum(4, max_len // messages) * messages, 1)


_WORKER_JOB: Callable | None = None  # set in the parent just before the pool forks


def _run_worker_job(task: Any) -> Any:
    assert _WORKER_JOB is not None
    return _WORKER_JOB(task)


def ordered_map(job: Callable, tasks: Iterable, workers: int) -> Iterator:
    """job(task) for each task, in task order, computed by `workers` forked processes (in-process for 1).

    At most 2 tasks per worker are in flight, so memory does not grow with the input; results are
    yielded by task index, never by completion order, so the output does not depend on `workers`.
    """
    if workers <= 1:
        yield from map(job, tasks)
        return
    global _WORKER_JOB
    _WORKER_JOB = job
    try:
        # Each worker is one tokenizing core: the tokenizers library's own thread pool would only compete.
        with _environ(TOKENIZERS_PARALLELISM="false"), multiprocessing.get_context("fork").Pool(workers) as pool:
            pending: collections.deque = collections.deque()
            for task in tasks:
                pending.append(pool.apply_async(_run_worker_job, (task,)))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()
    finally:
        _WORKER_JOB = None


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class TokenSpool:
    """Token ids and loss masks of the kept sequences, on disk: each process appends to its own part.

    A worker appends the chunks it tokenizes to its own pair of files (`append`), so no token passes
    through the parent; the parent records, in input order, where each chunk went (`add_chunk`). Sequences
    are then addressed by their offset in input order (0, len_0, len_0 + len_1, ...), whatever process
    wrote them, which keeps the output independent of the number of workers.
    """

    FIELDS = {"tokens": np.int32, "loss_mask": np.uint8}

    def __init__(self, directory: Path) -> None:
        directory.mkdir()
        self.directory = directory
        self._files: dict[int, tuple[str, dict[str, int]]] = {}  # pid -> (part, field -> fd), this process's
        self._chunks: list[tuple[int, str, int]] = []  # (first token in input order, part, offset in the part)
        self.num_tokens = 0
        self._table: tuple[np.ndarray, np.ndarray, np.ndarray, list[str]] | None = None

    def path(self, part: str, field: str) -> Path:
        return self.directory / f"{part}.{field}"

    def append(self, tokens: np.ndarray, loss_mask: np.ndarray) -> tuple[str, int]:
        """Append sequences to this process's part; return (part, token offset in it) for add_chunk."""
        pid = os.getpid()
        if pid not in self._files:  # first chunk of this process (a forked worker starts with none open)
            part = f"part-{pid}"
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
            self._files[pid] = (part, {field: os.open(self.path(part, field), flags) for field in self.FIELDS})
        part, fds = self._files[pid]
        offset = os.fstat(fds["tokens"]).st_size // 4
        for field, data in (("tokens", tokens), ("loss_mask", loss_mask)):
            _write_all(fds[field], np.ascontiguousarray(data, dtype=self.FIELDS[field]))
        return part, offset

    def add_chunk(self, part: str, offset: int, num_tokens: int) -> None:
        """Record that the next `num_tokens` tokens in input order are at `offset` in `part` (call in input order)."""
        if num_tokens:
            self._chunks.append((self.num_tokens, part, offset))
            self.num_tokens += num_tokens
            self._table = None

    def close(self) -> None:
        """Close the files this process opened to append to (a worker's close when it exits)."""
        for _part, fds in self._files.values():
            for fd in fds.values():
                os.close(fd)
        self._files.clear()

    def _chunk_table(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
        if self._table is None:
            parts = sorted({part for _, part, _ in self._chunks})
            firsts = np.array([first for first, _, _ in self._chunks], dtype=np.int64)
            part_ids = np.array([parts.index(part) for _, part, _ in self._chunks], dtype=np.int32)
            offsets = np.array([offset for _, _, offset in self._chunks], dtype=np.int64)
            self._table = (firsts, part_ids, offsets, parts)
        return self._table

    def read(self, field: str, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """`field` of the sequences at input-order token offsets `starts` (of `lengths` tokens), back to back."""
        firsts, part_ids, offsets, parts = self._chunk_table()
        starts = np.asarray(starts, dtype=np.int64)
        chunk = np.searchsorted(firsts, starts, side="right") - 1
        local = offsets[chunk] + (starts - firsts[chunk])
        seq_part = part_ids[chunk]
        used = np.unique(seq_part).tolist()
        if len(used) == 1:
            return self._gather(parts[used[0]], field, local, lengths)
        out = np.empty(int(lengths.sum(dtype=np.int64)), dtype=self.FIELDS[field])
        out_starts = np.cumsum(lengths, dtype=np.int64) - lengths
        for k in used:
            mine = np.flatnonzero(seq_part == k)
            out[_ranges(out_starts[mine], lengths[mine])] = self._gather(parts[k], field, local[mine], lengths[mine])
        return out

    def _gather(self, part: str, field: str, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        # Every page a read touches counts in this process's RSS while the file is mapped, and the kernel
        # maps up to 16 cached neighbours with it (fault-around). Mapping for READ_SEQUENCES sequences at a
        # time bounds that to those sequences' pages, whatever the size of the spool or of a shard.
        out = np.empty(int(lengths.sum(dtype=np.int64)), dtype=self.FIELDS[field])
        pos = 0
        with open(self.path(part, field), "rb") as f:
            for first in range(0, len(starts), READ_SEQUENCES):
                block = slice(first, first + READ_SEQUENCES)
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                    data = np.frombuffer(mapped, dtype=out.dtype)
                    values = gather_sequences(data, starts[block], lengths[block])
                    del data  # the mapping closes only once no array views it
                out[pos : pos + len(values)] = values
                pos += len(values)
        return out


def _write_all(fd: int, data: np.ndarray) -> None:
    view = memoryview(data).cast("B")
    while len(view):
        view = view[os.write(fd, view) :]


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """starts[j] + 0 .. starts[j] + lengths[j] - 1 for every j, concatenated (int64)."""
    n = np.asarray(lengths, dtype=np.int64)
    ends = np.cumsum(n)
    total = int(ends[-1]) if len(ends) else 0
    # Position p of the result belongs to range j: it is p + (starts[j] - where range j begins in the result).
    return np.arange(total, dtype=np.int64) + np.repeat(np.asarray(starts, dtype=np.int64) - (ends - n), n)


def gather_sequences(source: np.ndarray, starts: np.ndarray, lengths: np.ndarray, block: int = 8192) -> np.ndarray:
    """source[starts[j] : starts[j] + lengths[j]] for every j, concatenated (index arrays built block by block)."""
    out = np.empty(int(lengths.sum(dtype=np.int64)), dtype=source.dtype)
    pos = 0
    for first in range(0, len(starts), block):
        index = _ranges(starts[first : first + block], lengths[first : first + block])
        out[pos : pos + len(index)] = source[index]
        pos += len(index)
    return out
