"""results/eval.json never puts side by side results of one benchmark made with different settings."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from sftflow.errors import SftflowError
from sftflow.evaluation.settings import EvalSettings
from sftflow.evaluation.summary import summarize


def default_settings(**overrides) -> dict:
    """The settings metrics.json records for the schema's defaults, with `overrides`."""
    return {**asdict(EvalSettings.from_values({}, "defaults")), **overrides}


def write_result(root, model: str, benchmark: str = "gsm8k", num_entries: int = 20, seeds: int = 0, **settings):
    directory = root / model / benchmark
    directory.mkdir(parents=True)
    data = {
        "model": model,
        "model_path": f"/models/{model}",
        "benchmark": benchmark,
        "seeds": seeds,
        "num_problems_in_benchmark": 1319,
        "metrics": {"num_entries": num_entries, "num_samples": max(seeds, 1), "pass@1": 50.0},
        "settings": default_settings(max_samples=num_entries, **settings),
    }
    (directory / "metrics.json").write_text(json.dumps(data))
    return directory


def test_results_made_with_the_same_settings_are_summarized(tmp_path):
    dirs = [write_result(tmp_path, "final"), write_result(tmp_path, "base")]
    out = summarize(dirs, tmp_path / "eval.json", tmp_path / "eval.md", "gsm8k", {"final": "f", "base": "b"})
    assert set(out["summary"]["results"]) == {"final", "base"}


@pytest.mark.parametrize(
    "changed, key",
    [
        ({"num_entries": 10}, "settings.max_samples: 20"),  # issue 12: averaged on 10 problems vs base on 20
        ({"max_new_tokens": 64}, "settings.max_new_tokens"),
        ({"prompt_config": "generic/math-base"}, "settings.prompt_config"),
        ({"seeds": 4}, "seeds: 0"),
    ],
)
def test_results_made_with_different_settings_are_refused_naming_what_differs(tmp_path, changed, key):
    dirs = [write_result(tmp_path, "base"), write_result(tmp_path, "averaged", **changed)]
    with pytest.raises(
        SftflowError, match=r"benchmark 'gsm8k': the results of .*base/gsm8k and .*averaged/gsm8k"
    ) as err:
        summarize(dirs, tmp_path / "eval.json", tmp_path / "eval.md", "gsm8k", {})
    assert key in str(err.value) and "--forcerun generate" in str(err.value)
    assert not (tmp_path / "eval.json").exists()


def test_other_benchmarks_may_differ(tmp_path):
    """Only results of one benchmark are compared: gsm8k on 20 problems and math500 on 50 with another
    max_new_tokens sit side by side in eval.json, each with its own numbers."""
    dirs = [
        write_result(tmp_path, "final", "gsm8k", 20),
        write_result(tmp_path, "base", "gsm8k", 20),
        write_result(tmp_path, "final", "math500", 50, max_new_tokens=64),
        write_result(tmp_path, "base", "math500", 50, max_new_tokens=64),
    ]
    out = summarize(dirs, tmp_path / "eval.json", tmp_path / "eval.md", "gsm8k,math500", {})
    assert json.loads((tmp_path / "eval.json").read_text()) == out["summary"]
    for model in ("final", "base"):
        results = out["summary"]["results"][model]
        assert {b: m["num_entries"] for b, m in results.items()} == {"gsm8k": 20, "math500": 50}
    table = (tmp_path / "eval.md").read_text()
    assert all(f"{m} / {b}" in table for m in ("final", "base") for b in ("gsm8k", "math500"))


def test_warnings_of_the_runs_reach_eval_json_and_the_table(tmp_path):
    dirs = [write_result(tmp_path, "final"), write_result(tmp_path, "base")]
    data = json.loads((dirs[1] / "metrics.json").read_text())
    (dirs[1] / "metrics.json").write_text(
        json.dumps({**data, "warnings": ["100.0% of the generations have no answer"]})
    )
    out = summarize(dirs, tmp_path / "eval.json", tmp_path / "eval.md", "gsm8k", {})
    assert out["summary"]["warnings"] == ["base / gsm8k: 100.0% of the generations have no answer"]
    assert "**Warning** (base / gsm8k: 100.0% of the generations have no answer)" in (tmp_path / "eval.md").read_text()


def test_the_summary_writes_the_reports_eval_page_from_the_same_numbers(tmp_path):
    from tests.report.conftest import html_tables

    dirs = [write_result(tmp_path, "final"), write_result(tmp_path, "base")]
    summarize(dirs, tmp_path / "eval.json", tmp_path / "eval.md", "gsm8k", {}, tmp_path / "report" / "eval.html")
    (results, *_) = html_tables(tmp_path / "report" / "eval.html")
    assert [row[:2] for row in results[1:]] == [["final", "gsm8k"], ["base", "gsm8k"]]


def test_the_eval_summary_runs_without_matplotlib():
    """The eval environment (envs/eval.yaml) has no matplotlib: the summary's page writer must not need it."""
    import subprocess
    import sys

    from tests.conftest import REPO

    code = "import sys; sys.modules['matplotlib'] = None; import sftflow.evaluation.summary, sftflow.report.eval_table"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
