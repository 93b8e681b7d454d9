"""Evaluate one model on one benchmark through an inference server; see sftflow/evaluation/run.py.

The `generate` rule (rules/eval.smk) writes the command line; run `python scripts/generate.py --help`.
"""

import sys

from sftflow.evaluation.run import main

if __name__ == "__main__":
    sys.exit(main())
