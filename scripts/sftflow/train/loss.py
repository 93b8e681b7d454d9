"""The token loss of a HF causal LM: a sum over target tokens, optionally over chunks of lm_head's logits.

Shared by both backends: sftflow.megatron.loss sizes its chunks with `loss_chunk_size` too.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch.distributed.fsdp import register_fsdp_forward_method
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


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
