"""One chained training job, top to bottom: set up, resume, train until the job's target step or deadline, save.

Job i of N trains until step ceil(total_steps x (i+1) / N), where

    total_steps = min(max_num_steps, max_num_epochs x floor(bins / train_global_batch_size)).

It resumes from the latest complete checkpoint, whichever job wrote it; if that checkpoint is already
at or past the target it only writes its done-file. Each optimizer step, every dp rank takes its
micro-batches (the global batch split by BinSampler), the warmup + cosine schedule sets the learning rate,
and the backend's engine (training.backend, looked up in sftflow.train.engine) runs the step: its loss is
the sum of token losses over the loss tokens of the whole global batch, whatever the split into ranks and
micro-batches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from sftflow.errors import SftflowError
from sftflow.io import write_json
from sftflow.train.checkpoint import (
    ENGINE,
    Checkpointer,
    RngState,
    TrainState,
    check_layout,
    latest_checkpoint,
    read_meta,
)
from sftflow.train.config import check_training_keys, check_training_matches
from sftflow.train.data import BinSampler, TrainingPlan, job_target_step
from sftflow.train.deadline import Deadline, StopSignal
from sftflow.train.engine import Engine, JobSpec, engine_class
from sftflow.train.lr_schedule import WarmupCosineSchedule, lr_at
from sftflow.train.metrics import MetricsLogger
from sftflow.train.parallel import ParallelDims
from sftflow.train.settings import TrainingConfig

LOG = logging.getLogger("sftflow.train")


def data_fingerprint(packed_dir: str | os.PathLike) -> str:
    """Identifies the packed data a checkpoint was trained on (its index.json lists every shard's counts)."""
    return hashlib.sha256((Path(packed_dir) / "index.json").read_bytes()).hexdigest()[:16]


def _prepare_validation(cfg: dict, spec: JobSpec, parallel: ParallelDims):
    """Pack training.validation_data like the training data, once, into the checkpoint directory."""
    from sftflow.packing import PackedDataset, pack_jsonl

    source = cfg["training"]["validation_data"]
    if not source:
        return None
    if not Path(source).is_file():
        raise SftflowError(f"config key 'training.validation_data': file {source} not found")
    tokenizer = spec.tokenizer or spec.model
    # Named after everything that shapes it, so a changed file, packing config or tokenizer is repacked.
    recipe = json.dumps([cfg["packing"], tokenizer, spec.chat_template], sort_keys=True).encode()
    digest = hashlib.sha256(Path(source).read_bytes() + recipe).hexdigest()[:12]
    target = Path(spec.checkpoint_dir) / f"validation_packed_{digest}"

    def pack_once() -> None:  # rank 0 decides and packs; every rank takes part in on_main's collective
        if not (target / "index.json").is_file():
            LOG.info("packing validation data %s -> %s", source, target)
            pack_jsonl(source, target, tokenizer, cfg["packing"], chat_template=spec.chat_template)

    parallel.on_main(pack_once)
    return PackedDataset(target)


def rank_placement(parallel: ParallelDims) -> list[str]:
    """Where every rank runs, as "node/local_rank" (the Slurm node name when under Slurm), gathered on all ranks."""
    import socket

    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    mine = f"{node}/{parallel.local_rank}"
    if parallel.world_size == 1 or not dist.is_initialized():
        return [mine]
    placement: list = [None] * parallel.world_size
    dist.all_gather_object(placement, mine)
    return placement


def _done_record(
    spec: JobSpec,
    start_step: int,
    end_step: int,
    plan: TrainingPlan,
    target: int,
    ckpt,
    ranks: list[str],
    schedule_changes: list[dict],
) -> dict:
    return {
        "job_index": spec.job_index,
        "num_jobs": spec.num_jobs,
        "start_step": start_step,
        "end_step": end_step,
        "target_step": target,
        "total_steps": plan.total_steps,
        "complete": end_step >= plan.total_steps,
        "remaining_steps": max(0, plan.total_steps - end_step),
        "checkpoint": str(ckpt) if ckpt else None,
        "ranks": ranks,
        "schedule_changes": schedule_changes,  # the run's total-step changes so far (the report shows them)
    }


def _check_resume_compatible(
    meta: dict, fingerprint: str, spec: JobSpec, path: Path, current: dict, training: TrainingConfig
) -> None:
    check_layout(meta, current, path)
    if meta.get("data_fingerprint") not in (None, fingerprint):
        raise SftflowError(
            f"checkpoint {path} was trained on different packed data than {spec.packed} "
            f"(fingerprint {meta['data_fingerprint']} vs {fingerprint}); delete {spec.checkpoint_dir} to train from scratch"
        )
    if meta.get("model") not in (None, spec.model):
        raise SftflowError(
            f"checkpoint {path} continues base model {meta['model']!r}, not {spec.model!r} (config key "
            f"'model.base_model'); delete {spec.checkpoint_dir} to train the new model from scratch"
        )
    check_training_matches(meta.get("training"), training.as_dict(), path)


def _schedule_changes(saved: dict, step: int, total_steps: int, tcfg: TrainingConfig) -> list[dict]:
    """The run's record of total-step changes; a resume with another total (max_num_steps or max_num_epochs
    changed) appends one and says so: the cosine decay is recomputed over the new total from this step on."""
    changes = list(saved.get("schedule_changes", []))
    before = saved.get("total_steps")
    if before is not None and before != total_steps:
        rates = {
            total: lr_at(
                step,
                peak=tcfg.learning_rate,
                minimum=tcfg.min_learning_rate,
                warmup=tcfg.warmup_steps,
                total=total,
            )
            for total in (before, total_steps)
        }
        LOG.warning(
            "the schedule changes at step %d: total steps %d -> %d (training.max_num_steps / max_num_epochs "
            "changed); the learning rate of step %d is %.6g instead of %.6g, the cosine decay now ends at step %d",
            step,
            before,
            total_steps,
            step + 1,
            rates[total_steps],
            rates[before],
            total_steps,
        )
        changes.append({"step": step, "total_steps_before": before, "total_steps_after": total_steps})
    return changes


def _make_deadline(tcfg: TrainingConfig, parallel: ParallelDims, t_process_start: float, clock) -> Deadline:
    """Only rank 0 asks Slurm for the end time (hundreds of ranks must not all call squeue) and decides when
    to stop; the stop flag reaches the other ranks through the loop's per-step all-reduce."""
    if parallel.is_main:
        return Deadline.from_config(
            tcfg.time_limit, tcfg.time_margin_seconds, t_process_start, dict(os.environ), clock=clock
        )
    return Deadline(None, tcfg.time_margin_seconds, clock=clock)


def _log_job_plan(spec: JobSpec, plan: TrainingPlan, seq_len: int, target: int, has_deadline: bool, parallel) -> None:
    LOG.info(
        "job %d/%d: %d bins of %d tokens, %d steps per epoch, total %d steps, this job trains to step %d%s; "
        "world %d = dp %d x tp %d, micro-batch %d, gradient accumulation %d",
        spec.job_index,
        spec.num_jobs,
        plan.num_bins,
        seq_len,
        plan.steps_per_epoch,
        plan.total_steps,
        target,
        "" if not has_deadline else " or until its deadline",
        parallel.world_size,
        parallel.dp_size,
        parallel.tp,
        plan.micro_batch,
        plan.grad_accum,
    )


def _finish(spec: JobSpec, parallel: ParallelDims, record: dict) -> dict:
    """Write the done record (rank 0) and wait for every rank."""
    if spec.done_file and parallel.is_main:
        write_json(spec.done_file, record)
    parallel.barrier()
    return record


def _metrics_logger(
    spec: JobSpec, tcfg: TrainingConfig, plan: TrainingPlan, target: int, start_step: int, engine, parallel
):
    cuda = parallel.device.type == "cuda"
    return MetricsLogger(
        spec.metrics_dir or Path(spec.checkpoint_dir) / "metrics",
        enabled=parallel.is_main,
        total_steps=plan.total_steps,
        target_step=target,
        start_step=start_step,
        log_period=tcfg.log_period,
        num_params=engine.num_params,
        num_gpus=parallel.world_size if cuda else 0,
        device_name=torch.cuda.get_device_name(parallel.device) if cuda else "",
    )


def _schedule(engine: Engine, tcfg: TrainingConfig, plan: TrainingPlan) -> WarmupCosineSchedule:
    return WarmupCosineSchedule(
        engine.optimizer,
        peak=tcfg.learning_rate,
        minimum=tcfg.min_learning_rate,
        warmup=tcfg.warmup_steps,
        total=plan.total_steps,
    )


def _resume(checkpointer: Checkpointer, states: dict, deadline: Deadline, latest) -> int:
    """Load the latest checkpoint (if any) into every Stateful component; returns its step."""
    if latest is None:
        return 0
    t0 = time.perf_counter()
    checkpointer.load(latest.path, states)
    load_seconds = time.perf_counter() - t0
    deadline.estimate_save_from_load(load_seconds)
    step, epoch = states["train"].step, states["sampler"].epoch
    LOG.info("resumed from %s (step %d, epoch %d) in %.1f s", latest.path, step, epoch, load_seconds)
    return step


def _run_meta(
    spec: JobSpec, plan: TrainingPlan, parallel, engine: Engine, fingerprint: str, tcfg: TrainingConfig, changes
) -> dict:
    """What every checkpoint of this job records in its meta.json (resume checks read it back)."""
    return {
        "data_fingerprint": fingerprint,
        "model": spec.model,
        "total_steps": plan.total_steps,
        "world_size": parallel.world_size,
        "num_params": engine.num_params,
        **engine.meta(),
        "training": tcfg.as_dict(),
        "schedule_changes": changes,
    }


@dataclass
class _Training:
    """The parts of a job's training loop once the engine is built (run_job assembles them)."""

    tcfg: TrainingConfig
    plan: TrainingPlan
    parallel: ParallelDims
    engine: Engine
    dataset: object
    sampler: BinSampler
    schedule: WarmupCosineSchedule
    deadline: Deadline
    metrics: MetricsLogger
    validation: object
    meta: dict
    states: dict  # what a checkpoint holds: name -> Stateful component

    def save(self, step: int) -> Path:
        self.states["train"].step = step
        path, seconds = self.engine.checkpointer.save(step, self.states, self.meta)
        self.deadline.record_save(seconds)
        LOG.info("saved %s in %.1f s", path, seconds)
        return path

    def validate(self, step: int) -> None:
        if self.validation is not None:
            loss, n = self.engine.evaluate(self.validation, self.plan.micro_batch)
            self.metrics.log_validation(step, loss, n)

    def should_stop(self, step: int, stop_signal: StopSignal) -> bool:
        """True on every rank when rank 0 runs out of time or any rank received a stop signal."""
        deadline = self.deadline
        out_of_time = self.parallel.is_main and deadline.should_stop()
        if not self.parallel.any_rank(out_of_time or stop_signal.received is not None):
            return False
        if out_of_time:
            LOG.warning(
                "stopping at step %d before the deadline (%.0f s left; step %.1f s, save %.1f s, margin %.0f s)",
                step,
                deadline.seconds_left() or 0.0,
                deadline.average_step,
                deadline.save_seconds,
                deadline.margin,
            )
        else:
            LOG.warning("stopping at step %d: a rank received %s", step, stop_signal.received or "a stop signal")
        return True

    def step(self, step: int) -> int:
        """Train optimizer step step + 1 and log it; returns step + 1."""
        t_step = time.perf_counter()
        micro_bins = [[self.dataset.get_bin(i) for i in ids] for ids in self.sampler.next_step()]
        real_tokens = self.parallel.dp_sum(sum(len(b["input_ids"]) for bins in micro_bins for b in bins))
        lr = self.schedule.apply(step)
        loss, global_count, grad_norm = self.engine.train_step(micro_bins)
        step += 1
        seconds = time.perf_counter() - t_step
        self.deadline.record_step(seconds)
        self.metrics.log_step(
            step,
            {
                "loss": loss,
                "grad_norm": grad_norm,
                "lr": lr,
                "tokens_per_second": real_tokens / seconds,
                "loss_tokens": int(global_count),
                "epoch": self.sampler.epoch,
                "step_seconds": seconds,
            },
        )
        return step

    def train(self, step: int, target: int, last_saved: Path | None) -> tuple[int, Path | None]:
        """Train from `step` to `target` (or the deadline), saving every save_period steps and at the end;
        returns the step reached and the last checkpoint."""
        tcfg, total = self.tcfg, self.plan.total_steps
        last_saved_step = step if last_saved is not None else -1
        stopped_early = False
        stop_signal = StopSignal()
        while step < target:
            if self.should_stop(step, stop_signal):
                stopped_early = True
                break
            step = self.step(step)
            if tcfg.val_period and step % tcfg.val_period == 0 and step < total:
                self.validate(step)
            if step % tcfg.save_period == 0 and step < target:
                last_saved, last_saved_step = self.save(step), step
        if step != last_saved_step and step > 0:
            last_saved = self.save(step)
        stop_signal.restore()
        if step >= total and not stopped_early:
            self.validate(step)
        self.metrics.close()
        return step, last_saved


def run_job(cfg: dict, spec: JobSpec, parallel: ParallelDims | None = None, clock=time.time) -> dict:
    """Run one chained job; returns (and writes to spec.done_file) the done record. Collective.

    `clock` (wall-clock seconds) drives the deadline; tests pass a fake one.
    """
    t_process_start = clock()
    tcfg = TrainingConfig.from_section(cfg["training"])
    engine_cls = engine_class(tcfg.backend)
    parallel = parallel or engine_cls.init_parallel(tcfg)
    check_training_keys(cfg, world_size=parallel.world_size)
    ranks = rank_placement(parallel)
    LOG.info("ranks (node/local rank): %s", ", ".join(ranks))
    torch.manual_seed(tcfg.seed)
    random.seed(tcfg.seed)

    # --- data, the step plan, this job's target ---------------------------------------------------
    from sftflow.packing import PackedDataset

    dataset = PackedDataset(spec.packed)
    seq_len, pad_id = int(dataset.index["max_total_sequence_length"]), int(dataset.index["pad_token_id"])
    plan = TrainingPlan.make(tcfg, len(dataset), parallel.dp_size)
    deadline = _make_deadline(tcfg, parallel, t_process_start, clock)
    has_deadline = parallel.any_rank(deadline.end_time is not None)
    # Without a deadline job i of N trains its equal share. With one (a Slurm job, or training.time_limit)
    # it trains on towards the end until the deadline stops it, as NeMo-RL's chained jobs do: a job that
    # finishes early leaves the later ones nothing to do, and one that stops early is caught up by the next.
    share = job_target_step(plan.total_steps, spec.job_index, spec.num_jobs)
    target = plan.total_steps if has_deadline else share
    fingerprint = data_fingerprint(spec.packed)
    _log_job_plan(spec, plan, seq_len, target, has_deadline, parallel)

    # --- resume point -----------------------------------------------------------------------------
    Checkpointer(spec.checkpoint_dir, parallel).clean_partial()
    latest = latest_checkpoint(spec.checkpoint_dir)
    saved_meta = read_meta(latest.path) if latest is not None else {}
    if latest is not None:
        current = {"backend": engine_cls.name, **engine_cls.resume_layout(parallel)}
        _check_resume_compatible(saved_meta, fingerprint, spec, latest.path, current, tcfg)
    if latest is not None and latest.step >= target:
        LOG.info("checkpoint %s is at or past this job's target step %d: nothing to train", latest.path, target)
        changes = saved_meta.get("schedule_changes", [])
        return _finish(
            spec, parallel, _done_record(spec, latest.step, latest.step, plan, target, latest.path, ranks, changes)
        )

    # --- engine, schedule, data order, then the loop ----------------------------------------------
    engine = engine_cls(cfg, spec, parallel, seq_len, pad_id)
    sampler, schedule = BinSampler(plan, parallel.dp_rank, tcfg.seed), _schedule(engine, tcfg, plan)
    states = {
        ENGINE: engine,
        "sampler": sampler,
        "schedule": schedule,
        "rng": RngState(parallel),
        "train": TrainState(),
    }
    start_step = _resume(engine.checkpointer, states, deadline, latest)
    schedule_changes = _schedule_changes(saved_meta, start_step, plan.total_steps, tcfg)
    validation = _prepare_validation(cfg, spec, parallel)
    meta = _run_meta(spec, plan, parallel, engine, fingerprint, tcfg, schedule_changes)
    metrics = _metrics_logger(spec, tcfg, plan, target, start_step, engine, parallel)
    training = _Training(
        tcfg, plan, parallel, engine, dataset, sampler, schedule, deadline, metrics, validation, meta, states
    )
    step, last_saved = training.train(start_step, target, latest.path if latest is not None else None)

    record = _finish(
        spec, parallel, _done_record(spec, start_step, step, plan, target, last_saved, ranks, schedule_changes)
    )
    LOG.info(
        "job %d done: steps %d -> %d of %d%s",
        spec.job_index,
        start_step,
        step,
        plan.total_steps,
        " (training complete)" if record["complete"] else f" ({record['remaining_steps']} steps remain)",
    )
    return record
