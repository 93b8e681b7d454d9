"""One chained training job: `torchrun --standalone --nproc-per-node=N scripts/train.py --config ... --packed ...`.

See sftflow/train/cli.py for the arguments. Under Snakemake (the train_job rule's `script:`) this file
is the launcher instead: it writes the job's config JSON and runs torchrun on itself.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sftflow.train.cli import launch_train_job, train_main  # noqa: E402

if "snakemake" in globals():
    launch_train_job(snakemake, Path(__file__).resolve())  # noqa: F821
elif __name__ == "__main__":
    sys.exit(train_main())
