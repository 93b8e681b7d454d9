"""Prepare one benchmark's test set (rule prepare_benchmark): a local source file or a download, normalised.

Under Snakemake: wildcards.benchmark names it, params.source is eval.benchmark_files.<name> (or None
to download), output[0] is the prepared JSONL (problem, expected_answer, ...).
CLI: python scripts/prepare_benchmark.py NAME OUTPUT [--source FILE]
"""

import sys

from sftflow.evaluation.benchmarks import prepare_from_snakemake, prepare_main

if "snakemake" in globals():
    prepare_from_snakemake(snakemake)  # noqa: F821
elif __name__ == "__main__":
    sys.exit(prepare_main())
