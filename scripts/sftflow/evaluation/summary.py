"""results/eval.json: every (model, benchmark) metrics.json of the generate jobs in one file, plus a table.

eval.json layout: {"benchmarks": spec, "models": {label: path}, "results": {label: {benchmark:
metrics}}, "details": {label: {benchmark: generation / grading counts}}}. The same numbers are
printed as a pandas-rendered table (rows: model / benchmark) and saved as Markdown beside it.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sftflow.errors import SftflowError
from sftflow.evaluation.metrics import metrics_markdown
from sftflow.io import atomic_path, write_json

__all__ = ["summarize", "summarize_from_snakemake"]

log = logging.getLogger("sftflow.eval_summary")


def _load(directory: Path) -> dict[str, Any]:
    path = directory / "metrics.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SftflowError(f"{path}: missing (the generate job for {directory} did not finish)") from None
    except ValueError as err:
        raise SftflowError(f"{path}: invalid JSON ({err})") from None
    for key in ("model", "benchmark", "metrics"):
        if key not in data:
            raise SftflowError(f"{path}: no '{key}' key")
    return data


def _run_settings(data: dict[str, Any]) -> dict[str, Any]:
    """What must be equal for two models' results on one benchmark to be compared."""
    from sftflow.evaluation.settings import EvalSettings

    settings = data.get("settings") or {}
    compared = {f"settings.{k}": settings.get(k) for k in EvalSettings.result_names()}
    compared["seeds"] = data.get("seeds")
    compared["num_entries"] = data["metrics"].get("num_entries")
    compared["num_problems_in_benchmark"] = data.get("num_problems_in_benchmark")
    return compared


def check_comparable(loaded: Sequence[tuple[Path, dict[str, Any]]]) -> None:
    """Refuse to put side by side results of one benchmark made with different settings (a stale result)."""
    by_benchmark: dict[str, list[tuple[Path, dict[str, Any]]]] = {}
    for directory, data in loaded:
        by_benchmark.setdefault(data["benchmark"], []).append((directory, _run_settings(data)))
    for benchmark, runs in by_benchmark.items():
        (first_dir, first), *others = runs
        for directory, settings in others:
            differ = [k for k in first if settings[k] != first[k]]
            if differ:
                what = "; ".join(f"{k}: {first[k]!r} in {first_dir} vs {settings[k]!r} in {directory}" for k in differ)
                raise SftflowError(
                    f"benchmark '{benchmark}': the results of {first_dir} and {directory} were made with different "
                    f"settings ({what}); eval.json would compare unlike runs. Delete the stale one (the one made "
                    "with the old config) and rerun, or rerun both: snakemake ... --forcerun generate"
                )


def summarize(
    eval_dirs: Sequence[str | Path],
    json_path: str | Path,
    markdown_path: str | Path,
    benchmarks: str,
    models: Mapping[str, str],
    report_path: str | Path | None = None,
) -> dict[str, Any]:
    """Write eval.json and eval.md (and, given report_path, the report's eval page) from the generate jobs' dirs."""
    results: dict[str, dict[str, Any]] = {}
    details: dict[str, dict[str, Any]] = {}
    loaded = [(directory, _load(directory)) for directory in map(Path, eval_dirs)]
    check_comparable(loaded)
    for _, data in loaded:
        results.setdefault(data["model"], {})[data["benchmark"]] = data["metrics"]
        details.setdefault(data["model"], {})[data["benchmark"]] = {
            k: data.get(k) for k in ("model_path", "seeds", "num_problems_in_benchmark", "generation", "grading")
        }
    warnings = [f"{d['model']} / {d['benchmark']}: {w}" for _, d in loaded for w in d.get("warnings") or []]
    for warning in warnings:
        log.warning("%s", warning)
    summary = {"benchmarks": benchmarks, "models": dict(models), "results": results, "details": details}
    if warnings:
        summary["warnings"] = warnings
    rows = {f"{m} / {b}": metrics for m, per in results.items() for b, metrics in per.items()}
    table = metrics_markdown(rows, index_name="model / benchmark")
    write_json(json_path, summary)
    notes = "".join(f"\n**Warning** ({w})\n" for w in warnings)
    with atomic_path(markdown_path) as tmp:
        tmp.write_text(f"# Evaluation ({benchmarks})\n\n{table}\n{notes}", encoding="utf-8")
    if report_path is not None:
        from sftflow.report.eval_table import write_eval_page

        write_eval_page(report_path, summary, str(json_path))
    return {"summary": summary, "table": table}


def summarize_from_snakemake(smk) -> None:
    from sftflow.logs import setup_logging

    setup_logging(smk.log[0] if smk.log else None)
    try:
        result = summarize(
            smk.input.results,
            smk.output.json,
            smk.output.markdown,
            smk.params.benchmarks,
            smk.params.models,
            smk.output.get("report"),
        )
    except SftflowError as err:
        log.error("%s", err)
        raise SystemExit(f"error: {err}") from None
    log.info("results in %s and %s", smk.output.json, smk.output.markdown)
    print(result["table"], file=sys.stdout, flush=True)  # once, on stdout (the log line above also reaches stderr)
