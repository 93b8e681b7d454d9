"""The training worker's command line (scripts/train.py): one invocation = one chained job, under torchrun::

    torchrun --standalone --nproc-per-node=2 scripts/train.py \\
        --packed results/data/packed --model results/demo/base_model \\
        --checkpoint-dir results/checkpoints --job-index 0 --num-jobs 2 \\
        --done-file results/checkpoints/job0.done [--config c.yaml ...]

The config is the schema defaults, then each `--config` file in turn (JSON, or YAML by its suffix:
{"training": {...}, "packing": {...}}; a later file's keys win). A plain `python scripts/train.py ...` is a world
of one process. The train_job rule runs `scripts/train.py launch ... -- <torchrun or srun + torchrun command>`
(see sftflow.train.launch) with the two training stage files the workflow wrote while planning (rules/common.smk):
train.json, the keys that decide what each step computes (a tracked input of the rule), and train.run.json, the
rest (not an input: changing them reruns no job). load_train_config is the one place a job reads its config.
The export's command line is sftflow.train.export_cli.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from sftflow.errors import SftflowError
from sftflow.logs import setup_logging

LOG = logging.getLogger("sftflow.train")


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Run one chained training job (launch with torchrun).")
    p.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FILE",
        help='JSON or YAML file {"training": {...}, "packing": {...}}, repeatable (later files win key by key; keys '
        "left out take the schema defaults)",
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
    p.add_argument(
        "--validation-packed",
        default=None,
        metavar="DIR",
        help="packed validation data (pack_data's held-out share, training.val_set_size)",
    )
    return p


def load_train_config(paths: list[str]) -> dict:
    """The job's config: the schema defaults, then each file of `paths` in turn, validated (errors name the files)."""
    from sftflow import stage_config
    from sftflow.config import validate_sections

    raw: dict[str, dict] = {"training": {}, "packing": {}}
    protected: set[int] = set()
    for path in paths:
        data = stage_config.read_mapping(path)
        # The workflow's list of steps exported after training (sftflow.train.retention.protected_steps).
        steps = data.pop("protected_steps", [])
        if not isinstance(steps, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in steps):
            raise SftflowError(f"--config {path}: 'protected_steps' is not a list of steps")
        protected.update(steps)
        unknown = set(data) - set(raw)
        if unknown:
            raise SftflowError(f"--config {path}: unknown sections {sorted(unknown)} (expected training, packing)")
        for section, values in data.items():
            if not isinstance(values, dict):
                raise SftflowError(f"--config {path}: section '{section}' is not a mapping")
            raw[section].update(values)
    try:
        return {**validate_sections(raw), "protected_steps": sorted(protected)}
    except SftflowError as err:
        raise SftflowError(f"--config {' + '.join(map(str, paths))}: {err}") from None


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
    args = train_parser().parse_args(argv)
    from sftflow.train.parallel import launch_environment, shutdown
    from sftflow.train.trainer import JobSpec, Trainer

    try:
        if not 0 <= args.job_index < args.num_jobs:
            raise SftflowError(
                f"--job-index {args.job_index} is not in 0..{args.num_jobs - 1} (--num-jobs {args.num_jobs})"
            )
        cfg = load_train_config(args.config)
        where = launch_environment()  # torchrun's placement: which rank logs progress
        _setup_rank_logging(where.rank, where.world_size)
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
            validation_packed=args.validation_packed,
        )
        trainer = Trainer(cfg, spec)  # builds the job's TrainingConfig and joins the process group
        if trainer.parallel.is_main:  # the job's resolved config, for the record
            from sftflow.io import write_json

            Path(args.checkpoint_dir).mkdir(parents=True, exist_ok=True)
            write_json(Path(args.checkpoint_dir) / f"job{args.job_index}.config.json", cfg)
        trainer.train()
    except SftflowError as err:
        LOG.error("%s", err)
        return 2
    finally:
        shutdown()
    return 0
