"""Average exported steps into one HF model: `python scripts/average_checkpoints.py --models DIR... --output DIR`.

    python scripts/average_checkpoints.py --models results/hf_models/step_100 results/hf_models/step_200 \\
        --steps 100 200 --output results/hf_models/average_100_200

See sftflow/averaging.py; under Snakemake the rule's input.models (the step directories, in step order),
params.steps, output.model and log supply the arguments.
"""

import sys

from sftflow.averaging import average_from_snakemake, average_main

if "snakemake" in globals():
    average_from_snakemake(snakemake)  # noqa: F821
elif __name__ == "__main__":
    sys.exit(average_main())
