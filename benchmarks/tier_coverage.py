"""Compare the line coverage of scripts/sftflow by the fast tier with the full suite's (`make coverage`).

Usage: python benchmarks/tier_coverage.py FAST_DATA_FILE FULL_DATA_FILE
Prints each tier's covered lines and percentage, and the fast tier's share of what the full suite covers.
"""

from __future__ import annotations

import sys

import coverage


def covered(data_file: str) -> tuple[int, int]:
    """(lines run, lines measurable) of the sftflow package in a combined coverage data file."""
    cov = coverage.Coverage(data_file=data_file)
    cov.load()
    run = total = 0
    for path in cov.get_data().measured_files():
        _, statements, _, missing, _ = cov.analysis2(path)
        run += len(statements) - len(missing)
        total += len(statements)
    return run, total


def main(fast: str, full: str) -> None:
    (fast_run, fast_total), (full_run, full_total) = covered(fast), covered(full)
    for name, run, total in (("fast tier", fast_run, fast_total), ("full suite", full_run, full_total)):
        print(f"{name:10}: {run} of {total} lines of sftflow ({100 * run / total:.1f}%)")
    print(f"the fast tier covers {100 * fast_run / full_run:.1f}% of the lines the full suite covers")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
