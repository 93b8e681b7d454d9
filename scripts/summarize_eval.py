"""Gather the generate jobs' metrics.json files into results/eval.json and eval.md (rule eval_summary)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sftflow.evaluation.summary import summarize_from_snakemake  # noqa: E402

summarize_from_snakemake(snakemake)  # noqa: F821
