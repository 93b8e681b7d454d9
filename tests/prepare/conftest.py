"""Helpers of the prepare_data tests: prepare_data run through its ++ command line on rows written here, and the
neighbours of "a op b = c" chains that the arithmetic fast-path test reads."""

from __future__ import annotations

import json
from pathlib import Path

from sftflow.prepare.cli import main
from tests.conftest import read_jsonl, write_jsonl

OFF = [
    "++filters.remove_contaminated=false",
    "++filters.remove_len_outlier_problems=false",
    "++filters.trim_solutions=false",
    "++do_shuffle=false",
]


def row(problem: str, generation: str, correct: bool | None = True, **extra) -> dict:
    r = {"problem": problem, "generation": generation, "expected_answer": "1", **extra}
    if correct is not None:
        r["symbolic_correct"] = correct
    return r


def prepare(tmp_path: Path, files: dict[str, list], *args: str, defaults=OFF):
    for name, rows in files.items():
        write_jsonl(tmp_path / "gen" / name, rows)
    out = tmp_path / "out" / "sft.jsonl"
    rc = main([f"++input_files={tmp_path}/gen/*.jsonl", f"++output_path={out}", *defaults, *args])
    if rc != 0:
        return rc, None, None
    return rc, read_jsonl(out), json.loads((tmp_path / "out" / "sft.stats.json").read_text())


# Neighbours that do and do not let an equation's sides continue, around chains of the "a op b = c" form.
LEFT = [
    "",
    "\n",
    "$",
    "\\[",
    "\\(",
    "There are ",
    "x",
    "x ",
    "AB^2 = ",
    "3 times ",
    "so, ",
    "1,",
    "...",
    "\\cdots ",
    "\\quad ",
    "- ",
    "-",
    "(",
    "* ",
    "e.g. ",
    "\\, ",
    "é ",
    "ab\\\\ ",
    "\t",
]
RIGHT = [
    "",
    "\n",
    "$",
    " pencils.",
    "x",
    " x",
    "^2",
    "!",
    " !",
    ",000",
    ", so",
    ".5",
    ". ",
    "...",
    "\\]",
    "\\%",
    "\\quad",
    " cm",
    "?",
    ":4",
    " )",
    "\\\\",
    " times 2",
]
SIMPLE_CHAINS = ["10 * 3 = 30", " 2+2=4 ", "1.5 / 3 = 0.5", "10 -3 = 7", "7 / 0 = 1", "12 - 5 = 8", "4*2 =  8"]
