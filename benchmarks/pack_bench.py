"""Benchmark the bin packers on synthetic SFT sequence lengths: `python benchmarks/pack_bench.py [--n 1000000]`."""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from sftflow.packing.binpack import ALGORITHMS, assign_bins


def synthetic_lengths(n: int, capacity: int, median: float, sigma: float, seed: int) -> np.ndarray:
    """Lognormal token counts (median `median`), clipped to 1..capacity like truncated SFT sequences."""
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(math.log(median), sigma, n)), 1, capacity).astype(np.int64)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=1_000_000, help="number of sequences")
    p.add_argument("--capacity", type=int, default=4096, help="max_total_sequence_length")
    p.add_argument("--median", type=float, default=300.0, help="median sequence length")
    p.add_argument("--sigma", type=float, default=0.8, help="lognormal sigma of the lengths")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    lengths = synthetic_lengths(args.n, args.capacity, args.median, args.sigma, args.seed)
    total = int(lengths.sum())
    lower_bound = math.ceil(total / args.capacity)
    print(
        f"{args.n} sequences, L={args.capacity}, lognormal(median={args.median}, sigma={args.sigma}): "
        f"mean {lengths.mean():.1f}, p99 {np.percentile(lengths, 99):.0f}, max {lengths.max()}, "
        f"{total} tokens, lower bound {lower_bound} bins"
    )
    print(f"{'algorithm':<22} {'seconds':>8} {'bins':>9} {'fill ratio':>11} {'bins/LB':>9}")
    for algorithm in ALGORITHMS:
        start = time.perf_counter()
        bin_of = assign_bins(lengths, args.capacity, algorithm)
        seconds = time.perf_counter() - start
        fill = np.bincount(bin_of, weights=lengths)
        assert fill.max() <= args.capacity and len(bin_of) == args.n
        bins = len(fill)
        print(
            f"{algorithm:<22} {seconds:>8.2f} {bins:>9} {total / (bins * args.capacity):>11.5f} "
            f"{bins / lower_bound:>9.5f}"
        )


if __name__ == "__main__":
    main()
