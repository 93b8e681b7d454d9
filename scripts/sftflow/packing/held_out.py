"""The validation share of the prepared data (training.val_set_size): whole problems held out of training.

A problem is a row's prompt: the `input` of an input/output row, the messages before the last assistant turn
of a messages row. Every row of a problem goes to the same side, so the several solutions (seeds) of a problem
never leak from training into validation. The problems, in the order of their first row, are permuted by a
generator seeded with training.val_set_seed, and taken in that order until at least the asked number of rows
is held out: 0 < val_set_size < 1 asks for round(val_set_size x rows) rows, val_set_size >= 1 for that many.
Both sides keep the file's row order. The same file, size and seed always hold out the same rows.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from sftflow.errors import SftflowError
from sftflow.io import check_input_file, parse_json_object

LOG = logging.getLogger("sftflow.packing")
KEY = "training.val_set_size"


@dataclass(frozen=True)
class RowSubset:
    """Some lines of a prepared JSONL file, by line number (keep[n] for line n, counted from 1): what
    pack_jsonl packs when it is given one instead of a path."""

    path: Path
    keep: np.ndarray  # bool, indexed by line number

    def __str__(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class HeldOut:
    """The two sides of the split and its counts (held_out.json, the log)."""

    training: RowSubset
    validation: RowSubset
    summary: dict


def problem_key(row: dict) -> bytes:
    """What identifies a row's problem: its prompt (the input, or the messages before the last assistant turn)."""
    if "messages" in row and isinstance(row["messages"], list):
        messages = row["messages"]
        if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
            messages = messages[:-1]
        return orjson.dumps(messages, option=orjson.OPT_SORT_KEYS)
    return orjson.dumps(row.get("input"))


def rows_to_hold_out(size: float, rows: int) -> int:
    """The number of rows training.val_set_size asks for, out of `rows`; errors name the key."""
    if size >= 1 and size != int(size):
        raise SftflowError(
            f"config key '{KEY}' ({size}) is neither a fraction below 1 nor a whole number of rows: use e.g. 0.05 or 500"
        )
    return int(size) if size >= 1 else round(size * rows)


def split_problems(input_path: str | os.PathLike, size: float, seed: int) -> HeldOut:
    """Hold out whole problems of `input_path` (see the module docstring); errors name the file and the key."""
    path = check_input_file(input_path)
    problem_of_line = [-1]  # line 0 does not exist; blank lines stay -1 (read_chunks skips them too)
    problems: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            if not raw.strip():
                problem_of_line.append(-1)
                continue
            row, reason = parse_json_object(raw)
            if reason is not None:
                raise SftflowError(f"{path}:{line_number}: {reason}")
            digest = hashlib.blake2b(problem_key(row), digest_size=16).digest()
            problem_of_line.append(problems.setdefault(digest, len(problems)))
    line_problem = np.asarray(problem_of_line, dtype=np.int64)
    rows_per_problem = np.bincount(line_problem[line_problem >= 0], minlength=len(problems))
    rows = int(rows_per_problem.sum())
    want = rows_to_hold_out(size, rows)
    if want < 1:
        raise SftflowError(
            f"config key '{KEY}' ({size}) holds out no row of the {rows} rows of {path}: raise it (a fraction of the "
            "rows, or a number of rows) or set it to 0 for no held-out validation data"
        )
    order = np.random.default_rng(seed).permutation(len(problems))
    taken = int(np.searchsorted(np.cumsum(rows_per_problem[order]), want)) + 1  # problems until >= want rows
    if taken >= len(problems):
        raise SftflowError(
            f"config key '{KEY}' ({size}) holds out every problem of {path} ({len(problems)} problems, {rows} rows): "
            "no training data would be left; lower it"
        )
    held = np.zeros(len(problems), dtype=bool)
    held[order[:taken]] = True
    is_row = line_problem >= 0
    validation = is_row & held[np.maximum(line_problem, 0)]
    training = is_row & ~validation
    summary = {
        "val_set_size": size,
        "val_set_seed": seed,
        "rows": rows,
        "problems": len(problems),
        "held_out_rows": int(validation.sum()),
        "held_out_problems": taken,
        "training_rows": int(training.sum()),
        "training_problems": len(problems) - taken,
    }
    return HeldOut(RowSubset(path, training), RowSubset(path, validation), summary)


def summary_line(summary: dict) -> str:
    return (
        f"held out {summary['held_out_rows']} rows of {summary['held_out_problems']} problems for validation "
        f"({KEY} = {summary['val_set_size']}, training.val_set_seed = {summary['val_set_seed']}); training on "
        f"{summary['training_rows']} rows of {summary['training_problems']} problems"
    )
