"""Entry points of data preparation: `++key=value` command line and the Snakemake rule."""

from __future__ import annotations

import copy
import logging
import sys

from sftflow import config as C
from sftflow.errors import SftflowError
from sftflow.logs import setup_logging
from sftflow.prepare.pipeline import Preparer, summary_lines

LOG = logging.getLogger("sftflow.prepare")

CLI_ONLY_KEYS = {
    "output_path": {
        "type": "string",
        "description": "Where to write the SFT JSONL (stats go beside it as <name>.stats.json).",
    },
    "tokenizer": {
        "type": ["string", "null"],
        "default": None,
        "description": "Tokenizer path or hub name (chat template, token counts).",
    },
    "chat_template": {
        "type": ["string", "null"],
        "default": None,
        "description": "Jinja chat template file replacing the tokenizer's.",
    },
}


def cli_schema() -> dict:
    schema = copy.deepcopy(C.section_schema("prepare_data"))
    schema["properties"].update(copy.deepcopy(CLI_ONLY_KEYS))
    schema["required"] = ["output_path"]
    return schema


def prepare(cfg: dict, output_path: str, cores: int | None = None) -> dict:
    stats = Preparer(cfg, cores).run(output_path)
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
        cfg = C.validate(C.parse_overrides(argv), cli_schema())
        C.check_prepare_keys(cfg)
        prepare(cfg, cfg["output_path"])
    except SftflowError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def run_from_snakemake(smk) -> None:
    """Called by the prepare_data rule's script: config section in params, paths in input/output."""
    setup_logging(smk.log[0] if smk.log else None)
    cfg = copy.deepcopy(dict(smk.params.cfg))
    cfg["input_files"] = [str(p) for p in smk.input.generations]
    cfg["tokenizer"] = smk.params.tokenizer
    cfg["chat_template"] = smk.params.chat_template
    if cfg["filters"]["remove_contaminated"]:
        cfg["contamination_file"] = str(smk.input.contamination)
    try:
        C.validate(cfg, cli_schema() | {"required": []})
        prepare(cfg, smk.output.data, cores=smk.threads)
    except SftflowError as err:
        LOG.error("%s", err)
        raise SystemExit(f"error: {err}") from None
