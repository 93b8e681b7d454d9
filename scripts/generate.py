"""Evaluate one model on one benchmark through an inference server; see sftflow/evaluation/run.py.

The `generate` rule (rules/eval.smk) writes the command line; run `python scripts/generate.py --help`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sftflow.evaluation.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
