"""Prepare SFT data from generation outputs: `python scripts/prepare_data.py ++input_files=... ++output_path=...`."""

import sys

from sftflow.prepare.cli import main, run_from_snakemake

if "snakemake" in globals():
    run_from_snakemake(snakemake)  # noqa: F821
elif __name__ == "__main__":
    sys.exit(main())
