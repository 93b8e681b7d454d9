"""Speed of the packed-attention kernels on this machine's device: `python benchmarks/attention_bench.py --out FILE.json`.

One packed row of random q/k/v ([1, heads, tokens, head_dim]; bf16 on CUDA, fp32 on CPU) split into sequences of
random lengths goes through the trainer's own `varlen_attention` with each kernel that can run here: the
per-sequence SDPA loop, flex_attention with the document block mask (compiled on CUDA; on CPU forward only, as
torch has no CPU backward for it), torch's varlen_attn (CUDA, torch >= 2.10) and flash-attn (when installed).
Each kernel's forward and forward+backward are timed (median of --repeats after warm-up; the first call, which
compiles flex, is reported apart), and its output and gradients are compared with the loop's. Prints a table and
writes the JSON to --out. Defaults: CUDA 16,384 tokens in 40 sequences, 8 heads x 128; CPU 2,048 tokens in 10
sequences, 8 heads x 64.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from sftflow.train import attention as A


def segment_lengths(tokens: int, segments: int, seed: int) -> list[int]:
    """`segments` random lengths (each >= 1) summing to `tokens`."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(segments, generator=g) + 0.1
    lengths = (weights / weights.sum() * (tokens - segments)).floor().long() + 1
    lengths[-1] += tokens - int(lengths.sum())
    return lengths.tolist()


def kernels_here(device: torch.device, dtype: torch.dtype) -> dict[str, str]:
    """kernel -> "" (runs fwd+bwd), "forward only", or why it is skipped."""
    out = {}
    for kernel in ("sdpa_loop", "flex", "varlen", "flash"):
        problem = A.kernel_problem(kernel, device, dtype)
        if kernel == "flex" and problem and "backward" in problem:
            out[kernel] = "forward only"
        else:
            out[kernel] = problem or ""
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class PackedRow:
    """The attention inputs of one packed row: q/k/v [1, heads, tokens, head_dim] and where its sequences start."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_seq_lens: torch.Tensor  # int32 sequence starts and the end, on the device
    bounds: tuple[int, ...]  # the same, as Python ints
    max_len: int  # the longest sequence


def run_kernel(kernel: str, row: PackedRow, backward: bool):
    """The kernel's output and, with `backward`, the gradients of a loss on it (forward only: without autograd)."""
    q, k, v = row.q, row.k, row.v
    if not backward:  # flex_attention refuses CPU inputs that require grad, even under no_grad
        q, k, v = q.detach(), k.detach(), v.detach()
    with torch.set_grad_enabled(backward):
        out, _ = A.varlen_attention(
            None, q, k, v, None, scaling=q.shape[-1] ** -0.5, cu_seq_lens_q=row.cu_seq_lens,
            max_length_q=row.max_len, sftflow_segments=row.bounds, sftflow_attention=kernel,
        )  # fmt: skip
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v)) if backward else None
    return out, grads


def time_kernel(kernel: str, row: PackedRow, backward: bool, repeats: int) -> tuple[float, float]:
    """(first call seconds, median ms of the following calls)."""
    device = row.q.device
    _sync(device)
    start = time.perf_counter()
    run_kernel(kernel, row, backward)
    _sync(device)
    first = time.perf_counter() - start
    run_kernel(kernel, row, backward)  # one more warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        run_kernel(kernel, row, backward)
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return first, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON results file")
    parser.add_argument("--tokens", type=int, help="tokens in the packed row (CUDA 16384, CPU 2048)")
    parser.add_argument("--segments", type=int, help="sequences in the row (CUDA 40, CPU 10)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, help="key/value heads (default: --heads)")
    parser.add_argument("--head-dim", type=int, help="CUDA 128, CPU 64")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    # CPU flex is eager on purpose (what the trainer would run there); its "not compiled" warning is expected
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    tokens = args.tokens or (16384 if cuda else 2048)
    segments = args.segments or (40 if cuda else 10)
    head_dim = args.head_dim or (128 if cuda else 64)
    kv_heads = args.kv_heads or args.heads
    lengths = segment_lengths(tokens, segments, args.seed)
    bounds = tuple([0, *torch.tensor(lengths).cumsum(0).tolist()])
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)

    g = torch.Generator(device=device).manual_seed(args.seed)

    def rand(heads):
        return torch.randn(1, heads, tokens, head_dim, device=device, dtype=dtype, generator=g).requires_grad_()

    packed = PackedRow(rand(args.heads), rand(kv_heads), rand(kv_heads), cu, bounds, max(lengths))
    setup = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."),
        "tokens": tokens,
        "sequences": segments,
        "longest_sequence": max(lengths),
        "heads": args.heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "repeats": args.repeats,
        "auto_kernel": A.auto_kernel(device, dtype),
    }
    print(json.dumps(setup))

    ref_out, ref_grads = run_kernel("sdpa_loop", packed, backward=True)
    ref_out = ref_out.detach()
    results = {}
    for kernel, status in kernels_here(device, dtype).items():
        if status not in ("", "forward only"):
            results[kernel] = {"skipped": status}
            print(f"{kernel}: skipped ({status})", flush=True)
            continue
        backward = status == ""
        row = {}
        out, grads = run_kernel(kernel, packed, backward)
        row["max_abs_diff_out"] = float((out.detach().float() - ref_out.float()).abs().max())
        if grads:
            row["max_abs_diff_grad"] = max(float((a.float() - b.float()).abs().max()) for a, b in zip(grads, ref_grads))
        first, row["fwd_ms"] = time_kernel(kernel, packed, False, args.repeats)
        row["first_fwd_s"] = round(first, 2)
        if backward:
            first, row["fwd_bwd_ms"] = time_kernel(kernel, packed, True, args.repeats)
            row["first_fwd_bwd_s"] = round(first, 2)
        else:
            row["fwd_bwd_ms"] = None
            row["note"] = status
        results[kernel] = row
        print(f"{kernel}: {json.dumps(row)}", flush=True)

    loop = results["sdpa_loop"]
    print(f"\n{'kernel':<10} {'fwd ms':>9} {'fwd+bwd ms':>11} {'vs loop':>8} {'max |diff| out/grad':>22}")
    for kernel, row in results.items():
        if "skipped" in row:
            print(f"{kernel:<10} skipped: {row['skipped']}")
            continue
        total = row["fwd_bwd_ms"]
        speedup = f"{loop['fwd_bwd_ms'] / total:.1f}x" if total else f"{loop['fwd_ms'] / row['fwd_ms']:.1f}x fwd"
        diff = f"{row['max_abs_diff_out']:.1e}/{row.get('max_abs_diff_grad', float('nan')):.1e}"
        print(
            f"{kernel:<10} {row['fwd_ms']:>9.2f} {total if total is not None else float('nan'):>11.2f} "
            f"{speedup:>8} {diff:>22}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"setup": setup, "results": results}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
