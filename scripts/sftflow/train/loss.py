"""The training loss of a HF causal LM: the sum of its target tokens' cross-entropies, optionally over chunks of
lm_head's logits, and for a mixture-of-experts model megatron-core's router load-balancing loss.

Shared by both backends: sftflow.megatron.loss sizes its chunks with `loss_chunk_size` too, and the megatron
engine takes its load-balancing coefficient from `moe_aux_loss_coeff`.
"""

from __future__ import annotations

import types
from collections.abc import Mapping, Sequence

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


def _chunked_loss_forward(
    model: torch.nn.Module, inputs: dict, targets: torch.Tensor, chunk_tokens: int, router_logits: bool = False
):
    """What model(**inputs).logits feeds into token_loss_sum, without the full logits: the decoder's final
    (normed) hidden states, then lm_head chunk by chunk. With `router_logits`, (that loss, the decoder's MoE
    router logits per layer, as HF's output_router_logits records them; empty if it records none)."""
    if router_logits:
        inputs = {**inputs, "output_router_logits": True}
    out = model.get_decoder()(**inputs)
    loss = chunked_token_loss_sum(out.last_hidden_state, targets, model.get_output_embeddings(), chunk_tokens)
    if router_logits:
        return loss, tuple(getattr(out, "router_logits", None) or ())
    return loss


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
    """Give `model` the method CHUNKED_LOSS_METHOD(inputs, targets, chunk_tokens, router_logits=False) -> loss sum
    (with router_logits=True: (loss sum, router logits per MoE layer)).

    With FSDP2 the root unit (embeddings, final norm, lm_head; tied or not) holds sharded parameters that
    its forward hooks gather: registering the method as an FSDP forward method runs those hooks around it
    (as around forward), so the decoder and every lm_head chunk see the gathered weights, the root stays
    gathered into the backward pass (FSDP keeps the root unsharded after forward), and the gradients are
    reduce-scattered at the end of the backward pass as after a plain forward. Without FSDP it is a method.
    """
    setattr(model, CHUNKED_LOSS_METHOD, types.MethodType(_chunked_loss_forward, model))
    register_fsdp_forward_method(model, CHUNKED_LOSS_METHOD)


# --- the MoE router's load-balancing loss ---------------------------------------------------------------

# Megatron-Bridge's Qwen3-MoE provider fixes moe_aux_loss_coeff at 1e-3; transformers' default
# router_aux_loss_coef (Qwen3-MoE, Mixtral) is the same value.
DEFAULT_ROUTER_AUX_LOSS_COEF = 1e-3


def num_experts(model_config: Mapping) -> int:
    """The number of routed experts of a HF config dict (num_experts, or Mixtral's num_local_experts); 0: dense."""
    return int(model_config.get("num_experts") or model_config.get("num_local_experts") or 0)


def moe_aux_loss_coeff(setting: float | None, model_config: Mapping) -> float:
    """The coefficient of the router load-balancing loss a run trains with: 0 for a dense model; else
    training.moe_aux_loss_coeff (`setting`), or when that is null the model's own config.json
    router_aux_loss_coef (what NeMo-RL's megatron path reads through Megatron-Bridge), 1e-3 when it has none."""
    if not num_experts(model_config):
        return 0.0
    if setting is not None:
        return float(setting)
    value = model_config.get("router_aux_loss_coef")
    return DEFAULT_ROUTER_AUX_LOSS_COEF if value is None else float(value)


def router_load_balancing_loss(router_logits: Sequence[torch.Tensor], valid: torch.Tensor, top_k: int) -> torch.Tensor:
    """megatron-core's `aux_loss` load-balancing loss of one micro-batch, summed over the MoE layers and
    multiplied by the micro-batch's token count T, without the coefficient.

    `router_logits`: per MoE layer the router's logits of every token of the micro-batch ([tokens, experts],
    in `valid`'s flattened order); `valid`: which tokens are real (not padding). Per layer, over the T real
    tokens, with p = softmax(logits) in fp32 and n_i the tokens whose top_k experts include expert i (no
    gradient), megatron-core's switch loss is  E / (top_k x T^2) x sum_i n_i x sum_x p(x, i).  Megatron-core
    with calculate_per_token_loss multiplies each micro-batch's term by T before the gradients are divided by
    the global batch's loss tokens, so T x that is what a backend adds to the micro-batch's token-loss sum.
    """
    keep = valid.reshape(-1).to(router_logits[0].device)
    total = torch.zeros((), dtype=torch.float32, device=keep.device)
    for logits in router_logits:
        probs = torch.softmax(logits.reshape(-1, logits.shape[-1])[keep].float(), dim=-1)
        tokens, experts = probs.shape
        if not tokens:
            continue
        chosen = probs.detach().topk(top_k, dim=-1).indices.reshape(-1)
        counts = torch.zeros(experts, dtype=torch.float32, device=probs.device)
        counts.scatter_add_(0, chosen, torch.ones_like(chosen, dtype=torch.float32))
        total = total + (probs.sum(dim=0) * counts).sum() * (experts / (top_k * tokens))
    return total
