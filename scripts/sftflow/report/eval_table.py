"""eval.json as tables: one row per (model, benchmark), one column per metric, whatever metrics there are."""

from __future__ import annotations

import json
import os

import pandas as pd

from sftflow.report.render import PLUS_MINUS, Section, format_value, is_missing, write_html_page

STDERR_SUFFIXES = ("_stderr", "_std_err")


def _flatten(values: dict, prefix: str = "") -> dict:
    """{"generation": {"requests": 4}} -> {"generation.requests": 4}: one column per leaf."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def is_per_model_and_benchmark(value) -> bool:
    """True for {model: {benchmark: {key: value}}}, the shape of eval.json's "results" (and "details")."""
    return (
        isinstance(value, dict)
        and bool(value)
        and all(isinstance(b, dict) and all(isinstance(m, dict) for m in b.values()) for b in value.values())
    )


def eval_frame(results: dict) -> pd.DataFrame:
    """The numbers as eval.json has them: columns model, benchmark, then metrics in the order first seen."""
    rows = [
        {"model": model, "benchmark": benchmark, **_flatten(metrics)}
        for model, benchmarks in results.items()
        for benchmark, metrics in benchmarks.items()
    ]
    return pd.DataFrame(rows, columns=None if rows else ["model", "benchmark"])


def stderr_base(column: str, columns) -> str | None:
    """'pass@1' for 'pass@1_stderr' (or '_std_err') when 'pass@1' is a column too, else None."""
    for suffix in STDERR_SUFFIXES:
        if column.endswith(suffix) and column[: -len(suffix)] in columns:
            return column[: -len(suffix)]
    return None


def _with_stderr(value, stderr):
    if is_missing(value) or is_missing(stderr):
        return value
    return f"{format_value(value)} {PLUS_MINUS} {format_value(stderr)}"


def eval_display_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """For reading: each metric with a standard-error column is shown as 'value ± stderr' and the stderr column goes."""
    shown = frame.copy()
    for column in frame.columns:
        base = stderr_base(str(column), frame.columns)
        if base is not None:
            shown[base] = [_with_stderr(v, e) for v, e in zip(frame[base], frame[column])]
            shown = shown.drop(columns=column)
    return shown


def other_fields_frame(summary: dict) -> pd.DataFrame:
    rows = [
        (key, value if isinstance(value, str) else json.dumps(value))
        for key, value in summary.items()
        if key != "results"
    ]
    return pd.DataFrame(rows, columns=["field", "value"])


def write_eval_page(path: str | os.PathLike, summary: dict, source: str) -> None:
    frame = eval_frame(summary["results"])
    note = (
        f"From {source}: one row per model and benchmark, one column per metric. A metric with a standard error "
        f"(a '<metric>_stderr' key) is shown as value {PLUS_MINUS} standard error; '—' means not computed."
    )
    if frame.empty:
        note = f"{source} holds no results yet."
    sections = []
    if summary.get("warnings"):  # e.g. most generations without an answer: shown first, loudly
        sections.append(Section("Warnings", note="", preformatted="\n\n".join(summary["warnings"])))
    sections.append(Section("Results", eval_display_frame(frame), note))
    others = {key: value for key, value in summary.items() if key not in ("results", "warnings")}
    for key, value in others.items():
        if is_per_model_and_benchmark(value):  # e.g. "details": generation and grading counts
            sections.append(Section(f'"{key}" of eval.json', eval_frame(value)))
    scalars = {key: value for key, value in others.items() if not is_per_model_and_benchmark(value)}
    if scalars:
        sections.append(Section("Other fields of eval.json", other_fields_frame(scalars)))
    write_html_page(path, "Evaluation", sections)
