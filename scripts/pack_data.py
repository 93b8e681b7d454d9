"""Pack prepared SFT data: `python scripts/pack_data.py --input sft.jsonl --tokenizer DIR --output DIR [...]`."""

import sys

from sftflow.packing.cli import main, run_from_snakemake

if "snakemake" in globals():
    run_from_snakemake(snakemake)  # noqa: F821
elif __name__ == "__main__":
    sys.exit(main())
