"""The GPU kit: the wheels the GPU image lacks, fetched on a CPU machine, and the import check tests/gpu/run.sh runs.

    python tests/gpu/kit.py fetch [--dry-run-builds]     # -> tests/gpu/kit/cp312 (carried), + this Python's builds
    python tests/gpu/kit.py image-site DIR                # dry-run: the image's packages of this environment, linked
    python tests/gpu/kit.py check --target DIR --out FILE [--dry-run]

`fetch` downloads one wheel per pin of tests/gpu/kit-requirements.txt (no dependency resolution: the file names
every dependency the image lacks), CPython 3.12 manylinux x86_64 builds for the GPU machine into tests/gpu/kit/cp312,
and fails when that folder is over its size budget (docs/gpu.md). With --dry-run-builds it also fetches the same
pins built for the Python running it (tests/gpu/kit/cpXY) and the image's own versions of a few pure-Python
packages (tests/gpu/image-standins.txt -> tests/gpu/kit/image-standins), for `run.sh --dry-run`.

`check` imports every module the GPU checks import (GPU_IMPORTS, the one list both modes use), checks that each kit
package's requirements are met by the kit or the image, that torch is the image's and not the kit's, and (not in
--dry-run) that CUDA is visible. Exit status: 0 ok, 1 a missing or conflicting package, 3 no CUDA device. run.sh
runs it with the kit, scripts/, the repo root and benchmarks/ on PYTHONPATH (the image has no install of sftflow).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

# Its own REPO, not tests.conftest's: this file runs as a script, `python tests/gpu/kit.py fetch` (docs/gpu.md) and
# run.sh's `image-site` with only tests/gpu importable, where `tests` is not importable (nor, under -S, pytest).
REPO = Path(__file__).resolve().parents[2]
HERE = REPO / "tests" / "gpu"
KIT = HERE / "kit"
REQUIREMENTS = HERE / "kit-requirements.txt"
STANDINS = HERE / "image-standins.txt"
IMAGE_PACKAGES = HERE / "image-packages.txt"
GPU_PYTHON = (3, 12)
# What travels is the tracked tree (~1.4 MiB) plus tests/gpu/kit/cp312, 64 MiB in all; the kit is ~9 MiB today.
BUDGET_MIB = 16.0
# Linux x86_64 builds for glibc 2.28 or older (the device README's list); pip matches each tag exactly.
GPU_PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (28, 27, 24, 17)] + ["manylinux2014_x86_64", "manylinux1_x86_64"]

# Packages the checks could use but that cannot travel in 64 MiB (sizes of their x86_64 Linux builds, 2026-12).
TOO_LARGE = {
    "transformer-engine": "transformer_engine_cu13 2.20.2 is a 264 MiB wheel, and its torch extension is an sdist "
    "that compiles against the image's CUDA torch (megatron falls back to its local layers)",
    "flash-attn": "2.8.3.post2 is an sdist on PyPI (hours of CUDA compilation); prebuilt wheels are ~250 MiB "
    "(training.attention auto picks torch varlen_attn or compiled flex_attention)",
    "vllm": "0.34.0 is a 228 MiB wheel that also pins its own torch build (the eval-server check skips it)",
    "sglang": "needs sgl-kernel and flashinfer, several hundred MiB (the eval-server check skips it)",
    "trtllm": "tensorrt-llm is several GiB (the eval-server check skips it)",
}

# Every module the GPU checks import, lazily imported ones too: the trainer (both backends), the eval path and
# `transformers serve`, the tests and benchmarks run.sh calls. `check` imports each; one list for both modes.
GPU_IMPORTS = [
    # torch APIs of the fsdp trainer, checkpointing and attention (all in torch 2.11)
    "torch",
    "torch.distributed",
    "torch.distributed.run",
    "torch.distributed.fsdp",
    "torch.distributed.tensor",
    "torch.distributed.tensor.parallel",
    "torch.distributed.device_mesh",
    "torch.distributed.checkpoint",
    "torch.distributed.checkpoint.state_dict",
    "torch.distributed.checkpoint._traverse",
    "torch.nn.attention",
    "torch.nn.attention.flex_attention",
    "torch.utils.checkpoint",
    "torch.utils.tensorboard",
    "numpy",
    "yaml",
    "safetensors.torch",
    "tokenizers",
    "transformers",
    "pytest",
    # the fsdp trainer and the data it reads
    "sftflow.train.cli",
    "sftflow.train.trainer",
    "sftflow.train.model",
    "sftflow.train.parallel",
    "sftflow.train.checkpoint",
    "sftflow.train.export",
    "sftflow.train.metrics",
    "sftflow.packing",
    "sftflow.packing.binpack",
    # backend megatron and what it imports from megatron-core
    "sftflow.megatron.engine",
    "sftflow.megatron.model",
    "sftflow.megatron.checkpoint",
    "sftflow.megatron.weights",
    "megatron.core",
    "megatron.core.parallel_state",
    "megatron.core.tensor_parallel",
    "megatron.core.distributed",
    "megatron.core.optimizer",
    "megatron.core.packed_seq_params",
    "megatron.core.pipeline_parallel",
    "megatron.core.models.gpt.gpt_layer_specs",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.transformer.transformer_config",
    "megatron.core.transformer.moe.moe_utils",
    # the eval path: generate.py, its client and grader, and the server it starts
    "sftflow.evaluation.run",
    "sftflow.evaluation.server",
    "sftflow.evaluation.generation",
    "sftflow.evaluation.grading",
    "sftflow.demo.data",
    "sftflow.demo.model",
    "orjson",
    "jsonschema",
    "math_verify",
    "math_verify.errors",
    "openai",
    "fastapi",
    "uvicorn",
    "transformers.cli.transformers",
    "transformers.cli.serve",
    "transformers.cli.serving.server",
    "transformers.cli.serving.chat_completion",
    "transformers.cli.serving.completion",
    "transformers.cli.serving.response",
    "transformers.cli.serving.model_manager",
    "transformers.cli.serving.utils",
    # the GPU tests and the benchmarks run.sh runs (run.sh puts benchmarks/ on PYTHONPATH for `check`; attention_bench
    # only once it exists)
    "tests.train.conftest",
    "tests.megatron_backend.conftest",
    "tests.gpu.test_gpu_attention",
    "tests.gpu.test_gpu_megatron_import",
    "tests.gpu.test_gpu_megatron_train",
    "train_bench_gpu",
    "eval_servers_check",
]
# Imported when the file exists: benchmarks/attention_bench.py comes with the flex_attention work.
GPU_IMPORTS_IF_PRESENT = ["attention_bench"]


class KitError(Exception):
    """A kit file is wrong (unpinned, duplicated, over budget); the message says which and how to fix it."""


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str]:
    """name -> version of a requirements file of `name==version` lines; one pin per package, never torch."""
    pins: dict[str, str] = {}
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)", line)
        if not m:
            raise KitError(f"{path}:{lineno}: {line!r} is not an exact pin; write it as name==version")
        name = normalize(m[1])
        if name in pins:
            raise KitError(f"{path}:{lineno}: {m[1]} is pinned twice; keep one version (two stop the install)")
        if name in ("torch", "nvidia-nccl-cu13", "triton"):
            raise KitError(f"{path}:{lineno}: {m[1]} must come from the GPU image, never from the kit")
        pins[name] = m[2]
    return pins


def wheel_name_version(path: Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return normalize(name), version


def download(pins: dict[str, str], dest: Path, target_args: list[str]) -> list[Path]:
    """One wheel per pin in `dest` (already downloaded ones are kept, stale ones removed)."""
    dest.mkdir(parents=True, exist_ok=True)
    for wheel in dest.glob("*.whl"):
        name, version = wheel_name_version(wheel)
        if pins.get(name) != version:
            wheel.unlink()  # a pin changed: never leave two versions of one package
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "-d", str(dest)]
    cmd += [*target_args, *(f"{name}=={version}" for name, version in pins.items())]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    wheels = sorted(dest.glob("*.whl"))
    found = {wheel_name_version(w) for w in wheels}
    missing = sorted(f"{n}=={v}" for n, v in pins.items() if (n, v) not in found)
    if missing or len(wheels) != len(pins):
        raise KitError(f"{dest}: expected one wheel per pin, missing {missing}, found {[w.name for w in wheels]}")
    return wheels


def size_mib(wheels: list[Path]) -> float:
    return sum(w.stat().st_size for w in wheels) / 2**20


def fetch(args: argparse.Namespace) -> int:
    pins = read_pins(REQUIREMENTS)
    gpu_tag = f"cp{GPU_PYTHON[0]}{GPU_PYTHON[1]}"
    target = ["--python-version", f"{GPU_PYTHON[0]}.{GPU_PYTHON[1]}", "--implementation", "cp"]
    target += [arg for platform in GPU_PLATFORMS for arg in ("--platform", platform)]
    wheels = download(pins, KIT / gpu_tag, target)
    kit_mib = size_mib(wheels)
    print(f"kit for the GPU machine: {len(wheels)} wheels, {kit_mib:.1f} MiB in {KIT / gpu_tag}")
    if kit_mib > args.budget_mib:
        raise KitError(
            f"the GPU kit is {kit_mib:.1f} MiB, over its budget of {args.budget_mib} MiB (docs/gpu.md): the tree "
            "and the kit must travel in 64 MiB; drop a package or raise the budget there, with its reason"
        )
    for name, why in TOO_LARGE.items():
        print(f"not in the kit: {name}: {why}")
    if args.dry_run_builds:
        local = f"cp{sys.version_info[0]}{sys.version_info[1]}"
        if local != gpu_tag:  # the same Python as the GPU image's: the dry-run installs the GPU kit itself
            wheels = download(pins, KIT / local, [])
            print(f"kit for this Python ({local}, dry-run): {len(wheels)} wheels, {size_mib(wheels):.1f} MiB")
        standins = download(read_pins(STANDINS), KIT / "image-standins", [])
        print(f"image stand-ins (dry-run): {', '.join(w.name for w in standins)}")
    return 0


def image_packages() -> set[str]:
    lines = IMAGE_PACKAGES.read_text(encoding="utf-8").splitlines()
    return {normalize(line.strip()) for line in lines if line.strip() and not line.startswith("#")}


def image_site(args: argparse.Namespace) -> int:
    """Link into `dest` the files of this environment's distributions that the GPU image also has.

    The dry-run runs `python -S` with only the kit, the stand-ins and this folder on its path, so an import that
    would need a package neither the image nor the kit has fails here as it would there.
    """
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    allowed = image_packages() - set(read_pins(STANDINS))
    linked = []
    for dist in md.distributions():
        name = normalize(dist.metadata["Name"] or "")
        if name not in allowed or not dist.files:
            continue
        root = Path(dist.locate_file(""))
        tops = {f.parts[0] for f in dist.files if f.parts and f.parts[0] != ".."}
        for top in sorted(tops):
            link = dest / top
            if not link.exists() and (root / top).exists():
                link.symlink_to(root / top)
        linked.append(name)
    print(f"image stand-in site {dest}: {len(linked)} of the image's {len(image_packages())} packages linked")
    return 0


def requirement_problems(target: Path, dry_run: bool) -> list[str]:
    """Each kit package's unmet requirement: missing from the kit and the image, or at a version it excludes."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    kit = {normalize(d.metadata["Name"]): d for d in md.distributions(path=[str(target)])}
    available = image_packages() | set(kit) | (set(read_pins(STANDINS)) if dry_run else set())
    problems = []
    for name, dist in sorted(kit.items()):
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            dep = normalize(req.name)
            try:
                version = md.version(req.name)
            except md.PackageNotFoundError:
                version = None
            if version is None or dep not in available:
                problems.append(f"{name} needs {req}: not in the kit nor in the GPU image (add it to {REQUIREMENTS})")
            elif req.specifier and not req.specifier.contains(Version(version), prereleases=True):
                problems.append(f"{name} needs {req}, but {dep} {version} is installed (pin another version)")
    return problems


def check(args: argparse.Namespace) -> int:
    """Import GPU_IMPORTS under the kit; write what was found to --out; exit 0, 1 (a package problem) or 3 (no GPU)."""
    target = Path(args.target).resolve()
    report: dict = {"mode": "dry-run" if args.dry_run else "gpu", "python": sys.version.split()[0], "imports": {}}
    problems = []
    if (target / "torch").exists():
        problems.append(f"the kit installed a torch into {target}: torch must be the image's own build")
    for module in GPU_IMPORTS + GPU_IMPORTS_IF_PRESENT:
        if module in GPU_IMPORTS_IF_PRESENT and importlib.util.find_spec(module) is None:
            report["imports"][module] = "skipped: not in this checkout"
            continue
        started = time.perf_counter()
        try:
            imported = importlib.import_module(module)
        except Exception as err:  # noqa: BLE001  (any import error is a finding)
            report["imports"][module] = f"FAILED: {type(err).__name__}: {err}"
            problems.append(f"import {module}: {type(err).__name__}: {err}")
            continue
        where = getattr(imported, "__file__", None) or ""
        report["imports"][module] = f"ok ({time.perf_counter() - started:.1f} s) {where}"
    try:  # `transformers serve` refuses to start unless this holds (pydantic, fastapi, uvicorn, openai)
        from transformers.utils.import_utils import is_serve_available

        if not is_serve_available():
            problems.append("transformers.utils.import_utils.is_serve_available() is False: `transformers serve` fails")
    except ImportError as err:
        problems.append(f"transformers has no is_serve_available ({err}): check `transformers serve` by hand")
    import torch

    if str(Path(torch.__file__).resolve()).startswith(str(target)):
        problems.append(f"torch was imported from the kit ({torch.__file__}), not from the image")
    problems += requirement_problems(target, args.dry_run)
    versions = {"torch": torch.__version__, "torch_cuda": torch.version.cuda}
    for dist in ("transformers", "megatron-core", "openai", "fastapi", "math-verify", "numpy", "pydantic"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    report["versions"] = versions
    kit_names = {normalize(d.metadata["Name"]) for d in md.distributions(path=[str(target)])}
    report["kit_shadows_image_packages"] = sorted(kit_names & image_packages())
    report["problems"] = problems
    report["too_large_for_the_kit"] = TOO_LARGE
    status = 1 if problems else 0
    if args.dry_run:
        report["cuda"] = "not asked (dry-run stops before the first CUDA call)"
    else:
        cuda = torch.cuda.is_available() and torch.cuda.device_count() > 0
        report["cuda"] = torch.cuda.get_device_name(0) if cuda else "no CUDA device visible"
        if not cuda:
            status = 3
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    ok = sum(v.startswith("ok") for v in report["imports"].values())
    print(f"kit check ({report['mode']}): {ok}/{len(report['imports'])} imports ok; versions {json.dumps(versions)}")
    for problem in problems:
        print(f"  PROBLEM: {problem}", file=sys.stderr)
    if status == 3:
        print(f"  no CUDA device is visible to {sys.executable} (torch {torch.__version__})", file=sys.stderr)
    return status


def summary(args: argparse.Namespace) -> int:
    """summary.json from run.sh's parts table (name, status, seconds, budget, note; tab-separated)."""
    parts = []
    for line in Path(args.parts).read_text(encoding="utf-8").splitlines():
        name, status, seconds, budget, note = (line.split("\t") + [""] * 5)[:5]
        parts.append({"part": name, "status": status, "seconds": int(seconds), "budget_seconds": int(budget)})
        if note:
            parts[-1]["note"] = note
    kit_report = Path(args.kit_report)
    result = {
        "ok": all(p["status"] in ("ok", "skipped") for p in parts),
        "total_seconds": sum(p["seconds"] for p in parts),
        "parts": parts,
        "kit_check": json.loads(kit_report.read_text(encoding="utf-8")) if kit_report.exists() else None,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    width = max(len(p["part"]) for p in parts) if parts else 4
    for p in parts:
        note = f"  ({p['note']})" if "note" in p else ""
        print(f"  {p['part']:<{width}}  {p['status']:<8} {p['seconds']:>4} s of {p['budget_seconds']:>3} s{note}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fetch", help="download the kit's wheels (needs PyPI)")
    p.add_argument("--budget-mib", type=float, default=BUDGET_MIB)
    p.add_argument("--dry-run-builds", action="store_true", help="also this Python's builds and the image stand-ins")
    p.set_defaults(func=fetch)
    p = sub.add_parser("image-site", help="link this environment's copies of the image's packages into DEST")
    p.add_argument("dest")
    p.set_defaults(func=image_site)
    p = sub.add_parser("check", help="import everything the GPU checks import, under the kit")
    p.add_argument("--target", required=True, help="the folder the kit was installed into")
    p.add_argument("--out", required=True, help="JSON report")
    p.add_argument("--dry-run", action="store_true", help="CPU: stop before the first CUDA call")
    p.set_defaults(func=check)
    p = sub.add_parser("summary", help="summary.json from run.sh's parts table")
    p.add_argument("--parts", required=True)
    p.add_argument("--kit-report", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=summary)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KitError as err:
        print(f"tests/gpu/kit.py: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
