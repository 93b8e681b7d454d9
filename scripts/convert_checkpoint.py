"""Export a training checkpoint as an HF model: `python scripts/convert_checkpoint.py --checkpoint-dir ... --output ...`.

See sftflow/train/export_cli.py for the arguments; under Snakemake (convert_final / convert_step) the rule's
input, output and params supply them.
"""

import sys

from sftflow.train.export_cli import convert_from_snakemake, convert_main

if "snakemake" in globals():
    convert_from_snakemake(snakemake)  # noqa: F821
elif __name__ == "__main__":
    sys.exit(convert_main())
