"""Plots and tables of a finished run for `snakemake --report`: `python scripts/make_report.py [--output-dir results]`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sftflow.report.cli import main, run_from_snakemake  # noqa: E402

if "snakemake" in globals():
    run_from_snakemake(snakemake)  # noqa: F821
elif __name__ == "__main__":
    sys.exit(main())
