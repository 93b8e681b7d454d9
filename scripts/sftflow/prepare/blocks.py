"""Reading the input: each file cut into blocks of lines, and the blocks processed in input order, by a pool of
forked worker processes when there is enough input. A worker reads its block from the file itself: the main
process only finds where lines end."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from sftflow.errors import SftflowError
from sftflow.io import check_input_file
from sftflow.prepare.rows import Block, BlockResult

# Input bytes per block, cut at a line boundary: ~4096 rows of a few hundred bytes, enough blocks to balance
# the workers' load.
CHUNK_BYTES = 2 << 20
PARALLEL_MIN_BYTES = 32 << 20  # below this, starting worker processes costs more than it saves

ProcessBlock = Callable[[Block], BlockResult]


def next_block(fd: int, offset: int, end: int, buffer: bytearray) -> tuple[int, int]:
    """The size of the block of the file `fd` (`end` bytes) at `offset`: about CHUNK_BYTES, up to a line end or the
    end of the file; and the line ends in it. Read into `buffer` (CHUNK_BYTES), only to find and count line ends."""
    size = 0
    while True:
        read = os.preadv(fd, [buffer], offset + size)
        if not read:
            return size, 0  # the file got shorter: the worker reading the block says so
        # The rest of the file, or up to the last line end read; counted by numpy, faster than bytearray.count.
        cut = read if offset + size + read >= end else buffer.rfind(b"\n", 0, read) + 1
        if cut:
            return size + cut, int(np.count_nonzero(np.frombuffer(buffer, dtype=np.uint8, count=cut) == ord("\n")))
        size += read  # a line longer than CHUNK_BYTES: read on


def file_blocks(files: list[Path], skip_first: int, input_files: list[dict]) -> Iterator[tuple[dict, Block]]:
    """Yield (the file's counts, a block) for each file's blocks, from after its first `skip_first` rows (skipped
    here). Each file's counts ({"path", "rows", "skipped_first", "invalid"}) are appended to `input_files`."""
    for path in files:
        check_input_file(path)
        info = {"path": str(path), "rows": 0, "skipped_first": 0, "invalid": 0}
        input_files.append(info)
        with open(path, "rb") as f:
            offset, line_number = _skip_first(f, skip_first, info)
            end, buffer = os.fstat(f.fileno()).st_size, bytearray(CHUNK_BYTES)
            while offset < end:
                size, lines = next_block(f.fileno(), offset, end, buffer)
                if not size:  # shorter than its size a moment ago: no row may go missing unsaid
                    raise SftflowError(f"{path}: the file changed while it was read (rerun prepare_data)")
                yield info, Block(str(path), offset, size, line_number)
                line_number += lines
                offset += size


def _skip_first(f, skip_first: int, info: dict) -> tuple[int, int]:
    """Skip the file's first `skip_first` rows (blank lines are not rows); the offset and line number after them."""
    offset = line_number = 0
    while info["skipped_first"] < skip_first:
        raw = f.readline()
        if not raw:
            break
        offset += len(raw)
        line_number += 1
        if not raw.isspace():
            info["rows"] += 1
            info["skipped_first"] += 1
    return offset, line_number + 1


def block_results(
    blocks: Iterator[tuple[dict, Block]], process: ProcessBlock, workers: int, input_bytes: int
) -> Iterator[tuple[dict, BlockResult]]:
    """(the file's counts, process(block)) for each block, in input order: in `workers` forked processes when
    there are more than one and `input_bytes` is worth it, else here."""
    if workers <= 1 or input_bytes < PARALLEL_MIN_BYTES:
        for info, block in blocks:
            yield info, process(block)
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    infos: list[dict] = []

    def tasks():
        for info, block in blocks:
            infos.append(info)
            yield block

    # Forked: each worker inherits `process` with its filters, tokenizer and formatter set up (nothing pickled).
    context = multiprocessing.get_context("fork")
    with context.Pool(workers, initializer=_adopt, initargs=(process,)) as pool:
        for i, result in enumerate(pool.imap(_process_in_worker, tasks(), chunksize=1)):
            yield infos[i], result


_PROCESS: ProcessBlock | None = None  # in a worker process: what it runs on each block


def _adopt(process: ProcessBlock) -> None:
    global _PROCESS
    _PROCESS = process


def _process_in_worker(block: Block) -> BlockResult:
    return _PROCESS(block)
