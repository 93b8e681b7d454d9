"""Reading the files the report is made from; any missing or malformed file is an SftflowError naming it."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from sftflow.errors import SftflowError
from sftflow.io import iter_jsonl

_JOB_DONE = re.compile(r"job(\d+)\.done")


def read_json(path: str | os.PathLike, what: str, required: tuple[str, ...] = ()) -> dict:
    """A JSON object from `path`, which `what` (e.g. "prepare_data stats") describes in error messages."""
    path = Path(path)
    if not path.is_file():
        raise SftflowError(f"{path}: file not found (expected {what})")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SftflowError(f"{path}: invalid JSON ({err}); expected {what}") from None
    if not isinstance(obj, dict):
        raise SftflowError(f"{path}: expected a JSON object ({what}), got {type(obj).__name__}")
    missing = [key for key in required if key not in obj]
    if missing:
        raise SftflowError(f"{path}: missing key(s) {', '.join(map(repr, missing))}; is this {what}?")
    return obj


def read_sft_stats(path: str | os.PathLike) -> dict:
    stats = read_json(path, "prepare_data stats (sft.stats.json)", ("rows_read", "rows_written", "funnel"))
    if not isinstance(stats["funnel"], list) or not all(isinstance(s, dict) and "stage" in s for s in stats["funnel"]):
        raise SftflowError(f"{path}: 'funnel' should be a list of objects with a 'stage' key")
    return stats


def read_packing_stats(packed_dir: str | os.PathLike) -> dict:
    """pack_data's stats.json: the sequences it tokenized (the trainer packs them; metrics.jsonl says how)."""
    return read_json(
        Path(packed_dir) / "stats.json", "pack_data stats (packed/stats.json)", ("sequences_kept", "total_tokens")
    )


def read_eval_results(path: str | os.PathLike) -> dict:
    """eval.json: {"results": {model: {benchmark: {metric: value}}}, ...other keys}."""
    summary = read_json(path, "an eval summary (eval.json)", ("results",))
    results = summary["results"]
    layout = 'expected {"results": {model: {benchmark: {metric: value, ...}}}}'
    if not isinstance(results, dict):
        raise SftflowError(f"{path}: 'results' should be an object; {layout}")
    for model, benchmarks in results.items():
        if not isinstance(benchmarks, dict) or not all(isinstance(m, dict) for m in benchmarks.values()):
            raise SftflowError(f"{path}: results[{model!r}] should map benchmark names to metric objects; {layout}")
    return summary


MATCH_KEYS = ("benchmark", "matched_problem", "how", "overlap")


def read_contamination_matches(path: str | os.PathLike, input_key: str = "problem") -> tuple[int, pd.DataFrame]:
    """(problems checked, the rows marked contaminated) of a NeMo-Skills style contamination file.

    The matches have the columns of prepare_data's stats: problem (the `input_key` field), benchmark,
    matched_problem, how, overlap, plus the line of the file.
    """
    checked, matches = 0, []
    for line, row in iter_jsonl(path):
        checked += 1
        if row.get("contaminated", True):  # same default as prepare_data's load_contaminated
            matches.append({"line": line, "problem": row.get(input_key), **{k: row[k] for k in MATCH_KEYS if k in row}})
    return checked, pd.DataFrame(matches)


@dataclass
class Metrics:
    """metrics.jsonl split into training steps, validation evaluations and saves, one row per step (last one wins)."""

    train: pd.DataFrame
    validation: pd.DataFrame
    checkpoints: pd.DataFrame = field(default_factory=pd.DataFrame)  # one row per save (Trainer.save)


def read_metrics(path: str | os.PathLike) -> Metrics:
    train_rows, val_rows, checkpoint_rows = [], [], []
    for line, row in iter_jsonl(path):
        step = row.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise SftflowError(f"{path}:{line}: metrics row has no integer 'step'")
        if "checkpoint_bytes" in row:
            checkpoint_rows.append(row)
        elif "val_loss" in row:
            val_rows.append(row)
        elif "loss" in row:
            train_rows.append(row)
    if not train_rows:
        raise SftflowError(f"{path}: no training step logged (no row with 'loss'); did training run?")
    return Metrics(
        train=_one_row_per_step(train_rows),
        validation=_one_row_per_step(val_rows),
        checkpoints=_one_row_per_step(checkpoint_rows),
    )


def _one_row_per_step(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    # Keep file order (runs are appended in time order); a step logged twice keeps its latest value.
    return frame.drop_duplicates("step", keep="last").reset_index(drop=True)


def read_job_records(checkpoint_dir: str | os.PathLike) -> list[dict]:
    """The job{i}.done records of the chained training jobs, by job index."""
    records = []
    for path in Path(checkpoint_dir).glob("job*.done"):
        match = _JOB_DONE.fullmatch(path.name)
        if match:
            record = read_json(path, "a training job's done file", ("start_step", "end_step"))
            records.append({"job": int(match.group(1)), **record})
    return sorted(records, key=lambda r: r["job"])
