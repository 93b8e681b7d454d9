"""Entry points of the report assets: the writers of each rule's pages, `make_report()` (all of them) and the command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from sftflow.config import effective_config_yaml
from sftflow.errors import SftflowError
from sftflow.io import atomic_path
from sftflow.logs import setup_logging
from sftflow.report import data_prep, eval_table, training
from sftflow.report.inputs import (
    read_contamination_matches,
    read_eval_results,
    read_job_records,
    read_metrics,
    read_packing_stats,
    read_sft_stats,
)
from sftflow.report.pages import FILE_NAMES
from sftflow.report.render import Section, write_html_page

LOG = logging.getLogger("sftflow.report")


@dataclass
class ReportInputs:
    sft_stats: Path
    packed_dir: Path
    contamination: Path | None  # None when filters.remove_contaminated is off
    metrics: Path
    checkpoint_dir: Path  # holds the job{i}.done files
    eval_results: Path

    @classmethod
    def from_output_dir(cls, output_dir: str | Path, contamination: str | Path | None) -> ReportInputs:
        """The workflow's standard layout under output_dir (the config's output_dir)."""
        root = Path(output_dir)
        return cls(
            sft_stats=root / "data" / "sft.stats.json",
            packed_dir=root / "data" / "packed",
            contamination=Path(contamination) if contamination else None,
            metrics=root / "checkpoints" / "metrics" / "metrics.jsonl",
            checkpoint_dir=root / "checkpoints",
            eval_results=root / "eval.json",
        )


@dataclass
class ReportOutputs:
    """The report's assets; the file names here are the ones rules/report.smk declares."""

    data_funnel: Path
    data_prep: Path
    contamination: Path
    packing: Path
    training_curves: Path
    throughput: Path
    training_summary: Path
    eval_results: Path
    config_html: Path
    config_yaml: Path

    FILE_NAMES = FILE_NAMES

    @classmethod
    def in_dir(cls, report_dir: str | Path) -> ReportOutputs:
        return cls(**{name: Path(report_dir) / file for name, file in cls.FILE_NAMES.items()})

    def paths(self) -> list[Path]:
        return [getattr(self, f.name) for f in fields(self)]


def plain_config(config: dict) -> dict:
    """The workflow config as plain JSON-able data (Snakemake hands over its own mapping types)."""
    return json.loads(json.dumps(config, default=str))


def read_data_inputs(inputs: ReportInputs, config: dict) -> dict:
    """What the data pages show: sft.stats.json, packed/stats.json and the contamination matches."""
    input_key = config.get("prepare_data", {}).get("input_key", "problem")
    checked, matches = None, None
    if inputs.contamination is not None:
        checked, matches = read_contamination_matches(inputs.contamination, input_key)
    return {
        "sft_stats": read_sft_stats(inputs.sft_stats),
        "packing": read_packing_stats(inputs.packed_dir),
        "checked": checked,
        "matches": matches,
    }


def write_data_pages(inputs: ReportInputs, data: dict, outputs: ReportOutputs) -> None:
    """The data pages (rule report_data): funnel plot and table, decontamination matches, tokenized sequences."""
    funnel = data_prep.funnel_frame(data["sft_stats"])
    data_prep.plot_funnel(funnel, outputs.data_funnel)
    data_prep.write_data_prep_page(outputs.data_prep, data["sft_stats"], funnel)
    contamination = str(inputs.contamination) if inputs.contamination else None
    write_html_page(
        outputs.contamination,
        "Decontamination",
        data_prep.contamination_sections(data["sft_stats"], contamination, data["checked"], data["matches"]),
    )
    stats_path = str(Path(inputs.packed_dir) / "stats.json")
    write_html_page(outputs.packing, "Packing data", data_prep.packing_sections(data["packing"], stats_path))


def read_training_inputs(inputs: ReportInputs) -> dict:
    return {"metrics": read_metrics(inputs.metrics), "jobs": read_job_records(inputs.checkpoint_dir)}


def write_training_pages(inputs: ReportInputs, run: dict, outputs: ReportOutputs) -> None:
    """The training pages (rule report_training): curves, throughput, summary by run, packing per step, schedule
    changes, the validation losses and the checkpoints' bytes on disk."""
    metrics, jobs = run["metrics"], run["jobs"]
    training.plot_training_curves(metrics, jobs, outputs.training_curves)
    training.plot_throughput(metrics, jobs, outputs.throughput)
    write_html_page(
        outputs.training_summary,
        "Training summary",
        [
            Section(
                "Throughput by run",
                training.throughput_frame(metrics.train, jobs),
                "One row per training process: a chained job, or a job resumed after an interruption. The job "
                "column names the job whose done-file covers the run's steps; '—' marks a run whose job was run "
                "again later (e.g. the last job after raising max_num_steps) or that was interrupted.",
            ),
            training.packing_in_training_section(metrics.train),
            training.schedule_changes_section(jobs),
            training.validation_section(metrics),
            training.checkpoints_section(metrics.checkpoints),
            Section("Final values", training.final_values_frame(metrics), f"From {inputs.metrics}."),
        ],
    )


def write_config_pages(outputs: ReportOutputs, config: dict, sources: dict | None = None) -> None:
    """The config pages (rule report_config): the resolved config, where each value comes from, and as YAML."""
    config_text = yaml.safe_dump(config, sort_keys=False, default_flow_style=False, allow_unicode=True)
    write_html_page(
        outputs.config_html,
        "Workflow config",
        [
            Section(
                "Resolved config",
                note="The config this run used: config files and --config overrides merged, every default filled "
                "from config/schema.yaml. Pass config.yaml to --configfile to repeat it.",
                preformatted=config_text,
            ),
            *(
                [
                    Section(
                        "Where each value comes from",
                        note="Schema default, a --configfile, or --config (python scripts/show_config.py prints "
                        "the same for any config; docs/experiments.md).",
                        preformatted=effective_config_yaml(config, sources),
                    )
                ]
                if sources is not None
                else []
            ),
        ],
    )
    with atomic_path(outputs.config_yaml, suffix=".yaml") as tmp:
        tmp.write_text(config_text, encoding="utf-8")


def make_report(inputs: ReportInputs, outputs: ReportOutputs, config: dict, sources: dict | None = None) -> None:
    """Every page of a finished run (the command line): the ones the workflow's four rules write, in one go."""
    config = plain_config(config)
    data = read_data_inputs(inputs, config)  # every input is read before anything is written: a bad one fails first
    run = read_training_inputs(inputs)
    summary = read_eval_results(inputs.eval_results)
    write_data_pages(inputs, data, outputs)
    write_training_pages(inputs, run, outputs)
    eval_table.write_eval_page(outputs.eval_results, summary, str(inputs.eval_results))
    write_config_pages(outputs, config, sources)
    LOG.info("report assets written: %s", ", ".join(str(p) for p in outputs.paths()))


def run_from_snakemake(smk) -> None:
    """The script of rules report_data, report_training and report_config (rules/report.smk); the eval page is
    written by the eval_summary rule (sftflow.evaluation.summary), which needs these pages as its inputs. The
    config they show comes from the workflow's stage files (sftflow.stage_config), tracked inputs of the rules."""
    from sftflow import stage_config

    setup_logging(smk.log[0] if smk.log else None)
    outputs = ReportOutputs(**{name: Path(smk.output.get(name, "")) for name in ReportOutputs.FILE_NAMES})
    try:
        if smk.rule == "report_data":
            contamination = smk.input.get("contamination")
            if isinstance(contamination, list | tuple):  # an empty input list when remove_contaminated is off
                contamination = contamination[0] if contamination else None
            inputs = ReportInputs(
                sft_stats=Path(smk.input.sft_stats),
                packed_dir=Path(smk.input.packed),
                contamination=Path(contamination) if contamination else None,
                metrics=Path(),
                checkpoint_dir=Path(),
                eval_results=Path(),
            )
            prepare = stage_config.read(smk.input.prepare_config)  # the prepare_data stage file
            write_data_pages(inputs, read_data_inputs(inputs, {"prepare_data": prepare}), outputs)
        elif smk.rule == "report_training":
            last_job = Path(smk.input.last_job)
            inputs = ReportInputs(
                sft_stats=Path(),
                packed_dir=Path(),
                contamination=None,
                metrics=last_job.parent / "metrics" / "metrics.jsonl",
                checkpoint_dir=last_job.parent,
                eval_results=Path(),
            )
            write_training_pages(inputs, read_training_inputs(inputs), outputs)
        elif smk.rule == "report_config":
            resolved = stage_config.read(smk.input.resolved)  # the whole config and each value's source
            write_config_pages(outputs, resolved["config"], resolved["sources"])
        else:
            raise SftflowError(f"rule {smk.rule!r} writes no report pages")
    except SftflowError as err:
        LOG.error("%s", err)
        raise SystemExit(f"error: {err}") from None
    LOG.info("report pages written: %s", ", ".join(str(p) for p in smk.output))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python scripts/make_report.py",
        description="Write the report's plots and tables for a finished run (the report_* rules and eval_summary do "
        "this inside the workflow; then `snakemake --report report.html` collects them).",
    )
    p.add_argument("--output-dir", default="results", help="the run's output_dir (default: results)")
    p.add_argument("--report-dir", help="where to write the assets (default: OUTPUT_DIR/report)")
    p.add_argument(
        "--config",
        default="config/config.yaml",
        help="workflow config YAML to show, defaults filled (default: config/config.yaml, the demo's, read from "
        "the working directory like --output-dir: run it in the workflow checkout)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parser().parse_args(argv)
    from sftflow import config as C

    config_file = Path(args.config)
    try:
        if not config_file.is_file():
            raise SftflowError(f"{config_file}: file not found (expected the workflow config YAML)")
        config = C.validate_workflow_config(yaml.safe_load(config_file.read_text(encoding="utf-8")) or {})
        output_dir = Path(args.output_dir)
        contamination = None
        if config["prepare_data"]["filters"]["remove_contaminated"]:
            contamination = config["prepare_data"]["contamination_file"] or output_dir / "data" / "contamination.jsonl"
        make_report(
            ReportInputs.from_output_dir(output_dir, contamination),
            ReportOutputs.in_dir(args.report_dir or output_dir / "report"),
            config,
        )
    except SftflowError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
