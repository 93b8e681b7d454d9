"""Run sftflow's DAG from Python with per-experiment overrides, through Snakemake's own API.

The equivalent of NeMo-Skills' Python chaining (`sft_nemo_rl(...)` then `eval(..., run_after=...)`):
there is no chaining to write, because results/eval.json depends on the model it evaluates. An
experiment is a dict of config overrides merged over its --configfile(s) (or, with none, the demo's
config/config.yaml), exactly as `snakemake --configfile F --config KEY=VALUE` merges them:

    from run_experiment import Execution, run_experiment

    run_experiment(
        "results/lr1e-5/eval.json",
        overrides={"output_dir": "results/lr1e-5", "training": {"learning_rate": 1e-5}},
        configfiles=["config/examples/llama3.1-8b-8x8.yaml"],
        execution=Execution("slurm"),  # or "local" (the default) / "dryrun"
    )

Command line: python scripts/run_experiment.py TARGET [--set training.learning_rate=1e-5 ...]
[--configfile F] [--executor local|slurm|dryrun] [--cores N]. Values of --set are parsed as YAML.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Execution:
    """How and where Snakemake runs an experiment's jobs."""

    executor: str = "local"  # or "slurm" / "dryrun"
    cores: int = 2
    workdir: str | Path | None = None  # where results/ goes (default: the repository)
    executor_settings: Any = None  # the executor plugin's settings (slurm's default: keep_successful_logs)


def run_experiment(
    target: str = "results/eval.json",
    overrides: Mapping | None = None,
    configfiles: Sequence[str | Path] = (),
    execution: Execution = Execution(),
) -> None:
    """Build `target` with the workflow in this repository; raises on failure (and on an invalid config,
    naming the key, before any job starts)."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, DAGSettings, OutputSettings, ResourceSettings

    with SnakemakeApi(OutputSettings(printshellcmds=True, show_failed_logs=True)) as api:
        workflow = api.workflow(
            resource_settings=ResourceSettings(cores=execution.cores),
            # What `snakemake --configfile F ... --config KEY=VALUE` does: the demo's config/config.yaml only
            # when no configfile is given, each value's source known (scripts/show_config.py prints them).
            config_settings=ConfigSettings(
                config=dict(overrides or {}), configfiles=[Path(f).resolve() for f in configfiles]
            ),
            snakefile=REPO / "Snakefile",
            workdir=Path(execution.workdir) if execution.workdir else REPO,
        )
        dag = workflow.dag(DAGSettings(targets={target}))
        executor_settings = execution.executor_settings
        if execution.executor == "slurm" and executor_settings is None:
            from snakemake_executor_plugin_slurm import ExecutorSettings

            executor_settings = ExecutorSettings(keep_successful_logs=True)
        dag.execute_workflow(executor=execution.executor, executor_settings=executor_settings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", nargs="?", default="results/eval.json")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. training.max_num_steps=10"
    )
    parser.add_argument("--configfile", action="append", default=[])
    parser.add_argument("--executor", default="local")
    parser.add_argument("--cores", type=int, default=2)
    args = parser.parse_args(argv)
    overrides: dict = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected KEY=VALUE")
        node = overrides
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    try:
        run_experiment(args.target, overrides, args.configfile, Execution(args.executor, args.cores))
    except Exception as err:  # noqa: BLE001 - Snakemake has printed the details; say it failed, briefly
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
