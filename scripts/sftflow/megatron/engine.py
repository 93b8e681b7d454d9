"""The megatron backend's training engine: megatron-core GPTModel, its DDP and distributed optimizer.

The `Trainer` (sftflow.train.trainer) drives it exactly like the fsdp engine: same data order, packing, step
plan, chained jobs, deadlines, learning-rate schedule, metrics and done-records. What differs:

* parallel state: megatron-core's `parallel_state` with tensor / pipeline / context / expert /
  expert-tensor parallel sizes from the config; data parallel is what is left of the world;
* the model: GPTModel from the HF config (sftflow.megatron.hf_config), HF weights imported and
  sharded for this rank (sftflow.megatron.weights); Transformer Engine layers when it is installed
  (THD packed attention, context parallelism), megatron-core's own layers otherwise (a block-diagonal
  attention mask, no context parallelism);
* a step: megatron-core's forward/backward schedule (1F1B across pipeline stages) with
  `calculate_per_token_loss`, so each micro-batch's loss is its sum of token losses and the reduced
  gradients are divided by the loss tokens of the whole global batch, the fsdp backend's normalisation;
  the loss computes the logits from the final hidden states in chunks of tokens (sftflow.megatron.loss,
  training.loss_chunk_tokens), so the full fp32 logits of a long micro-batch never exist at once;
  then the distributed optimizer (fp32 main weights and Adam moments sharded over data parallel,
  gradient-norm clipping);
* a mixture-of-experts model trains megatron-core's router load-balancing loss (`aux_loss`) with the
  coefficient of training.moe_aux_loss_coeff (sftflow.train.loss.moe_aux_loss_coeff), over the real
  tokens only: the padding this engine adds for pipeline shapes, sequence or context parallelism is
  masked out of routing statistics (GPTModel's padding_mask), so every layout trains the same objective
  as the fsdp backend (sftflow.train.loss.router_load_balancing_loss says how megatron-core scales it);
* checkpoints (sftflow.megatron.checkpoint): per-rank model shards as safetensors and the optimizer
  shards, committed by the same rename as the fsdp backend's.

megatron-core's training path runs on CUDA only.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import ClassVar

import torch
import torch.distributed as dist

from sftflow.errors import SftflowError
from sftflow.megatron.batches import ContextShard, megatron_micro_batch
from sftflow.megatron.hf_config import model_layout, padded_vocab_size
from sftflow.megatron.loss import OutputLayerLoss
from sftflow.train.loss import moe_aux_loss_coeff
from sftflow.train.parallel import LaunchEnvironment, ParallelDims, init_process_group
from sftflow.train.settings import TrainingConfig

LOG = logging.getLogger("sftflow.train")


def transformer_engine_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def _patch_moe_router_without_te() -> None:
    """megatron-core 0.16.1's MoE router reads `moe_utils.te_general_gemm`, which that module only defines when
    Transformer Engine imports (NameError otherwise); None is the value its own fallback (torch.mm) expects."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def init_megatron_parallel(tcfg: TrainingConfig, timeout_minutes: float = 30.0) -> ParallelDims:
    """Process group plus megatron-core's parallel state for the training config's sizes."""
    if not torch.cuda.is_available():
        raise SftflowError(
            "config key 'training.backend' is 'megatron', but this process sees no CUDA GPU: megatron-core's "
            "training path (its DDP buffers, distributed optimizer and attention) runs on CUDA only; use "
            "backend: fsdp on CPU"
        )
    # megatron-core orders tensor-parallel communication behind compute on one CUDA queue (as Megatron-LM sets it)
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    env, device = init_process_group(timeout_minutes)
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tcfg.tensor_model_parallel_size,
            pipeline_model_parallel_size=tcfg.pipeline_model_parallel_size,
            context_parallel_size=tcfg.context_parallel_size,
            expert_model_parallel_size=tcfg.expert_model_parallel_size,
            expert_tensor_parallel_size=tcfg.expert_tensor_parallel_size,
        )
    return megatron_parallel_dims(env, device)


def megatron_parallel_dims(env: LaunchEnvironment, device: torch.device) -> ParallelDims:
    """The layout that megatron-core's (initialised) parallel state describes, for this rank."""
    from megatron.core import parallel_state as ps

    return ParallelDims(
        world_size=env.world_size,
        rank=env.rank,
        local_rank=env.local_rank,
        local_world_size=env.local_world_size,
        device=device,
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        cp=ps.get_context_parallel_world_size(),
        ep=ps.get_expert_model_parallel_world_size(),
        etp=ps.get_expert_tensor_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        cp_rank=ps.get_context_parallel_rank(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        etp_rank=ps.get_expert_tensor_parallel_rank(),
        dp_group=ps.get_data_parallel_group(),
    )


def vocab_padding_parameters(layout, padded_vocab: int, pp: int) -> int:
    """What a GPTModel holds beyond the HF model's parameters: padded vocabulary rows of the embedding and the
    output layer, and with tied embeddings and PP > 1 the last stage's own copy of the embedding."""
    pad = (padded_vocab - layout.vocab_size) * layout.hidden_size
    if not layout.tied_embeddings:
        return 2 * pad
    return pad + (padded_vocab * layout.hidden_size if pp > 1 else 0)


def read_hf_config(model_dir: str | os.PathLike) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise SftflowError(
            f"{path} not found: backend megatron reads the base model's config.json (config key 'model.base_model')"
        )
    return json.loads(path.read_text(encoding="utf-8"))


class MegatronEngine:
    """One rank's part of a megatron-core training run: the megatron backend's Engine (sftflow.train.engine)."""

    name: ClassVar[str] = "megatron"

    @classmethod
    def init_parallel(cls, training: TrainingConfig) -> ParallelDims:
        return init_megatron_parallel(training)

    @classmethod
    def resume_layout(cls, parallel: ParallelDims) -> dict[str, int]:
        return parallel.layout()  # the optimizer shards follow the layout: resume with the same one

    @staticmethod
    def hf_weights(checkpoint: Path, base_model: str):
        """Every shard, unsharded and mapped to HF names (one copy of the model in host memory)."""
        from sftflow.megatron.checkpoint import hf_weights

        full = hf_weights(checkpoint, base_model)
        shapes = {n: (tuple(t.shape), t.dtype) for n, t in full.items()}
        return shapes, lambda names: {n: full[n] for n in names}

    def __init__(self, t: TrainingConfig, spec, parallel: ParallelDims, seq_len: int, pad_id: int) -> None:
        from megatron.core import parallel_state as ps
        from megatron.core import tensor_parallel

        from sftflow.megatron.checkpoint import MegatronCheckpointer
        from sftflow.megatron.model import PipelineStage, build_gpt_model
        from sftflow.megatron.weights import local_model_dir
        from sftflow.train.checkpoint import latest_checkpoint

        self.parallel, self.pad_id = parallel, pad_id
        parallel.on_main(lambda: local_model_dir(spec.model))  # a hub model is downloaded once, by rank 0
        model_dir = local_model_dir(spec.model)
        hf_config = read_hf_config(model_dir)
        layout = model_layout(hf_config, where=f"{spec.model}/config.json")
        coeff = moe_aux_loss_coeff(t.moe_aux_loss_coeff, hf_config)
        self.layout = dataclasses.replace(layout, moe_aux_loss_coef=coeff) if layout.num_experts else layout
        if coeff:
            LOG.info("MoE router load-balancing loss: aux_loss, coefficient %g", coeff)
        self.use_te = transformer_engine_available()
        self.sequence_parallel = bool(t.sequence_parallel) and parallel.tp > 1
        self._check_features()
        bf16 = t.precision == "bf16"
        dtype = torch.bfloat16 if bf16 else torch.float32
        tensor_parallel.model_parallel_cuda_manual_seed(t.seed)
        self.padded_vocab = padded_vocab_size(self.layout.vocab_size, parallel.tp)
        micro_tokens = t.train_micro_batch_size * seq_len
        self.first_stage, self.last_stage = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
        module = build_gpt_model(
            self.layout,
            self.padded_vocab,
            max(micro_tokens, seq_len) * 2,
            stage=PipelineStage(first=self.first_stage, last=self.last_stage),
            transformer_engine=self.use_te,
            **self._gpt_config(t, bf16, dtype),
        )
        module.cuda(torch.cuda.current_device())
        # The last stage's GPTModel returns hidden states; the loss computes the logits, in chunks of tokens.
        self.loss = OutputLayerLoss(module, self.layout.vocab_size, t.loss_chunk_tokens) if self.last_stage else None
        if latest_checkpoint(spec.checkpoint_dir) is None:  # a resumed run loads its weights instead
            self._import_hf_weights(module, spec.model, model_dir)
        self.module = module
        self.model, self.optimizer = self._distributed(module, t, bf16, dtype)
        self.max_grad_norm = t.max_grad_norm
        self.num_params = self._count_parameters()
        self.checkpointer = MegatronCheckpointer(spec.checkpoint_dir, parallel)

    def _check_features(self) -> None:
        """Refuse what this model and megatron-core (with or without Transformer Engine) cannot train."""
        parallel = self.parallel
        if parallel.cp > 1 and not self.use_te:
            raise SftflowError(
                f"config key 'training.context_parallel_size' is {parallel.cp}: context parallelism needs "
                "Transformer Engine's attention (pip install transformer_engine[pytorch]); it is not installed"
            )
        if self.layout.num_experts and parallel.tp > 1 and not self.sequence_parallel:
            raise SftflowError(
                f"config key 'training.sequence_parallel' must be true for a mixture-of-experts model with "
                f"tensor_model_parallel_size {parallel.tp} (megatron-core requires it)"
            )
        if self.layout.num_experts and not self.use_te:
            _patch_moe_router_without_te()
        if self.sequence_parallel and not self.use_te:
            raise SftflowError(
                "config key 'training.sequence_parallel' is true: megatron-core's own norm layers cannot split "
                "the sequence, this needs Transformer Engine's (pip install transformer_engine[pytorch]); it is "
                "not installed. Set it to false"
            )

    def _gpt_config(self, t: TrainingConfig, bf16: bool, dtype: torch.dtype) -> dict:
        """TransformerConfig settings of this run's parallel layout, precision and recomputation."""
        parallel = self.parallel
        config = {
            "tensor_model_parallel_size": parallel.tp,
            "pipeline_model_parallel_size": parallel.pp,
            "context_parallel_size": parallel.cp,
            "expert_model_parallel_size": parallel.ep,
            "sequence_parallel": self.sequence_parallel,
            "bf16": bf16,
            "params_dtype": dtype,
            "pipeline_dtype": dtype,
            "calculate_per_token_loss": True,
            # Every weight is then overwritten (imported or loaded), but megatron-core's initialisation is also
            # what marks tensor-parallel weights as such; without it the gradient norm counts one TP shard only.
            "perform_initialization": True,
        }
        if self.layout.num_experts:
            config["expert_tensor_parallel_size"] = parallel.etp
            # Expert-parallel ranks are data-parallel ranks with packed micro-batches of their own lengths:
            # the all-to-all dispatcher exchanges each rank's own token count (all-gather needs equal ones).
            config["moe_token_dispatcher_type"] = "alltoall"
        if t.activation_checkpointing:
            config.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
        return config

    def _import_hf_weights(self, module, model: str, model_dir: Path) -> None:
        """Load this rank's part of the HF model's weights into `module`."""
        from sftflow.megatron.checkpoint import load_rank_weights
        from sftflow.megatron.weights import hf_to_megatron, read_hf_weights, shard

        parallel = self.parallel
        LOG.info("importing %s into megatron-core GPTModel (%s layers)", model, "TE" if self.use_te else "local")
        # Each rank reads the whole HF model and keeps its part: the ranks of a node take turns, so the
        # node's host memory holds one copy of the model at a time, not one per GPU.
        for turn in range(parallel.local_world_size):
            if parallel.local_rank == turn:
                full = hf_to_megatron(read_hf_weights(model_dir), self.layout, self.padded_vocab)
                weights = shard(full, self.layout, parallel)
                del full
                load_rank_weights(module, weights, self.layout, self.use_te, parallel.pp_rank, parallel)
                del weights
            dist.barrier()

    def _distributed(self, module, t: TrainingConfig, bf16: bool, dtype: torch.dtype):
        """megatron-core's DDP around `module` and its distributed optimizer: (model, optimizer)."""
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=True,
            check_for_nan_in_grad=True,
        )
        model = DistributedDataParallel(config=module.config, ddp_config=ddp_config, module=module)
        module.config.finalize_model_grads_func = finalize_model_grads
        module.config.no_sync_func = model.no_sync
        optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=t.learning_rate,
                min_lr=t.min_learning_rate,
                weight_decay=t.weight_decay,  # megatron-core: none on biases and 1-D weights, as fsdp
                adam_beta1=t.adam_beta1,
                adam_beta2=t.adam_beta2,
                adam_eps=t.adam_eps,
                # megatron-core computes the grad norm only when it clips: with no clipping (null) an infinite
                # threshold, which never scales a gradient, still gets the norm logged.
                clip_grad=float("inf") if t.max_grad_norm is None else float(t.max_grad_norm),
                bf16=bf16,
                params_dtype=dtype,
                use_distributed_optimizer=True,
            ),
            [model],
        )
        # megatron-core's own scheduler sets each group's weight decay (x its wd_mult: 0 for biases and 1-D
        # weights) every step; the Trainer's schedule sets the learning rate only, so set the decay once here.
        for group in optimizer.param_groups:
            group["weight_decay"] = t.weight_decay * group.get("wd_mult", 1.0)
        return model, optimizer

    def _count_parameters(self) -> int:
        """Parameters of the HF model (for MFU): every rank counts its shard, replicas are counted once, and
        the vocabulary padding (and, with tied embeddings and PP > 1, the last stage's copy) is left out."""
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

        # Weights split over tensor parallel count on every TP rank, replicated ones (norms, router) on rank 0.
        mine = [(n, p) for n, p in self.module.named_parameters() if param_is_not_tensor_parallel_duplicate(p)]
        dense = sum(p.numel() for n, p in mine if ".mlp.experts." not in n)
        experts = sum(p.numel() for n, p in mine if ".mlp.experts." in n)
        # Dense weights are replicated over data parallel (and cp); experts over expert data parallel.
        t = torch.tensor(
            [
                dense if ps.get_data_parallel_rank(with_context_parallel=True) == 0 else 0,
                experts if ps.get_expert_data_parallel_rank() == 0 else 0,
            ],
            dtype=torch.float64,
            device=self.parallel.device,
        )
        dist.all_reduce(t)
        return int(t.sum().item()) - vocab_padding_parameters(self.layout, self.padded_vocab, self.parallel.pp)

    def meta(self) -> dict:
        return {"backend": self.name, **self.parallel.layout(), "transformer_engine": self.use_te}

    # --- one step -------------------------------------------------------------------------------------

    def _micro_batches(self, micro_bins: list[list[dict]]) -> list[dict]:
        def build(bins: list[dict], pad_to: int = 0) -> dict:
            return megatron_micro_batch(
                bins,
                self.pad_id,
                context=ContextShard(self.parallel.cp, self.parallel.cp_rank),
                length_multiple=self.parallel.tp if self.sequence_parallel else 1,
                pad_to=pad_to,
                block_mask=not self.use_te,
            )

        micro = [build(bins) for bins in micro_bins]
        if self.parallel.pp > 1:  # pipeline stages exchange activations of one shape: pad to the longest
            longest = max(int(m["cu_seqlens_padded"][-1]) for m in micro)
            micro = [build(bins, longest) for bins in micro_bins]
        return micro

    def _forward_step(self, data_iterator, model):
        from megatron.core.packed_seq_params import PackedSeqParams

        b = next(data_iterator)
        dev = self.parallel.device
        kwargs = {
            "input_ids": b["tokens"].to(dev, non_blocking=True),
            "position_ids": b["position_ids"].to(dev, non_blocking=True),
            "attention_mask": b["attention_mask"].to(dev, non_blocking=True) if "attention_mask" in b else None,
        }
        if self.layout.moe_aux_loss_coef:
            kwargs["padding_mask"] = self._padding_mask(b["padding_mask"]).to(dev, non_blocking=True)
        if self.use_te:
            cu = b["cu_seqlens"].to(dev, non_blocking=True)
            cu_padded = b["cu_seqlens_padded"].to(dev, non_blocking=True)
            kwargs["packed_seq_params"] = PackedSeqParams(
                qkv_format="thd",
                cu_seqlens_q=cu,
                cu_seqlens_kv=cu,
                cu_seqlens_q_padded=cu_padded,
                cu_seqlens_kv_padded=cu_padded,
                max_seqlen_q=int(b["max_seqlen"]),
                max_seqlen_kv=int(b["max_seqlen"]),
            )
        output = model(**kwargs)  # on the last pipeline stage the final hidden states, [1, T, hidden] (see loss.py)
        labels = b["labels"].to(dev, non_blocking=True)
        loss_mask = b["loss_mask"].to(dev, non_blocking=True)

        def loss_func(hidden: torch.Tensor):
            loss_sum = self.loss(hidden, labels, loss_mask)
            count = loss_mask.sum().to(torch.int)
            return loss_sum, count, {"loss_sum": loss_sum.detach().double(), "loss_tokens": count.detach().double()}

        return output, loss_func

    def _padding_mask(self, padding: torch.Tensor) -> torch.Tensor:
        """The padding mask for GPTModel's MoE routers. GPTModel splits it for sequence parallelism only on the
        first pipeline stage; a later stage's routers see this TP rank's part of the tokens, so it gets that part.

        With it, megatron-core 0.16.1's router counts the real tokens of the micro-batch over the tensor- and
        context-parallel group (an in-place all-reduce of the routed counts) and multiplies the load-balancing
        loss by that count, the scaling of sftflow.train.loss.router_load_balancing_loss; without it, by the
        rank's local token count, 1 / (TP x CP) of it."""
        if not self.sequence_parallel or self.first_stage:
            return padding
        return padding.chunk(self.parallel.tp, dim=1)[self.parallel.tp_rank]

    def _run(self, micro: list[dict], forward_only: bool) -> tuple[float, float]:
        """Forward (and backward) over the micro-batches; returns (sum of token losses, loss tokens) of the
        whole data-parallel world."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        outputs = get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=iter(micro),
            model=[self.model],
            num_microbatches=len(micro),
            seq_length=max(b["tokens"].shape[1] for b in micro),
            micro_batch_size=1,
            forward_only=forward_only,
        )
        totals = torch.zeros(2, dtype=torch.float64, device=self.parallel.device)
        for out in outputs or []:  # only the last pipeline stage has losses
            totals[0] += out["loss_sum"]
            totals[1] += out["loss_tokens"]
        # Every tensor-parallel rank of the last stage holds the same (vocab-parallel) loss; context-
        # parallel ranks hold parts of it and data-parallel ranks their own bins: sum the world, then /tp.
        dist.all_reduce(totals)
        totals /= self.parallel.tp
        return float(totals[0]), float(totals[1])

    def train_step(self, micro_bins: list[list[dict]]) -> tuple[float, float, float]:
        micro = self._micro_batches(micro_bins)
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss_sum, count = self._run(micro, forward_only=False)
        updated, grad_norm, _ = self.optimizer.step()
        if not updated:
            raise SftflowError("megatron-core's optimizer skipped the step (non-finite gradients)")
        return loss_sum / max(count, 1.0), count, float("nan") if grad_norm is None else float(grad_norm)

    def evaluate(self, micro_bins: list[list[dict]]) -> tuple[float, int]:
        self.model.eval()
        with torch.no_grad():
            micro = self._micro_batches(micro_bins)
            loss_sum, count = self._run(micro, forward_only=True)
        self.model.train()
        return loss_sum / max(count, 1.0), int(count)

    def state_dict(self) -> dict:
        from sftflow.megatron.checkpoint import engine_state_dict

        return engine_state_dict(self)

    def load_state_dict(self, state: dict) -> None:
        from sftflow.megatron.checkpoint import load_engine_state_dict

        load_engine_state_dict(self, state)
