"""Export a training checkpoint as an HF model: `python scripts/convert_checkpoint.py --checkpoint-dir ... --output ...`.

See sftflow/train/cli.py for the arguments; under Snakemake (convert_final / convert_step) the rule's
input, output and params supply them.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sftflow.train.cli import convert_from_snakemake, convert_main  # noqa: E402

if "snakemake" in globals():
    convert_from_snakemake(snakemake)  # noqa: F821
elif __name__ == "__main__":
    sys.exit(convert_main())
