"""Small synthetic run outputs in the workflow's layout (same keys as the real files), a PNG size reader, and the
tables of an HTML page as lists of rows of cell text (stdlib only: pandas.read_html needs lxml)."""

from __future__ import annotations

import hashlib
import json
import math
import struct
from html.parser import HTMLParser
from pathlib import Path

import pytest

from sftflow.report.cli import ReportInputs
from tests.conftest import write_jsonl

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG, after checking its signature and header chunk; AssertionError if not a PNG."""
    data = Path(path).read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR", f"{path}: no IHDR chunk"
    assert data[-8:-4] == b"IEND", f"{path}: truncated PNG (no IEND chunk)"
    return struct.unpack(">II", data[16:24])


def sft_stats() -> dict:
    """A funnel that accounts for all 100 rows read: 4 invalid, 16 by selection, 45 by stages, 35 written."""
    return {
        "input_files": [
            {"path": "gen/output-rs0.jsonl", "rows": 50, "skipped_first": 0, "invalid": 4},
            {"path": "gen/output-rs1.jsonl", "rows": 50, "skipped_first": 0, "invalid": 0},
        ],
        "invalid_rows": {"count": 4, "examples": [{"file": "gen/output-rs0.jsonl", "line": 3, "reason": "bad"}]},
        "selection": {
            "correct_seen": 80,
            "correct_kept": 80,
            "incorrect_seen": 12,
            "incorrect_kept": 0,
            "unlabeled_seen": 4,
            "unlabeled_kept": 0,
        },
        "rows_written": 35,
        "rows_read": 100,
        "skipped_first": 0,
        "funnel": [
            {"stage": "drop_multi_boxed", "rows_in": 80, "dropped": 7, "modified": 0},
            {
                "stage": "remove_contaminated",
                "rows_in": 73,
                "dropped": 5,
                "modified": 0,
                "contamination_file": "results/data/contamination.jsonl",
                "contaminated_problems": 3,
            },
            {"stage": "trim_solutions", "rows_in": 68, "dropped": 0, "modified": 11},
            {
                "stage": "remove_len_outlier_solutions",
                "field": "generation",
                "min": 0,
                "max": 200,
                "rows_in": 68,
                "dropped_too_short": 0,
                "dropped_too_long": 9,
                "dropped": 9,
            },
            {"stage": "deduplicate", "rows_in": 59, "dropped": 24},
        ],
        "dropped_by_selection": 16,
        "output_path": "results/data/sft.jsonl",
        "formatting": {"mode": "chat_template", "output_format": "input_output", "prompt_config": "generic/math"},
        "seconds": 0.5,
    }


def packing_stats() -> dict:
    """pack_data's stats.json: 35 rows read, 2 over-long masked, 1 dropped for having no loss token, 34 kept."""
    return {
        "source": "results/data/sft.jsonl",
        "tokenizer": "results/demo/tokenizer",
        "packing": True,
        "algorithm": "best_fit_decreasing",
        "max_total_sequence_length": 512,
        "rows_read": 35,
        "sequences_kept": 34,
        "overlong": {
            "count": 2,
            "action": "mask",
            "masked": 2,
            "tokens_truncated": 0,
            "tokens_dropped": 0,
            "tokens_masked": 1100,
        },
        "dropped": {"overlong": 0, "no_loss_tokens": 1, "no_loss_tokens_after_truncation": 0},
        "shards": 1,
        "total_tokens": 5000,
        "loss_tokens": 2000,
        "mean_sequence_length": 147.06,
        "max_sequence_length": 512,
        "num_workers": 1,
        "seconds": {"tokenize": 0.1, "total": 0.2},
    }


CONTAMINATION = [
    {"problem": "What is 2 + 2?", "contaminated": False},
    {
        "problem": "Compute 3 + 4.",
        "contaminated": True,
        "benchmark": "demo",
        "matched_problem": "Compute 3 + 4.",
        "overlap": 1.0,
        "how": "exact",
    },
    {
        "problem": "Compute 9 - 4.",
        "contaminated": True,
        "benchmark": "demo",
        "matched_problem": "Compute 9 + 4.",
        "overlap": 1.0,
        "how": "exact",
    },
    {
        "problem": "A train leaves at noon and travels 60 miles",
        "contaminated": True,
        "benchmark": "gsm8k",
        "matched_problem": "A train leaves at noon and travels 80 miles",
        "overlap": 0.75,
        "how": "5-gram",
    },
    {"problem": "What is 5 * 5?", "contaminated": False},
]


SEQUENCES_PER_STEP = 8  # training.train_global_batch_size
MAX_TOKENS_PER_BIN = 512  # packing.max_total_sequence_length


def step_packing(step: int) -> dict:
    """The per-step packing keys the trainer logs, varying by step: 8 sequences in 3 to 5 bins over 2 ranks."""
    tokens = 1100 + 97 * (step % 7)
    bins = math.ceil(tokens / MAX_TOKENS_PER_BIN) + step % 2
    return {
        "sequences": SEQUENCES_PER_STEP,
        "tokens": tokens,
        "bins": bins,
        "micro_batches": bins,
        "micro_batches_per_rank": math.ceil(bins / 2),
        "fill_ratio": round(tokens / (bins * MAX_TOKENS_PER_BIN), 6),
        "overlong_masked": int(step % 4 == 0),
        "samples_digest": hashlib.sha256(str(step).encode()).hexdigest()[:16],
    }


def metrics_rows(steps_per_job: int = 15, jobs: int = 2, validate_every: int = 5, packing: bool = True) -> list[dict]:
    """Two chained jobs: elapsed_seconds restarts with each; tokens/s is 1000 in job 0 and 2000 in job 1. Each
    step logs its packing (step_packing), unless `packing` is false: the rows of a trainer before issue 27."""
    rows = []
    for job in range(jobs):
        for i in range(steps_per_job):
            step = job * steps_per_job + i + 1
            rows.append(
                {
                    "step": step,
                    "loss": 3.0 - 0.05 * step,
                    "grad_norm": 1.0 + (step % 3),
                    "lr": 1e-3 * min(1.0, step / 5),
                    "tokens_per_second": 1000.0 * (job + 1),
                    "loss_tokens": 100,
                    "epoch": 0,
                    "step_seconds": 0.5,
                    "elapsed_seconds": 0.5 * (i + 1),
                    **(step_packing(step) if packing else {}),
                }
            )
            if step % validate_every == 0:
                rows.append({"step": step, "val_loss": 4.0 - 0.1 * step, "val_loss_tokens": 50})
    return rows


def job_records(steps_per_job: int = 15, jobs: int = 2) -> list[dict]:
    """The job{i}.done contents as read_job_records returns them (it adds "job", the index in the file name)."""
    return [
        {
            "job": j,
            "job_index": j,
            "num_jobs": jobs,
            "start_step": j * steps_per_job,
            "end_step": (j + 1) * steps_per_job,
        }
        for j in range(jobs)
    ]


def eval_summary() -> dict:
    return {
        "benchmarks": "demo:4,gsm8k",
        "models": {"final": "results/final_hf_model"},
        "results": {
            "final": {
                "demo": {
                    "num_entries": 200,
                    "pass@1": 62.5,
                    "pass@1_stderr": 1.25,
                    "majority@4": 70.0,
                    "pass@4": 81.25,
                    "no_answer": 2.5,
                    "avg_tokens": 48.3,
                    "gen_seconds": 12.7,
                },
                "gsm8k": {"num_entries": 1319, "pass@1": 3.1, "pass@1_stderr": None, "no_answer": 40.0},
            }
        },
        "details": {"final": {"demo": {"seeds": 4, "generation": {"requests": 800, "retries": 3}}}},
    }


def write_results(root: Path) -> ReportInputs:
    """Every file make_report reads, under `root` as under the workflow's output_dir."""
    (root / "data" / "packed").mkdir(parents=True)
    (root / "data" / "sft.stats.json").write_text(json.dumps(sft_stats()))
    (root / "data" / "packed" / "stats.json").write_text(json.dumps(packing_stats()))
    write_jsonl(root / "data" / "contamination.jsonl", CONTAMINATION)
    write_jsonl(root / "checkpoints" / "metrics" / "metrics.jsonl", metrics_rows())
    for record in job_records():
        (root / "checkpoints" / f"job{record['job_index']}.done").write_text(json.dumps(record))
    (root / "eval.json").write_text(json.dumps(eval_summary()))
    return ReportInputs.from_output_dir(root, root / "data" / "contamination.jsonl")


@pytest.fixture
def results_dir(tmp_path) -> Path:
    write_results(tmp_path / "results")
    return tmp_path / "results"


@pytest.fixture
def report_inputs(results_dir) -> ReportInputs:
    return ReportInputs.from_output_dir(results_dir, results_dir / "data" / "contamination.jsonl")


class _Tables(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None:
            self.tables[-1][-1].append(" ".join("".join(self.cell).split()))
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


def html_tables(page: str | Path) -> list[list[list[str]]]:
    """[table][row][cell] of `page` (HTML text, or a path to an HTML file); the header is row 0."""
    text = page.read_text(encoding="utf-8") if isinstance(page, Path) else page
    parser = _Tables()
    parser.feed(text)
    return parser.tables


def table_dicts(table: list[list[str]]) -> list[dict[str, str]]:
    header, *rows = table
    return [dict(zip(header, row)) for row in rows]
