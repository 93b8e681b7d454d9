"""Benchmark normalisation (real GSM8K / MATH-500 files and bad input), spec parsing, and the download error path."""

from __future__ import annotations

import re
import urllib.error
import urllib.request

import pytest

from sftflow.errors import SftflowError
from sftflow.evaluation import benchmarks
from sftflow.evaluation.benchmarks import (
    LOCAL_PATH_OPTION,
    SOURCES,
    download_benchmark,
    normalize_row,
    parse_benchmarks_spec,
    prepare_benchmark,
)
from sftflow.mathtext import last_boxed
from tests.conftest import SHARED_DATA, needs_shared_data, read_jsonl, write_jsonl

GSM8K = SHARED_DATA / "gsm8k" / "test.jsonl"
MATH500 = SHARED_DATA / "math500" / "test.jsonl"
needs_gsm8k = needs_shared_data("gsm8k/test.jsonl")
needs_math500 = needs_shared_data("math500/test.jsonl")


# --- real files ---------------------------------------------------------------------------------


@needs_gsm8k
def test_gsm8k_normalisation(tmp_path):
    out = tmp_path / "gsm8k" / "test.jsonl"
    assert prepare_benchmark("gsm8k", GSM8K, out) == 1319
    source, rows = read_jsonl(GSM8K), read_jsonl(out)
    assert len(rows) == 1319
    for src, row in zip(source, rows):
        assert set(row) == {"problem", "expected_answer", "reference_solution"}
        assert row["problem"] == src["question"]
        # A plain number, no thousands separators (GSM8K has 14 such answers, and two negative ones).
        assert re.fullmatch(r"-?\d+", row["expected_answer"]), row["expected_answer"]
        assert row["expected_answer"] == src["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        assert "<<" not in row["reference_solution"] and ">>" not in row["reference_solution"]
        assert "####" not in row["reference_solution"]
    assert sum("," in src["answer"].rsplit("####", 1)[1] for src in source) == 14
    assert rows[0]["expected_answer"] == "18"
    assert rows[0]["reference_solution"] == (
        "Janet sells 16 - 3 - 4 = 9 duck eggs a day.\nShe makes 9 * 2 = $18 every day at the farmer\u2019s market."
    )
    assert rows[2]["expected_answer"] == "70000"  # "#### 70000" with "$<<...>>70,000" in the text
    assert "80,000+50,000=$130,000" in rows[2]["reference_solution"]


@needs_math500
def test_math500_normalisation(tmp_path):
    out = tmp_path / "math500.jsonl"
    assert prepare_benchmark("math500", MATH500, out) == 500
    source, rows = read_jsonl(MATH500), read_jsonl(out)
    for src, row in zip(source, rows):
        assert row["problem"] == src["problem"]
        assert row["expected_answer"] == src["answer"]
        assert row["reference_solution"] == src["solution"]
        assert row["subject"] == src["subject"] and row["level"] == src["level"]
    assert rows[0]["expected_answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)"


@needs_math500
def test_math_without_answer_uses_the_last_box_of_the_solution(tmp_path):
    # Every MATH-500 answer is the last \boxed{} of its solution: drop `answer` and get it back.
    source = read_jsonl(MATH500)
    stripped = [{k: v for k, v in row.items() if k != "answer"} for row in source]
    write_jsonl(tmp_path / "in.jsonl", stripped)
    prepare_benchmark("math", tmp_path / "in.jsonl", tmp_path / "out.jsonl")
    assert [r["expected_answer"] for r in read_jsonl(tmp_path / "out.jsonl")] == [r["answer"] for r in source]


def test_math_original_layout_keeps_type_level_and_unique_id():
    row = {
        "problem": "What is $1+1$?",
        "solution": "We get $\\boxed{1}$ first, then $1+1=\\boxed{\\frac{4}{2}}$.",
        "type": "Algebra",
        "level": "Level 1",
        "unique_id": "test/algebra/1.json",
    }
    out = normalize_row("math", row)
    assert out["expected_answer"] == "\\frac{4}{2}"  # the last box, braces balanced
    assert out["subject"] == "Algebra" and out["level"] == "Level 1" and out["unique_id"] == "test/algebra/1.json"
    assert last_boxed(out["reference_solution"]) == "\\frac{4}{2}"


def test_demo_rows_pass_through(tmp_path):
    src = write_jsonl(tmp_path / "demo.jsonl", [{"problem": "2+3?", "expected_answer": "5", "extra": 1}])
    prepare_benchmark("demo", src, tmp_path / "out.jsonl")
    assert read_jsonl(tmp_path / "out.jsonl") == [{"problem": "2+3?", "expected_answer": "5", "extra": 1}]


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "rows", "message"),
    [
        ("gsm8k", [{"question": "q", "answer": "a\n#### 1"}, {"question": "q"}], r":2: missing key 'answer'"),
        ("gsm8k", [{"question": "q", "answer": "no final answer"}], r":1: .*'#### <number>'"),
        ("gsm8k", [{"question": "q", "answer": "x\n#### about 5"}], r":1: the answer after '####' is not a number"),
        ("gsm8k", [{"question": "", "answer": "x\n#### 5"}], r":1: key 'question' is empty"),
        ("math", [{"problem": "p", "solution": "no box"}], r":1: no 'answer' key and no \\boxed"),
        ("math500", [{"problem": ["p"], "answer": "1"}], r":1: key 'problem' must be a string"),
        ("demo", [{"problem": "p"}], r":1: missing key 'expected_answer'"),
    ],
)
def test_bad_rows_name_file_line_and_key(tmp_path, name, rows, message):
    src = write_jsonl(tmp_path / "src.jsonl", rows)
    out = tmp_path / "out.jsonl"
    with pytest.raises(SftflowError, match=re.escape(str(src)) + message):
        prepare_benchmark(name, src, out)
    assert not out.exists() and not list(tmp_path.glob(".out.jsonl*"))  # nothing partial written


def test_bad_json_line_names_file_and_line(tmp_path):
    src = tmp_path / "src.jsonl"
    src.write_text('{"problem": "p", "expected_answer": "1"}\n{not json\n', encoding="utf-8")
    with pytest.raises(SftflowError, match=re.escape(f"{src}:2: invalid JSON")):
        prepare_benchmark("demo", src, tmp_path / "out.jsonl")


def test_missing_source_and_unknown_benchmark(tmp_path):
    with pytest.raises(SftflowError, match="file not found"):
        prepare_benchmark("gsm8k", tmp_path / "nope.jsonl", tmp_path / "out.jsonl")
    src = write_jsonl(tmp_path / "src.jsonl", [{"problem": "p", "expected_answer": "1"}])
    with pytest.raises(SftflowError, match="unknown benchmark 'aime'; known: demo, gsm8k, math, math500"):
        prepare_benchmark("aime", src, tmp_path / "out.jsonl")


# --- eval.benchmarks spec -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("gsm8k:4,math", [("gsm8k", 4), ("math", 0)]),
        ("demo", [("demo", 0)]),
        (" gsm8k : 8 , math500:0 ", [("gsm8k", 8), ("math500", 0)]),
        ("gsm8k,", [("gsm8k", 0)]),  # blank items are skipped, as rules/common.smk's benchmark_names() does
    ],
)
def test_parse_benchmarks_spec(spec, parsed):
    assert parse_benchmarks_spec(spec) == parsed


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "no benchmarks"),
        (" , ", "no benchmarks"),
        ("gsm8k:", "bad number of seeds ''"),
        ("gsm8k:four", "bad number of seeds 'four'"),
        ("gsm8k:-1", "bad number of seeds '-1'"),
        ("gsm8k:1.5", "bad number of seeds '1.5'"),
        ("gsm8k:4:2", "bad number of seeds '4:2'"),
        (":4", "bad benchmark name ''"),
        ("gsm 8k", "bad benchmark name 'gsm 8k'"),
        ("math/500", "bad benchmark name"),
        ("gsm8k,gsm8k:4", "listed twice"),
    ],
)
def test_bad_benchmarks_specs(spec, message):
    with pytest.raises(SftflowError, match=re.escape("eval.benchmarks: ") + ".*" + re.escape(message)):
        parse_benchmarks_spec(spec)


def test_spec_names_can_be_restricted():
    assert parse_benchmarks_spec("gsm8k:2", known=SOURCES) == [("gsm8k", 2)]
    with pytest.raises(SftflowError, match="unknown benchmark 'aime'; known: gsm8k, math, math500"):
        parse_benchmarks_spec("aime", known=SOURCES)


# --- sources and downloads ----------------------------------------------------------------------


def test_canonical_sources():
    assert SOURCES["gsm8k"].url == (
        "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/test.jsonl"
    )
    assert (SOURCES["math500"].hf_dataset, SOURCES["math500"].hf_split) == ("HuggingFaceH4/MATH-500", "test")
    assert SOURCES["math"].url == (
        "https://raw.githubusercontent.com/QwenLM/Qwen2.5-Math/main/evaluation/data/math/test.jsonl"
    )


def test_download_without_network_names_url_and_local_option(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    dest = tmp_path / "raw.jsonl"
    with pytest.raises(SftflowError) as info:
        download_benchmark("gsm8k", dest)
    message = str(info.value)
    assert SOURCES["gsm8k"].url in message
    assert "name resolution" in message
    assert f"{LOCAL_PATH_OPTION}.gsm8k" in message
    assert not dest.exists()


def test_hub_download_without_network_names_dataset_and_local_option(tmp_path, monkeypatch):
    def no_network(dataset, split):
        raise ConnectionError(f"Couldn't reach '{dataset}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(benchmarks, "_load_hub_dataset", no_network)
    with pytest.raises(SftflowError, match=r"HuggingFaceH4/MATH-500.*eval\.benchmark_files\.math500"):
        download_benchmark("math500", tmp_path / "raw.jsonl")


def test_download_then_prepare_with_a_fake_server(tmp_path, monkeypatch):
    body = b'{"question": "1+1?", "answer": "1+1=<<1+1=2>>2\\n#### 2"}\n'

    class Response:
        def __init__(self) -> None:
            self.chunks = [body, b""]

        def read(self, size: int = -1) -> bytes:
            return self.chunks.pop(0)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            return None

    monkeypatch.setattr(urllib.request, "urlopen", lambda request, timeout: Response())
    raw = download_benchmark("gsm8k", tmp_path / "raw.jsonl")
    assert raw.read_bytes() == body
    prepare_benchmark("gsm8k", raw, tmp_path / "test.jsonl")
    assert read_jsonl(tmp_path / "test.jsonl") == [
        {"problem": "1+1?", "expected_answer": "2", "reference_solution": "1+1=2"}
    ]


def test_generated_and_unknown_benchmarks_are_not_downloadable(tmp_path):
    with pytest.raises(SftflowError, match="'demo' cannot be downloaded \\(the workflow generates it\\)"):
        download_benchmark("demo", tmp_path / "x.jsonl")
    with pytest.raises(SftflowError, match="'aime' cannot be downloaded; downloadable: gsm8k, math, math500"):
        download_benchmark("aime", tmp_path / "x.jsonl")
