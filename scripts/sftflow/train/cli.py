"""The training worker's command line (scripts/train.py): one invocation = one chained job, under torchrun::

    torchrun --standalone --nproc-per-node=2 scripts/train.py \\
        --packed results/data/packed --model results/demo/base_model \\
        --checkpoint-dir results/checkpoints --job-index 0 --num-jobs 2 \\
        --done-file results/checkpoints/job0.done [--config c.json] [++training.max_num_steps=50 ...]

The config is the schema defaults, then `--config` (a JSON file {"training": {...}, "packing": {...}}),
then the `++section.key=value` arguments. A plain `python scripts/train.py ...` is a world of one process.
The train_job rule runs `scripts/train.py launch ... -- <torchrun or srun + torchrun command>` (see
sftflow.train.launch), with the config as `++` arguments: the keys that differ from the defaults
(config_overrides, the rule's side; load_train_config, the job's side: the one place a job reads its config).
The export's command line is sftflow.train.export_cli.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from sftflow import config as C
from sftflow.errors import SftflowError
from sftflow.logs import setup_logging

LOG = logging.getLogger("sftflow.train")


def _deep_update(base: dict, overrides: dict) -> dict:
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value
    return base


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Run one chained training job (launch with torchrun).")
    p.add_argument(
        "--config", default=None, help='JSON file {"training": {...}, "packing": {...}} (default: the schema defaults)'
    )
    p.add_argument("--packed", required=True, help="packed data directory (pack_data output)")
    p.add_argument("--model", required=True, help="base model: local HF directory or hub name")
    p.add_argument("--checkpoint-dir", required=True, help="checkpoint directory shared by all chained jobs")
    p.add_argument("--job-index", type=int, default=0, help="this job's index i (0-based)")
    p.add_argument("--num-jobs", type=int, default=1, help="number of chained jobs N")
    p.add_argument("--done-file", default=None, help="JSON record written atomically when the job ends")
    p.add_argument("--metrics-dir", default=None, help="metrics.jsonl + tensorboard/ (default: CHECKPOINT_DIR/metrics)")
    p.add_argument("--tokenizer", default=None, help="tokenizer for packing validation_data (default: --model)")
    p.add_argument("--chat-template", default=None, help="Jinja chat template file replacing the tokenizer's")
    return p


def load_train_config(path: str | None, overrides: list[str]) -> dict:
    """The job's config: the schema defaults, then the --config JSON file, then the ++ overrides, validated."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8")) if path else {}
    except (OSError, ValueError) as err:
        raise SftflowError(f"--config {path}: cannot read JSON ({err})") from None
    if not isinstance(raw, dict):
        raise SftflowError(f"--config {path}: expected a JSON object with 'training' and 'packing' sections")
    unknown = set(raw) - {"training", "packing"}
    if unknown:
        raise SftflowError(f"--config {path}: unknown sections {sorted(unknown)} (expected training, packing)")
    _deep_update(raw, C.parse_overrides(overrides))
    from sftflow.config import validate_sections

    return validate_sections(raw)


def _setup_rank_logging(rank: int, world_size: int) -> None:
    """Progress from rank 0 only; other ranks report warnings and errors, tagged with their rank."""
    setup_logging(level=logging.INFO if rank == 0 else logging.WARNING)
    if world_size > 1:
        fmt = f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s"
        for handler in logging.getLogger().handlers:
            handler.setFormatter(logging.Formatter(fmt))
    # transformers' per-rank chatter (e.g. the same warning from every process) is not progress information
    logging.getLogger("transformers").setLevel(logging.ERROR)


def train_main(argv: list[str] | None = None) -> int:
    setup_logging()
    args, extra = train_parser().parse_known_args(argv)
    from sftflow.train.engine import init_parallel
    from sftflow.train.parallel import shutdown
    from sftflow.train.trainer import JobSpec, Trainer

    try:
        bad = [a for a in extra if not a.startswith("++")]
        if bad:
            raise SftflowError(f"unknown arguments {bad}; overrides look like ++training.max_num_steps=10")
        if not 0 <= args.job_index < args.num_jobs:
            raise SftflowError(
                f"--job-index {args.job_index} is not in 0..{args.num_jobs - 1} (--num-jobs {args.num_jobs})"
            )
        cfg = load_train_config(args.config, extra)
        parallel = init_parallel(cfg["training"])
        _setup_rank_logging(parallel.rank, parallel.world_size)
        if parallel.is_main:  # the job's resolved config, for the record
            from sftflow.io import write_json

            Path(args.checkpoint_dir).mkdir(parents=True, exist_ok=True)
            write_json(Path(args.checkpoint_dir) / f"job{args.job_index}.config.json", cfg)
        spec = JobSpec(
            packed=args.packed,
            model=args.model,
            checkpoint_dir=args.checkpoint_dir,
            job_index=args.job_index,
            num_jobs=args.num_jobs,
            done_file=args.done_file,
            metrics_dir=args.metrics_dir,
            tokenizer=args.tokenizer,
            chat_template=args.chat_template,
        )
        Trainer(cfg, spec, parallel).train()
    except SftflowError as err:
        LOG.error("%s", err)
        return 2
    finally:
        shutdown()
    return 0


def config_overrides(config: dict, sections: tuple[str, ...] = ("training", "packing")) -> list[str]:
    """`++section.key=value` for every key of `sections` that differs from the schema default.

    The worker fills in the defaults again (validate_sections), so these arguments alone rebuild the
    config: the command line shows exactly what an experiment changed, as NeMo-Skills' commands do.
    """
    from sftflow.config import validate_sections

    defaults = validate_sections({})

    def walk(prefix: str, value, default) -> list[str]:
        if isinstance(value, dict) and isinstance(default, dict):
            return [arg for key in value for arg in walk(f"{prefix}.{key}", value[key], default.get(key))]
        return [] if value == default else [f"++{prefix}={C.yaml_value(value)}"]

    return [arg for section in sections for arg in walk(section, config.get(section, {}), defaults[section])]
