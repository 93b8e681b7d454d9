"""prepare_data on real NeMo-Skills generation outputs (../shared/data/generations), checked by hand-derivable facts."""

from __future__ import annotations

import json

from sftflow.prepare.cli import main
from tests.conftest import SHARED_DATA, needs_shared_data, read_jsonl

GEN = SHARED_DATA / "generations"
pytestmark = needs_shared_data(*(f"generations/output-rs{i}.jsonl" for i in range(3)))

PLAIN = [
    "++filters.remove_contaminated=false",
    "++filters.remove_len_outlier_problems=false",
    "++filters.trim_solutions=false",
    "++do_shuffle=false",
    "++exclude_optional_keys=false",
]


def source_rows():
    rows = []
    for i in range(3):
        rows += read_jsonl(GEN / f"output-rs{i}.jsonl")
    return rows


def test_correct_only_keeps_exactly_the_correct_rows_minus_duplicates(tmp_path):
    out = tmp_path / "sft.jsonl"
    assert main([f"++input_files={GEN}/output-rs*.jsonl", f"++output_path={out}", *PLAIN]) == 0
    rows = source_rows()
    expected = list(dict.fromkeys((r["problem"], r["generation"]) for r in rows if r["symbolic_correct"] is True))
    problems = list(dict.fromkeys(p for p, _ in expected))  # grouped by problem, as NeMo-Skills' GroupSamples
    expected.sort(key=lambda pair: problems.index(pair[0]))
    got = [(r["problem"], r["generation"]) for r in read_jsonl(out)]
    assert got == expected
    stats = json.loads((tmp_path / "sft.stats.json").read_text())
    assert stats["rows_read"] == 150
    assert stats["selection"]["correct_seen"] == sum(r["symbolic_correct"] is True for r in rows) == 107
    dedup = stats["funnel"][-1]
    assert dedup["stage"] == "deduplicate" and dedup["dropped"] == 107 - len(expected)


def test_incorrect_only(tmp_path):
    out = tmp_path / "sft.jsonl"
    main(
        [
            f"++input_files={GEN}/output-rs*.jsonl",
            f"++output_path={out}",
            "++add_correct=false",
            "++add_incorrect=true",
            *PLAIN,
        ]
    )
    assert all(r["symbolic_correct"] is False for r in read_jsonl(out))
    assert len(read_jsonl(out)) == len(
        {(r["problem"], r["generation"]) for r in source_rows() if r["symbolic_correct"] is False}
    )


def test_trim_solutions_on_real_generations(tmp_path):
    out = tmp_path / "sft.jsonl"
    args = [a for a in PLAIN if "trim_solutions" not in a] + ["++filters.trim_solutions=true"]
    main([f"++input_files={GEN}/output-rs*.jsonl", f"++output_path={out}", *args])
    for r in read_jsonl(out):
        # after trimming, nothing follows the line of the last boxed answer
        from sftflow.mathtext import find_boxed

        end = find_boxed(r["generation"])[-1][1]
        assert "\n" not in r["generation"][end:]


def test_demo_tokenizer_formatting_on_real_data(tmp_path, demo_tokenizer_dir):
    out = tmp_path / "sft.jsonl"
    rc = main(
        [
            f"++input_files={GEN}/output-rs*.jsonl",
            f"++output_path={out}",
            "++prompt_config=generic/math",
            f"++tokenizer={demo_tokenizer_dir}",
            "++filters.remove_contaminated=false",
        ]
    )
    assert rc == 0
    rows = read_jsonl(out)
    assert rows and all(
        r["input"].startswith("<|im_start|>user\n") and r["output"].endswith("<|im_end|>\n") for r in rows
    )
