"""Which checkpoints a run keeps (training.keep_top_k by metric_name, NeMo-Skills' keys), and deleting them crash-safely.

Torch-free: the trainer runs it on rank 0 after each save commits, and rule remove_averaged_checkpoints runs
it after the exports (scripts/remove_checkpoints.py). Every decision is made from what is on disk (each
checkpoint's meta.json records its metric values), so chained jobs rank the same way.

Retention never removes the newest checkpoint (the next job resumes from it) nor a protected step (one an
export or the average reads after training). A removal first renames `step_N` to `step_N.removing` (atomic:
from then on no reader sees a checkpoint there), then deletes it; `clean_partial` finishes what a killed
job left. An optimizer state is dropped the same way: `step_N/optimizer` -> `step_N/optimizer.removing`.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sftflow.io import fsync_dir, write_json
from sftflow.train.checkpoint_dir import complete_checkpoints, read_meta

LOG = logging.getLogger("sftflow.train")

REMOVING_SUFFIX = ".removing"
# The part of a checkpoint that only a resume reads (both backends keep it in this subdirectory).
OPTIMIZER_DIR = "optimizer"
# metric_name as NeMo-Skills or NeMo-RL spells it -> the key in meta.json's "metrics".
METRIC_KEYS = {
    "val_loss": "val_loss",
    "val:val_loss": "val_loss",
    "train_loss": "train_loss",
    "train:loss": "train_loss",
}


@dataclass(frozen=True)
class RetentionPolicy:
    """training.keep_top_k / metric_name / higher_is_better, and the steps no retention may remove."""

    keep_top_k: int | None
    metric_name: str = "val_loss"
    higher_is_better: bool = False
    protected: frozenset[int] = frozenset()

    @classmethod
    def from_training(
        cls, training: dict, protected: Iterable[int] = (), has_validation: bool = True
    ) -> RetentionPolicy:
        """From the `training:` section; without validation data a val_loss metric ranks by step."""
        metric = training["metric_name"]
        if METRIC_KEYS.get(metric) == "val_loss" and not has_validation:
            metric = "step"
        return cls(training["keep_top_k"], metric, training["higher_is_better"], frozenset(protected))

    @property
    def metric_key(self) -> str | None:
        """The meta.json metrics key ranked by, or None when ranking by step."""
        return METRIC_KEYS.get(self.metric_name)

    def describe(self) -> str:
        return f"keep_top_k {self.keep_top_k} by {self.metric_name}"


def protected_steps(config: dict) -> set[int]:
    """Steps exported after training: training.conversion_step, export_steps, average_steps and eval.models'
    step_N (the same list sftflow.config.check_saved_steps checks)."""
    t = config["training"]
    steps = set(t.get("export_steps") or []) | set(t.get("average_steps") or [])
    if t.get("conversion_step") is not None:
        steps.add(t["conversion_step"])
    for model in (config.get("eval") or {}).get("models") or []:
        name, _, number = str(model).partition("_")
        if name == "step" and number.isdigit():
            steps.add(int(number))
    return steps


def checkpoint_metrics(path: Path) -> dict:
    return read_meta(path).get("metrics") or {}


def rank_key(step: int, metrics: dict, policy: RetentionPolicy) -> tuple:
    """Sort key, best first: checkpoints with the metric before those without, then by the metric (direction by
    higher_is_better), then newer before older."""
    key = policy.metric_key
    if key is None:
        return (0, 0.0, -step)
    value = metrics.get(key)
    if value is None or value != value:  # missing or NaN: below every checkpoint that has it
        return (1, 0.0, -step)
    return (0, -value if policy.higher_is_better else value, -step)


@dataclass(frozen=True)
class Decision:
    step: int
    keep: bool
    why: str


def plan_retention(checkpoints: list[tuple[int, dict]], policy: RetentionPolicy) -> list[Decision]:
    """Keep or remove each (step, metrics) checkpoint, oldest first. The newest and the protected steps are
    kept on top of the keep_top_k best (as NeMo-RL keeps its latest checkpoint beside the top k)."""
    if not checkpoints:
        return []
    newest = max(step for step, _ in checkpoints)
    ranked = sorted(checkpoints, key=lambda c: rank_key(c[0], c[1], policy))
    top = {step for step, _ in ranked[: policy.keep_top_k]} if policy.keep_top_k is not None else None
    decisions = []
    for step, _ in sorted(checkpoints):
        if step == newest:
            decisions.append(Decision(step, True, "newest (the resume point)"))
        elif step in policy.protected:
            decisions.append(
                Decision(step, True, "named in conversion_step / export_steps / average_steps / eval.models")
            )
        elif top is None or step in top:
            decisions.append(Decision(step, True, "kept" if top is None else f"in the top {policy.keep_top_k}"))
        else:
            decisions.append(Decision(step, False, policy.describe()))
    return decisions


def directory_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass  # removed meanwhile
    return total


def remove_tree(path: Path) -> None:
    """Rename `path` to `<path>.removing` (the atomic step: no reader takes it for a checkpoint any more), then delete it."""
    marker = path.with_name(path.name + REMOVING_SUFFIX)
    shutil.rmtree(marker, ignore_errors=True)
    os.replace(path, marker)
    fsync_dir(path.parent)
    shutil.rmtree(marker, ignore_errors=True)


def has_optimizer_state(path: Path) -> bool:
    """False once retention dropped it (meta.json says so). Checkpoints written before it was split out keep it inline."""
    return read_meta(path).get("optimizer_state", True) is not False


def drop_optimizer_state(path: Path) -> int:
    """Remove `path`'s optimizer state (step_N/optimizer), marking meta.json first; returns the bytes freed."""
    optimizer = path / OPTIMIZER_DIR
    if not optimizer.is_dir():
        return 0
    freed = directory_bytes(optimizer)
    meta = read_meta(path)
    meta["optimizer_state"] = False
    write_json(path / "meta.json", meta)  # atomic: meta.json says so before the state goes
    remove_tree(optimizer)
    return freed


def clean_leftovers(root: Path) -> list[Path]:
    """Finish removals a killed job began: `step_N.removing` and `step_N/optimizer.removing` (rank 0)."""
    removed = []
    if not root.is_dir():
        return removed
    for child in root.iterdir():
        if child.name.startswith("step_") and child.name.endswith(REMOVING_SUFFIX):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
        elif child.is_dir() and (child / (OPTIMIZER_DIR + REMOVING_SUFFIX)).exists():
            shutil.rmtree(child / (OPTIMIZER_DIR + REMOVING_SUFFIX), ignore_errors=True)
            removed.append(child / (OPTIMIZER_DIR + REMOVING_SUFFIX))
    return removed


@dataclass
class RetentionResult:
    removed: list[int]
    optimizer_dropped: list[int]
    freed_bytes: int
    kept: list[Decision]


def apply_retention(root: Path, policy: RetentionPolicy, keep_optimizer_state: str = "latest") -> RetentionResult:
    """Rank checkpoints on disk and remove those outside the policy; drop every optimizer state but the
    newest's when keep_optimizer_state is "latest". Rank 0 only, after the newest checkpoint committed."""
    found = complete_checkpoints(root)
    decisions = plan_retention([(c.step, checkpoint_metrics(c.path)) for c in found], policy)
    paths = {c.step: c.path for c in found}
    result = RetentionResult([], [], 0, [d for d in decisions if d.keep])
    newest = found[-1].step if found else None
    for decision in decisions:
        path = paths[decision.step]
        if not decision.keep:
            result.freed_bytes += directory_bytes(path)
            remove_tree(path)
            result.removed.append(decision.step)
        elif keep_optimizer_state == "latest" and decision.step != newest and (path / OPTIMIZER_DIR).is_dir():
            result.freed_bytes += drop_optimizer_state(path)
            result.optimizer_dropped.append(decision.step)
    return result


def disk_usage(root: Path) -> tuple[int, int]:
    """(complete checkpoints, their bytes) under `root`."""
    found = complete_checkpoints(root)
    return len(found), sum(directory_bytes(c.path) for c in found)


def remove_averaged(root: Path, steps: Iterable[int]) -> dict:
    """remove_checkpoints_after_average: delete the checkpoints of `steps` except the newest on disk; returns a
    record of what was removed and what was kept, and why."""
    found = {c.step: c.path for c in complete_checkpoints(root)}
    newest = max(found) if found else None
    record: dict = {"removed": [], "kept": {}, "freed_bytes": 0}
    for step in sorted(set(steps)):
        if step not in found:
            record["kept"][str(step)] = "not on disk (already removed)"
        elif step == newest:
            record["kept"][str(step)] = "the newest checkpoint: a later run resumes from it"
            LOG.info("keeping %s: the newest checkpoint, a later run resumes from it", found[step])
        else:
            record["freed_bytes"] += directory_bytes(found[step])
            remove_tree(found[step])
            record["removed"].append(step)
            LOG.info("removed %s (averaged into averaged_hf_model, every export made)", found[step])
    return record


def format_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def remove_averaged_from_snakemake(smk) -> None:
    """Rule remove_averaged_checkpoints: params.checkpoint_dir, params.steps, output.record (JSON), log[0]."""
    from sftflow.logs import setup_logging

    setup_logging(smk.log[0] if smk.log else None)
    root = Path(smk.params.checkpoint_dir)
    record = remove_averaged(root, smk.params.steps)
    count, total = disk_usage(root)
    record.update({"checkpoints_on_disk": count, "checkpoint_bytes_on_disk": total})
    LOG.info(
        "remove_checkpoints_after_average: removed steps %s (%s freed); kept %s; %d checkpoints on disk, %s",
        record["removed"] or "none",
        format_bytes(record["freed_bytes"]),
        record["kept"] or "none",
        count,
        format_bytes(total),
    )
    write_json(smk.output.record, record)
