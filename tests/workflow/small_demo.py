"""The small demo that several slow tests run, and one finished local run of it that they share.

Running the workflow end to end is what these tests are about, but running the same one three times is not:
the report's pages, the Slurm run's "equals a local run" check and the Slurm training tests all need the
small demo's data, and the first two need the same finished local run. `small_demo_run` (a session fixture in
tests/conftest.py) makes it once; `copy_with_data` gives a test its own workflow copy whose data stages are
already done, so that it runs (and checks) only what it is about.
"""

from __future__ import annotations

import re
from pathlib import Path

from tests.workflow.test_workflow import WORKFLOW_PARTS, copy_parts, copy_workflow, snakemake

# The small demo: 2 chained jobs of 6 steps each.
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
CONFIG = ("--configfile", "config/config.yaml", SMALL_RUN_FILE)
# What the data stages write (demo_tokenizer, demo_base_model, demo_generations, decontaminate, prepare_data,
# pack_data), and Snakemake's record of how each was made.
DATA_OUTPUTS = ("results/demo", "results/benchmarks", "results/data", ".snakemake/metadata")
DATA_RULES = ("demo_tokenizer", "demo_base_model", "demo_generations", "decontaminate", "prepare_data", "pack_data")


def run_small_demo(dest: Path) -> Path:
    """A workflow copy in `dest` that has run `snakemake results/eval.json` on SMALL_RUN, as a user does."""
    workdir = copy_workflow(dest)
    (workdir / SMALL_RUN_FILE).write_text(SMALL_RUN)
    result = snakemake("--cores", "2", "results/eval.json", *CONFIG, cwd=workdir)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return workdir


def copy_with_data(run: Path, dest: Path) -> Path:
    """A new workflow copy in `dest` holding `run`'s data stages' outputs and records (modification times kept,
    so Snakemake sees them as up to date) and nothing of its training or evaluation."""
    return copy_parts(run, dest, (*WORKFLOW_PARTS, *DATA_OUTPUTS))


def rules_run(log: str) -> list[str]:
    """The rules of the jobs a `snakemake` run started, in order, from its log (stderr)."""
    return re.findall(r"(?m)^(?:local)?rule (\w+):", log)
