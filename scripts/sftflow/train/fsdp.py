"""The fsdp backend's engine: a HF model sharded with FSDP2 (and DTensor tensor parallelism), AdamW, DCP checkpoints.

Each optimizer step (`FsdpEngine.train_step`):

1. the number of loss tokens of the *whole* global batch is summed over micro-batches and dp ranks
   before any backward, so each micro-batch's backward uses  sum of token losses / global count;
   a mixture-of-experts model adds megatron-core's router load-balancing loss to that sum, scaled as
   megatron-core scales it (`training.moe_aux_loss_coeff`; sftflow.train.loss.router_load_balancing_loss),
   so both backends train the same objective;
2. FSDP sums (not averages) gradients over dp ranks, so the update equals a single process running the
   whole global batch, whatever the split into ranks and micro-batches;
3. gradient-norm clipping over the sharded gradients, then AdamW.

Its checkpoints are DCP state dicts (sftflow.train.checkpoint) with full-model parameter names, so they
resume under any dp x tp layout and export streaming, a few tensors at a time (`FsdpEngine.hf_weights`).
"""

from __future__ import annotations

import logging
import warnings
from collections import defaultdict
from pathlib import Path
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from sftflow.errors import SftflowError
from sftflow.train.attention import resolve_kernel
from sftflow.train.checkpoint import Checkpointer
from sftflow.train.engine import JobSpec
from sftflow.train.loss import (
    CHUNKED_LOSS_METHOD,
    attach_chunked_loss,
    chunked_loss_unsupported,
    loss_chunk_size,
    moe_aux_loss_coeff,
    router_load_balancing_loss,
    token_loss_sum,
)
from sftflow.train.model import build_model, count_parameters, model_inputs
from sftflow.train.parallel import ParallelDims, init_parallel
from sftflow.train.settings import TrainingConfig

LOG = logging.getLogger("sftflow.train")
MODEL_PREFIX = "model."


def mixed_precision_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The compute dtype of FSDP's mixed precision (None: plain fp32). bf16 compute with fp32 master weights
    and fp32 gradient reduction on GPU; a CPU run trains in fp32 (bf16 matmuls are slow on most CPUs), though
    the same bf16 path runs on CPU too (tests/train/test_mixed_precision.py)."""
    return torch.bfloat16 if precision == "bf16" and device.type == "cuda" else None


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


class FsdpEngine:
    """The fsdp backend's Engine (sftflow.train.engine): see the module docstring."""

    name: ClassVar[str] = "fsdp"

    def __init__(self, tcfg: TrainingConfig, spec: JobSpec, parallel: ParallelDims, seq_len: int, pad_id: int) -> None:
        self.parallel, self.seq_len, self.pad_id, self.max_grad_norm = parallel, seq_len, pad_id, tcfg.max_grad_norm
        param_dtype = mixed_precision_dtype(tcfg.precision, parallel.device)
        self.model = build_model(
            spec.model,
            parallel,
            param_dtype=param_dtype,
            activation_checkpointing=tcfg.activation_checkpointing,
            max_seq_len=seq_len,
        )
        self.attention = resolve_kernel(
            tcfg.attention,
            parallel.device,
            param_dtype or torch.float32,
            float(getattr(self.model.config, "attention_dropout", 0.0) or 0.0),
        )
        LOG.info("packed attention: %s (training.attention: %s)", self.attention, tcfg.attention)
        self.params = list(self.model.parameters())
        # As in HF Trainer: no weight decay on biases and norm weights (1-D parameters).
        decay = [p for p in self.params if p.ndim >= 2]
        no_decay = [p for p in self.params if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=tcfg.learning_rate,
            betas=(tcfg.adam_beta1, tcfg.adam_beta2),
            eps=tcfg.adam_eps,
        )
        self.num_params = count_parameters(self.model)
        self.loss_chunk_tokens = tcfg.loss_chunk_tokens
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
        model_config = self.model.config.to_dict()
        self.moe_aux_loss_coeff = moe_aux_loss_coeff(tcfg.moe_aux_loss_coeff, model_config)
        self.moe_top_k = int(model_config.get("num_experts_per_tok") or 0)
        if self.moe_aux_loss_coeff:
            LOG.info("MoE router load-balancing loss: aux_loss, coefficient %g", self.moe_aux_loss_coeff)
        self.checkpointer = Checkpointer(spec.checkpoint_dir, parallel)

    @classmethod
    def init_parallel(cls, training: TrainingConfig) -> ParallelDims:
        return init_parallel(training.tensor_model_parallel_size)

    @classmethod
    def resume_layout(cls, parallel: ParallelDims) -> dict[str, int]:
        return {}  # DCP reshards: any dp x tp layout resumes any checkpoint

    @staticmethod
    def hf_weights(checkpoint: Path, base_model: str):
        """Shapes from the DCP metadata; the reader loads only the named tensors (a few at a time)."""
        tensors = model_tensors(checkpoint)
        shapes = {n: (tuple(m.size), m.properties.dtype) for n, m in tensors.items()}
        return shapes, lambda names: read_model_tensors(checkpoint, names, tensors)

    def meta(self) -> dict:
        return {"backend": self.name, "tensor_model_parallel_size": self.parallel.tp}

    def loss_sum(self, batch: dict) -> torch.Tensor:
        """Sum of the token losses of one collated micro-batch: the model's full logits, or chunked
        (training.loss_chunk_tokens) so that only one chunk's logits exist at a time."""
        return self._forward_loss(batch, router_logits=False)

    def _forward_loss(self, batch: dict, router_logits: bool):
        """loss_sum; with `router_logits`, (loss_sum, the routers' logits per MoE layer: HF's output_router_logits)."""
        device = self.parallel.device
        inputs, targets = model_inputs(batch, device, self.attention), batch["targets"].to(device)
        chunk = loss_chunk_size(self.loss_chunk_tokens, targets.numel(), self.vocab_size)
        if chunk > 0:
            return getattr(self.model, CHUNKED_LOSS_METHOD)(inputs, targets, chunk, router_logits=router_logits)
        if not router_logits:
            return token_loss_sum(self.model(**inputs).logits, targets)
        out = self.model(**inputs, output_router_logits=True)
        return token_loss_sum(out.logits, targets), tuple(getattr(out, "router_logits", None) or ())

    def train_loss(self, bins: list[dict], batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of token losses, the loss to differentiate) of one micro-batch: for a mixture-of-experts model
        the second adds moe_aux_loss_coeff x router_load_balancing_loss over the micro-batch's real tokens."""
        if not self.moe_aux_loss_coeff:
            loss = self.loss_sum(batch)
            return loss, loss
        loss, router_logits = self._forward_loss(batch, router_logits=True)
        if not router_logits:
            raise SftflowError(
                f"config key 'training.moe_aux_loss_coeff' ({self.moe_aux_loss_coeff}): model class "
                f"{type(self.model).__name__} returns no router logits (HF's output_router_logits), so backend fsdp "
                "cannot add the load-balancing loss; set it to 0"
            )
        seq_len = batch["input_ids"].shape[1]
        lengths = torch.tensor([len(b["input_ids"]) for b in bins])
        real = torch.arange(seq_len)[None, :] < lengths[:, None]  # the rest of each row is padding
        balance = router_load_balancing_loss(router_logits, real, self.moe_top_k)
        return loss, loss + self.moe_aux_loss_coeff * balance

    def train_step(self, micro_bins: list[list[dict]]) -> tuple[float, float, float]:
        """One optimizer step over this rank's micro-batches; returns (mean token loss, loss tokens, grad norm).
        The mean token loss leaves the MoE load-balancing term out, as megatron-core's loss does."""
        from sftflow.packing import collate_bins

        device = self.parallel.device
        batches = [collate_bins(bins, self.seq_len, self.pad_id) for bins in micro_bins]
        global_count = self.parallel.dp_sum(sum(b["num_loss_tokens"] for b in batches))
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # no host sync per micro-batch
        for bins, batch in zip(micro_bins, batches):
            micro_loss, objective = self.train_loss(bins, batch)
            (objective / max(global_count, 1.0)).backward()
            loss_sum += micro_loss.detach().double()
            del micro_loss, objective
        grad_norm = clip_grad_norm(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self.parallel.dp_sum(float(loss_sum)) / max(global_count, 1.0), global_count, grad_norm

    def evaluate(self, micro_bins: list[list[dict]]) -> tuple[float, int]:
        """Mean token loss and loss tokens of one validation batch (this rank's micro-batches, as train_step's)."""
        from sftflow.packing import collate_bins

        loss_sum, count = 0.0, 0
        self.model.eval()
        with torch.no_grad():
            for bins in micro_bins:
                batch = collate_bins(bins, self.seq_len, self.pad_id)
                loss_sum += float(self.loss_sum(batch))
                count += batch["num_loss_tokens"]
        self.model.train()
        total_count = int(self.parallel.dp_sum(count))
        return self.parallel.dp_sum(loss_sum) / max(total_count, 1), total_count

    def state_dict(self) -> dict:
        """Model and optimizer state under full-model parameter names (DCP saves each rank's shards)."""
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state: dict) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def model_tensors(checkpoint: str | Path) -> dict[str, TensorStorageMetadata]:
    """HF parameter name -> DCP tensor metadata, for the model part of a checkpoint."""
    metadata = FileSystemReader(str(checkpoint)).read_metadata()
    return {
        key[len(MODEL_PREFIX) :]: md
        for key, md in metadata.state_dict_metadata.items()
        if key.startswith(MODEL_PREFIX) and isinstance(md, TensorStorageMetadata)
    }


def read_model_tensors(
    checkpoint: Path, names: list[str], tensors: dict[str, TensorStorageMetadata]
) -> dict[str, torch.Tensor]:
    """The named model tensors of a DCP checkpoint, loaded in this process alone."""
    want = {MODEL_PREFIX + n: torch.empty(tuple(tensors[n].size), dtype=tensors[n].properties.dtype) for n in names}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(want, checkpoint_id=str(checkpoint), no_dist=True)
    return {n: want[MODEL_PREFIX + n] for n in names}
