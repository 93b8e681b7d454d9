"""Training curves, throughput plot, per-run summary and packing per step from metrics.jsonl rows of chained jobs."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from sftflow.report import training
from sftflow.report.cli import ReportOutputs, read_training_inputs, write_training_pages
from sftflow.report.figures import DPI, WIDTH_INCHES
from sftflow.report.inputs import read_metrics
from sftflow.report.render import format_value
from tests.conftest import write_jsonl
from tests.report.conftest import (
    MAX_TOKENS_PER_BIN,
    html_tables,
    job_records,
    metrics_rows,
    png_size,
    write_results,
)


@pytest.fixture
def metrics(tmp_path):
    return read_metrics(write_jsonl(tmp_path / "metrics.jsonl", metrics_rows()))


def test_metrics_split_into_training_steps_and_validation_evaluations(metrics):
    assert metrics.train["step"].tolist() == list(range(1, 31))
    assert metrics.validation["step"].tolist() == [5, 10, 15, 20, 25, 30]
    assert metrics.validation["val_loss"].iloc[-1] == pytest.approx(1.0)


def test_a_step_logged_twice_keeps_its_latest_value(tmp_path):
    rows = metrics_rows(steps_per_job=3, jobs=1)
    rows.append({**rows[-1], "loss": 0.123})  # e.g. a step redone after a crash
    metrics = read_metrics(write_jsonl(tmp_path / "m.jsonl", rows))
    assert metrics.train["step"].tolist() == [1, 2, 3] and metrics.train["loss"].iloc[-1] == 0.123


def test_each_chained_job_is_one_run_matched_to_its_done_file(metrics):
    runs = training.run_numbers(metrics.train)
    assert runs.tolist() == [0] * 15 + [1] * 15
    assert training.run_starts(metrics.train, job_records()) == [(16, "job 1")]
    assert training.run_starts(metrics.train, []) == [(16, "run 1")]  # no done-file covers it


def test_throughput_table_has_one_row_per_run_and_a_total(metrics):
    frame = training.throughput_frame(metrics.train, job_records()).set_index("run")
    assert frame.loc["0", "job"] == 0 and frame.loc["1", "job"] == 1 and pd.isna(frame.loc["all", "job"])
    assert frame.loc["0", "step range"] == "1–15" and frame.loc["1", "steps"] == 15
    assert frame.loc["0", "tokens"] == 15 * 0.5 * 1000 and frame.loc["1", "tokens"] == 15 * 0.5 * 2000
    assert frame.loc["all", "tokens/s (tokens ÷ time)"] == pytest.approx((7500 + 15000) / 15)
    assert frame.loc["1", "median tokens/s of a step"] == 2000
    assert frame.loc["all", "training time (h:mm:ss)"] == "0:00:15"
    assert frame.loc["all", "loss tokens"] == 3000
    assert frame.loc["0", "sequences"] == 15 * 8 and frame.loc["all", "sequences"] == 30 * 8
    assert "median MFU" not in frame  # not logged on CPU: no empty column


def test_final_values_average_the_last_steps_and_find_the_best_validation(metrics):
    frame = training.final_values_frame(metrics)
    values = dict(zip(frame["quantity"], frame["value"]))
    assert values["last step"] == 30
    assert values["training loss, mean of the last 10 steps"] == pytest.approx(3.0 - 0.05 * 25.5)
    assert values["validation loss at step 30 (lowest)"] == pytest.approx(1.0)
    assert values["learning rate at the last step"] == pytest.approx(1e-3)


def test_training_curves_png_has_a_panel_per_logged_curve(tmp_path, metrics):
    path = tmp_path / "curves.png"
    training.plot_training_curves(metrics, job_records(), path)
    assert png_size(path) == (WIDTH_INCHES * DPI, round(training.curves_height(3) * DPI))


def test_training_curves_without_lr_and_grad_norm_show_the_loss_alone(tmp_path):
    rows = [{"step": s, "loss": 1.0 / s} for s in range(1, 6)]
    metrics = read_metrics(write_jsonl(tmp_path / "m.jsonl", rows))
    training.plot_training_curves(metrics, [], tmp_path / "curves.png")
    assert png_size(tmp_path / "curves.png") == (WIDTH_INCHES * DPI, round(training.curves_height(1) * DPI))
    frame = training.throughput_frame(metrics.train, [])
    assert list(frame.columns) == ["run", "job", "steps", "step range"]
    section = training.packing_in_training_section(metrics.train)
    assert section.table is None and "logs no per-step packing" in section.note


def test_throughput_png(tmp_path, metrics):
    training.plot_throughput(metrics, job_records(), tmp_path / "tps.png")
    assert png_size(tmp_path / "tps.png") == (WIDTH_INCHES * DPI, round(training.THROUGHPUT_INCHES * DPI))


def test_schedule_changes_come_from_the_last_job_that_records_them():
    jobs = [
        {"job": 0, "start_step": 0, "end_step": 4, "schedule_changes": []},
        {
            "job": 1,
            "start_step": 4,
            "end_step": 10,
            "schedule_changes": [
                {"step": 4, "total_steps_before": 8, "total_steps_after": 10},
            ],
        },
        {"job": 2, "start_step": 10, "end_step": 10},  # a done file written before the field existed
    ]
    frame = training.schedule_changes_frame(jobs)
    assert frame.to_dict("records") == [{"at step": 4, "total steps before": 8, "total steps after": 10}]
    section = training.schedule_changes_section(jobs)
    assert section.table is frame or section.table.equals(frame)
    assert "cosine decay was recomputed" in section.note


def test_no_schedule_change_says_so():
    section = training.schedule_changes_section([{"job": 0, "start_step": 0, "end_step": 4, "schedule_changes": []}])
    assert section.table is None and section.note.startswith("None:")


def packing_expected(rows: list[dict]) -> dict:
    """The packing-in-training numbers, from the step rows as logged (validation rows have no 'loss')."""
    steps = [r for r in rows if "loss" in r and "sequences" in r]
    sequences = sum(r["sequences"] for r in steps)
    tokens = sum(r["tokens"] for r in steps)
    bins = sum(r["bins"] for r in steps)
    return {
        "steps": len(steps),
        "sequences trained": sequences,
        "sequences per step, mean": sequences / len(steps),
        "tokens trained": tokens,
        "loss tokens trained": sum(r["loss_tokens"] for r in steps),
        "bins (packed rows, all ranks) per step, mean": bins / len(steps),
        "sequences per bin, mean": sequences / bins,
        "micro-batches (all ranks) per step, mean": sum(r["micro_batches"] for r in steps) / len(steps),
        "micro-batches per rank per step (empty ones included), mean": sum(r["micro_batches_per_rank"] for r in steps)
        / len(steps),
        "fill ratio over the run (tokens ÷ bins × max_total_sequence_length)": tokens / (bins * MAX_TOKENS_PER_BIN),
        "fill ratio of a step, lowest": min(r["fill_ratio"] for r in steps),
        "over-long sequences trained masked (no loss token)": sum(r["overlong_masked"] for r in steps),
    }


def test_packing_in_training_adds_up_the_steps_rows(tmp_path):
    rows = metrics_rows()
    frame = training.packing_in_training_frame(read_metrics(write_jsonl(tmp_path / "m.jsonl", rows)).train)
    shown = dict(zip(frame["quantity"], frame["value"]))
    expected = packing_expected(rows)
    assert shown == pytest.approx(expected, rel=1e-12)
    assert expected["over-long sequences trained masked (no loss token)"] == 7  # steps 4, 8, ..., 28
    assert 0.5 < expected["fill ratio over the run (tokens ÷ bins × max_total_sequence_length)"] < 1


def test_packing_in_training_weights_the_fill_by_each_steps_capacity(tmp_path):
    rows = [
        {"step": 1, "loss": 1.0, "sequences": 8, "tokens": 1000, "bins": 2, "fill_ratio": 0.976562},  # 1000 / 1024
        {"step": 2, "loss": 1.0, "sequences": 8, "tokens": 100, "bins": 1, "fill_ratio": 0.195312},  # 100 / 512
    ]
    frame = training.packing_in_training_frame(read_metrics(write_jsonl(tmp_path / "m.jsonl", rows)).train)
    shown = dict(zip(frame["quantity"], frame["value"]))
    assert shown["fill ratio over the run (tokens ÷ bins × max_total_sequence_length)"] == pytest.approx(1100 / 1536)
    assert "over-long sequences trained masked (no loss token)" not in shown  # not logged: not shown as 0
    assert "micro-batches (all ranks) per step, mean" not in shown


def test_training_summary_page_shows_the_packing_in_training(tmp_path):
    inputs = write_results(tmp_path / "results")
    outputs = ReportOutputs.in_dir(tmp_path / "report")
    write_training_pages(inputs, read_training_inputs(inputs), outputs)
    page = outputs.training_summary.read_text()
    (table,) = [t for t in html_tables(page) if t[0] == ["quantity", "value"] and t[1][0] == "steps"]
    shown = dict(table[1:])
    expected = packing_expected(metrics_rows())
    assert shown["sequences trained"] == format_value(expected["sequences trained"]) == "240"
    assert shown["sequences per step, mean"] == "8"
    for quantity in (
        "fill ratio over the run (tokens ÷ bins × max_total_sequence_length)",
        "bins (packed rows, all ranks) per step, mean",
        "over-long sequences trained masked (no loss token)",
    ):
        assert shown[quantity] == format_value(expected[quantity]), quantity
    assert "<h2>Packing in training</h2>" in page and "Only" not in page


def test_steps_of_an_older_trainer_are_left_out_of_the_packing_in_training(tmp_path):
    rows = metrics_rows(steps_per_job=4, jobs=1, packing=False) + [
        r for r in metrics_rows(steps_per_job=4, jobs=2) if r["step"] > 4
    ]
    train = read_metrics(write_jsonl(tmp_path / "m.jsonl", rows)).train
    frame = training.packing_in_training_frame(train)
    shown = dict(zip(frame["quantity"], frame["value"]))
    assert shown == pytest.approx(packing_expected(rows), rel=1e-12)
    assert shown["steps"] == 4 and shown["sequences trained"] == 32
    section = training.packing_in_training_section(train)
    assert "Only 4 of the 8 steps logged their packing" in section.note
    assert training.throughput_frame(train, []).set_index("run").loc["all", "sequences"] == 32


def test_training_summary_page_lists_every_validation_beside_the_training_loss(tmp_path):
    inputs = write_results(tmp_path / "results")
    outputs = ReportOutputs.in_dir(tmp_path / "report")
    write_training_pages(inputs, read_training_inputs(inputs), outputs)
    page = outputs.training_summary.read_text()
    (table,) = [t for t in html_tables(page) if t[0][:2] == ["step", "validation loss"]]
    rows = metrics_rows()
    train_loss = {r["step"]: r["loss"] for r in rows if "loss" in r}
    expected = [r for r in rows if "val_loss" in r]
    assert [row[0] for row in table[1:]] == [str(r["step"]) for r in expected] == ["5", "10", "15", "20", "25", "30"]
    for row, r in zip(table[1:], expected, strict=True):
        assert row[1] == format_value(r["val_loss"]) and row[2] == format_value(r["val_loss_tokens"])
        assert row[-1] == format_value(train_loss[r["step"]])
    assert "Lowest: 1.0000 at step 30." in page


def test_a_run_without_validation_says_how_to_get_one(tmp_path):
    rows = [r for r in metrics_rows() if "val_loss" not in r]
    metrics = read_metrics(write_jsonl(tmp_path / "metrics.jsonl", rows))
    section = training.validation_section(metrics)
    assert section.table is None and "training.val_set_size" in section.note


def _checkpoint_row(step: int, on_disk: int, removed: list[int], dropped: list[int]) -> dict:
    return {
        "step": step,
        "checkpoint_bytes": 12_300_000,
        "checkpoints_on_disk": on_disk,
        "checkpoint_bytes_on_disk": on_disk * 4_100_000 + 8_200_000,
        "removed_steps": removed,
        "optimizer_dropped_steps": dropped,
        "freed_bytes": 1,
        "save_seconds": 0.5,
        "elapsed_seconds": 1.0,
    }


def test_training_summary_page_shows_the_bytes_of_every_save_and_what_retention_removed(tmp_path):
    inputs = write_results(tmp_path / "results")
    saves = [_checkpoint_row(10, 2, [], [5]), _checkpoint_row(15, 2, [5], [10])]
    with open(inputs.metrics, "a", encoding="utf-8") as f:  # the trainer appends a row per save
        f.writelines(json.dumps(row) + "\n" for row in saves)
    metrics = read_metrics(inputs.metrics)
    assert metrics.checkpoints["step"].tolist() == [10, 15]
    assert metrics.train["step"].tolist() == list(range(1, 31))  # save rows are neither steps nor validations
    outputs = ReportOutputs.in_dir(tmp_path / "report")
    write_training_pages(inputs, read_training_inputs(inputs), outputs)
    page = outputs.training_summary.read_text()
    assert "<h2>Checkpoints on disk</h2>" in page
    (table,) = [t for t in html_tables(page) if t[0][:2] == ["step", "MB written"]]
    assert table[1:] == [["10", "12.3", "2", "16.4", "—", "5"], ["15", "12.3", "2", "16.4", "5", "10"]]
