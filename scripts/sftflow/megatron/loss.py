"""The megatron backend's loss: cross-entropy over GPTModel's vocab-parallel output layer, in chunks of tokens
(training.loss_chunk_tokens) so that the full [tokens, vocabulary] fp32 logits never exist at once.

`OutputLayerLoss` makes the last pipeline stage's GPTModel return its final (normed) hidden states instead of
logits: its output layer (a ColumnParallelLinear, each TP rank holding a slice of the vocabulary) passes its
input through. The loss then calls that layer itself, a chunk of tokens at a time, and megatron-core's
vocab-parallel cross-entropy on each chunk's logits (which combines the TP ranks' maxima and sums). With
gradients every chunk runs under activation checkpointing, so its logits are dropped after its loss and
recomputed in the backward pass. Unchunked, the layer runs once on all tokens: the logits GPTModel computes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from sftflow.train.loss import loss_chunk_size


def vocab_parallel_token_losses(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Cross-entropy of every token over the model's real vocabulary (`vocab_size`): the columns padding the
    vocabulary to a multiple of 128 x TP are left out of the softmax (as the HF model, which has none, and
    the fsdp backend compute it), then megatron-core's vocab-parallel cross-entropy (in fp32)."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    local = logits.shape[-1]
    real = vocab_size - ps.get_tensor_model_parallel_rank() * local
    logits = logits.float()
    if real < local:
        padding = torch.arange(local, device=logits.device) >= real
        logits = logits.masked_fill(padding, float("-inf"))
    return tensor_parallel.vocab_parallel_cross_entropy(logits, labels)


class OutputLayerLoss:
    """Sum of the masked token losses of GPTModel `module`'s last stage, from its final hidden states.

    Building it changes `module`: its output layer returns its input (the hidden states) from then on, and
    GPTModel's output is [batch, tokens, hidden] instead of the logits (with sequence parallelism: this TP
    rank's tokens). `chunk_setting` is training.loss_chunk_tokens (see sftflow.train.loss.loss_chunk_size,
    applied to this rank's logits: all tokens of the micro-batch on this rank x its slice of the vocabulary).
    """

    def __init__(self, module: torch.nn.Module, vocab_size: int, chunk_setting: int | None) -> None:
        from megatron.core import parallel_state as ps

        self.module, self.vocab_size, self.chunk_setting = module, vocab_size, chunk_setting
        layer = module.output_layer
        self.tp = ps.get_tensor_model_parallel_world_size()
        self.sequence_parallel = bool(layer.sequence_parallel) and self.tp > 1
        self._logits: Callable = layer.forward  # (hidden [tokens, batch, hidden], weight) -> (logits, bias)

        def hidden_states_out(input_, weight=None, runtime_gather_output=None):
            return input_, None

        layer.forward = hidden_states_out

    def _output_weight(self) -> torch.Tensor | None:
        """The tied embedding (or, on a later pipeline stage, its copy) when weights are shared, else None: the
        output layer's own weight, as GPTModel passes it."""
        if self.module.share_embeddings_and_output_weights:
            return self.module.shared_embedding_or_output_weight()
        return None

    def chunk_tokens(self, num_tokens: int) -> int:
        """Tokens per loss chunk (0: one piece) for a micro-batch of `num_tokens` tokens on this rank."""
        local_vocab = self.module.output_layer.output_size_per_partition
        return loss_chunk_size(self.chunk_setting, num_tokens, local_vocab)

    def _piece(self, hidden: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
        logits, _ = self._logits(hidden, weight=self._output_weight())  # [tokens, 1, vocab / TP]
        losses = vocab_parallel_token_losses(logits, labels.view(-1, 1), self.vocab_size)
        return (losses.view(-1) * loss_mask).sum()

    def __call__(self, output: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
        """Sum of token loss x loss_mask over the micro-batch. `output`: GPTModel's [1, local tokens, hidden];
        `labels`, `loss_mask`: [1, tokens], all tokens of the micro-batch on this rank (with sequence
        parallelism the output layer gathers TP ranks' tokens: rank r holds tokens [r x local, (r+1) x local))."""
        hidden = output.transpose(0, 1)  # [local tokens, 1, hidden], as megatron-core's layers take it
        labels, loss_mask = labels.reshape(-1), loss_mask.reshape(-1).float()
        local = hidden.shape[0]
        chunk = self.chunk_tokens(labels.numel())
        if chunk <= 0 or chunk >= labels.numel():
            return self._piece(hidden, labels, loss_mask)
        # With sequence parallelism each rank contributes chunk / TP of its own tokens to a chunk.
        step = -(-chunk // self.tp) if self.sequence_parallel else chunk
        grad = torch.is_grad_enabled() and hidden.requires_grad
        total = None
        for start in range(0, local, step):
            end = min(start + step, local)
            if self.sequence_parallel:
                offsets = torch.arange(self.tp, device=labels.device)[:, None] * local
                index = (offsets + torch.arange(start, end, device=labels.device)).reshape(-1)
                piece_labels, piece_mask = labels[index], loss_mask[index]
            else:
                piece_labels, piece_mask = labels[start:end], loss_mask[start:end]
            args = (hidden[start:end], piece_labels, piece_mask)
            part = checkpoint(self._piece, *args, use_reentrant=False) if grad else self._piece(*args)
            total = part if total is None else total + part
        return total
