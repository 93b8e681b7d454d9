"""Training curves (loss, learning rate, grad norm), tokens/s, a per-run throughput summary and the packing the
trainer did per optimizer step, from metrics.jsonl.

The chained jobs append to one metrics.jsonl; each training process restarts `elapsed_seconds` at zero, so a
fall in it marks where a new run (a job, or a job resumed after a crash) took over. Runs are drawn as dashed
lines and summarised one row each.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
from matplotlib.axes import Axes

from sftflow.report.figures import new_figure, save_png
from sftflow.report.inputs import Metrics
from sftflow.report.render import Section

CURVES = (("loss", "training loss"), ("lr", "learning rate"), ("grad_norm", "grad norm (before clipping)"))
CURVE_PANEL_INCHES = 2.8
THROUGHPUT_INCHES = 4.5
LAST_STEPS = 10  # "final loss" is the mean of this many last steps: single steps are noisy


def curves_height(num_panels: int) -> float:
    return 0.6 + CURVE_PANEL_INCHES * num_panels


def run_numbers(train: pd.DataFrame) -> pd.Series:
    """0, 1, ... per row: the training process that logged the step (a new one starts where elapsed_seconds falls)."""
    if "elapsed_seconds" not in train:
        return pd.Series(0, index=train.index)
    return train["elapsed_seconds"].diff().lt(0).cumsum()


def job_of_run(first_step: int, jobs: list[dict]) -> int | None:
    """The job whose done-file covers `first_step`; None for a run whose work a later run redid or continued."""
    for job in jobs:
        if job["start_step"] < first_step <= job["end_step"]:
            return job["job"]
    return None


def run_starts(train: pd.DataFrame, jobs: list[dict]) -> list[tuple[int, str]]:
    """(first step, label) of each run after the first: where the curves get a dashed line."""
    starts = []
    for run, group in train.groupby(run_numbers(train), sort=True):
        if run == 0:
            continue
        first = int(group["step"].iloc[0])
        job = job_of_run(first, jobs)
        starts.append((first, f"job {job}" if job is not None else f"run {run}"))
    return starts


def _mark_runs(ax: Axes, starts: list[tuple[int, str]], label: bool) -> None:
    for step, name in starts:
        ax.axvline(step - 0.5, color="#64748b", linestyle="--", linewidth=1)
        if label:
            ax.annotate(name, (step - 0.5, 1), xycoords=("data", "axes fraction"), xytext=(3, -12),
                        textcoords="offset points", fontsize=8, color="#475569")  # fmt: skip


def _smoothing_window(num_steps: int) -> int:
    return max(5, num_steps // 40) if num_steps >= 20 else 1


def _plot_series(ax: Axes, steps: pd.Series, values: pd.Series, color: str, smooth: bool = True) -> None:
    """The per-step values, and over them a centred moving average when there are enough steps to be noisy."""
    window = _smoothing_window(len(values)) if smooth else 1
    if window == 1:
        ax.plot(steps, values, color=color, linewidth=1.5, label="per step")
        return
    ax.plot(steps, values, color=color, linewidth=0.7, alpha=0.35, label="per step")
    mean = values.rolling(window, center=True, min_periods=1).mean()
    ax.plot(steps, mean, color=color, linewidth=1.8, label=f"mean of {window} steps")


def plot_training_curves(metrics: Metrics, jobs: list[dict], path: str | os.PathLike) -> None:
    train = metrics.train
    panels = [(key, title) for key, title in CURVES if key in train and train[key].notna().any()]
    fig, axes = new_figure(curves_height(len(panels)), nrows=len(panels), sharex=True)
    starts = run_starts(train, jobs)
    for i, (ax, (key, title)) in enumerate(zip(axes, panels)):
        values = train[key].astype(float)
        _plot_series(ax, train["step"], values, "#2563eb", smooth=key != "lr")  # the schedule is not noisy
        if key == "loss" and "val_loss" in metrics.validation:
            val = metrics.validation
            ax.plot(val["step"], val["val_loss"], "o-", color="#dc2626", markersize=4, label="validation loss")
        if key == "grad_norm" and (values > 0).all() and values.max() / values.min() > 50:
            ax.set_yscale("log")
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        _mark_runs(ax, starts, label=i == 0)
        if key == "loss":
            ax.legend(loc="upper right", fontsize=8)
    axes[0].set_title(f"Training: steps {int(train['step'].iloc[0])}–{int(train['step'].iloc[-1])}")
    axes[-1].set_xlabel("optimizer step")
    save_png(fig, path)


def plot_throughput(metrics: Metrics, jobs: list[dict], path: str | os.PathLike) -> None:
    train = metrics.train
    fig, (ax,) = new_figure(THROUGHPUT_INCHES)
    if "tokens_per_second" in train and train["tokens_per_second"].notna().any():
        tps = train["tokens_per_second"].astype(float)
        _plot_series(ax, train["step"], tps, "#0f766e")
        median = float(tps.median())
        ax.axhline(median, color="#f59e0b", linestyle=":", linewidth=1.5, label=f"median {median:,.0f} tokens/s")
        ax.set_ylim(bottom=0)
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "tokens_per_second was not logged", ha="center", va="center", transform=ax.transAxes)
    _mark_runs(ax, run_starts(train, jobs), label=True)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("tokens / second (all ranks)")
    ax.set_title("Training throughput")
    ax.grid(alpha=0.3)
    save_png(fig, path)


def format_duration(seconds: float | None) -> str | None:
    if seconds is None or np.isnan(seconds):
        return None
    h, rem = divmod(int(round(seconds)), 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def _run_summary(group: pd.DataFrame) -> dict:
    has = {key: key in group and group[key].notna().any() for key in ("step_seconds", "tokens_per_second")}
    seconds = float(group["step_seconds"].sum()) if has["step_seconds"] else None
    tokens = None
    if has["step_seconds"] and has["tokens_per_second"]:
        tokens = float((group["tokens_per_second"] * group["step_seconds"]).sum())
    return {
        "steps": len(group),
        "step range": f"{int(group['step'].iloc[0])}–{int(group['step'].iloc[-1])}",
        "training time (h:mm:ss)": format_duration(seconds),
        "tokens": round(tokens) if tokens is not None else None,
        "tokens/s (tokens ÷ time)": tokens / seconds if tokens is not None and seconds else None,
        "median tokens/s of a step": float(group["tokens_per_second"].median()) if has["tokens_per_second"] else None,
        "sequences": int(group["sequences"].sum()) if _logged(group, "sequences") else None,
        "loss tokens": int(group["loss_tokens"].sum()) if "loss_tokens" in group else None,
        "median MFU": float(group["mfu"].median()) if "mfu" in group and group["mfu"].notna().any() else None,
    }


def _logged(frame: pd.DataFrame, key: str) -> bool:
    return key in frame and frame[key].notna().any()


def throughput_frame(train: pd.DataFrame, jobs: list[dict]) -> pd.DataFrame:
    """One row per training run (job, or resumed job) and a total row; columns nothing was logged for are left out."""
    rows = []
    for run, group in train.groupby(run_numbers(train), sort=True):
        job = job_of_run(int(group["step"].iloc[0]), jobs)
        rows.append({"run": str(run), "job": job, **_run_summary(group)})
    if len(rows) > 1:
        rows.append({"run": "all", "job": None, **_run_summary(train)})
    frame = pd.DataFrame(rows)
    keep = [col for col in frame.columns if col in ("run", "job", "steps") or frame[col].notna().any()]
    return frame[keep]


def final_values_frame(metrics: Metrics) -> pd.DataFrame:
    train, val = metrics.train, metrics.validation
    last = train.tail(LAST_STEPS)
    rows = [
        ("last step", int(train["step"].iloc[-1])),
        ("training loss at the first step", float(train["loss"].iloc[0])),
        (f"training loss, mean of the last {len(last)} steps", float(last["loss"].mean())),
    ]
    if "val_loss" in val:
        best = val.loc[val["val_loss"].idxmin()]
        rows += [
            (f"validation loss at step {int(val['step'].iloc[-1])} (last)", float(val["val_loss"].iloc[-1])),
            (f"validation loss at step {int(best['step'])} (lowest)", float(best["val_loss"])),
        ]
    if "grad_norm" in train:
        rows.append((f"grad norm, mean of the last {len(last)} steps", float(last["grad_norm"].mean())))
        peak = train.loc[train["grad_norm"].idxmax()]
        rows.append((f"grad norm at step {int(peak['step'])} (highest)", float(peak["grad_norm"])))
    if "lr" in train:
        rows.append(("learning rate at the last step", float(train["lr"].iloc[-1])))
    if "epoch" in train:
        rows.append(("epoch at the last step", int(train["epoch"].iloc[-1])))
    return pd.DataFrame(rows, columns=["quantity", "value"])


def validation_frame(metrics: Metrics) -> pd.DataFrame:
    """One row per validation: its step, the validation loss, what it was computed on, and the training loss of
    that step (none at step 0: val_at_start validates before the first step)."""
    val = metrics.validation
    if "val_loss" not in val:
        return pd.DataFrame(columns=["step", "validation loss"])
    frame = pd.DataFrame({"step": val["step"].astype(int), "validation loss": val["val_loss"].astype(float)})
    for key, name in (("val_loss_tokens", "loss tokens"), ("val_sequences", "sequences")):
        if key in val and val[key].notna().any():
            frame[name] = val[key].astype("Int64")
    train_loss = metrics.train.set_index("step")["loss"] if "loss" in metrics.train else pd.Series(dtype=float)
    frame["training loss of the step"] = [train_loss.get(step, np.nan) for step in frame["step"]]
    return frame.reset_index(drop=True)


def validation_section(metrics: Metrics) -> Section:
    frame = validation_frame(metrics)
    if frame.empty:
        return Section(
            "Validation",
            note="No validation loss was computed: set training.validation_data or training.val_set_size, with "
            "training.val_period, val_at_start or val_at_end.",
        )
    best = frame.loc[frame["validation loss"].idxmin()]
    note = (
        "The validation loss is the token-weighted mean over every loss token of the first training.val_batches "
        "batches of val_global_batch_size validation sequences (the same sequences every time), with the model in "
        f"eval mode: at every val_period steps, at the start (val_at_start) and at the end (val_at_end). Lowest: "
        f"{float(best['validation loss']):.4f} at step {int(best['step'])}."
    )
    return Section("Validation", frame, note)


def schedule_changes_frame(jobs: list[dict]) -> pd.DataFrame:
    """The run's total-step changes (a resume after max_num_steps / max_num_epochs changed), as the last job's
    done file records them: every job carries the list so far, so the highest job that has one holds them all."""
    changes = next((job["schedule_changes"] for job in reversed(jobs) if "schedule_changes" in job), [])
    rows = [
        {
            "at step": change["step"],
            "total steps before": change["total_steps_before"],
            "total steps after": change["total_steps_after"],
        }
        for change in changes
    ]
    return pd.DataFrame(rows, columns=["at step", "total steps before", "total steps after"])


def schedule_changes_section(jobs: list[dict]) -> Section:
    frame = schedule_changes_frame(jobs)
    if frame.empty:
        note = "None: every step ran on one learning-rate schedule (the total step count never changed)."
    else:
        note = (
            "Training continued from a checkpoint with another total step count (training.max_num_steps or "
            "max_num_epochs changed): from each step listed on, the cosine decay was recomputed over the new "
            "total, so the learning-rate curve has a kink there. A run from scratch with the final settings "
            "would differ."
        )
    return Section("Learning-rate schedule changes", frame if not frame.empty else None, note)


# The per-step packing keys of metrics.jsonl (a trainer from before issue 27 logged none of them).
PACKING_METRICS = ("sequences", "tokens", "bins", "micro_batches", "micro_batches_per_rank", "fill_ratio")


def _bin_capacity(steps: pd.DataFrame) -> pd.Series:
    """Each step's bins x max_total_sequence_length, which the rows do not log: tokens / (bins x fill_ratio) gives
    max_total_sequence_length back, an integer, so rounding it undoes the rounding of the logged fill ratio."""
    tokens_per_bin = steps["tokens"] / (steps["bins"] * steps["fill_ratio"])
    return steps["bins"] * tokens_per_bin.round()


def packing_steps(train: pd.DataFrame) -> pd.DataFrame:
    """The step rows that logged the trainer's packing (all of a run's, none of an older trainer's)."""
    logged = [key for key in PACKING_METRICS if key in train]
    return train.dropna(subset=logged) if "sequences" in logged else train.iloc[:0]


def packing_in_training_frame(train: pd.DataFrame) -> pd.DataFrame:
    """Sums and per-step means of what the trainer packed, over the steps that logged it; empty if none did."""
    steps = packing_steps(train)
    if steps.empty:
        return pd.DataFrame(columns=["quantity", "value"])
    logged = [key for key in PACKING_METRICS if key in steps]
    rows = [("steps", len(steps))]
    sequences = steps["sequences"]
    rows.append(("sequences trained", int(sequences.sum())))
    rows.append(("sequences per step, mean", float(sequences.mean())))
    if sequences.min() != sequences.max():
        rows.append(("sequences per step, fewest – most", f"{int(sequences.min()):,} – {int(sequences.max()):,}"))
    if "tokens" in logged:
        rows.append(("tokens trained", int(steps["tokens"].sum())))
    if "loss_tokens" in steps and steps["loss_tokens"].notna().all():
        rows.append(("loss tokens trained", int(steps["loss_tokens"].sum())))
    if "bins" in logged:
        rows.append(("bins (packed rows, all ranks) per step, mean", float(steps["bins"].mean())))
        rows.append(("sequences per bin, mean", float(sequences.sum() / steps["bins"].sum())))
    if "micro_batches" in logged:
        rows.append(("micro-batches (all ranks) per step, mean", float(steps["micro_batches"].mean())))
    if "micro_batches_per_rank" in logged:
        rows.append(
            (
                "micro-batches per rank per step (empty ones included), mean",
                float(steps["micro_batches_per_rank"].mean()),
            )
        )
    if {"tokens", "bins", "fill_ratio"} <= set(logged):
        fill = float(steps["tokens"].sum() / _bin_capacity(steps).sum())
        rows.append(("fill ratio over the run (tokens ÷ bins × max_total_sequence_length)", fill))
        rows.append(("fill ratio of a step, lowest", float(steps["fill_ratio"].min())))
    if "overlong_masked" in steps and steps["overlong_masked"].notna().all():
        rows.append(("over-long sequences trained masked (no loss token)", int(steps["overlong_masked"].sum())))
    return pd.DataFrame(rows, columns=["quantity", "value"])


def packing_in_training_section(train: pd.DataFrame) -> Section:
    frame = packing_in_training_frame(train)
    if frame.empty:
        return Section(
            "Packing in training",
            note="metrics.jsonl logs no per-step packing (no 'sequences' in its step rows): a trainer from before "
            "per-step packing wrote it; the packing page shows how pack_data packed this run's rows.",
        )
    note = (
        "Each optimizer step trains on training.train_global_batch_size sequences, which the trainer packs into "
        "bins of at most max_total_sequence_length tokens and spreads over the data-parallel ranks; each rank runs "
        "micro-batches of train_micro_batch_size bins. Sums and means over the steps, from metrics.jsonl."
    )
    steps = len(packing_steps(train))
    if steps < len(train):
        note += f" Only {steps:,} of the {len(train):,} steps logged their packing (the others: an older trainer)."
    return Section("Packing in training", frame, note)


def _step_names(steps) -> str:
    return ", ".join(str(int(s)) for s in steps) if isinstance(steps, list) and steps else "—"


def checkpoints_frame(checkpoints: pd.DataFrame) -> pd.DataFrame:
    """One row per save (metrics.jsonl's checkpoint rows): its size, what was on disk after retention, and what
    retention removed (whole checkpoints, or only their optimizer state)."""
    columns = ["step", "MB written", "checkpoints on disk", "MB on disk", "removed steps", "optimizer state dropped"]
    if checkpoints.empty:
        return pd.DataFrame(columns=columns)
    rows = [
        {
            "step": int(row["step"]),
            "MB written": round(row["checkpoint_bytes"] / 1e6, 1),
            "checkpoints on disk": int(row["checkpoints_on_disk"]),
            "MB on disk": round(row["checkpoint_bytes_on_disk"] / 1e6, 1),
            "removed steps": _step_names(row.get("removed_steps")),
            "optimizer state dropped": _step_names(row.get("optimizer_dropped_steps")),
        }
        for row in checkpoints.to_dict("records")
    ]
    return pd.DataFrame(rows, columns=columns)


def checkpoints_section(checkpoints: pd.DataFrame) -> Section:
    frame = checkpoints_frame(checkpoints)
    if frame.empty:
        return Section(
            "Checkpoints on disk", note="metrics.jsonl records no save (a trainer from before issue 28 logged none)."
        )
    last = frame.iloc[-1]
    note = (
        "Each save: the bytes it wrote, then the checkpoints and bytes on disk once retention ran "
        "(training.keep_top_k by metric_name; keep_optimizer_state: latest drops the optimizer state of every "
        f"checkpoint but the newest). After the last save: {int(last['checkpoints on disk'])} checkpoints, "
        f"{last['MB on disk']:,} MB."
    )
    return Section("Checkpoints on disk", frame, note)
