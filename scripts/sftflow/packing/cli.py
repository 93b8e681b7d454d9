"""Entry points of the packing stage: the command line and the pack_data Snakemake rule."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from sftflow import stage_config
from sftflow.errors import SftflowError
from sftflow.io import write_json
from sftflow.logs import setup_logging
from sftflow.packing.held_out import split_problems, summary_line
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
    p.add_argument(
        "--val-set-size",
        type=float,
        default=0,
        help="hold whole problems out for validation (training.val_set_size): a fraction of the rows, or a count",
    )
    p.add_argument("--val-set-seed", type=int, default=42, help="seed of the held-out problems (training.val_set_seed)")
    p.add_argument("--validation-output", help="output directory of the held-out rows (with --val-set-size)")
    return p


def pack_with_held_out(input_path: str, outputs: tuple[str, str | None], held_out: dict | None, **pack) -> dict:
    """pack_jsonl of `input_path` into outputs[0]; with `held_out` ({"val_set_size", "val_set_seed"}), whole problems
    held out of it first and packed into outputs[1] (the split's counts: held_out.json there, and "held_out" in
    outputs[0]'s stats.json). `pack`: pack_jsonl's tokenizer, cfg and keyword arguments. Returns the training side's
    stats."""
    output, validation_output = outputs
    if not held_out:
        return pack_jsonl(input_path, output, **pack)
    if not validation_output:
        raise SftflowError(
            "training.val_set_size (--val-set-size) is set: give the held-out rows an output directory "
            "(--validation-output; the workflow's is results/data/packed_validation)"
        )
    split = split_problems(input_path, held_out["val_set_size"], held_out["val_set_seed"])
    pack_jsonl(split.validation, validation_output, **pack)
    write_json(Path(validation_output) / "held_out.json", split.summary)
    stats = pack_jsonl(split.training, output, **pack)
    stats["held_out"] = split.summary  # the training side's stats say what was held out (the report's packing page)
    write_json(Path(output) / "stats.json", stats)
    LOG.info("%s", summary_line(split.summary))
    return stats


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parser().parse_args(argv)
    cfg: dict = {}
    for key in ("max_total_sequence_length", "overlong", "sequences_per_shard", "num_workers"):
        value = getattr(args, key)
        if value is not None:
            cfg[key] = value
    held_out = {"val_set_size": args.val_set_size, "val_set_seed": args.val_set_seed} if args.val_set_size else None
    try:
        pack_with_held_out(
            args.input,
            (args.output, args.validation_output),
            held_out,
            tokenizer=args.tokenizer,
            cfg=PackingConfig.from_section(cfg),
            chat_template=args.chat_template,
        )
    except SftflowError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def run_from_snakemake(smk) -> None:
    """Called by the pack_data rule's script: its config in the stage file input.config (packing section,
    tokenizer, chat template and its arguments, and the held-out share when training.val_set_size is set;
    rules/common.smk), paths in input/output (output.validation: the held-out rows, packed)."""
    setup_logging(smk.log[0] if smk.log else None)
    try:
        cfg = stage_config.read(smk.input.config)
        pack_with_held_out(
            str(smk.input.data),
            (str(smk.output.packed), str(smk.output.get("validation", "")) or None),
            cfg.get("held_out"),
            tokenizer=cfg["tokenizer"],
            cfg=PackingConfig.from_section(cfg["packing"]).with_workers(smk.input.data, cores=smk.threads),
            chat_template=cfg["chat_template"],
            chat_template_kwargs=cfg["chat_template_kwargs"] or {},
        )
    except SftflowError as err:
        LOG.error("%s", err)
        raise SystemExit(f"error: {err}") from None
