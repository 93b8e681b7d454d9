"""Compare training problems with the evaluated benchmarks' test problems; called by the decontaminate rule."""

from sftflow.contamination import find_contamination
from sftflow.logs import setup_logging

smk = snakemake  # noqa: F821
setup_logging(smk.log[0])
find_contamination(
    [str(p) for p in smk.input.generations],
    dict(zip(smk.params.benchmark_names, map(str, smk.input.benchmarks))),
    smk.output[0],
    smk.params.input_key,
    smk.params.ngram_size,
    smk.params.threshold,
)
