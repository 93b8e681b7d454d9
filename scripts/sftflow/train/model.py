"""Load an HF causal LM (Llama, Qwen2, Qwen3, Mistral, ...) for packed-sequence training and parallelise it.

Attention isolation
-------------------
A packed row holds several sequences back to back. The trainer passes per-sequence restarting
`position_ids` (so RoPE sees each sequence from position 0), no 2-D attention mask, `use_cache=False`,
and the sequence boundaries `cu_seq_lens_q/k` (flattened over the batch, as `collate_bins` builds them).
The model is built with `attn_implementation="sftflow_varlen"`, registered through transformers'
AttentionInterface by `sftflow.train.attention`: causal attention inside each segment only, so a token can
never attend to another sequence and the cross-sequence blocks of the L x L score matrix are never computed.
Its kernel (`training.attention`, `auto` by default) is flash-attn's varlen kernel on CUDA when installed, else
torch's own `varlen_attn` (torch >= 2.10), else compiled `flex_attention` with a document mask; on CPU one SDPA
call per segment (see that module).
Since the implementation name has no mask function registered, transformers builds no mask for it.

Parallelism is applied in a fixed order, as in torchtitan: tensor parallel (`apply_tp`), then activation
checkpointing (`apply_ac`), then FSDP2 (`apply_fsdp`), on a model built on the meta device; weights are
then loaded on rank 0 and broadcast into the shards, so only rank 0 ever holds a full copy in memory.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.utils.checkpoint import checkpoint

from sftflow.errors import SftflowError
from sftflow.train.attention import VARLEN_ATTENTION, register_attention, segment_bounds
from sftflow.train.checks import check_tp_divides_heads
from sftflow.train.parallel import ParallelDims

LOG = logging.getLogger("sftflow.train")

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


def model_inputs(batch: dict, device: torch.device, attention: str | None = None) -> dict:
    """The keyword arguments of a packed forward pass (for the model built by `build_model`).

    `attention` names the packed-attention kernel (`sftflow.train.attention.resolve_kernel`); None lets each
    attention call choose as `auto` would.
    """
    inputs = {
        "input_ids": batch["input_ids"].to(device, non_blocking=True),
        "position_ids": batch["position_ids"].to(device, non_blocking=True),
        "cu_seq_lens_q": batch["cu_seqlens"].to(device, non_blocking=True),
        "cu_seq_lens_k": batch["cu_seqlens"].to(device, non_blocking=True),
        "max_length_q": int(batch["max_seqlen"]),
        "max_length_k": int(batch["max_seqlen"]),
        "sftflow_segments": segment_bounds(batch["cu_seqlens"]),
        "use_cache": False,
    }
    if attention is not None:
        inputs["sftflow_attention"] = attention
    return inputs


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise SftflowError(
            f"model class {type(model).__name__} has no model.layers; the fsdp backend supports decoder-only "
            f"causal LMs laid out like {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return layers


def apply_tp(model: nn.Module, tp_mesh) -> None:
    """Megatron-style tensor parallelism of every decoder layer with DTensor.

    q/k/v and gate/up are split by output features (each rank owns whole heads / a slice of the MLP),
    o/down by input features with an all-reduce after them; the layer's input and output stay
    replicated, so norms, embeddings and lm_head are plain (replicated) parameters.
    The attention forward reshapes with `-1` heads, so each rank simply sees its local heads.
    """
    plan = {
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(),
    }
    tp = tp_mesh.size()
    for layer in decoder_layers(model):
        parallelize_module(layer, tp_mesh, plan)
        attn = layer.self_attn
        for attr in ("num_heads", "num_key_value_heads", "num_attention_heads"):  # older/other attention classes
            if isinstance(getattr(attn, attr, None), int):
                setattr(attn, attr, getattr(attn, attr) // tp)


def _checkpointed(forward, *args, **kwargs):
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def apply_ac(model: nn.Module) -> None:
    """Recompute each decoder layer in the backward pass.

    The layer's own `forward` is wrapped (instead of wrapping the module) so parameter names, and with
    them checkpoint keys, do not change; FSDP's hooks still run around the whole layer.
    """
    for layer in decoder_layers(model):
        layer.forward = functools.partial(_checkpointed, layer.forward)


def apply_fsdp(model: nn.Module, dp_mesh, param_dtype: torch.dtype | None) -> None:
    """FSDP2: shard each decoder layer, then the root (embeddings, final norm, lm_head), over the dp mesh.

    With `param_dtype` (bf16 on GPU) parameters are all-gathered and computed in that dtype while the
    sharded fp32 parameters stay the optimizer's master weights and gradients are reduced in fp32.
    """
    mp = (
        MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        if param_dtype
        else MixedPrecisionPolicy()
    )
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        # The last layer is needed again first in backward: keeping it gathered saves one all-gather.
        fully_shard(layer, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=i < len(layers) - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp)
    # The trainer divides the loss by the global number of loss tokens itself, so gradients must be
    # summed over dp ranks, not averaged: a divide factor of 1 with plain SUM collectives (which gloo
    # supports too) gives exactly the gradient of a single process holding the whole global batch.
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def _reset_rotary(model: nn.Module, device: torch.device) -> None:
    """Recompute RoPE's non-persistent buffers, which meta-device construction left undefined."""
    for module in model.modules():
        if type(module).__name__.endswith("RotaryEmbedding") and hasattr(module, "config"):
            fresh = type(module)(config=module.config)
            for name, buf in fresh.named_buffers(recurse=False):
                getattr(module, name).copy_(buf.to(device))


def check_no_sliding_window(hf_config, max_seq_len: int | None) -> None:
    """The varlen attention is full causal attention: refuse sequences longer than a sliding window."""
    window = getattr(hf_config, "sliding_window", None)
    if getattr(hf_config, "use_sliding_window", True) is False or not window or max_seq_len is None:
        return
    if max_seq_len > window:
        raise SftflowError(
            f"config key 'packing.max_total_sequence_length' ({max_seq_len}) exceeds the model's sliding attention "
            f"window ({window}); the fsdp trainer computes full causal attention, so keep sequences within {window}"
        )


def build_model(
    model_name: str,
    parallel: ParallelDims,
    *,
    param_dtype: torch.dtype | None = None,
    activation_checkpointing: bool = False,
    max_seq_len: int | None = None,
) -> nn.Module:
    """The HF model, tensor-parallel, checkpointed and FSDP-sharded on `parallel.device`, with loaded weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    register_attention()
    hf_config = AutoConfig.from_pretrained(model_name)
    if hf_config.model_type not in SUPPORTED_MODEL_TYPES:
        LOG.warning("model type %r is untested (tested: %s)", hf_config.model_type, ", ".join(SUPPORTED_MODEL_TYPES))
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    check_tp_divides_heads(parallel.tp, {"num_attention_heads": heads, "num_key_value_heads": kv_heads})
    check_no_sliding_window(hf_config, max_seq_len)
    hf_config.use_cache = False

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, attn_implementation=VARLEN_ATTENTION, dtype=torch.float32)
    if parallel.tp > 1:
        apply_tp(model, parallel.tp_mesh)
    if activation_checkpointing:
        apply_ac(model)
    # One fp32 process has nothing to shard: FSDP's per-layer all-gather/reduce-scatter hooks would only
    # cost time (about a quarter of a CPU step for small models). Anything distributed, or bf16 (whose
    # mixed-precision policy FSDP implements), goes through FSDP.
    if parallel.world_size > 1 or param_dtype is not None:
        apply_fsdp(model, parallel.dp_mesh, param_dtype)
    model.to_empty(device=parallel.device)
    if getattr(hf_config, "tie_word_embeddings", False):
        model.tie_weights()  # to_empty() gives tied parameters separate storage again
    _reset_rotary(model, parallel.device)

    # Rank 0 reads the checkpoint (transformers handles the hub, sharding and key renames) in its stored
    # dtype, so a bf16 model costs 2 bytes per parameter of host memory; the other ranks receive their
    # shards by broadcast, and copying into the fp32 shards upcasts.
    full = {}
    if parallel.is_main:
        source = AutoModelForCausalLM.from_pretrained(model_name, dtype="auto")
        full = source.state_dict()
        del source
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    model.train()
    return model


def count_parameters(model: nn.Module) -> int:
    """Unique parameters of the full (unsharded) model; tied weights counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
