"""Gather the generate jobs' metrics.json files into results/eval.json and eval.md (rule eval_summary)."""

from sftflow.evaluation.summary import summarize_from_snakemake

summarize_from_snakemake(snakemake)  # noqa: F821
