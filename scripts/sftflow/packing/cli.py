"""Entry points of the packing stage: the command line and the pack_data Snakemake rule."""

from __future__ import annotations

import argparse
import logging
import sys

from sftflow import stage_config
from sftflow.errors import SftflowError
from sftflow.logs import setup_logging
from sftflow.packing.pipeline import PackingConfig, pack_jsonl
from sftflow.packing.stream import OVERLONG

LOG = logging.getLogger("sftflow.packing")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python scripts/pack_data.py",
        description="Tokenize prepared SFT rows (assistant-only loss mask) into sftflow-packed-v2 shards: one sequence "
        "per bin, in the input's order (the trainer packs each optimizer step). Options left out take the defaults "
        "of the packing section of config/schema.yaml.",
    )
    p.add_argument("--input", required=True, help="prepared SFT JSONL (input/output or messages rows)")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory or hub name")
    p.add_argument("--output", required=True, help="output directory (replaced atomically)")
    p.add_argument(
        "--max-total-sequence-length", type=int, help="longest sequence kept as it is (the trainer's packed row)"
    )
    p.add_argument("--overlong", choices=OVERLONG, help="what to do with a longer sequence")
    p.add_argument("--sequences-per-shard", type=int)
    p.add_argument("--num-workers", type=int, help="tokenizing processes (default: one per available core)")
    p.add_argument("--chat-template", help="Jinja chat template file replacing the tokenizer's")
    return p


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parser().parse_args(argv)
    cfg: dict = {}
    for key in ("max_total_sequence_length", "overlong", "sequences_per_shard", "num_workers"):
        value = getattr(args, key)
        if value is not None:
            cfg[key] = value
    try:
        pack_jsonl(
            args.input, args.output, args.tokenizer, PackingConfig.from_section(cfg), chat_template=args.chat_template
        )
    except SftflowError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def run_from_snakemake(smk) -> None:
    """Called by the pack_data rule's script: its config in the stage file input.config (packing section,
    tokenizer, chat template and its arguments; rules/common.smk), paths in input/output."""
    setup_logging(smk.log[0] if smk.log else None)
    try:
        cfg = stage_config.read(smk.input.config)
        pack_jsonl(
            str(smk.input.data),
            str(smk.output.packed),
            cfg["tokenizer"],
            PackingConfig.from_section(cfg["packing"]).with_workers(smk.input.data, cores=smk.threads),
            chat_template=cfg["chat_template"],
            chat_template_kwargs=cfg["chat_template_kwargs"] or {},
        )
    except SftflowError as err:
        LOG.error("%s", err)
        raise SystemExit(f"error: {err}") from None
