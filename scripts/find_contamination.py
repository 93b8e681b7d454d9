"""Compare training problems with the evaluated benchmarks' test problems; called by the decontaminate rule."""

from sftflow import stage_config
from sftflow.contamination import find_contamination
from sftflow.logs import setup_logging

smk = snakemake  # noqa: F821
setup_logging(smk.log[0])
cfg = stage_config.read(smk.input.config)  # rules/common.smk: decontaminate_config
find_contamination(
    [str(p) for p in smk.input.generations],
    dict(zip(cfg["benchmarks"], map(str, smk.input.benchmarks), strict=True)),
    smk.output[0],
    cfg["input_key"],
    cfg["ngram_size"],
    cfg["threshold"],
)
