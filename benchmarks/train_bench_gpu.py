"""GPU training throughput and MFU of our trainer: a ~0.8B-parameter random Llama, bf16, 4096-token packed rows.

    python benchmarks/train_bench_gpu.py [--steps 20] [--warmup-steps 5] [--nproc 1] [--out result.json]

Needs a CUDA device (exits with status 3 and a message otherwise). Everything is synthetic, nothing is downloaded:

1. a Llama-shaped model (default hidden 2048, 16 layers, 16 heads / 8 kv heads, intermediate 5632, vocab 32000,
   tied embeddings: ~0.82B parameters) randomly initialised and saved once with save_pretrained (bf16 on disk;
   the trainer keeps fp32 master weights and computes in bf16);
2. random-token SFT sequences (lognormal lengths, median --median-tokens, the first ~30 % of each without loss)
   written one per bin in the sftflow-packed-v2 format, as pack_data stores them;
3. our trainer through its CLI: `torchrun --standalone --nproc-per-node=N scripts/train.py ...`, precision bf16,
   micro-batch 1 bin; the global batch counts sequences (--global-batch; by default 8 full 4096-token rows' worth,
   see ROWS_PER_STEP), which the trainer packs per step best-fit-decreasing into 4096-token bins; throughput
   read back from its metrics.jsonl; once per training.backend in --backends (default: fsdp, then megatron on
   the same model and data).

Reports real (non-padding) tokens/s over the steps after the warm-up, per GPU and in all, and
MFU = 6 x parameters x tokens/s per GPU / the GPU's peak dense bf16 FLOP/s (sftflow.train.metrics.PEAK_BF16_FLOPS,
or --peak-tflops). 6N ignores attention-score FLOPs, so MFU understates the work at long sequences.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from train_bench import REPO, read_our_metrics, summarize  # a sibling: benchmarks/ is this script's folder

PAD_ID = 0
# The default global batch holds about the tokens of this many full --seq-len rows. Before issue 27 the global
# batch counted packed rows and the default was 8 rows of 4,096 tokens (~32.1k tokens at bfd's ~98 % fill);
# it now counts sequences, so the default is round(8 x the mean sequences per row of a best-fit-decreasing
# packing of the data): at median 600 / sigma 0.8 (mean ~810 tokens) that is 8 x ~5.0 = ~40 sequences,
# ~33k tokens a step, packed by the trainer per step into ~8-9 bins.
ROWS_PER_STEP = 8


def require_cuda() -> None:
    try:
        import torch
    except ImportError:
        raise SystemExit("train_bench_gpu: torch is not installed") from None
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        print(
            "train_bench_gpu: no CUDA device is available (torch.cuda.is_available() is False; torch "
            f"{torch.__version__}, CUDA build {torch.version.cuda}). This benchmark needs a GPU.",
            file=sys.stderr,
        )
        raise SystemExit(3)


def make_model(out_dir: Path, args) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.seq_len,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        pad_token_id=PAD_ID,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(args.seed)
    # Initialising 0.8B parameters on the GPU takes a second, on CPU much longer.
    with torch.device("cpu" if args.cpu_smoke else "cuda"):
        model = LlamaForCausalLM(config)
    num_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    model.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    del model
    if not args.cpu_smoke:
        torch.cuda.empty_cache()
    return num_params


def make_packed(out_dir: Path, args, num_tokens: int, min_sequences: int) -> dict:
    """Random sequences (at least `num_tokens` tokens and `min_sequences` sequences) written one per bin, in order
    (sftflow-packed-v2, as pack_data writes them; the trainer packs each step's sequences). Returns a data summary
    with the global batch in sequences: --global-batch, or, when unset, 8 rows' worth of tokens (see main)."""
    from sftflow.packing import pack_lengths, write_packed

    rng = np.random.default_rng(args.seed)
    lengths: list[int] = []
    acc = 0
    while acc < num_tokens or len(lengths) < min_sequences:
        lengths.append(int(np.clip(round(rng.lognormal(math.log(args.median_tokens), args.sigma)), 16, args.seq_len)))
        acc += lengths[-1]
    lengths_np = np.array(lengths, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths_np)])
    tokens = rng.integers(3, args.vocab_size, size=int(offsets[-1])).astype(np.int32)
    loss_mask = np.ones(int(offsets[-1]), dtype=np.uint8)
    for start, n in zip(offsets[:-1], lengths_np):
        loss_mask[start : start + max(1, int(0.3 * n))] = 0  # the "prompt"
    out_dir.mkdir(parents=True, exist_ok=True)
    index = write_packed(
        out_dir,
        tokens,
        loss_mask,
        lengths_np,
        sequences_per_shard=8192,
        meta={
            "max_total_sequence_length": args.seq_len,
            "pad_token_id": PAD_ID,
            "tokenizer": "none (random token ids)",
            "source": "train_bench_gpu synthetic",
        },
    )
    # The whole data set packed best-fit-decreasing once: sequences per full row, for the default global batch.
    rows_bfd = pack_lengths(lengths_np, args.seq_len, "best_fit_decreasing")
    sequences_per_row = len(lengths) / len(rows_bfd)
    return {
        "sequences": int(index["num_sequences"]),
        "tokens": int(index["num_tokens"]),
        "mean_sequence_tokens": round(float(lengths_np.mean()), 1),
        "bfd_rows": len(rows_bfd),
        "bfd_sequences_per_row": round(sequences_per_row, 3),
        "global_batch_sequences": args.global_batch or max(1, round(ROWS_PER_STEP * sequences_per_row)),
    }


def run_backend(backend: str, work: Path, args, data: dict, num_params: int, peak: float | None) -> dict:
    """Train with one backend through scripts/train.py under torchrun; tokens/s and MFU from its metrics."""
    from sftflow.train.launch import torchrun_command

    config = {
        "training": {
            "backend": backend,
            "num_gpus": args.nproc,
            "train_global_batch_size": data["global_batch_sequences"],
            "train_micro_batch_size": 1,
            "max_num_steps": args.warmup_steps + args.steps,
            "max_num_epochs": 1000,
            "learning_rate": args.lr,
            "min_learning_rate": args.lr,
            "warmup_steps": 0,
            "seed": args.seed,
            "precision": "bf16",
            "activation_checkpointing": args.activation_checkpointing,
            "tensor_model_parallel_size": args.tp,
            "save_period": 10**9,
            "log_period": 1,
            "time_margin_seconds": 0,
        },
        "packing": {"max_total_sequence_length": args.seq_len},
    }
    config_path = work / f"config.{backend}.json"
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    train_args = [
        "--config", str(config_path), "--packed", str(work / "packed"), "--model", str(work / "model"),
        "--checkpoint-dir", str(work / f"checkpoints.{backend}"), "--metrics-dir", str(work / f"metrics.{backend}"),
    ]  # fmt: skip
    argv = torchrun_command(REPO / "scripts" / "train.py", args.nproc, train_args)
    log = work / f"train.{backend}.log"
    t_train = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "w", encoding="utf-8") as fh:
        rc = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO, check=False).returncode
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(log, Path(args.out).with_suffix(f".train.{backend}.log"))
    if rc != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-6000:]
        raise SystemExit(
            f"train_bench_gpu: the {backend} trainer failed (exit code {rc}); last lines of its log:\n{tail}"
        )
    text = log.read_text(encoding="utf-8", errors="replace")
    if backend == "megatron":
        attention = "Transformer Engine THD" if "(TE layers)" in text else "megatron-core local (block-diagonal mask)"
    else:
        used = re.search(r"packed attention: (\w+)", text)  # the fsdp engine logs the kernel it took
        attention = used.group(1) if used else "unknown (not in the log)"
    steps = read_our_metrics(work / f"metrics.{backend}" / "metrics.jsonl")
    summary = summarize(steps, args.warmup_steps)
    tps = summary["tokens_per_second"]
    per_gpu = tps / args.nproc
    mfu = 6.0 * num_params * per_gpu / peak if peak else None
    return {
        "attention": attention,
        "summary": summary,
        "tokens_per_second": tps,
        "tokens_per_second_per_gpu": round(per_gpu, 1),
        "mfu": round(mfu, 4) if mfu is not None else None,
        "train_process_seconds": round(time.perf_counter() - t_train, 1),
        "command": " ".join(str(a) for a in argv),
        "per_step": steps,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="measured optimizer steps (after the warm-up)")
    p.add_argument("--warmup-steps", type=int, default=5, help="optimizer steps run first and not measured (>= 1)")
    p.add_argument("--nproc", type=int, default=1, help="GPUs (torchrun processes)")
    p.add_argument(
        "--global-batch",
        type=int,
        default=None,
        help="sequences per optimizer step, all GPUs (training.train_global_batch_size); default: 8 full rows' worth "
        "of tokens, round(8 x the mean sequences per row of a best-fit-decreasing packing of the data)",
    )
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--median-tokens", type=float, default=600.0, help="median tokens of one sequence")
    p.add_argument("--sigma", type=float, default=0.8, help="lognormal sigma of the sequence lengths")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--backends", default="fsdp,megatron", help="comma-separated training.backend values to run")
    p.add_argument("--tp", type=int, default=1, help="training.tensor_model_parallel_size")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s of one GPU (override)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    p.add_argument("--workdir", default=None, help="working directory (default: a temporary one, removed)")
    # internal: check this script's plumbing on a CPU with a tiny model (no throughput meaning)
    p.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.warmup_steps < 1 or args.steps < 1:
        p.error("--warmup-steps and --steps must be >= 1")
    if args.global_batch is not None and args.global_batch < 1:
        p.error("--global-batch must be >= 1")
    if not args.cpu_smoke:
        require_cuda()

    import torch
    import transformers

    from sftflow.train.metrics import peak_flops

    if not args.cpu_smoke and torch.cuda.device_count() < args.nproc:
        raise SystemExit(f"train_bench_gpu: --nproc {args.nproc} but only {torch.cuda.device_count()} GPUs visible")
    device_name = "cpu (smoke test)" if args.cpu_smoke else torch.cuda.get_device_name(0)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(device_name)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="train_bench_gpu_"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        total_steps = args.warmup_steps + args.steps
        num_params = make_model(work / "model", args)
        # Tokens for every step at 8 rows' worth, 10 % spare; at least one sequence per step of an explicit batch.
        data = make_packed(
            work / "packed",
            args,
            num_tokens=int(total_steps * ROWS_PER_STEP * args.seq_len * 1.1),
            min_sequences=total_steps * (args.global_batch or 0),
        )
        print(f"model {num_params / 1e9:.3f}B parameters; data {json.dumps(data)}; prepared in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)  # fmt: skip
        runs = {}
        for backend in args.backends.split(","):
            runs[backend] = run_backend(backend, work, args, data, num_params, peak)
        first = runs[args.backends.split(",")[0]]
        result = {
            "benchmark": "train_bench_gpu",
            "device": device_name,
            "num_gpus": args.nproc,
            "peak_bf16_flops_per_gpu": peak,
            "model": {
                "num_params": num_params,
                "hidden": args.hidden,
                "intermediate": args.intermediate,
                "layers": args.layers,
                "heads": args.heads,
                "kv_heads": args.kv_heads,
                "vocab_size": args.vocab_size,
            },
            "seq_len": args.seq_len,
            "global_batch_sequences": data["global_batch_sequences"],
            "activation_checkpointing": args.activation_checkpointing,
            "data": data,
            "steps": args.steps,
            "warmup_steps": args.warmup_steps,
            # the first backend's numbers at the top level, every backend's under "backends"
            "tokens_per_second": first["tokens_per_second"],
            "mfu": first["mfu"],
            "backends": runs,
            "total_seconds": round(time.perf_counter() - t0, 1),
            "versions": {
                "torch": torch.__version__,
                "cuda": torch.version.cuda,
                "transformers": transformers.__version__,
            },
        }
        print()
        print(f"{device_name} x {args.nproc}, {num_params / 1e9:.3f}B params, seq {args.seq_len}")
        for backend, run in runs.items():
            summary = run["summary"]
            mfu = run["mfu"]
            print(f"  {backend} (attention: {run['attention']})")
            print(f"    tokens/s (real, non-padding): {run['tokens_per_second']:,.0f} total, "
                  f"{run['tokens_per_second_per_gpu']:,.0f} per GPU")  # fmt: skip
            print(f"    seconds / optimizer step:     {summary['seconds_per_step']:.3f} "
                  f"(median {summary['median_step_seconds']:.3f})")  # fmt: skip
            print(f"    per step:                     {summary['sequences_per_step']:.1f} sequences in "
                  f"{summary['bins_per_step']:.2f} bins (fill {summary['fill_ratio']:.3f})")  # fmt: skip
            print(f"    MFU (6N):                     {100 * mfu:.1f}%" if mfu is not None else "    MFU: unknown peak")
            print(f"    loss: {summary['first_loss']:.4f} -> {summary['final_loss']:.4f}")
        print()
        text = json.dumps(result, indent=2)
        if args.out:
            Path(args.out).write_text(text + "\n", encoding="utf-8")
        print(text)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
