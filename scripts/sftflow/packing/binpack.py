"""Bin packing of sequence lengths: best-fit-decreasing and first-fit-decreasing in O(n log n)."""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Iterator, Sequence

import numpy as np

from sftflow.errors import SftflowError

ALGORITHMS = ("best_fit_decreasing", "first_fit_decreasing")

# Sequence ids and bin ids are stored as int32 (4 bytes a sequence rather than 8, for every per-sequence
# array of the bin layout); there are never more bins than sequences.
MAX_SEQUENCES = 2**31 - 1

# The packers walk the items in Python; converting them to Python ints a block at a time (rather than
# all at once) keeps their memory a few MiB whatever the number of sequences (14M items as two Python
# lists would take about 1 GB).
_BLOCK = 65536


def _placements(lengths: np.ndarray, order: np.ndarray) -> Iterator[tuple[int, int]]:
    """(item, size) in placement order, converted to Python ints block by block."""
    for start in range(0, len(order), _BLOCK):
        block = order[start : start + _BLOCK]
        yield from zip(block.tolist(), lengths[block].tolist(), strict=True)


def check_sequence_count(n: int) -> None:
    """Raise if `n` sequences are more than int32 sequence and bin ids can number."""
    if n > MAX_SEQUENCES:
        raise SftflowError(
            f"{n:,} sequences to pack: more than the {MAX_SEQUENCES:,} (2**31 - 1) that int32 sequence ids can "
            "number; split the input into several pack_data runs"
        )


def placement_order(lengths: np.ndarray) -> np.ndarray:
    """Sequence ids in the order the packers place them (int32): longest first, equal lengths in input order.

    A stable sort, so the packing is a pure function of the input (no dependence on sort internals).
    """
    check_sequence_count(len(lengths))
    lengths = np.asarray(lengths)
    # Negated in their own signed dtype (pack_jsonl's are int32): no int64 copy of every length.
    keys = np.negative(lengths if lengths.dtype.kind == "i" else lengths.astype(np.int64))
    order = np.argsort(keys, kind="stable")
    del keys  # argsort answers int64: free the keys before the int32 copy
    return order.astype(np.int32)


def _best_fit(lengths: np.ndarray, order: np.ndarray, capacity: int) -> np.ndarray:
    """Each item into the bin with the least remaining room that still fits it (fullest bin)."""
    bin_of = np.empty(len(lengths), dtype=np.int32)
    # Remaining capacities are integers in 1..capacity, so bins are bucketed by exact remaining
    # room: `free` is the sorted list of distinct non-empty buckets (at most `capacity` entries, so
    # insort/remove are short memmoves) and each bucket is a min-heap of bin ids, which makes the
    # choice among equally full bins deterministic (lowest bin id).
    free: list[int] = []
    buckets: dict[int, list[int]] = {}
    num_bins = 0
    for item, size in _placements(lengths, order):
        pos = bisect.bisect_left(free, size)
        if pos == len(free):
            b = num_bins
            num_bins += 1
            room = capacity - size
        else:
            room_before = free[pos]
            bucket = buckets[room_before]
            b = heapq.heappop(bucket)
            if not bucket:
                del buckets[room_before]
                del free[pos]
            room = room_before - size
        bin_of[item] = b
        if room > 0:  # a full bin can take nothing more: stop tracking it
            bucket = buckets.get(room)
            if bucket is None:
                buckets[room] = [b]
                bisect.insort(free, room)
            else:
                heapq.heappush(bucket, b)
    return bin_of


def _first_fit(lengths: np.ndarray, order: np.ndarray, capacity: int) -> np.ndarray:
    """Each item into the lowest-numbered bin that still fits it."""
    n = len(lengths)
    bin_of = np.empty(n, dtype=np.int32)
    # A max segment tree over bin ids holding remaining room. Unopened bins start with full room,
    # and opened bins are always a prefix of the ids, so "leftmost leaf with room >= size" is the
    # first fit among open bins or, when none fits, the next new bin; no separate open-bin case.
    # Any-fit packing leaves at most one bin half empty or emptier, so it never opens more than
    # 2 * total / capacity + 1 bins: the tree needs no more leaves than that (nor than n).
    max_bins = min(n, 2 * int(lengths.sum(dtype=np.int64)) // capacity + 1)
    size_pow2 = 1
    while size_pow2 < max(max_bins, 1):
        size_pow2 *= 2
    tree = [capacity] * (2 * size_pow2)
    num_bins = 0
    for item, size in _placements(lengths, order):
        node = 1
        while node < size_pow2:
            node *= 2
            if tree[node] < size:
                node += 1
        b = node - size_pow2
        bin_of[item] = b
        if b >= num_bins:
            num_bins = b + 1
        tree[node] -= size
        node //= 2
        while node:
            best = max(tree[2 * node], tree[2 * node + 1])
            if tree[node] == best:  # ancestors above are unchanged too
                break
            tree[node] = best
            node //= 2
    return bin_of


def assign_bins(
    lengths: Sequence[int] | np.ndarray, capacity: int, algorithm: str, order: np.ndarray | None = None
) -> np.ndarray:
    """Return bin_of[i] (int32), the bin of sequence i, packing `lengths` into bins of `capacity` tokens.

    Bins are numbered in the order they are opened; every length must be in 1..capacity. `order` is
    placement_order(lengths) when the caller has it already (it is computed otherwise).
    """
    lengths = np.asarray(lengths)
    if lengths.dtype.kind not in "iu":
        lengths = lengths.astype(np.int64)
    if lengths.ndim != 1:
        raise ValueError("lengths must be one-dimensional")
    if len(lengths) and (lengths.min() < 1 or lengths.max() > capacity):
        raise ValueError(f"every length must be in 1..{capacity} (got {lengths.min()}..{lengths.max()})")
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown packing algorithm {algorithm!r} (expected one of {', '.join(ALGORITHMS)})")
    if order is None:
        order = placement_order(lengths)
    packer = _best_fit if algorithm == "best_fit_decreasing" else _first_fit
    return packer(lengths, order, capacity)


def bins_from_assignment(bin_of: np.ndarray, lengths: Sequence[int] | np.ndarray) -> list[list[int]]:
    """Group sequence ids by bin; within a bin, in the order the packer placed them (longest first)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(bin_of) == 0:
        return []
    placement_rank = np.empty(len(lengths), dtype=np.int64)
    placement_rank[placement_order(lengths)] = np.arange(len(lengths))
    ordered = np.lexsort((placement_rank, bin_of))
    counts = np.bincount(bin_of)
    return [chunk.tolist() for chunk in np.split(ordered, np.cumsum(counts)[:-1])]


def pack_lengths(lengths: Sequence[int] | np.ndarray, capacity: int, algorithm: str) -> list[list[int]]:
    """Pack sequence lengths into bins of `capacity`; return each bin's sequence ids (every id exactly once)."""
    return bins_from_assignment(assign_bins(lengths, capacity, algorithm), lengths)
