"""Bin packing: placement validity, agreement with a naive reference, BFD vs FFD, determinism and speed."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from sftflow.packing.binpack import assign_bins, pack_lengths

ALGOS = ["best_fit_decreasing", "first_fit_decreasing"]


def naive_pack(lengths: list[int], capacity: int, algorithm: str) -> list[list[int]]:
    """O(n * bins) textbook version: the specification the fast packers must match exactly."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    room: list[int] = []
    bins: list[list[int]] = []
    for i in order:
        fits = [b for b in range(len(bins)) if room[b] >= lengths[i]]
        if not fits:
            bins.append([i])
            room.append(capacity - lengths[i])
            continue
        # best fit: least room left, lowest bin id on ties; first fit: lowest bin id
        b = min(fits, key=lambda b: (room[b], b)) if algorithm == "best_fit_decreasing" else fits[0]
        bins[b].append(i)
        room[b] -= lengths[i]
    return bins


def check_valid(bins: list[list[int]], lengths: list[int], capacity: int) -> None:
    placed = sorted(i for b in bins for i in b)
    assert placed == list(range(len(lengths))), "every sequence exactly once"
    assert all(b for b in bins), "no empty bin"
    assert max(sum(lengths[i] for i in b) for b in bins) <= capacity


@pytest.mark.parametrize("algorithm", ALGOS)
@pytest.mark.parametrize("seed", range(6))
def test_matches_naive_reference_and_is_valid(algorithm, seed):
    rng = np.random.default_rng(seed)
    capacity = int(rng.integers(8, 200))
    lengths = rng.integers(1, capacity + 1, size=int(rng.integers(1, 400))).tolist()
    if seed % 2:  # many duplicates stress the tie-breaking
        lengths = [min(capacity, 1 + (x % 7) * (capacity // 7)) for x in lengths]
    bins = pack_lengths(lengths, capacity, algorithm)
    check_valid(bins, lengths, capacity)
    assert bins == naive_pack(lengths, capacity, algorithm)


def test_bfd_beats_ffd_on_crafted_case():
    # FFD puts 7 into the first bin (room 10 -> 3), stranding 4 in a third bin;
    # BFD puts 7 where it fits exactly (room 7) and reaches the lower bound of 68 / 34 = 2 bins.
    lengths, capacity = [24, 16, 11, 7, 6, 4], 34
    bfd = pack_lengths(lengths, capacity, "best_fit_decreasing")
    ffd = pack_lengths(lengths, capacity, "first_fit_decreasing")
    check_valid(bfd, lengths, capacity)
    check_valid(ffd, lengths, capacity)
    assert len(bfd) == 2 == math.ceil(sum(lengths) / capacity)
    assert len(ffd) == 3
    assert sorted(sorted(b) for b in bfd) == [[0, 4, 5], [1, 2, 3]]


@pytest.mark.parametrize("algorithm", ALGOS)
def test_easy_case_reaches_lower_bound(algorithm):
    lengths = [6, 4, 5, 5, 3, 7, 2, 8, 9, 1] * 10  # complementary pairs summing to 10
    bins = pack_lengths(lengths, 10, algorithm)
    check_valid(bins, lengths, 10)
    assert len(bins) == sum(lengths) // 10 == 50


@pytest.mark.parametrize("algorithm", ALGOS)
def test_deterministic_and_ties_by_original_index(algorithm):
    lengths = [5, 5, 5, 5, 3]
    bins = pack_lengths(lengths, 10, algorithm)
    assert bins == [[0, 1], [2, 3], [4]]
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, size=2000)
    assert (assign_bins(lengths, 100, algorithm) == assign_bins(lengths.copy(), 100, algorithm)).all()


def test_bad_lengths_rejected():
    with pytest.raises(ValueError, match="1..10"):
        assign_bins([3, 11], 10, "best_fit_decreasing")
    with pytest.raises(ValueError, match="unknown packing algorithm"):
        assign_bins([3], 10, "next_fit")


@pytest.mark.parametrize("algorithm", ALGOS)
def test_scales_n_log_n(algorithm):
    # 200k sequences into ~15k bins: an O(n * bins) packer would take minutes here.
    rng = np.random.default_rng(0)
    lengths = np.clip(np.round(rng.lognormal(np.log(300), 0.8, 200_000)), 1, 4096).astype(np.int64)
    start = time.perf_counter()
    bin_of = assign_bins(lengths, 4096, algorithm)
    assert time.perf_counter() - start < 20
    fill = np.bincount(bin_of, weights=lengths)
    assert fill.max() <= 4096
    assert len(fill) <= 1.01 * math.ceil(lengths.sum() / 4096)


@pytest.mark.parametrize("algorithm", ALGOS)
@pytest.mark.parametrize("seed", range(4))
def test_block_by_block_walk_and_tree_bound_match_naive(monkeypatch, algorithm, seed):
    # Items are converted to Python ints a block at a time; tiny blocks cross many block boundaries.
    # Sizes just over, at, and under half the capacity stress the first-fit tree's bin-count bound.
    from sftflow.packing import binpack

    monkeypatch.setattr(binpack, "_BLOCK", 7)
    rng = np.random.default_rng(seed)
    capacity = 2 * int(rng.integers(4, 60))
    half = capacity // 2
    lengths = rng.choice([half - 1, half, half + 1, 1, capacity], size=int(rng.integers(1, 300))).tolist()
    bins = pack_lengths(lengths, capacity, algorithm)
    check_valid(bins, lengths, capacity)
    assert bins == naive_pack(lengths, capacity, algorithm)


@pytest.mark.parametrize("algorithm", ALGOS)
def test_int32_lengths_give_the_int64_packing_in_int32_ids(algorithm):
    # pack_jsonl hands the packers int32 lengths and keeps every per-sequence array int32.
    from sftflow.packing.binpack import placement_order

    lengths = np.random.default_rng(1).integers(1, 4097, size=5000)
    order = placement_order(lengths.astype(np.int32))
    assert order.dtype == np.int32
    assert (order == np.argsort(-lengths, kind="stable")).all()
    bin_of = assign_bins(lengths.astype(np.int32), 4096, algorithm, order=order)
    assert bin_of.dtype == np.int32
    assert (bin_of == assign_bins(lengths, 4096, algorithm)).all()


def test_more_sequences_than_int32_ids_are_refused_naming_the_limit():
    from sftflow.errors import SftflowError
    from sftflow.packing.binpack import MAX_SEQUENCES, check_sequence_count

    assert MAX_SEQUENCES == 2**31 - 1
    check_sequence_count(MAX_SEQUENCES)
    with pytest.raises(SftflowError, match=r"2,147,483,648 sequences .* 2,147,483,647 \(2\*\*31 - 1\) .* int32"):
        check_sequence_count(2**31)
