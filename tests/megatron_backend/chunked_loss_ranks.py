"""One rank of a 2-process CPU (gloo) world, run by torchrun from tests/megatron_backend/test_chunked_loss.py.

For each layout (TP=2, then TP=1) and each HF model (tied and untied embeddings), builds megatron-core's
GPTModel with the imported weights (through cpu_shim.py) and computes one packed micro-batch's sum of token
losses and the gradients of every weight on this rank:

* "logits": GPTModel's own logits (before sftflow.megatron.loss touches the model), then the vocab-parallel
  cross-entropy: what the engine computed before the loss was chunked;
* "chunk<N>": sftflow.megatron.loss.OutputLayerLoss with training.loss_chunk_tokens = N (0: unchunked);
* "eval<N>": the same without gradients.

Then, at TP=2, one output layer with sequence parallelism (each rank holds half the tokens' hidden states)
through OutputLayerLoss, chunked and not, and a plain-torch reference on the whole hidden states and weight.

Every result is saved as OUT_DIR/rank<r>.pt; the test compares them.

    PYTHONPATH=. torchrun --standalone --nproc-per-node=2 tests/megatron_backend/chunked_loss_ranks.py TIED UNTIED OUT_DIR
"""

import json
import os
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

from tests.megatron_backend import cpu_shim  # noqa: E402

cpu_shim.install()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

TOKENS = 96
CHUNKS = [0, 7, 32, 10_000]  # 7 does not divide the 96 tokens; 10,000 is more than all of them


def micro_batch(vocab: int) -> dict:
    """One packed row of three sequences: labels, a loss mask with prompt and padding zeros, positions."""
    g = torch.Generator().manual_seed(0)
    lengths = [40, 30, 26]
    tokens = torch.randint(3, vocab, (1, TOKENS), generator=g)
    labels = torch.randint(3, vocab, (1, TOKENS), generator=g)
    loss_mask = (torch.rand(1, TOKENS, generator=g) > 0.3).float()
    loss_mask[0, -4:] = 0
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "positions": positions}


def build(model_dir: Path, tp: int):
    from safetensors.torch import load_file

    from sftflow.megatron.hf_config import model_layout, padded_vocab_size
    from sftflow.megatron.model import build_gpt_model
    from sftflow.megatron.weights import hf_to_megatron, shard
    from sftflow.train.parallel import ParallelDims

    layout = model_layout(json.loads((model_dir / "config.json").read_text()))
    padded = padded_vocab_size(layout.vocab_size, tp)
    model = build_gpt_model(layout, padded, 2 * TOKENS, cpu_init=True, tensor_model_parallel_size=tp)
    hf = load_file(model_dir / "model.safetensors")
    if layout.tied_embeddings:
        hf.setdefault("lm_head.weight", hf["model.embed_tokens.weight"])
    from megatron.core import parallel_state as ps

    mine = shard(hf_to_megatron(hf, layout, padded), layout,
                 ParallelDims(tp=tp, tp_rank=ps.get_tensor_model_parallel_rank()))  # fmt: skip
    extra = {k: v for k, v in model.state_dict().items() if k.endswith("_extra_state")}
    model.load_state_dict({**mine, **extra}, strict=True)
    return model, layout


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def model_losses(model_dir: Path, tp: int) -> dict:
    from sftflow.megatron.loss import OutputLayerLoss, vocab_parallel_token_losses

    model, layout = build(model_dir, tp)
    b = micro_batch(layout.vocab_size)
    inputs = (b["tokens"], b["positions"], None)  # None: megatron-core's causal mask (one sequence per row)
    count = b["loss_mask"].sum()
    out = {"tied": layout.tied_embeddings, "names": [n for n, _ in model.named_parameters()]}

    model.zero_grad(set_to_none=True)
    logits = model(*inputs)
    loss = (vocab_parallel_token_losses(logits, b["labels"], layout.vocab_size) * b["loss_mask"]).sum()
    (loss / count).backward()
    out["logits"] = {"loss": loss.detach(), "grads": gradients(model)}

    loss_of = OutputLayerLoss(model, layout.vocab_size, None)
    for chunk in CHUNKS:
        loss_of.chunk_setting = chunk
        model.zero_grad(set_to_none=True)
        loss = loss_of(model(*inputs), b["labels"], b["loss_mask"])
        (loss / count).backward()
        out[f"chunk{chunk}"] = {"loss": loss.detach(), "grads": gradients(model)}
        with torch.no_grad():
            out[f"eval{chunk}"] = {"loss": loss_of(model(*inputs), b["labels"], b["loss_mask"])}
    # training.loss_chunk_tokens null: chunked when this rank's fp32 logits (tokens x vocabulary / TP) > 256 MiB
    loss_of.chunk_setting = None
    out["local_vocab"] = model.output_layer.output_size_per_partition
    out["automatic"] = {n: loss_of.chunk_tokens(n) for n in (TOKENS, 10**6)}
    return out


class _LastStage(torch.nn.Module):
    """What OutputLayerLoss reads of a GPTModel: its output layer (untied)."""

    share_embeddings_and_output_weights = False

    def __init__(self, output_layer: torch.nn.Module) -> None:
        super().__init__()
        self.output_layer = output_layer


def sequence_parallel_losses(vocab: int = 300, hidden_size: int = 32) -> dict:
    """An output layer with sequence parallelism at TP=2: chunked and unchunked, and a plain reference."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from sftflow.megatron.hf_config import padded_vocab_size
    from sftflow.megatron.loss import OutputLayerLoss

    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    padded = padded_vocab_size(vocab, tp)
    config = TransformerConfig(num_layers=1, hidden_size=hidden_size, num_attention_heads=2,
                               tensor_model_parallel_size=tp, sequence_parallel=True, use_cpu_initialization=True)  # fmt: skip
    torch.manual_seed(1)  # the same full weight on both ranks, each keeping its rows
    layer = tensor_parallel.ColumnParallelLinear(hidden_size, padded, config=config, init_method=torch.nn.init.normal_,
                                                 bias=False, gather_output=False)  # fmt: skip
    loss_of = OutputLayerLoss(_LastStage(layer), vocab, None)
    g = torch.Generator().manual_seed(2)
    hidden_all = torch.randn(TOKENS, 1, hidden_size, generator=g)
    b = micro_batch(vocab)
    local = TOKENS // tp
    out = {"sequence_parallel": loss_of.sequence_parallel}
    for chunk in CHUNKS:
        loss_of.chunk_setting = chunk
        layer.zero_grad(set_to_none=True)
        hidden = hidden_all[rank * local : (rank + 1) * local].clone().requires_grad_()
        loss = loss_of(hidden.transpose(0, 1), b["labels"], b["loss_mask"])  # GPTModel's [1, tokens, hidden]
        loss.backward()
        out[f"chunk{chunk}"] = {"loss": loss.detach(), "hidden_grad": hidden.grad, "weight_grad": layer.weight.grad}

    shards = [torch.empty_like(layer.weight) for _ in range(tp)]
    dist.all_gather(shards, layer.weight.detach(), group=ps.get_tensor_model_parallel_group())
    weight = torch.cat(shards).requires_grad_()
    hidden = hidden_all[:, 0].clone().requires_grad_()
    losses = torch.nn.functional.cross_entropy(hidden @ weight[:vocab].T, b["labels"][0], reduction="none")
    loss = (losses * b["loss_mask"][0]).sum()
    loss.backward()
    rows = padded // tp
    out["reference"] = {"loss": loss.detach(), "hidden_grad": hidden.grad[rank * local : (rank + 1) * local, None],
                        "weight_grad": weight.grad[rank * rows : (rank + 1) * rows]}  # fmt: skip
    return out


def main() -> None:
    tied_dir, untied_dir, out_dir = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    dist.init_process_group("gloo")
    results = {}
    for tp in (2, 1):
        ps.initialize_model_parallel(tensor_model_parallel_size=tp)
        tensor_parallel.model_parallel_cuda_manual_seed(0)
        for name, model_dir in (("tied", tied_dir), ("untied", untied_dir)):
            results[f"tp{tp}-{name}"] = model_losses(model_dir, tp)
        if tp == 2:
            results["tp2-sequence-parallel"] = sequence_parallel_losses()
        ps.destroy_model_parallel()
    torch.save(results, out_dir / f"rank{dist.get_rank()}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
