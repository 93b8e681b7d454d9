"""One chained training job, top to bottom: set up, resume, train until the job's target step or deadline, save.

Job i of N trains until step ceil(total_steps x (i+1) / N), where

    total_steps = min(max_num_steps, max_num_epochs x floor(bins / train_global_batch_size)).

It resumes from the latest complete checkpoint, whichever job wrote it; if that checkpoint is already
at or past the target it only writes its done-file. Each optimizer step:

1. every dp rank collates its micro-batches (the global batch split by BinSampler);
2. the number of loss tokens of the *whole* global batch is summed over micro-batches and dp ranks
   before any backward, so each micro-batch's backward uses  sum of token losses / global count;
3. FSDP sums (not averages) gradients over dp ranks, so the update equals a single process running the
   whole global batch, whatever the split into ranks and micro-batches;
4. gradient-norm clipping over the sharded gradients, AdamW, warmup + cosine learning rate.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
import types
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from sftflow.errors import SftflowError
from sftflow.io import write_json
from sftflow.train.attention import resolve_kernel
from sftflow.train.checkpoint import Checkpointer, fault_point, latest_checkpoint, read_meta
from sftflow.train.config import check_training_keys, check_training_matches
from sftflow.train.data import BinSampler, TrainingPlan, eval_batches, job_target_step
from sftflow.train.deadline import Deadline, StopSignal
from sftflow.train.lr_schedule import WarmupCosineSchedule, lr_at
from sftflow.train.metrics import MetricsLogger
from sftflow.train.model import build_model, count_parameters, model_inputs
from sftflow.train.parallel import ParallelDims, init_parallel

LOG = logging.getLogger("sftflow.train")
IGNORE_INDEX = -100


@dataclass
class JobSpec:
    """Where one chained job reads and writes (the command line of scripts/train.py)."""

    packed: str
    model: str
    checkpoint_dir: str
    job_index: int = 0
    num_jobs: int = 1
    done_file: str | None = None
    metrics_dir: str | None = None
    tokenizer: str | None = None
    chat_template: str | None = None


def data_fingerprint(packed_dir: str | os.PathLike) -> str:
    """Identifies the packed data a checkpoint was trained on (its index.json lists every shard's counts)."""
    return hashlib.sha256((Path(packed_dir) / "index.json").read_bytes()).hexdigest()[:16]


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of the cross-entropies of all target tokens (in fp32, whatever the compute dtype)."""
    return F.cross_entropy(
        logits.float().view(-1, logits.shape[-1]), targets.view(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


# training.loss_chunk_tokens: null chunks the loss when a micro-batch's fp32 logits would exceed this many
# bytes, in chunks of at most this many bytes of fp32 logits.
LOGITS_BUDGET_BYTES = 256 * 2**20
# Model config keys of a transform between lm_head and the logits (Gemma's softcapping, Cohere's and Granite's
# scaling) that the chunked loss does not reproduce; it only computes lm_head(final hidden states).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")
CHUNKED_LOSS_METHOD = "sftflow_chunked_loss_sum"


def loss_chunk_size(setting: int | None, num_tokens: int, vocab_size: int) -> int:
    """Tokens per loss chunk for a micro-batch of `num_tokens` (0: compute the logits in one piece).

    `setting` is training.loss_chunk_tokens: a positive number is the chunk size, 0 never chunks, and None
    chunks when the micro-batch's fp32 logits would exceed LOGITS_BUDGET_BYTES, in the largest chunks
    within that budget (e.g. 8,192 tokens x 151,936 vocabulary: 4.6 GiB of logits -> chunks of 441 tokens).
    """
    if setting is not None:
        return int(setting)
    if num_tokens * vocab_size * 4 <= LOGITS_BUDGET_BYTES:
        return 0
    return max(1, LOGITS_BUDGET_BYTES // (4 * vocab_size))


def _chunk_loss_sum(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return token_loss_sum(head(hidden), targets)


def chunked_token_loss_sum(
    hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, chunk_tokens: int
) -> torch.Tensor:
    """token_loss_sum(head(hidden), targets), computed `chunk_tokens` tokens at a time.

    With gradients each chunk runs under activation checkpointing: its logits (and their fp32 copy) are
    dropped after the chunk's loss and recomputed, chunk by chunk, in the backward pass, so only one
    chunk's [chunk_tokens, vocab] logits exist at once. `head` is called as a module (its hooks run).
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    grad = torch.is_grad_enabled() and hidden.requires_grad
    total = None
    for h, t in zip(hidden.split(chunk_tokens), targets.split(chunk_tokens)):
        part = checkpoint(_chunk_loss_sum, head, h, t, use_reentrant=False) if grad else _chunk_loss_sum(head, h, t)
        total = part if total is None else total + part
    return total


def _chunked_loss_forward(model: torch.nn.Module, inputs: dict, targets: torch.Tensor, chunk_tokens: int):
    """What model(**inputs).logits feeds into token_loss_sum, without the full logits: the decoder's final
    (normed) hidden states, then lm_head chunk by chunk."""
    hidden = model.get_decoder()(**inputs).last_hidden_state
    return chunked_token_loss_sum(hidden, targets, model.get_output_embeddings(), chunk_tokens)


def chunked_loss_unsupported(model: torch.nn.Module) -> str | None:
    """Why the chunked loss cannot stand in for the model's own logits, or None when it can."""
    config = getattr(model, "config", None)
    for key in _LOGIT_TRANSFORMS:
        if getattr(config, key, None) not in (None, 1, 1.0):
            return f"the model transforms its logits after lm_head (config {key}={getattr(config, key)})"
    if not callable(getattr(model, "get_decoder", None)) or model.get_output_embeddings() is None:
        return f"model class {type(model).__name__} has no decoder / output embeddings to call separately"
    return None


def attach_chunked_loss(model: torch.nn.Module) -> None:
    """Give `model` the method CHUNKED_LOSS_METHOD(inputs, targets, chunk_tokens) -> loss sum.

    With FSDP2 the root unit (embeddings, final norm, lm_head; tied or not) holds sharded parameters that
    its forward hooks gather: registering the method as an FSDP forward method runs those hooks around it
    (as around forward), so the decoder and every lm_head chunk see the gathered weights, the root stays
    gathered into the backward pass (FSDP keeps the root unsharded after forward), and the gradients are
    reduce-scattered at the end of the backward pass as after a plain forward. Without FSDP it is a method.
    """
    setattr(model, CHUNKED_LOSS_METHOD, types.MethodType(_chunked_loss_forward, model))
    register_fsdp_forward_method(model, CHUNKED_LOSS_METHOD)


def clip_grad_norm(parameters: list[torch.nn.Parameter], max_norm: float | None) -> float:
    """Total L2 norm of all gradients (sharded by FSDP and/or TP) and, with `max_norm`, clip them to it.

    Each rank sums the squares of its local gradient shards, grouped by DTensor layout; a group's sum
    is all-reduced over the mesh dimensions its gradients are sharded on (not over replicated ones,
    which would count a replica twice). A final MAX over all ranks makes every rank use the very same
    value, so the clipped updates cannot drift apart by rounding.
    """
    groups: dict[object, list[torch.Tensor]] = defaultdict(list)
    for p in parameters:
        if p.grad is not None:
            g = p.grad
            key = (g.device_mesh, tuple(g.placements)) if isinstance(g, DTensor) else None
            groups[key].append(g)
    device = next((p.device for p in parameters), torch.device("cpu"))
    total_sq = torch.zeros((), dtype=torch.float64, device=device)
    for key, grads in groups.items():
        local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
        group_sq = torch.stack([n.double() ** 2 for n in torch._foreach_norm(local)]).sum()
        if key is not None:
            mesh, placements = key
            for dim, placement in enumerate(placements):
                if placement.is_partial():
                    raise RuntimeError(f"gradient with pending reduction {placements} cannot be clipped")
                if placement.is_shard():
                    dist.all_reduce(group_sq, group=mesh.get_group(dim))
        total_sq += group_sq
    if dist.is_initialized():
        dist.all_reduce(total_sq, op=dist.ReduceOp.MAX)
    total = float(total_sq.sqrt())
    if max_norm is not None and total > max_norm:
        coef = max_norm / (total + 1e-6)
        for grads in groups.values():
            torch._foreach_mul_(grads, coef)
    return total


def eval_micro_batches(dataset, parallel, micro_batch: int) -> list[list[dict]]:
    """This dp rank's micro-batches (lists of bins) for a pass over every bin of `dataset`.

    Every rank gets the same number of micro-batches (the forwards are collective): ranks short of data
    get a one-token dummy bin that carries no loss."""
    pad = int(dataset.index["pad_token_id"])
    per_rank = math.ceil(len(dataset) / parallel.dp_size)
    num_batches = math.ceil(per_rank / micro_batch)
    dummy = {"input_ids": [pad], "loss_mask": [False], "seq_lens": [1]}
    batches = list(eval_batches(len(dataset), micro_batch, parallel.dp_rank, parallel.dp_size))
    return [[dataset.get_bin(i) for i in batches[k]] if k < len(batches) else [dummy] for k in range(num_batches)]


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
    mine = f"{node}/{os.environ.get('LOCAL_RANK', '0')}"
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
    meta: dict, fingerprint: str, spec: JobSpec, path: Path, current: dict, training: dict
) -> None:
    from sftflow.megatron.checkpoint import check_layout

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
    check_training_matches(meta.get("training"), training, path)


def _schedule_changes(saved: dict, step: int, total_steps: int, tcfg: dict) -> list[dict]:
    """The run's record of total-step changes; a resume with another total (max_num_steps or max_num_epochs
    changed) appends one and says so: the cosine decay is recomputed over the new total from this step on."""
    changes = list(saved.get("schedule_changes", []))
    before = saved.get("total_steps")
    if before is not None and before != total_steps:
        rates = {
            total: lr_at(
                step,
                peak=tcfg["learning_rate"],
                minimum=tcfg["min_learning_rate"],
                warmup=tcfg["warmup_steps"],
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


def mixed_precision_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The compute dtype of FSDP's mixed precision (None: plain fp32). bf16 compute with fp32 master weights
    and fp32 gradient reduction on GPU; a CPU run trains in fp32 (bf16 matmuls are slow on most CPUs), though
    the same bf16 path runs on CPU too (tests/train/test_mixed_precision.py)."""
    return torch.bfloat16 if precision == "bf16" and device.type == "cuda" else None


class FsdpEngine:
    """The fsdp backend: a HF model sharded with FSDP2 (and DTensor TP), AdamW, DCP checkpoints.

    The engine contract, shared with sftflow.megatron.engine.MegatronEngine (run_job drives either):
    `optimizer` (its param_groups get the learning rate), `num_params`, `train_step(micro_bins)`,
    `evaluate(dataset, micro_batch)`, `save(step, train_state, meta)`, `load(path)`, `meta()`.
    """

    def __init__(self, cfg: dict, spec: JobSpec, parallel: ParallelDims, seq_len: int, pad_id: int) -> None:
        tcfg = cfg["training"]
        self.parallel, self.seq_len, self.pad_id, self.max_grad_norm = parallel, seq_len, pad_id, tcfg["max_grad_norm"]
        param_dtype = mixed_precision_dtype(tcfg["precision"], parallel.device)
        self.model = build_model(
            spec.model,
            parallel,
            param_dtype=param_dtype,
            activation_checkpointing=tcfg["activation_checkpointing"],
            max_seq_len=seq_len,
        )
        self.attention = resolve_kernel(
            tcfg.get("attention", "auto"),
            parallel.device,
            param_dtype or torch.float32,
            float(getattr(self.model.config, "attention_dropout", 0.0) or 0.0),
        )
        LOG.info("packed attention: %s (training.attention: %s)", self.attention, tcfg.get("attention", "auto"))
        self.params = list(self.model.parameters())
        # As in HF Trainer: no weight decay on biases and norm weights (1-D parameters).
        decay = [p for p in self.params if p.ndim >= 2]
        no_decay = [p for p in self.params if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": tcfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
            lr=tcfg["learning_rate"],
            betas=(tcfg["adam_beta1"], tcfg["adam_beta2"]),
            eps=tcfg["adam_eps"],
        )
        self.num_params = count_parameters(self.model)
        self.loss_chunk_tokens = tcfg.get("loss_chunk_tokens")
        self.vocab_size = self.model.get_output_embeddings().out_features
        unsupported = chunked_loss_unsupported(self.model)
        if parallel.tp > 1:  # lm_head's output is sharded over the TP ranks there; not built for that yet
            unsupported = "not with tensor parallelism (training.tensor_model_parallel_size > 1) yet"
        if unsupported and self.loss_chunk_tokens:
            raise SftflowError(f"config key 'training.loss_chunk_tokens' ({self.loss_chunk_tokens}): {unsupported}")
        if unsupported:
            self.loss_chunk_tokens = 0
        else:
            attach_chunked_loss(self.model)
        self.checkpointer = Checkpointer(spec.checkpoint_dir, parallel)

    def meta(self) -> dict:
        return {"backend": "fsdp", "tensor_model_parallel_size": self.parallel.tp}

    def loss_sum(self, batch: dict) -> torch.Tensor:
        """Sum of the token losses of one collated micro-batch: the model's full logits, or chunked
        (training.loss_chunk_tokens) so that only one chunk's logits exist at a time."""
        device = self.parallel.device
        inputs, targets = model_inputs(batch, device, self.attention), batch["targets"].to(device)
        chunk = loss_chunk_size(self.loss_chunk_tokens, targets.numel(), self.vocab_size)
        if chunk <= 0:
            return token_loss_sum(self.model(**inputs).logits, targets)
        return getattr(self.model, CHUNKED_LOSS_METHOD)(inputs, targets, chunk)

    def train_step(self, micro_bins: list[list[dict]]) -> tuple[float, float, float]:
        """One optimizer step over this rank's micro-batches; returns (mean token loss, loss tokens, grad norm)."""
        from sftflow.packing import collate_bins

        device = self.parallel.device
        batches = [collate_bins(bins, self.seq_len, self.pad_id) for bins in micro_bins]
        global_count = self.parallel.dp_sum(sum(b["num_loss_tokens"] for b in batches))
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # no host sync per micro-batch
        for batch in batches:
            micro_loss = self.loss_sum(batch)
            (micro_loss / max(global_count, 1.0)).backward()
            loss_sum += micro_loss.detach().double()
            del micro_loss
        grad_norm = clip_grad_norm(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self.parallel.dp_sum(float(loss_sum)) / max(global_count, 1.0), global_count, grad_norm

    def evaluate(self, dataset, micro_batch: int) -> tuple[float, int]:
        """Mean token loss over every bin of `dataset` (each dp rank takes a stride of the bins)."""
        from sftflow.packing import collate_bins

        loss_sum, count = 0.0, 0
        self.model.eval()
        with torch.no_grad():
            for bins in eval_micro_batches(dataset, self.parallel, micro_batch):
                batch = collate_bins(bins, self.seq_len, self.pad_id)
                loss_sum += float(self.loss_sum(batch))
                count += batch["num_loss_tokens"]
        self.model.train()
        total_count = int(self.parallel.dp_sum(count))
        return self.parallel.dp_sum(loss_sum) / max(total_count, 1), total_count

    def save(self, step: int, train_state: dict, meta: dict) -> tuple[Path, float]:
        return self.checkpointer.save(step, self.model, self.optimizer, train_state, meta)

    def load(self, path: Path) -> dict:
        return self.checkpointer.load(path, self.model, self.optimizer)


def init_training_parallel(tcfg: dict):
    """The process group and parallel layout of the configured backend."""
    if tcfg["backend"] == "megatron":
        from sftflow.megatron.engine import init_megatron_parallel

        return init_megatron_parallel(tcfg)
    return init_parallel(tcfg["tensor_model_parallel_size"])


def build_engine(cfg: dict, spec: JobSpec, parallel, seq_len: int, pad_id: int):
    if cfg["training"]["backend"] == "megatron":
        from sftflow.megatron.engine import MegatronEngine

        return MegatronEngine(cfg, spec, parallel, seq_len, pad_id)
    return FsdpEngine(cfg, spec, parallel, seq_len, pad_id)


def run_job(cfg: dict, spec: JobSpec, parallel: ParallelDims | None = None, clock=time.time) -> dict:
    """Run one chained job; returns (and writes to spec.done_file) the done record. Collective.

    `clock` (wall-clock seconds) drives the deadline; tests pass a fake one.
    """
    t_process_start = clock()
    tcfg = cfg["training"]
    parallel = parallel or init_training_parallel(tcfg)
    check_training_keys(cfg, world_size=parallel.world_size)
    ranks = rank_placement(parallel)
    LOG.info("ranks (node/local rank): %s", ", ".join(ranks))
    torch.manual_seed(tcfg["seed"])
    random.seed(tcfg["seed"])

    # --- data and the step plan -------------------------------------------------------------------
    from sftflow.packing import PackedDataset

    dataset = PackedDataset(spec.packed)
    seq_len = int(dataset.index["max_total_sequence_length"])
    pad_id = int(dataset.index["pad_token_id"])
    plan = TrainingPlan.make(tcfg, len(dataset), parallel.dp_size)
    # Only rank 0 asks Slurm for the end time (hundreds of ranks must not all call squeue) and decides when
    # to stop; the stop flag reaches the other ranks through the loop's per-step all-reduce.
    deadline = (
        Deadline.from_config(
            tcfg["time_limit"], tcfg["time_margin_seconds"], t_process_start, dict(os.environ), clock=clock
        )
        if parallel.is_main
        else Deadline(None, tcfg["time_margin_seconds"], clock=clock)
    )
    has_deadline = parallel.any_rank(deadline.end_time is not None)
    # Without a deadline job i of N trains its equal share. With one (a Slurm job, or training.time_limit)
    # it trains on towards the end until the deadline stops it, as NeMo-RL's chained jobs do: a job that
    # finishes early leaves the later ones nothing to do, and one that stops early is caught up by the next.
    share = job_target_step(plan.total_steps, spec.job_index, spec.num_jobs)
    target = plan.total_steps if has_deadline else share
    fingerprint = data_fingerprint(spec.packed)
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

    # --- resume point -----------------------------------------------------------------------------
    checkpointer = Checkpointer(spec.checkpoint_dir, parallel)
    checkpointer.clean_partial()
    latest = latest_checkpoint(spec.checkpoint_dir)
    saved_meta = read_meta(latest.path) if latest is not None else {}
    if latest is not None:
        current = {"backend": tcfg["backend"], **(parallel.layout() if tcfg["backend"] == "megatron" else {})}
        _check_resume_compatible(saved_meta, fingerprint, spec, latest.path, current, tcfg)
    if latest is not None and latest.step >= target:
        LOG.info("checkpoint %s is at or past this job's target step %d: nothing to train", latest.path, target)
        record = _done_record(
            spec, latest.step, latest.step, plan, target, latest.path, ranks, saved_meta.get("schedule_changes", [])
        )
        if spec.done_file and parallel.is_main:
            write_json(spec.done_file, record)
        parallel.barrier()
        return record

    # --- model, optimizer, schedule ---------------------------------------------------------------
    engine = build_engine(cfg, spec, parallel, seq_len, pad_id)
    schedule = WarmupCosineSchedule(
        engine.optimizer,
        peak=tcfg["learning_rate"],
        minimum=tcfg["min_learning_rate"],
        warmup=tcfg["warmup_steps"],
        total=plan.total_steps,
    )
    sampler = BinSampler(plan, parallel.dp_rank, tcfg["seed"])

    step = 0
    if latest is not None:
        t0 = time.perf_counter()
        state = engine.load(latest.path)
        step = state["step"]
        sampler.load_state_dict(state)
        schedule.load_state_dict(state["scheduler"])
        load_seconds = time.perf_counter() - t0
        deadline.estimate_save_from_load(load_seconds)
        LOG.info("resumed from %s (step %d, epoch %d) in %.1f s", latest.path, step, sampler.epoch, load_seconds)
    start_step = step
    schedule_changes = _schedule_changes(saved_meta, step, plan.total_steps, tcfg)

    validation = _prepare_validation(cfg, spec, parallel)
    meta = {
        "data_fingerprint": fingerprint,
        "model": spec.model,
        "total_steps": plan.total_steps,
        "world_size": parallel.world_size,
        "num_params": engine.num_params,
        **engine.meta(),
        "training": tcfg,
        "schedule_changes": schedule_changes,
    }
    metrics = MetricsLogger(
        spec.metrics_dir or Path(spec.checkpoint_dir) / "metrics",
        enabled=parallel.is_main,
        total_steps=plan.total_steps,
        target_step=target,
        start_step=start_step,
        log_period=tcfg["log_period"],
        num_params=engine.num_params,
        num_gpus=parallel.world_size if parallel.device.type == "cuda" else 0,
        device_name=torch.cuda.get_device_name(parallel.device) if parallel.device.type == "cuda" else "",
    )

    def save(at_step: int) -> Path:
        train_state = {"step": at_step, **sampler.state_dict(), "scheduler": schedule.state_dict()}
        path, seconds = engine.save(at_step, train_state, meta)
        deadline.record_save(seconds)
        LOG.info("saved %s in %.1f s", path, seconds)
        return path

    def validate(at_step: int) -> None:
        if validation is not None:
            loss, n = engine.evaluate(validation, plan.micro_batch)
            metrics.log_validation(at_step, loss, n)

    # --- the loop ---------------------------------------------------------------------------------
    last_saved = latest.path if latest is not None else None
    last_saved_step = start_step if latest is not None else -1
    stopped_early = False
    stop_signal = StopSignal()
    while step < target:
        out_of_time = parallel.is_main and deadline.should_stop()
        if parallel.any_rank(out_of_time or stop_signal.received is not None):
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
            stopped_early = True
            break
        t_step = time.perf_counter()
        micro_bins = [[dataset.get_bin(i) for i in ids] for ids in sampler.next_step()]
        real_tokens = parallel.dp_sum(sum(len(b["input_ids"]) for bins in micro_bins for b in bins))
        lr = schedule.apply(step)
        loss, global_count, grad_norm = engine.train_step(micro_bins)
        step += 1
        fault_point("step", step)
        seconds = time.perf_counter() - t_step
        deadline.record_step(seconds)
        metrics.log_step(
            step,
            {
                "loss": loss,
                "grad_norm": grad_norm,
                "lr": lr,
                "tokens_per_second": real_tokens / seconds,
                "loss_tokens": int(global_count),
                "epoch": sampler.epoch,
                "step_seconds": seconds,
            },
        )
        if tcfg["val_period"] and step % tcfg["val_period"] == 0 and step < plan.total_steps:
            validate(step)
        if step % tcfg["save_period"] == 0 and step < target:
            last_saved, last_saved_step = save(step), step

    if step != last_saved_step and step > 0:
        last_saved = save(step)
    stop_signal.restore()
    if step >= plan.total_steps and not stopped_early:
        validate(step)
    metrics.close()
    record = _done_record(spec, start_step, step, plan, target, last_saved, ranks, schedule_changes)
    if spec.done_file and parallel.is_main:
        write_json(spec.done_file, record)
    parallel.barrier()
    LOG.info(
        "job %d done: steps %d -> %d of %d%s",
        spec.job_index,
        start_step,
        step,
        plan.total_steps,
        " (training complete)" if record["complete"] else f" ({record['remaining_steps']} steps remain)",
    )
    return record
