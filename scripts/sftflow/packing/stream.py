"""Pass 1 of packing: tokenize chunks of rows in worker processes and spool the kept sequences to disk in order."""

from __future__ import annotations

import collections
import contextlib
import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sftflow.errors import SftflowError
from sftflow.io import check_input_file, parse_json_object
from sftflow.packing.tokenize import tokenize_rows

# What pack_jsonl counts about the rows it reads (summed over chunks; see pipeline._stats).
COUNTERS = (
    "rows",
    "overlong",
    "truncated_tokens",
    "dropped_overlong",
    "dropped_overlong_tokens",
    "dropped_no_loss",
    "dropped_no_loss_truncated",
)


def available_cpus() -> int:
    """Cores this process may run on (Slurm's and taskset's limits included)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def read_chunks(path: Path, chunk_rows: int, chunk_bytes: int) -> Iterator[list[tuple[int, bytes]]]:
    """The non-blank lines of `path` as (line number, raw bytes), in chunks of at most chunk_rows rows / ~chunk_bytes."""
    path = check_input_file(path)
    chunk: list[tuple[int, bytes]] = []
    size = 0
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            if not raw.strip():
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
    """The kept sequences of one chunk, back to back, and the chunk's counters."""

    tokens: np.ndarray  # int32
    loss_mask: np.ndarray  # uint8
    lengths: np.ndarray  # int32, one per kept sequence
    counts: dict[str, int]


@dataclass
class ChunkTokenizer:
    """Everything a worker needs to turn a chunk of raw lines into a ChunkResult (inherited through fork)."""

    source: str
    tokenizer: Any
    chat_template_kwargs: dict | None
    max_len: int
    overlong: str

    def _rows(self, lines: list[tuple[int, bytes]]) -> Iterator[tuple[str, dict]]:
        # A generator, so that rows are parsed as tokenize_rows reaches them: the first bad line in file
        # order is the one reported, whether it is bad JSON or a bad row.
        for line_number, raw in lines:
            where = f"{self.source}:{line_number}"
            row, reason = parse_json_object(raw)
            if reason is not None:
                raise SftflowError(f"{where}: {reason}")
            yield where, row

    def __call__(self, lines: list[tuple[int, bytes]]) -> ChunkResult:
        counts = dict.fromkeys(COUNTERS, 0)
        ids_parts: list[np.ndarray] = []
        mask_parts: list[np.ndarray] = []
        for _where, ids, mask in tokenize_rows(self.tokenizer, self._rows(lines), self.chat_template_kwargs):
            counts["rows"] += 1
            kept = self._keep(ids, mask, counts)
            if kept is not None:
                ids_parts.append(kept[0])
                mask_parts.append(kept[1])
        lengths = np.fromiter((len(ids) for ids in ids_parts), dtype=np.int32, count=len(ids_parts))
        if not ids_parts:
            return ChunkResult(np.zeros(0, np.int32), np.zeros(0, np.uint8), lengths, counts)
        return ChunkResult(np.concatenate(ids_parts), np.concatenate(mask_parts), lengths, counts)

    def _keep(self, ids: np.ndarray, mask: np.ndarray, counts: dict) -> tuple[np.ndarray, np.ndarray] | None:
        """Truncate or drop an over-long sequence, drop one without predictable loss tokens; count both."""
        truncated = False
        if len(ids) > self.max_len:
            counts["overlong"] += 1
            if self.overlong == "drop":
                counts["dropped_overlong"] += 1
                counts["dropped_overlong_tokens"] += len(ids)
                return None
            counts["truncated_tokens"] += len(ids) - self.max_len
            ids, mask = ids[: self.max_len], mask[: self.max_len]
            truncated = True
        # A sequence whose only loss tokens are at position 0 (or none, after truncation) would
        # contribute nothing but padding-like compute; never keep it silently.
        if not mask[1:].any():
            counts["dropped_no_loss"] += 1
            counts["dropped_no_loss_truncated"] += int(truncated)
            return None
        return ids, mask


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
    """Token ids and loss masks of the kept sequences, appended to two flat files as chunks come back."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir()
        self.tokens_path = directory / "tokens.int32"
        self.mask_path = directory / "loss_mask.uint8"
        self._tokens = open(self.tokens_path, "wb")  # noqa: SIM115 (closed by close())
        self._mask = open(self.mask_path, "wb")  # noqa: SIM115
        self.num_tokens = 0

    def append(self, tokens: np.ndarray, loss_mask: np.ndarray) -> None:
        self._tokens.write(memoryview(np.ascontiguousarray(tokens, dtype=np.int32)))
        self._mask.write(memoryview(np.ascontiguousarray(loss_mask, dtype=np.uint8)))
        self.num_tokens += len(tokens)

    def close(self) -> None:
        self._tokens.close()
        self._mask.close()

    def read(self, starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The sequences at token offsets `starts` (of `lengths` tokens) back to back: (tokens, loss_mask).

        The files are mapped for this call only: the pages it touches leave the process's memory
        with the mapping, so reading a shard at a time never holds more than a shard.
        """
        tokens = np.memmap(self.tokens_path, dtype=np.int32, mode="r", shape=(self.num_tokens,))
        mask = np.memmap(self.mask_path, dtype=np.uint8, mode="r", shape=(self.num_tokens,))
        try:
            return gather_sequences(tokens, starts, lengths), gather_sequences(mask, starts, lengths)
        finally:
            del tokens, mask


def gather_sequences(source: np.ndarray, starts: np.ndarray, lengths: np.ndarray, block: int = 8192) -> np.ndarray:
    """source[starts[j] : starts[j] + lengths[j]] for every j, concatenated (index arrays built block by block)."""
    out = np.empty(int(lengths.sum(dtype=np.int64)), dtype=source.dtype)
    pos = 0
    for first in range(0, len(starts), block):
        s = np.asarray(starts[first : first + block], dtype=np.int64)
        n = np.asarray(lengths[first : first + block], dtype=np.int64)
        ends = np.cumsum(n)
        total = int(ends[-1]) if len(ends) else 0
        # Position p of the block's output comes from source[p + (start_j - offset_j)] for its sequence j.
        out[pos : pos + total] = source[np.arange(total, dtype=np.int64) + np.repeat(s - (ends - n), n)]
        pos += total
    return out
