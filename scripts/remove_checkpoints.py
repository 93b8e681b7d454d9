"""Delete the averaged steps' checkpoints once every model made from them exists (training.remove_checkpoints_after_average).

Run by rule remove_averaged_checkpoints (rules/train.smk): params.checkpoint_dir, params.steps, output.record.
See sftflow/train/retention.py.
"""

from sftflow.train.retention import remove_averaged_from_snakemake

if "snakemake" in globals():
    remove_averaged_from_snakemake(snakemake)  # noqa: F821
