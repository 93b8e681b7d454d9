"""Plots and tables of a finished run for `snakemake --report`: `python scripts/make_report.py [--output-dir results]`."""

import sys

from sftflow.report.cli import main, run_from_snakemake

if "snakemake" in globals():
    run_from_snakemake(snakemake)  # noqa: F821
elif __name__ == "__main__":
    sys.exit(main())
