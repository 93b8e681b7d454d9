"""The Trainer: one chained training job, top to bottom: set up, resume, train until the job's target step or deadline, save.

Job i of N trains until step ceil(total_steps x (i+1) / N), where

    total_steps = min(max_num_steps, max_num_epochs x floor(sequences / train_global_batch_size)).

It resumes from the latest complete checkpoint, whichever job wrote it; if that checkpoint is already
at or past the target it only writes its done-file (a DoneRecord). Each optimizer step takes the next
train_global_batch_size sequences, packed into bins and dealt to the dp ranks (StepSampler, train/data.py);
every rank runs its micro-batches of bins, the warmup + cosine schedule sets the learning rate,
and the backend's engine (training.backend, looked up in sftflow.train.engine) runs the step: its loss is
the sum of token losses over the loss tokens of the whole global batch, whatever the split into ranks and
micro-batches. Validation (NeMo-RL's validate()) runs the first val_batches batches of val_global_batch_size
validation sequences through the engine's forward-only evaluate, at step 0 (val_at_start), every val_period
steps and at the last step (val_at_end), before the save of the same step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass, field
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
    step_dir_name,
)
from sftflow.train.config import check_training_keys, check_training_matches
from sftflow.train.data import (
    Packer,
    StepBatch,
    StepSampler,
    TrainingPlan,
    job_target_step,
    join_sequences,
    validation_batches,
)
from sftflow.train.deadline import Deadline, StopSignal
from sftflow.train.engine import Engine, JobSpec, engine_class
from sftflow.train.lr_schedule import WarmupCosineSchedule, lr_at
from sftflow.train.metrics import Hardware, JobSteps, MetricsLogger
from sftflow.train.parallel import ParallelDims
from sftflow.train.retention import (
    RetentionPolicy,
    RetentionResult,
    apply_retention,
    directory_bytes,
    disk_usage,
    format_bytes,
    protected_steps,
)
from sftflow.train.settings import TrainingConfig

LOG = logging.getLogger("sftflow.train")


def data_fingerprint(packed_dir: str | os.PathLike) -> str:
    """Identifies the packed data a checkpoint was trained on (its index.json lists every shard's counts)."""
    return hashlib.sha256((Path(packed_dir) / "index.json").read_bytes()).hexdigest()[:16]


def _prepare_validation(cfg: dict, spec: JobSpec, parallel: ParallelDims):
    """The validation set as a PackedDataset, or None: pack_data's held-out share (spec.validation_packed,
    training.val_set_size) or training.validation_data, tokenized like the training data, once, into the
    checkpoint directory."""
    from sftflow.packing import PackedDataset, pack_jsonl

    source = cfg["training"]["validation_data"]
    if source and spec.validation_packed:
        raise SftflowError(
            f"config keys 'training.validation_data' ({source}) and 'training.val_set_size' "
            f"({cfg['training']['val_set_size']}) both give validation data: set one of them"
        )
    if spec.validation_packed:
        return PackedDataset(spec.validation_packed)
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


@dataclass
class DoneRecord:
    """What a job's done-file says (JSON, written by rank 0 when the job ends): the launcher, the export
    and the report read it, so its keys are an interface."""

    job_index: int
    num_jobs: int
    start_step: int
    end_step: int
    target_step: int
    total_steps: int
    complete: bool = field(init=False)
    remaining_steps: int = field(init=False)
    checkpoint: str | None
    ranks: list[str]
    schedule_changes: list[dict]  # the run's total-step changes so far (the report shows them)

    def __post_init__(self) -> None:
        self.complete = self.end_step >= self.total_steps
        self.remaining_steps = max(0, self.total_steps - self.end_step)

    def to_json(self) -> dict:
        return asdict(self)


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


def _sequences_without_loss(bin_: dict) -> int:
    """Sequences of a bin none of whose tokens after the first is a loss token."""
    mask, count, start = bin_["loss_mask"], 0, 0
    for n in bin_["seq_lens"]:
        count += not bool(mask[start + 1 : start + n].any())
        start += n
    return count


def _describe_retention(result: RetentionResult, policy: RetentionPolicy) -> str:
    """The tail of the save's log line: what retention removed and why."""
    parts = []
    if result.removed:
        names = ", ".join(step_dir_name(s) for s in result.removed)
        parts.append(f"removed {names} ({policy.describe()})")
    if result.optimizer_dropped:
        names = ", ".join(step_dir_name(s) for s in result.optimizer_dropped)
        parts.append(f"dropped the optimizer state of {names} (keep_optimizer_state latest)")
    if result.freed_bytes:
        parts.append(f"freed {format_bytes(result.freed_bytes)}")
    return "".join(f"; {p}" for p in parts)


class Trainer:
    """One chained job of a training run, for any registered backend.

    The constructor builds the job's parts as attributes: the parallel layout, the data and its step plan,
    the deadline, the resume point, the backend's engine, the sampler, the learning-rate schedule, the
    checkpoint's Stateful components (loaded from the resume point), the validation data and the metrics
    logger. `train()` runs the loop and returns the DoneRecord (also written to spec.done_file). Collective:
    every rank builds one and calls train(). `clock` (wall-clock seconds) drives the deadline; tests pass a
    fake one.
    """

    engine: Engine | None  # None when the resume point is at or past this job's target

    def __init__(self, cfg: dict, spec: JobSpec, parallel: ParallelDims | None = None, clock=time.time) -> None:
        t_process_start = clock()
        self.cfg, self.spec = cfg, spec
        self.training = tcfg = TrainingConfig.from_section(cfg["training"])
        self.val_losses: dict[int, float] = {}  # step -> validation loss of this job (saves record it for retention)
        self.train_loss: float | None = None  # the last step's loss (metric_name train_loss)
        self.validation, self.validation_batches = None, []  # set once the job has steps to train
        engine_cls = engine_class(tcfg.backend)
        self.parallel = parallel = parallel or engine_cls.init_parallel(tcfg)
        check_training_keys(cfg, world_size=parallel.world_size)
        self.ranks = rank_placement(parallel)
        LOG.info("ranks (node/local rank): %s", ", ".join(self.ranks))
        torch.manual_seed(tcfg.seed)
        random.seed(tcfg.seed)

        # --- data, the step plan, this job's target -----------------------------------------------
        from sftflow.packing import PackedDataset

        self.dataset = PackedDataset(spec.packed)
        seq_len, pad_id = int(self.dataset.index["max_total_sequence_length"]), int(self.dataset.index["pad_token_id"])
        self.plan = TrainingPlan.make(tcfg, len(self.dataset), parallel.dp_size)
        from sftflow.packing.pipeline import PackingConfig

        packing = PackingConfig.from_section(cfg.get("packing") or {})  # the schema's defaults for unset keys
        self.packer = Packer(enabled=packing.enabled, algorithm=packing.algorithm, capacity=seq_len)
        self.deadline = _make_deadline(tcfg, parallel, t_process_start, clock)
        has_deadline = parallel.any_rank(self.deadline.end_time is not None)
        # Without a deadline job i of N trains its equal share. With one (a Slurm job, or training.time_limit)
        # it trains on towards the end until the deadline stops it, as NeMo-RL's chained jobs do: a job that
        # finishes early leaves the later ones nothing to do, and one that stops early is caught up by the next.
        share = job_target_step(self.plan.total_steps, spec.job_index, spec.num_jobs)
        self.target = self.plan.total_steps if has_deadline else share
        self._log_plan(seq_len, has_deadline)

        # --- resume point -------------------------------------------------------------------------
        fingerprint = data_fingerprint(spec.packed)
        Checkpointer(spec.checkpoint_dir, parallel).clean_partial()
        self.latest = latest_checkpoint(spec.checkpoint_dir)
        saved_meta = read_meta(self.latest.path) if self.latest is not None else {}
        if self.latest is not None:
            current = {"backend": engine_cls.name, **engine_cls.resume_layout(parallel)}
            _check_resume_compatible(saved_meta, fingerprint, spec, self.latest.path, current, tcfg)
        self.schedule_changes = saved_meta.get("schedule_changes", [])
        self.start_step = self.latest.step if self.latest is not None else 0
        if self.latest is not None and self.latest.step >= self.target:
            self.engine = None  # nothing to train: train() only writes the done record
            return

        # --- engine, data order, schedule, checkpoint state, validation, metrics ------------------
        self.engine = engine_cls(tcfg, spec, parallel, seq_len, pad_id)
        self.sampler = StepSampler(self.plan, self.dataset.lengths(), tcfg.seed, self.packer)
        self.schedule = WarmupCosineSchedule(
            self.engine.optimizer,
            peak=tcfg.learning_rate,
            minimum=tcfg.min_learning_rate,
            warmup=tcfg.warmup_steps,
            total=self.plan.total_steps,
        )
        self.states = {  # what a checkpoint holds: name -> Stateful component
            ENGINE: self.engine,
            "sampler": self.sampler,
            "schedule": self.schedule,
            "rng": RngState(parallel),
            "train": TrainState(),
        }
        self.start_step = self._resume()
        self.schedule_changes = _schedule_changes(saved_meta, self.start_step, self.plan.total_steps, tcfg)
        self.validation = _prepare_validation(cfg, spec, parallel)
        self.validation_batches = (
            validation_batches(self.validation.lengths(), self.packer, tcfg, parallel.dp_size)
            if self.validation is not None
            else []
        )
        if self.validation is None and (tcfg.val_period or tcfg.val_at_start):
            LOG.warning(
                "training.val_period / val_at_start ask for validation, but there is no validation data "
                "(training.validation_data or training.val_set_size): no validation loss is computed"
            )
        self.retention = RetentionPolicy.from_training(
            cfg["training"],
            protected=protected_steps(cfg) | set(cfg.get("protected_steps") or []),
            has_validation=self.validation is not None,
        )
        self._warn_unranked_saves()
        self.meta = {  # what every checkpoint of this job records in its meta.json (resume checks read it back)
            "data_fingerprint": fingerprint,
            "model": spec.model,
            "total_steps": self.plan.total_steps,
            "world_size": parallel.world_size,
            "num_params": self.engine.num_params,
            **self.engine.meta(),
            "training": tcfg.as_dict(),
            "schedule_changes": self.schedule_changes,
        }
        cuda = parallel.device.type == "cuda"
        self.metrics = MetricsLogger(
            spec.metrics_dir or Path(spec.checkpoint_dir) / "metrics",
            enabled=parallel.is_main,
            steps=JobSteps(start=self.start_step, target=self.target, total=self.plan.total_steps),
            log_period=tcfg.log_period,
            num_params=self.engine.num_params,
            hardware=Hardware(
                num_gpus=parallel.world_size if cuda else 0,
                device_name=torch.cuda.get_device_name(parallel.device) if cuda else "",
            ),
        )

    def train(self) -> DoneRecord:
        """Train from the resume point to this job's target step, or until the deadline or a stop signal,
        saving every save_period steps and at the end; returns the done record."""
        if self.engine is None:
            LOG.info(
                "checkpoint %s is at or past this job's target step %d: nothing to train", self.latest.path, self.target
            )
            return self._finish(self.start_step, self.latest.path)
        tcfg, total, target = self.training, self.plan.total_steps, self.target
        step = self.start_step
        last_saved = self.latest.path if self.latest is not None else None
        last_saved_step = step if last_saved is not None else -1
        stop_signal = StopSignal()
        if tcfg.val_at_start and step == 0:
            self.validate(0)
        while step < target:
            if self._should_stop(step, stop_signal):
                break
            t_step = time.perf_counter()
            batch = self.sampler.next_step()
            micro_bins, masked = self._micro_bins(batch, self.dataset)
            lr = self.schedule.apply(step)
            loss, loss_tokens, grad_norm = self.engine.train_step(micro_bins)
            self.train_loss = loss
            overlong_masked = int(self.parallel.dp_sum(masked))
            step += 1
            seconds = time.perf_counter() - t_step
            self.deadline.record_step(seconds)
            self.metrics.log_step(
                step,
                {
                    "loss": loss,
                    "grad_norm": grad_norm,
                    "lr": lr,
                    "tokens_per_second": batch.tokens / seconds,
                    "loss_tokens": int(loss_tokens),
                    "epoch": batch.epoch,
                    "step_seconds": seconds,
                    **self._step_counts(batch, overlong_masked),
                },
            )
            # Before the save of the same step, so that the checkpoint's validation loss is known when it is saved.
            if (tcfg.val_period and step % tcfg.val_period == 0) or (tcfg.val_at_end and step == total):
                self.validate(step)
            if step % tcfg.save_period == 0 and step < target:
                last_saved, last_saved_step = self.save(step), step
        if step != last_saved_step and step > 0:
            last_saved = self.save(step)
        stop_signal.restore()
        self.metrics.close()
        return self._finish(step, last_saved)

    def _micro_bins(self, batch: StepBatch, dataset) -> tuple[list[list[dict]], int]:
        """This rank's micro-batches of the step (or validation batch) of `dataset` as bins (dicts collate_bins
        reads; an empty micro-batch is one padding bin with no loss), and how many of its sequences carry no
        loss token: the over-long ones pack_data masked (it keeps no other sequence without loss tokens)."""
        micro_bins, masked = [], 0
        for micro in batch.rank_micro_batches(self.parallel.dp_rank):
            bins = [join_sequences(dataset, ids) for ids in micro]
            masked += sum(_sequences_without_loss(b) for b in bins)
            micro_bins.append(bins or [join_sequences(dataset, [])])
        return micro_bins, masked

    def _step_counts(self, batch: StepBatch, overlong_masked: int) -> dict:
        """What metrics.jsonl records of a step's data: sequences, tokens, bins, micro-batches, fill, digest."""
        return {
            "sequences": len(batch.sample_ids),
            "tokens": batch.tokens,
            "bins": len(batch.bins),
            "micro_batches": batch.micro_batches,
            "micro_batches_per_rank": batch.micro_batches_per_rank,
            "fill_ratio": round(batch.tokens / (len(batch.bins) * self.packer.capacity), 6),
            "overlong_masked": overlong_masked,
            "samples_digest": batch.digest,
        }

    def save(self, step: int) -> Path:
        """Save step `step`, then (rank 0, once it committed) apply retention; every rank waits for it."""
        start = time.perf_counter()
        self.states["train"].step = step
        metrics = {"train_loss": self.train_loss}
        if step in self.val_losses:
            metrics["val_loss"] = self.val_losses[step]
        path, seconds = self.engine.checkpointer.save(step, self.states, {**self.meta, "metrics": metrics})
        if self.parallel.is_main:
            self._retain(step, path, seconds)
        self.parallel.barrier()
        self.deadline.record_save(time.perf_counter() - start)  # the deadline counts retention in the save
        return path

    def _retain(self, step: int, path: Path, seconds: float) -> None:
        """Rank 0: apply the retention policy to what is on disk, log the save's and the run's bytes."""
        written = directory_bytes(path)
        tcfg = self.training
        result = (
            apply_retention(path.parent, self.retention, tcfg.keep_optimizer_state)
            if tcfg.keep_top_k is not None or tcfg.keep_optimizer_state == "latest"
            else RetentionResult([], [], 0, [])
        )
        count, total = disk_usage(path.parent)
        LOG.info(
            "saved %s (%s) in %.1f s; %d checkpoint%s on disk, %s%s",
            path,
            format_bytes(written),
            seconds,
            count,
            "" if count == 1 else "s",
            format_bytes(total),
            _describe_retention(result, self.retention),
        )
        self.metrics.log_checkpoint(
            step,
            {
                "checkpoint_bytes": written,
                "checkpoints_on_disk": count,
                "checkpoint_bytes_on_disk": total,
                "removed_steps": result.removed,
                "optimizer_dropped_steps": result.optimizer_dropped,
                "freed_bytes": result.freed_bytes,
                "save_seconds": round(seconds, 3),
            },
        )

    def _warn_unranked_saves(self) -> None:
        """Once, at the start: with a validation metric, a save at a step without validation ranks last."""
        tcfg = self.training
        if self.retention.metric_key != "val_loss" or tcfg.keep_top_k is None or not self.parallel.is_main:
            return
        if tcfg.val_period == 0 or tcfg.save_period % tcfg.val_period != 0:
            why = (
                "training.val_period is 0 (validation only at the end)"
                if tcfg.val_period == 0
                else f"training.save_period ({tcfg.save_period}) is not a multiple of training.val_period "
                f"({tcfg.val_period})"
            )
            LOG.warning(
                "%s: checkpoints saved without a validation loss rank below those with one for "
                "training.keep_top_k (%d by %s)",
                why,
                tcfg.keep_top_k,
                tcfg.metric_name,
            )

    def validate(self, step: int) -> float | None:
        """The validation loss after `step` steps (None without validation data): the token-weighted mean over
        every loss token of the validation batches (NeMo-RL's sum of batch loss x tokens / tokens). Recorded in
        self.val_losses and the metrics. Collective."""
        if self.validation is None:
            return None
        loss_sum, tokens, sequences = 0.0, 0, 0
        for batch in self.validation_batches:
            loss, n = self.engine.evaluate(self._micro_bins(batch, self.validation)[0])
            loss_sum, tokens, sequences = loss_sum + loss * n, tokens + n, sequences + len(batch.sample_ids)
        if not tokens:
            LOG.warning("step %d: the validation batches have no loss token (all over-long and masked)", step)
            return None
        self.val_losses[step] = loss = loss_sum / tokens
        self.metrics.log_validation(step, loss, tokens, sequences)
        return loss

    def _resume(self) -> int:
        """Load the latest checkpoint (if any) into every Stateful component; returns its step."""
        if self.latest is None:
            return 0
        t0 = time.perf_counter()
        self.engine.checkpointer.load(self.latest.path, self.states)
        load_seconds = time.perf_counter() - t0
        self.deadline.estimate_save_from_load(load_seconds)
        step, epoch = self.states["train"].step, self.states["sampler"].epoch
        LOG.info("resumed from %s (step %d, epoch %d) in %.1f s", self.latest.path, step, epoch, load_seconds)
        return step

    def _should_stop(self, step: int, stop_signal: StopSignal) -> bool:
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

    def _finish(self, end_step: int, checkpoint: Path | None) -> DoneRecord:
        """Write the done record (rank 0) and wait for every rank."""
        spec, total = self.spec, self.plan.total_steps
        record = DoneRecord(
            job_index=spec.job_index,
            num_jobs=spec.num_jobs,
            start_step=self.start_step,
            end_step=end_step,
            target_step=self.target,
            total_steps=total,
            checkpoint=str(checkpoint) if checkpoint else None,
            ranks=self.ranks,
            schedule_changes=self.schedule_changes,
        )
        if spec.done_file and self.parallel.is_main:
            write_json(spec.done_file, record.to_json())
        self.parallel.barrier()
        LOG.info(
            "job %d done: steps %d -> %d of %d%s",
            spec.job_index,
            self.start_step,
            end_step,
            total,
            " (training complete)" if record.complete else f" ({record.remaining_steps} steps remain)",
        )
        return record

    def _log_plan(self, seq_len: int, has_deadline: bool) -> None:
        spec, plan, parallel = self.spec, self.plan, self.parallel
        LOG.info(
            "job %d/%d: %d sequences, %d per step (packed per step into bins of %d tokens%s), %d steps per epoch, "
            "total %d steps, this job trains to step %d%s; world %d = dp %d x tp %d, micro-batch %d bins",
            spec.job_index,
            spec.num_jobs,
            plan.num_sequences,
            plan.global_batch,
            seq_len,
            "" if self.packer.enabled else ", one sequence per bin: packing.enabled is false",
            plan.steps_per_epoch,
            plan.total_steps,
            self.target,
            "" if not has_deadline else " or until its deadline",
            parallel.world_size,
            parallel.dp_size,
            parallel.tp,
            plan.micro_batch,
        )
