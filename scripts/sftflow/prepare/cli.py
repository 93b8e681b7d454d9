"""Entry points of data preparation: the `++key=value` command line and the Snakemake rule."""

from __future__ import annotations

import logging
import sys

from sftflow import config as C
from sftflow import stage_config
from sftflow.errors import SftflowError
from sftflow.logs import setup_logging
from sftflow.prepare.funnel import summary_lines
from sftflow.prepare.pipeline import prepare
from sftflow.prepare.settings import PrepareConfig

LOG = logging.getLogger("sftflow.prepare")


def prepare_and_log(cfg: PrepareConfig, cores: int | None = None) -> dict:
    stats = prepare(cfg, cores)
    for line in summary_lines(stats):
        LOG.info(line)
    return stats


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(
            "usage: python scripts/prepare_data.py ++input_files='dir/output-rs*.jsonl' ++output_path=sft.jsonl "
            "[++prompt_config=generic/math] [++tokenizer=PATH] [++filters.NAME=true|false] ...\n"
            "Every key is documented in config/README.md (section prepare_data)."
        )
        return 0
    try:
        prepare_and_log(PrepareConfig.from_section(C.parse_overrides(argv)))
    except SftflowError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def run_from_snakemake(smk) -> None:
    """Called by the prepare_data rule's script: its config is the stage file input.config (the prepare_data section
    with the input files, tokenizer, chat template and contamination file the workflow resolved; rules/common.smk),
    its output path the rule's output."""
    setup_logging(smk.log[0] if smk.log else None)
    try:
        section = stage_config.read(smk.input.config)
        prepare_and_log(PrepareConfig.from_section({**section, "output_path": str(smk.output.data)}), cores=smk.threads)
    except SftflowError as err:
        LOG.error("%s", err)
        raise SystemExit(f"error: {err}") from None
