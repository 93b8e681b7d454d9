"""Where checkpoints are and what their meta.json says, without torch: the workflow reads these while planning
(sftflow.train.config.check_checkpoint_matches), and importing torch there would cost every `snakemake` call,
dry runs and every Slurm job step included, seconds of start-up."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

STEP_DIR_RE = re.compile(r"^step_(\d{8})$")
TMP_SUFFIX = ".tmp"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: Path


def complete_checkpoints(root: str | os.PathLike) -> list[CheckpointInfo]:
    """Committed checkpoints (renamed, with their meta.json), oldest first."""
    root = Path(root)
    found = []
    if root.is_dir():
        for child in root.iterdir():
            m = STEP_DIR_RE.match(child.name)
            if m and child.is_dir() and (child / "meta.json").is_file():
                found.append(CheckpointInfo(int(m.group(1)), child))
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(root: str | os.PathLike) -> CheckpointInfo | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def read_meta(path: str | os.PathLike) -> dict:
    meta = Path(path) / "meta.json"
    return json.loads(meta.read_text(encoding="utf-8")) if meta.is_file() else {}
