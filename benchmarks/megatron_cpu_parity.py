"""How closely the megatron backend follows the fsdp backend, on CPU: every parallel layout, same data.

    python -m benchmarks.megatron_cpu_parity [--steps 8] [--families dense,moe] [--layouts single,dp2,...]
        [--out result.json]    # from the repo root

Builds the trainer tests' tiny Llama (2 layers, hidden 64, tied embeddings) and a tiny Qwen3-MoE (4 experts,
2 active, first layer dense), writes 96 random sequences of 6-30 tokens one per bin (the trainer tests'
make_packed, sftflow-packed-v2), trains each with the fsdp backend (scripts/train.py) and with the megatron
backend in several layouts (tests/megatron_backend/cpu_train.py: megatron-core's own training path on gloo
ranks through the test-only CUDA -> CPU shim), fp32, global batch 8 sequences (the trainer packs each step's
sequences into 64-token bins, 2-4 of them; the same sequences in every layout), micro-batch 2 bins, and
reports per layout the largest relative difference of the per-step loss and gradient norm from fsdp's, and
the wall time of the run (torchrun start included; CPU times say nothing of GPU speed).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.train.conftest import (
    REPO,
    logged,
    make_model,
    make_moe_model,
    make_packed,
    subprocess_env,
    train_command,
    training_config,
    write_config,
)

LAYOUTS = {
    "dense": [
        ("single", 1, {}),
        ("dp2", 2, {}),
        ("tp2", 2, {"tensor_model_parallel_size": 2}),
        ("pp2", 2, {"pipeline_model_parallel_size": 2}),
        ("tp2pp2", 4, {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2}),
    ],
    "moe": [
        ("single", 1, {}),
        ("ep2", 2, {"expert_model_parallel_size": 2}),
        ("pp2ep2", 4, {"pipeline_model_parallel_size": 2, "expert_model_parallel_size": 2}),
    ],
}


def run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=REPO, check=False)
    if result.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stderr[-4000:]}")
    return time.perf_counter() - t0


def max_rel(ours: dict, theirs: dict) -> float:
    assert ours.keys() == theirs.keys(), (sorted(ours), sorted(theirs))
    return max(abs(ours[s] - theirs[s]) / abs(theirs[s]) for s in ours)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--families", default=",".join(LAYOUTS), help="comma-separated models to run (dense, moe)")
    p.add_argument("--layouts", default=None, help="comma-separated megatron layouts to run (default: all)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    families = args.families.split(",")
    wanted = set(args.layouts.split(",")) if args.layouts else None
    unknown = set(families) - set(LAYOUTS)
    if unknown:
        p.error(f"--families: unknown {sorted(unknown)} (known: {', '.join(LAYOUTS)})")
    work = Path(tempfile.mkdtemp(prefix="megatron_parity_"))
    packed = make_packed(work / "packed")
    builders = {"dense": make_model, "moe": make_moe_model}
    models = {family: builders[family](work / family) for family in families}
    rows = []
    for family in families:
        layouts = [layout for layout in LAYOUTS[family] if wanted is None or layout[0] in wanted]
        cfg = training_config(max_num_steps=args.steps, save_period=10**6)
        fsdp_ckpt = work / f"{family}-fsdp"
        seconds = run(train_command(write_config(work / "fsdp.json", cfg), packed, models[family], fsdp_ckpt))
        rows.append({"model": family, "backend": "fsdp", "layout": "single", "ranks": 1, "seconds": round(seconds, 1),
                     "final_loss": logged(fsdp_ckpt)[args.steps]})  # fmt: skip
        for name, nproc, layout in layouts:
            config = write_config(work / f"{family}-{name}.json", {**cfg, "training": {**cfg["training"],
                                  "backend": "megatron", **layout}})  # fmt: skip
            ckpt = work / f"{family}-megatron-{name}"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   str(REPO / "tests" / "megatron_backend" / "cpu_train.py"), str(config), str(packed),
                   str(models[family]), str(ckpt), "0", "1"]  # fmt: skip
            seconds = run(cmd)
            rows.append({
                "model": family, "backend": "megatron", "layout": name, "ranks": nproc, "seconds": round(seconds, 1),
                "final_loss": logged(ckpt)[args.steps],
                "max_rel_loss_diff": max_rel(logged(ckpt), logged(fsdp_ckpt)),
                "max_rel_grad_norm_diff": max_rel(logged(ckpt, "grad_norm"), logged(fsdp_ckpt, "grad_norm")),
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    print(
        "\n| model | backend | layout | ranks | final loss | max rel. loss diff | max rel. grad-norm diff | seconds |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        diff = (f"{r['max_rel_loss_diff']:.1e} | {r['max_rel_grad_norm_diff']:.1e}" if "max_rel_loss_diff" in r
                else "— | —")  # fmt: skip
        print(f"| {r['model']} | {r['backend']} | {r['layout']} | {r['ranks']} | {r['final_loss']:.4f} | {diff} | "
              f"{r['seconds']} |")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps({"steps": args.steps, "runs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
