"""Checkpoint averaging: wall time and peak RSS increase vs the size of one checkpoint.

    .venv/bin/python benchmarks/average_bench.py [--num-models 4] [--size-mb 500] [--tensor-mb 50] \\
        [--dtype bfloat16] [--shard-mb 0] [--naive] [--workdir DIR] [--keep]

Builds --num-models checkpoints of --size-mb MiB each (random tensors of --tensor-mb MiB, in one
model.safetensors or in shards of --shard-mb MiB), then runs `average_hf_models` in a fresh child process:
the RSS increase is the child's peak RSS minus its RSS just before averaging, after the imports. The peak is
/proc's VmHWM, reset just before averaging (Linux only); not getrusage's ru_maxrss, which a child inherits from
its parent's RSS at fork, here the builder's. Page cache is not RSS: run it twice to time warm reads. --naive also times the obvious
alternative (safetensors load_file of every model, then the mean) in another fresh child, for comparison.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

MIB = 2**20

CHILD = """
import json, sys, time
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
from sftflow.averaging import average_hf_models

def status_bytes(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

dirs, out, naive = [Path(d) for d in {dirs!r}], Path({out!r}), {naive!r}
baseline = status_bytes("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS
start = time.perf_counter()
if naive:
    models = [load_file(d / "model.safetensors") for d in dirs]
    mean = {{k: (sum(m[k].float() for m in models) / len(models)).to(v.dtype) for k, v in models[0].items()}}
    out.mkdir()
    save_file(mean, str(out / "model.safetensors"), metadata={{"format": "pt"}})
else:
    average_hf_models(dirs, out)
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "baseline": baseline, "peak": status_bytes("VmHWM")}}))
"""


def build_checkpoints(workdir: Path, num_models: int, size_mb: int, tensor_mb: int, dtype: str, shard_mb: int):
    """num_models HF-style weight dirs step_1.. of random tensors; returns (dirs, bytes per checkpoint)."""
    import torch
    from safetensors.torch import save_file

    torch_dtype = getattr(torch, dtype)
    numel = tensor_mb * MIB // torch_dtype.itemsize
    num_tensors = max(1, size_mb // tensor_mb)
    dirs = []
    for i in range(num_models):
        model_dir = workdir / f"step_{(i + 1) * 100}"
        model_dir.mkdir(parents=True)
        g = torch.Generator().manual_seed(i)
        names = [f"model.layers.{j}.weight" for j in range(num_tensors)]
        per_shard = max(1, shard_mb // tensor_mb) if shard_mb else num_tensors
        groups = [names[k : k + per_shard] for k in range(0, num_tensors, per_shard)]
        weight_map = {}
        for k, group in enumerate(groups, start=1):
            filename = "model.safetensors" if len(groups) == 1 else f"model-{k:05d}-of-{len(groups):05d}.safetensors"
            tensors = {n: torch.randn(numel, generator=g).to(torch_dtype) for n in group}
            save_file(tensors, str(model_dir / filename), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(group, filename))
            del tensors
        if len(groups) > 1:
            index = {"metadata": {"total_size": num_tensors * numel * torch_dtype.itemsize}, "weight_map": weight_map}
            (model_dir / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")
        (model_dir / "config.json").write_text("{}", encoding="utf-8")
        dirs.append(model_dir)
    return dirs, num_tensors * numel * torch_dtype.itemsize


def run_child(dirs: list[Path], out: Path, naive: bool) -> dict:
    code = CHILD.format(dirs=[str(d) for d in dirs], out=str(out), naive=naive)
    result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-models", type=int, default=4)
    p.add_argument("--size-mb", type=int, default=500, help="size of one checkpoint (MiB)")
    p.add_argument("--tensor-mb", type=int, default=50, help="size of one tensor (MiB)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    p.add_argument(
        "--shard-mb", type=int, default=0, help="shard the checkpoints into files of this size (0: one file)"
    )
    p.add_argument("--naive", action="store_true", help="also time load_file of every model + mean (single file only)")
    p.add_argument("--workdir", default=None, help="build the checkpoints in a new temporary directory under this one")
    p.add_argument("--keep", action="store_true", help="keep the workdir")
    args = p.parse_args()

    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="average_bench.", dir=args.workdir))
    try:
        start = time.perf_counter()
        dirs, checkpoint_bytes = build_checkpoints(
            workdir, args.num_models, args.size_mb, args.tensor_mb, args.dtype, args.shard_mb
        )
        print(
            f"built {args.num_models} checkpoints of {checkpoint_bytes / MIB:.0f} MiB ({args.dtype}, "
            f"{args.tensor_mb} MiB tensors) in {time.perf_counter() - start:.1f} s under {workdir}"
        )
        methods = ["streaming", "naive"] if args.naive and not args.shard_mb else ["streaming"]
        results = {}
        for method in methods:
            out = workdir / f"average_{method}"
            r = run_child(dirs, out, naive=method == "naive")
            shutil.rmtree(out)
            increase = r["peak"] - r["baseline"]
            read_gb = args.num_models * checkpoint_bytes / 1e9
            results[method] = {
                "seconds": round(r["seconds"], 2),
                "read_gb_per_s": round(read_gb / r["seconds"], 2),
                "rss_increase_mib": round(increase / MIB),
                "rss_increase_vs_checkpoint": round(increase / checkpoint_bytes, 3),
            }
        print(f"{'method':<10} {'seconds':>8} {'read GB/s':>10} {'RSS +MiB':>9} {'x checkpoint':>13}")
        for method, r in results.items():
            print(
                f"{method:<10} {r['seconds']:>8.2f} {r['read_gb_per_s']:>10.2f} {r['rss_increase_mib']:>9} "
                f"{r['rss_increase_vs_checkpoint']:>13.3f}"
            )
        print(json.dumps({"args": vars(args), "checkpoint_mib": checkpoint_bytes / MIB, "results": results}))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
