"""Peak CPU memory of the loss part of a training step (lm_head + cross-entropy, forward and backward), chunked
(training.loss_chunk_tokens) vs the full logits:
`python -m benchmarks.loss_memory_bench [--tokens 8192] [--backend fsdp|megatron]` (from the repo root: the
megatron variant imports the tests' CUDA -> CPU shim).

Each variant runs in its own subprocess, on the same random final hidden states ([tokens, hidden], requiring
grad) and targets (a quarter ignored, as prompt tokens are), through the backend's own functions: fsdp,
the trainer's token_loss_sum / chunked_token_loss_sum over an nn.Linear head; megatron,
sftflow.megatron.loss.OutputLayerLoss over megatron-core's ColumnParallelLinear output layer (as GPTModel
builds it) and its vocab-parallel cross-entropy, on a one-rank gloo world through the tests' CUDA -> CPU
shim (tests/megatron_backend/cpu_shim.py). A variant's peak is its process's peak RSS (getrusage ru_maxrss)
minus the peak after setup (imports, weights, inputs); both variants and their loss and gradient norms
are printed as JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MIB = 2**20


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


@dataclass(frozen=True)
class _Start:
    """Where a variant's measurement starts: the peak RSS after setup and the clock, right before the loss."""

    peak_rss: int
    seconds: float

    @classmethod
    def now(cls) -> _Start:
        return cls(_peak_rss(), time.perf_counter())


def run_variant(args) -> dict:
    if args.backend == "megatron":
        return run_megatron_variant(args)
    import torch

    from sftflow.train.loss import chunked_token_loss_sum, loss_chunk_size, token_loss_sum

    torch.manual_seed(args.seed)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False)
    hidden = torch.randn(args.tokens, args.hidden, requires_grad=True)
    targets = torch.randint(0, args.vocab, (args.tokens,))
    targets[torch.rand(args.tokens) < 0.25] = -100
    chunk = loss_chunk_size(None if args.chunk is None else args.chunk, args.tokens, args.vocab)
    if args.variant == "full":
        chunk = 0
    start = _Start.now()
    if chunk:
        loss = chunked_token_loss_sum(hidden, targets, head, chunk)
    else:
        loss = token_loss_sum(head(hidden), targets)
    loss.backward()
    return _measured(args.variant, chunk, start, loss, hidden, head.weight)


def _measured(variant: str, chunk: int, start: _Start, loss, hidden, weight) -> dict:
    """One variant's result, taken right after its backward pass."""
    seconds = time.perf_counter() - start.seconds
    return {
        "variant": variant,
        "chunk_tokens": chunk,
        "peak_mib": round((_peak_rss() - start.peak_rss) / MIB, 1),
        "seconds": round(seconds, 2),
        "loss": float(loss),
        "hidden_grad_norm": float(hidden.grad.norm()),
        "weight_grad_norm": float(weight.grad.norm()),
    }


def run_megatron_variant(args) -> dict:
    import tempfile

    from tests.megatron_backend import cpu_shim

    cpu_shim.install()
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from sftflow.megatron.hf_config import padded_vocab_size
    from sftflow.megatron.loss import OutputLayerLoss

    store = Path(tempfile.mkdtemp()) / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    ps.initialize_model_parallel(tensor_model_parallel_size=1)
    torch.manual_seed(args.seed)
    config = TransformerConfig(num_layers=1, hidden_size=args.hidden, num_attention_heads=1,
                               use_cpu_initialization=True)  # fmt: skip
    layer = tensor_parallel.ColumnParallelLinear(
        args.hidden, padded_vocab_size(args.vocab, 1), config=config, bias=False, gather_output=False,
        init_method=lambda w: torch.nn.init.normal_(w, std=args.hidden**-0.5),
    )  # fmt: skip

    class LastStage(torch.nn.Module):  # what OutputLayerLoss reads of GPTModel: its (untied) output layer
        share_embeddings_and_output_weights = False

        def __init__(self) -> None:
            super().__init__()
            self.output_layer = layer

    setting = 0 if args.variant == "full" else args.chunk
    loss_of = OutputLayerLoss(LastStage(), args.vocab, setting)
    hidden = torch.randn(1, args.tokens, args.hidden, requires_grad=True)  # GPTModel's output: [1, T, hidden]
    labels = torch.randint(0, args.vocab, (1, args.tokens))
    loss_mask = (torch.rand(1, args.tokens) >= 0.25).float()
    chunk = loss_of.chunk_tokens(args.tokens)
    start = _Start.now()
    loss = loss_of(hidden, labels, loss_mask)
    loss.backward()
    result = _measured(args.variant, chunk, start, loss, hidden, layer.weight)
    dist.destroy_process_group()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=8192, help="tokens per micro-batch")
    p.add_argument("--vocab", type=int, default=151_936, help="vocabulary size (Qwen2/3: 151,936)")
    p.add_argument("--hidden", type=int, default=64, help="hidden size")
    p.add_argument("--chunk", type=int, default=None, help="training.loss_chunk_tokens (default: null, automatic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=["fsdp", "megatron"], default="fsdp", help="whose loss functions")
    p.add_argument("--variant", choices=["full", "chunked"], help=argparse.SUPPRESS)  # one subprocess's part
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return

    results = {}
    for variant in ("chunked", "full"):
        cmd = [sys.executable, "-m", "benchmarks.loss_memory_bench", "--variant", variant, *sys.argv[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    chunked, full = results["chunked"], results["full"]
    fp32_logits_mib = args.tokens * args.vocab * 4 / MIB
    print(
        json.dumps(
            {
                "backend": args.backend,
                "tokens": args.tokens,
                "vocab": args.vocab,
                "hidden": args.hidden,
                "fp32_logits_mib": round(fp32_logits_mib, 1),
                "chunked": chunked,
                "full": full,
                "peak_ratio_full_over_chunked": round(full["peak_mib"] / max(chunked["peak_mib"], 1e-9), 1),
                "loss_rel_diff": abs(chunked["loss"] - full["loss"]) / abs(full["loss"]),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
