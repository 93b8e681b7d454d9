"""eval.json rendered generically: any metric keys, standard errors folded in, per-model details as a table."""

from __future__ import annotations

import math

from sftflow.report import eval_table
from tests.report.conftest import eval_summary, html_tables, table_dicts


def test_eval_frame_has_a_row_per_model_and_benchmark_and_a_column_per_metric():
    frame = eval_table.eval_frame(eval_summary()["results"])
    assert list(frame.columns[:4]) == ["model", "benchmark", "num_entries", "pass@1"]
    assert {"majority@4", "pass@4", "no_answer", "avg_tokens", "gen_seconds"} <= set(frame.columns)
    demo, gsm8k = frame.to_dict("records")
    assert (demo["model"], demo["benchmark"], demo["pass@1"], demo["pass@4"]) == ("final", "demo", 62.5, 81.25)
    assert gsm8k["num_entries"] == 1319 and math.isnan(gsm8k["majority@4"])


def test_standard_errors_are_shown_beside_their_metric_under_either_name():
    frame = eval_table.eval_frame(
        {"m": {"b": {"pass@1": 50.0, "pass@1_std_err": 2.5, "maj@4": 1.0, "maj@4_stderr": 0.5}}}
    )
    shown = eval_table.eval_display_frame(frame)
    assert list(shown.columns) == ["model", "benchmark", "pass@1", "maj@4"]
    assert shown.iloc[0]["pass@1"] == "50 ± 2.5" and shown.iloc[0]["maj@4"] == "1 ± 0.5"


def test_eval_page_tables_hold_the_numbers_of_eval_json(tmp_path):
    path = tmp_path / "eval.html"
    eval_table.write_eval_page(path, eval_summary(), "results/eval.json")
    results, details, others = html_tables(path)
    demo, gsm8k = table_dicts(results)
    assert demo["pass@1"] == "62.5 ± 1.25" and demo["majority@4"] == "70" and demo["no_answer"] == "2.5"
    assert gsm8k["pass@1"] == "3.1" and gsm8k["num_entries"] == "1,319" and gsm8k["pass@4"] == "—"
    assert "pass@1_stderr" not in results[0]
    (detail,) = table_dicts(details)
    assert detail["generation.requests"] == "800" and detail["seeds"] == "4"
    fields = dict(row for row in others[1:])
    assert fields["benchmarks"] == "demo:4,gsm8k" and '"final": "results/final_hf_model"' in fields["models"]


def test_eval_page_of_an_empty_result_says_so(tmp_path):
    eval_table.write_eval_page(tmp_path / "eval.html", {"results": {}}, "eval.json")
    assert "eval.json holds no results yet" in (tmp_path / "eval.html").read_text()


def test_eval_page_shows_the_runs_warnings_first(tmp_path):
    """Issue 12: a run whose generations mostly have no answer is flagged in the report, above the numbers."""
    warning = "final / demo: 100.0% of the generations have no answer: the grader looks for the last \\boxed{...}"
    eval_table.write_eval_page(tmp_path / "eval.html", {**eval_summary(), "warnings": [warning]}, "eval.json")
    page = (tmp_path / "eval.html").read_text()
    assert page.index("Warnings") < page.index("Results") and "100.0% of the generations have no answer" in page
    results, details, others = html_tables(tmp_path / "eval.html")  # the warnings are not an "other field"
    assert "warnings" not in dict(row for row in others[1:])
