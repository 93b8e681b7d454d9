"""Training throughput on CPU: our trainer vs TRL's SFTTrainer, same tiny Llama, same SFT sequences.

    .venv/bin/python benchmarks/train_bench.py [--steps 20] [--warmup-steps 3] [--threads 2] [--out bench.json]

What it does (everything under a temporary --workdir, removed at the end unless --keep):

1. Synthesises SFT rows (ChatML-style prompt + step-by-step arithmetic completion, lognormal token lengths,
   median --median-tokens), builds the demo BPE tokenizer (vocab 512) and saves one randomly initialised
   Llama (hidden 128, 4 layers, 4 heads / 2 kv heads, intermediate 512, tied embeddings) with save_pretrained.
2. Tokenizes the rows with our pack_data (`pack_jsonl`: sftflow-packed-v2, one sequence per bin, input order).
3. Ours: the real CLI, `torchrun --standalone --nproc-per-node=1 scripts/train.py ...` (argv from
   `sftflow.train.launch.torchrun_command`), throughput read back from its metrics.jsonl. Its global batch
   counts sequences (NeMo-RL's meaning) and it packs each step's sequences (best-fit-decreasing) into
   1024-token bins, micro-batch --ours-micro-batch bins.
4. TRL: a child process running `trl.SFTTrainer` on exactly the sequences stored in our shards (token ids +
   loss mask, read back from the packed data), with its best CPU settings: packing=True, packing_strategy="bfd"
   (the data set packed once, before training), padding_free=True, max_length=1024, SDPA attention, fp32,
   completion-only loss, per-device batch 1 x gradient accumulation 8, gradient checkpointing off,
   torch.set_num_threads(--threads).

The global batch, made equal in tokens: TRL's is 8 packed rows of 1024 tokens. Ours is
round(8 x S / R) sequences, where S / R is the mean number of sequences in a 1024-token row when the whole data
set is packed best-fit-decreasing (`sftflow.packing.binpack.pack_lengths`, the packer TRL's bfd mirrors): a step of
ours then holds, on average, the tokens of 8 such rows. Packed per step, from fewer sequences, ours fills its
bins a little less well, so a step of ours usually has somewhat more than 8 bins; the sequences, bins and fill of
every step come from its metrics.jsonl and are reported, and TRL's sequences per step are counted in its collator.

Both runs: AdamW (lr --lr constant, betas 0.9/0.999, eps 1e-8, no weight decay, no warm-up), grad-norm clip 1.0,
loss = sum of token losses / loss tokens of the global batch, OMP_NUM_THREADS=--threads. A step's time is the
wall time between the ends of consecutive optimizer steps (data loading, packing, collation and logging
included); throughput is counted over the steps after --warmup-steps, in real (non-padding) tokens per second,
and in loss (target) tokens per second, the same way for both. Prints a table, then the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SEQ_LEN = 1024
TRL_GLOBAL_ROWS = 8  # TRL's global batch: packed rows per optimizer step
MICRO_BATCH = 1  # TRL's per-device batch (packed rows per forward pass)
MODEL_SIZES = dict(
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=512,
    max_position_embeddings=SEQ_LEN,
)


# --- data --------------------------------------------------------------------------------------------------------


def _completion_piece(rng: random.Random) -> str:
    """One step of a worked solution, in the demo data's style."""
    from sftflow.demo.data import correct_solution, make_problem

    _, expr, value = make_problem(rng)
    kind = rng.random()
    if kind < 0.6:
        return correct_solution(expr, value, rng) + "\n"
    if kind < 0.85:
        return f"First, {expr} = {value}. Then we keep {value} for the next step.\n"
    return f"Let me double-check: {expr} gives {value}, which matches.\n"


def synth_rows(tokenizer, num_tokens: int, median: float, sigma: float, seed: int) -> list[dict]:
    """input/output rows whose total length (in tokens) follows lognormal(median, sigma), until `num_tokens`."""
    from sftflow.demo.data import make_problem

    rng = random.Random(seed)
    n_tok = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    rows, total = [], 0
    while total < num_tokens:
        target = int(min(SEQ_LEN, max(24, round(rng.lognormvariate(math.log(median), sigma)))))
        problems = [make_problem(rng)[0] for _ in range(rng.randint(1, 3))]
        prompt = "Solve the following, showing your work.\n" + "\n".join(problems)
        inp = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
        used = n_tok(inp) + 2  # + "<|im_end|>\n"
        pieces: list[str] = []
        while True:
            piece = _completion_piece(rng)
            k = n_tok(piece)
            if pieces and used + k > target:
                break
            pieces.append(piece)
            used += k
        out = "".join(pieces).rstrip("\n") + "<|im_end|>\n"
        rows.append({"input": inp, "output": out})
        total += used
    return rows


def prepare_inputs(work: Path, args) -> dict:
    """Tokenizer + random model (saved once, loaded by both trainers), SFT rows, our tokenized data, and our
    global batch in sequences (see the module docstring)."""
    from transformers import LlamaForCausalLM

    from sftflow.demo.data import corpus
    from sftflow.demo.model import build_model, build_tokenizer
    from sftflow.packing import PackedDataset, pack_jsonl, pack_lengths

    model_dir, packed_dir, rows_path = work / "model", work / "packed", work / "sft.jsonl"
    tokenizer = build_tokenizer(corpus(0), args.vocab_size, work / "tokenizer")
    # Enough tokens for every step of both runs, with ~10 % to spare for fill losses.
    needed = (args.warmup_steps + args.steps) * TRL_GLOBAL_ROWS * SEQ_LEN
    rows = synth_rows(tokenizer, int(needed * 1.1), args.median_tokens, args.sigma, args.seed)
    rows_path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    # The demo's model builder: random Llama sized by MODEL_SIZES, saved with safetensors and the tokenizer.
    build_model(work / "tokenizer", model_dir, args.seed, **MODEL_SIZES)
    model = LlamaForCausalLM.from_pretrained(model_dir)
    num_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())

    stats = pack_jsonl(rows_path, packed_dir, tokenizer, {"max_total_sequence_length": SEQ_LEN})
    ds = PackedDataset(packed_dir)
    index = ds.index
    lengths = ds.lengths()
    # The whole data set packed once, best-fit-decreasing, as TRL's bfd packs it: how many sequences a
    # 1024-token row holds on average decides our global batch (sequences) for the tokens of TRL's 8 rows.
    rows_bfd = pack_lengths(lengths, SEQ_LEN, "best_fit_decreasing")
    sequences_per_row = len(lengths) / len(rows_bfd)
    global_batch = max(1, round(TRL_GLOBAL_ROWS * sequences_per_row))
    return {
        "model_dir": model_dir,
        "packed_dir": packed_dir,
        "num_params": num_params,
        "global_batch_sequences": global_batch,
        "data": {
            "rows": len(rows),
            "sequences": index["num_sequences"],
            "tokens": index["num_tokens"],
            "loss_tokens": index["num_loss_tokens"],
            "mean_sequence_tokens": round(float(lengths.mean()), 1),
            "max_sequence_tokens": int(lengths.max()),
            "bfd_rows": len(rows_bfd),
            "bfd_fill": round(index["num_tokens"] / (len(rows_bfd) * SEQ_LEN), 4),
            "bfd_sequences_per_row": round(sequences_per_row, 3),
            "overlong_sequences": stats["overlong"]["count"],
        },
    }


def packed_sequences(packed_dir: Path) -> tuple[list[list[int]], list[list[int]]]:
    """Every sequence stored in our shards (sftflow-packed-v2: bin i is sequence i), as (token ids, loss mask)
    lists, in stored order."""
    from sftflow.packing import PackedDataset

    ds = PackedDataset(packed_dir)
    ids_out, mask_out = [], []
    for i in range(len(ds)):
        b = ds.get_bin(i)
        ids_out.append(b["input_ids"].tolist())
        mask_out.append(b["loss_mask"].to(dtype=int).tolist())
    return ids_out, mask_out


# --- the two runs ------------------------------------------------------------------------------------------------


def _child_env(threads: int) -> dict:
    env = dict(os.environ)
    # torchrun would otherwise force OMP_NUM_THREADS=1; give both trainers the same thread count.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run_logged(argv: list[str], log: Path, env: dict, what: str) -> float:
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as fh:
        rc = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO, check=False).returncode
    if rc != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-4000:]
        raise SystemExit(f"{what} failed (exit code {rc}); last lines of {log}:\n{tail}")
    return time.perf_counter() - t0


def read_our_metrics(path: Path) -> list[dict]:
    """Per-step records (tokens, loss tokens, sequences, bins, seconds, loss) from our trainer's metrics.jsonl."""
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    steps, prev_elapsed = [], None
    for r in rows:
        # Wall time between step ends (the whole loop: deadline check, data, forward/backward, optimizer, logging);
        # the first step has no previous end and uses its own in-step time (it is a warm-up step anyway).
        seconds = r["elapsed_seconds"] - prev_elapsed if prev_elapsed is not None else r["step_seconds"]
        prev_elapsed = r["elapsed_seconds"]
        step = {
            "step": r["step"],
            "tokens": r["tokens"],  # real tokens: the sum of the step's sequence lengths, no padding
            "loss_tokens": r["loss_tokens"],
            "sequences": r["sequences"],
            "bins": r["bins"],
            "micro_batches": r["micro_batches"],
            "fill_ratio": r["fill_ratio"],
            "seconds": seconds,
            "in_step_seconds": r["step_seconds"],
            "loss": r["loss"],
        }
        if "mfu" in r:
            step["mfu"] = r["mfu"]
        steps.append(step)
    return steps


def run_ours(work: Path, inputs: dict, args) -> dict:
    """Our trainer through its CLI under torchrun (one process); per-step records from its metrics.jsonl."""
    from sftflow.train.launch import torchrun_command

    out = work / "ours"
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "training": {
            "num_gpus": 1,
            "train_global_batch_size": inputs["global_batch_sequences"],  # sequences: 8 bfd rows' worth
            "train_micro_batch_size": args.ours_micro_batch,
            "max_num_steps": args.warmup_steps + args.steps,
            "max_num_epochs": 1000,
            "learning_rate": args.lr,
            "min_learning_rate": args.lr,  # cosine from lr to lr: constant, like TRL's "constant" schedule
            "warmup_steps": 0,
            "weight_decay": 0.0,
            "adam_beta1": 0.9,
            "adam_beta2": 0.999,
            "adam_eps": 1e-8,
            "max_grad_norm": 1.0,
            "seed": args.seed,
            "precision": "fp32",
            "activation_checkpointing": False,
            "save_period": 10**9,  # only the final save, after the measured steps
            "log_period": 1,
            "time_margin_seconds": 0,
        },
        "packing": {"enabled": True, "algorithm": "best_fit_decreasing", "max_total_sequence_length": SEQ_LEN},
    }
    config_path = out / "config.json"
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    train_args = [
        "--config", str(config_path),
        "--packed", str(inputs["packed_dir"]),
        "--model", str(inputs["model_dir"]),
        "--checkpoint-dir", str(out / "checkpoints"),
        "--metrics-dir", str(out / "metrics"),
    ]  # fmt: skip
    argv = torchrun_command(REPO / "scripts" / "train.py", 1, train_args)
    wall = _run_logged(argv, out / "train.log", _child_env(args.threads), "our trainer")
    steps = read_our_metrics(out / "metrics" / "metrics.jsonl")
    return {"steps": steps, "process_seconds": wall, "command": " ".join(str(a) for a in argv)}


def run_trl(work: Path, inputs: dict, args) -> dict:
    """TRL's SFTTrainer in a child process (this script with --child-trl); per-step records from its JSON."""
    out = work / "trl"
    out.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable, str(Path(__file__).resolve()), "--child-trl", str(out),
        "--model-dir", str(inputs["model_dir"]), "--packed-dir", str(inputs["packed_dir"]),
        "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps), "--threads", str(args.threads),
        "--lr", str(args.lr), "--seed", str(args.seed),
    ]  # fmt: skip
    wall = _run_logged(argv, out / "train.log", _child_env(args.threads), "TRL SFTTrainer")
    result = json.loads((out / "result.json").read_text(encoding="utf-8"))
    result["process_seconds"] = wall
    return result


def trl_child(out: Path, args) -> None:
    """Runs inside the child process: TRL SFTTrainer on the sequences of our packed data."""
    import torch

    torch.set_num_threads(args.threads)
    import transformers
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    transformers.logging.set_verbosity_error()
    ids, masks = packed_sequences(Path(args.packed_dir))
    dataset = Dataset.from_dict({"input_ids": ids, "completion_mask": masks})
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, attn_implementation="sdpa", dtype=torch.float32)
    config = SFTConfig(
        output_dir=str(out / "output"),
        max_steps=args.warmup_steps + args.steps,
        per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=TRL_GLOBAL_ROWS // MICRO_BATCH,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        optim="adamw_torch",
        packing=True,
        packing_strategy="bfd",
        padding_free=True,
        max_length=SEQ_LEN,
        completion_only_loss=True,
        bf16=False,
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        seed=args.seed,
    )

    batches: list[tuple[int, int, int]] = []

    class CountingCollator:
        """TRL's own collator, recording the tokens, loss tokens and sequences of every micro-batch it builds."""

        def __init__(self, inner):
            self.inner = inner

        def __call__(self, examples):
            batch = self.inner(examples)
            # padding-free: one flattened row, no padding; the model shifts labels, so targets are labels[1:].
            loss_tokens = int((batch["labels"][..., 1:] != -100).sum())
            sequences = int((batch["position_ids"] == 0).sum())  # every sequence restarts its positions at 0
            batches.append((int(batch["input_ids"].numel()), loss_tokens, sequences))
            return batch

    ends: list[float] = []
    losses: dict[int, float] = {}

    class StepClock(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            ends.append(time.perf_counter())

        def on_step_end(self, a, state, control, **kw):
            ends.append(time.perf_counter())

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses[state.global_step] = float(logs["loss"])

    trainer = SFTTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[StepClock()]
    )
    trainer.data_collator = CountingCollator(trainer.data_collator)
    packed_rows = trainer.train_dataset
    row_tokens = [len(x) for x in packed_rows["input_ids"]]
    trainer.train()

    accum = TRL_GLOBAL_ROWS // MICRO_BATCH
    steps = []
    for k in range(1, len(ends)):
        micro = batches[(k - 1) * accum : k * accum]
        steps.append(
            {
                "step": k,
                "tokens": sum(t for t, _, _ in micro),
                "loss_tokens": sum(n for _, n, _ in micro),
                "sequences": sum(q for _, _, q in micro),
                "bins": len(micro) * MICRO_BATCH,
                "seconds": ends[k] - ends[k - 1],
                "loss": losses.get(k),
            }
        )
    result = {
        "steps": steps,
        "packed_rows": len(row_tokens),
        "packed_fill": round(sum(row_tokens) / (len(row_tokens) * SEQ_LEN), 4),
        "torch_threads": torch.get_num_threads(),
        "attn_implementation": model.config._attn_implementation,
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__},
        "config": {
            k: getattr(config, k)
            for k in (
                "packing",
                "packing_strategy",
                "padding_free",
                "max_length",
                "completion_only_loss",
                "per_device_train_batch_size",
                "gradient_accumulation_steps",
                "learning_rate",
                "lr_scheduler_type",
                "optim",
                "bf16",
                "gradient_checkpointing",
                "max_grad_norm",
            )
        },
    }
    (out / "result.json").write_text(json.dumps(result, indent=2), encoding="utf-8")


# --- report ------------------------------------------------------------------------------------------------------


def summarize(steps: list[dict], warmup: int) -> dict:
    timed = steps[warmup:]
    if not timed:
        raise SystemExit(f"no steps after the {warmup} warm-up steps (ran {len(steps)})")
    seconds = sum(s["seconds"] for s in timed)
    tokens = sum(s["tokens"] for s in timed)
    loss_tokens = sum(s["loss_tokens"] for s in timed)
    tail = [s["loss"] for s in steps[-5:] if s.get("loss") is not None]
    out = {
        "timed_steps": len(timed),
        "seconds": round(seconds, 3),
        "tokens": tokens,
        "loss_tokens": loss_tokens,
        "tokens_per_second": round(tokens / seconds, 1),
        "loss_tokens_per_second": round(loss_tokens / seconds, 1),
        "seconds_per_step": round(seconds / len(timed), 4),
        "median_step_seconds": round(statistics.median(s["seconds"] for s in timed), 4),
        "min_step_seconds": round(min(s["seconds"] for s in timed), 4),
        # Robust to a few steps slowed down by other processes (noisy machines): mean tokens / median time.
        "tokens_per_second_median_step": round(tokens / len(timed) / statistics.median(s["seconds"] for s in timed), 1),
        "first_loss": steps[0].get("loss"),
        "final_loss": steps[-1].get("loss"),
        "mean_loss_last_5": round(sum(tail) / len(tail), 5) if tail else None,
        "steps_run": len(steps),
    }
    for key in ("sequences", "bins"):
        if all(key in s for s in timed):
            out[f"{key}_per_step"] = round(sum(s[key] for s in timed) / len(timed), 2)
    if all("fill_ratio" in s for s in timed):
        out["fill_ratio"] = round(sum(s["fill_ratio"] for s in timed) / len(timed), 4)
    if all("in_step_seconds" in s for s in timed):
        in_step = sum(s["in_step_seconds"] for s in timed)
        out["tokens_per_second_in_step"] = round(tokens / in_step, 1)
    return out


def print_table(result: dict) -> None:
    ours, theirs = result["ours"], result["trl"]
    rows = [
        ("tokens/s (real, non-padding)", "tokens_per_second", "{:,.0f}"),
        ("loss tokens/s", "loss_tokens_per_second", "{:,.0f}"),
        ("tokens/s (median step time)", "tokens_per_second_median_step", "{:,.0f}"),
        ("seconds / optimizer step", "seconds_per_step", "{:.3f}"),
        ("median step (s)", "median_step_seconds", "{:.3f}"),
        ("fastest step (s)", "min_step_seconds", "{:.3f}"),
        ("tokens / step", None, "{:,.0f}"),
        ("loss tokens / step", None, "{:,.0f}"),
        ("sequences / step", "sequences_per_step", "{:.1f}"),
        ("packed rows (bins) / step", "bins_per_step", "{:.2f}"),
        ("first loss", "first_loss", "{:.4f}"),
        ("final loss", "final_loss", "{:.4f}"),
        ("mean loss, last 5 steps", "mean_loss_last_5", "{:.4f}"),
    ]
    print()
    print(f"{'':<30} {'ours':>12} {'TRL SFTTrainer':>15}")
    for label, key, fmt in rows:
        cells = []
        for side in (ours, theirs):
            if key is None:
                value = side["tokens" if "loss" not in label else "loss_tokens"] / side["timed_steps"]
            else:
                value = side.get(key)
            cells.append(fmt.format(value) if value is not None else "-")
        print(f"{label:<30} {cells[0]:>12} {cells[1]:>15}")
    print(
        f"{'ratio ours / TRL':<30} {result['ratio_tokens_per_second']:>12.2f}x   (loss tokens/s: "
        f"{result['ratio_loss_tokens_per_second']:.2f}x; target >= 1.30x)"
    )
    print(f"{'ratio, median step time':<30} {result['ratio_tokens_per_second_median_step']:>12.2f}x")
    print(f"measured over steps {result['warmup_steps'] + 1}..{result['warmup_steps'] + result['steps']}")
    print()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="measured optimizer steps (after the warm-up)")
    p.add_argument("--warmup-steps", type=int, default=3, help="optimizer steps run first and not measured (>= 1)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads of each trainer")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--median-tokens", type=float, default=180.0, help="median tokens of one SFT row")
    p.add_argument("--sigma", type=float, default=0.6, help="lognormal sigma of the row lengths")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--only", choices=["ours", "trl"], default=None, help="run one side only")
    p.add_argument(
        "--ours-micro-batch",
        type=int,
        default=MICRO_BATCH,
        help="bins (packed rows) per forward pass in our trainer (TRL keeps 1 x 8 rows, its best with padding-free packing)",
    )
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    p.add_argument("--workdir", default=None, help="working directory (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the working directory")
    # internal: the TRL child process
    p.add_argument("--child-trl", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--packed-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.warmup_steps < 1 or args.steps < 1:
        p.error("--warmup-steps and --steps must be >= 1 (a step's time is measured from the previous step's end)")
    if args.child_trl:
        trl_child(Path(args.child_trl), args)
        return

    import torch
    import transformers

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="train_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    try:
        inputs = prepare_inputs(work, args)
        print(
            f"model {inputs['num_params']:,} parameters; data: {json.dumps(inputs['data'])}; our global batch "
            f"{inputs['global_batch_sequences']} sequences; prepared in {time.perf_counter() - t0:.1f} s",
            flush=True,
        )
        result: dict = {
            "benchmark": "train_bench",
            "steps": args.steps,
            "warmup_steps": args.warmup_steps,
            "threads": args.threads,
            "seq_len": SEQ_LEN,
            "trl_global_batch_rows": TRL_GLOBAL_ROWS,
            "trl_micro_batch_rows": MICRO_BATCH,
            "ours_global_batch_sequences": inputs["global_batch_sequences"],
            "ours_micro_batch_bins": args.ours_micro_batch,
            "lr": args.lr,
            "model": {"num_params": inputs["num_params"], **MODEL_SIZES, "vocab_size": args.vocab_size},
            "data": inputs["data"],
            "machine": {
                "cpu_count": os.cpu_count(),
                "platform": platform.platform(),
                "loadavg_before": [round(x, 2) for x in load_before],
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            },
        }
        raw = {}
        if args.only in (None, "ours"):
            raw["ours"] = run_ours(work, inputs, args)
            result["ours"] = summarize(raw["ours"]["steps"], args.warmup_steps)
            result["ours"]["process_seconds"] = round(raw["ours"]["process_seconds"], 1)
            result["ours"]["command"] = raw["ours"]["command"]
            print(
                f"ours: {result['ours']['tokens_per_second']:,.0f} tokens/s, {result['ours']['sequences_per_step']} sequences "
                f"in {result['ours']['bins_per_step']} bins per step",
                flush=True,
            )
        if args.only in (None, "trl"):
            raw["trl"] = run_trl(work, inputs, args)
            result["trl"] = summarize(raw["trl"]["steps"], args.warmup_steps)
            result["trl"]["process_seconds"] = round(raw["trl"]["process_seconds"], 1)
            for key in ("packed_rows", "packed_fill", "torch_threads", "attn_implementation", "versions", "config"):
                result["trl"][key] = raw["trl"][key]
            print(f"TRL:  {result['trl']['tokens_per_second']:,.0f} tokens/s", flush=True)
        result["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        result["total_seconds"] = round(time.perf_counter() - t0, 1)
        result["per_step"] = {side: r["steps"] for side, r in raw.items()}
        if "ours" in result and "trl" in result:
            result["ratio_tokens_per_second"] = round(
                result["ours"]["tokens_per_second"] / result["trl"]["tokens_per_second"], 3
            )
            result["ratio_loss_tokens_per_second"] = round(
                result["ours"]["loss_tokens_per_second"] / result["trl"]["loss_tokens_per_second"], 3
            )
            result["ratio_tokens_per_second_median_step"] = round(
                result["ours"]["tokens_per_second_median_step"] / result["trl"]["tokens_per_second_median_step"], 3
            )
            print_table(result)
        text = json.dumps(result, indent=2)
        if args.out:
            Path(args.out).write_text(text + "\n", encoding="utf-8")
        print(text)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
        elif args.keep:
            print(f"working directory kept: {work}", file=sys.stderr)


if __name__ == "__main__":
    main()
