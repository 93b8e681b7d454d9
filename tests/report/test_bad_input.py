"""A missing or malformed input is one SftflowError naming the file (and line), and no asset is written."""

from __future__ import annotations

import json

import pytest

from sftflow.errors import SftflowError
from sftflow.report.cli import ReportOutputs, main, make_report
from tests.conftest import REPO

METRICS = "checkpoints/metrics/metrics.jsonl"
GOOD_STEP = json.dumps({"step": 1, "loss": 2.0}) + "\n"


@pytest.mark.parametrize(
    "relative, content, message",
    [
        ("data/sft.stats.json", None, "sft.stats.json: file not found (expected prepare_data stats"),
        ("data/sft.stats.json", b'{"rows_read": 1,', "sft.stats.json: invalid JSON"),
        ("data/sft.stats.json", b"[1, 2]", "sft.stats.json: expected a JSON object"),
        ("data/sft.stats.json", b'{"rows_read": 1, "rows_written": 1}', "sft.stats.json: missing key(s) 'funnel'"),
        ("data/sft.stats.json", b'{"rows_read": 1, "rows_written": 1, "funnel": [1]}', "'funnel' should be a list"),
        ("data/packed/stats.json", None, "packed/stats.json: file not found"),
        (
            "data/packed/stats.json",
            b'{"bins": 1}',
            "packed/stats.json: missing key(s) 'sequences_kept', 'total_tokens'",
        ),
        ("data/contamination.jsonl", b'{"problem": "p"}\n{oops\n', "contamination.jsonl:2: invalid JSON"),
        (METRICS, None, "metrics.jsonl: file not found"),
        (METRICS, b"", "metrics.jsonl: file is empty"),
        (METRICS, GOOD_STEP.encode() + b"not json\n", "metrics.jsonl:2: invalid JSON"),
        (METRICS, b'{"loss": 2.0}\n', "metrics.jsonl:1: metrics row has no integer 'step'"),
        (METRICS, b'{"step": 5, "val_loss": 2.0}\n', "metrics.jsonl: no training step logged"),
        ("checkpoints/job1.done", b"{}", "job1.done: missing key(s) 'start_step', 'end_step'"),
        ("eval.json", None, "eval.json: file not found (expected an eval summary"),
        ("eval.json", b'{"pass@1": 3}', "eval.json: missing key(s) 'results'"),
        ("eval.json", b'{"results": [1]}', "eval.json: 'results' should be an object"),
        ("eval.json", b'{"results": {"final": {"demo": 3}}}', "eval.json: results['final'] should map benchmark"),
    ],
)
def test_bad_input_names_the_file_and_writes_nothing(tmp_path, results_dir, report_inputs, relative, content, message):
    path = results_dir / relative
    if content is None:
        path.unlink()
    else:
        path.write_bytes(content)
    outputs = ReportOutputs.in_dir(tmp_path / "report")
    with pytest.raises(SftflowError) as err:
        make_report(report_inputs, outputs, {"output_dir": str(results_dir)})
    assert message in str(err.value)
    assert str(path) in str(err.value)
    assert not (tmp_path / "report").exists() or not any((tmp_path / "report").iterdir())


def test_command_line_reports_a_bad_input_as_one_line(tmp_path, results_dir, capsys):
    (results_dir / "eval.json").unlink()
    config = str(REPO / "config" / "config.yaml")
    assert main(["--output-dir", str(results_dir), "--report-dir", str(tmp_path / "report"), "--config", config]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"{results_dir / 'eval.json'}: file not found" in err
    assert "Traceback" not in err
