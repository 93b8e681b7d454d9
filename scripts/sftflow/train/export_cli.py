"""The export's command line (scripts/convert_checkpoint.py) and its Snakemake rules::

    python scripts/convert_checkpoint.py --checkpoint-dir results/checkpoints --model BASE \\
        --output results/final_hf_model [--step N | --done-file results/checkpoints/job1.done] \\
        [--tokenizer TOK] [--chat-template FILE] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from sftflow.errors import SftflowError
from sftflow.logs import setup_logging

LOG = logging.getLogger("sftflow.train")


def convert_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Export a DCP training checkpoint as a Hugging Face model folder.")
    p.add_argument("--checkpoint-dir", required=True, help="the training checkpoint directory")
    p.add_argument("--output", required=True, help="HF model directory to write (atomically)")
    p.add_argument("--model", required=True, help="base model (config.json, generation_config.json)")
    p.add_argument("--tokenizer", default=None, help="tokenizer to save with the model (default: --model)")
    p.add_argument("--chat-template", default=None, help="Jinja chat template file replacing the tokenizer's")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--step", type=int, default=None, help="export this saved step")
    which.add_argument(
        "--done-file", default=None, help="last job's done-file: export its checkpoint, if training is complete"
    )
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default=None, help="default: the base model's dtype"
    )
    p.add_argument("--max-shard-gb", type=float, default=2.0, help="largest safetensors shard (GiB)")
    return p


def convert(args: argparse.Namespace) -> Path:
    from sftflow.train.export import ExportTokenizer, check_training_complete, export_checkpoint, resolve_checkpoint

    checkpoint = None
    if args.done_file:
        record = check_training_complete(args.done_file)
        checkpoint = record.get("checkpoint")
        if not checkpoint or not Path(checkpoint).is_dir():
            checkpoint = resolve_checkpoint(args.checkpoint_dir, None)
    else:
        checkpoint = resolve_checkpoint(args.checkpoint_dir, args.step)
    return export_checkpoint(
        checkpoint,
        args.output,
        args.model,
        tokenizer=ExportTokenizer(args.tokenizer, args.chat_template),
        dtype=args.dtype,
        max_shard_bytes=int(args.max_shard_gb * 1024**3),
    )


def convert_main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = convert_parser().parse_args(argv)
    try:
        convert(args)
    except SftflowError as err:
        LOG.error("%s", err)
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def convert_from_snakemake(smk) -> None:
    """Snakemake `convert_final` / `convert_step` rules."""
    setup_logging(smk.log[0] if smk.log else None)
    argv = [
        "--checkpoint-dir", str(smk.params.checkpoint_dir),
        "--output", str(smk.output.model),
        "--model", str(smk.params.model),
        "--tokenizer", str(smk.params.tokenizer),
    ]  # fmt: skip
    if smk.params.chat_template:
        argv += ["--chat-template", str(smk.params.chat_template)]
    if smk.params.get("step", None) is not None:
        argv += ["--step", str(smk.params.step)]
    else:
        argv += ["--done-file", str(smk.input.last_job)]
    try:
        convert(convert_parser().parse_args(argv))
    except SftflowError as err:
        LOG.error("%s", err)
        raise SystemExit(f"error: {err}") from None
