"""The differences from NeMo-Skills' prepare_data that are kept on purpose, each pinned as documented in
docs/nemo-skills-parity.md (issue 13). A change here is a change of that page too."""

from __future__ import annotations

from tests.conftest import write_jsonl
from tests.prepare.conftest import prepare, row


def test_a_null_label_is_unlabeled_not_incorrect_and_is_correct_is_a_label(tmp_path):
    rows = [row("p1", "a", correct=None, symbolic_correct=None), row("p2", "b", correct=None, is_correct=True)]
    _, out, stats = prepare(tmp_path, {"a.jsonl": rows}, "++add_incorrect=true")
    assert [r["output"] for r in out] == ["b"]  # NeMo-Skills: "a" counts as incorrect and is kept here
    assert stats["selection"]["unlabeled_seen"] == 1 and stats["selection"]["incorrect_seen"] == 0


def test_judgement_verdicts_are_read_loosely_and_an_unreadable_one_is_an_error(tmp_path, capsys):
    rows = [
        row("p1", "a", correct=None, judgement="Judgment: Yes"),  # NeMo-Skills: no "Judgement:", so incorrect
        row("p2", "b", correct=None, judgement="judgement: **Yes**"),
        row("p3", "c", correct=None, judgement="Judgement: No"),
    ]
    _, out, _ = prepare(tmp_path, {"a.jsonl": rows}, "++use_judgement=true")
    assert [r["output"] for r in out] == ["a", "b"]
    rc, _, _ = prepare(
        tmp_path / "bad", {"a.jsonl": [row("p", "s", correct=None, judgement="looks fine")]}, "++use_judgement=true"
    )
    assert rc == 2 and "a.jsonl:1: field 'judgement' has no 'Judgement: Yes/No' verdict" in capsys.readouterr().err


def test_contamination_matches_normalised_text_and_a_row_without_the_flag_counts(tmp_path):
    contamination = write_jsonl(
        tmp_path / "contamination.jsonl",
        [{"problem": "what is 5 + 5"}, {"problem": "What is 6 + 6?", "contaminated": False}],
    )
    rows = [row("What is 5 + 5?", "10"), row("What is 6 + 6?", "12"), row("What is 7 + 7?", "14")]
    _, out, _ = prepare(
        tmp_path, {"a.jsonl": rows}, "++filters.remove_contaminated=true", f"++contamination_file={contamination}"
    )
    assert [r["input"] for r in out] == ["What is 6 + 6?", "What is 7 + 7?"]  # NeMo-Skills: exact text only


def test_drop_multi_boxed_counts_fbox_and_a_spaced_boxed(tmp_path):
    rows = [row("p1", "\\fbox{1} or \\boxed{2}"), row("p2", "\\boxed {1} or \\boxed{2}"), row("p3", "\\boxed{3}")]
    _, out, _ = prepare(tmp_path, {"a.jsonl": rows}, "++filters.drop_multi_boxed=true")
    assert [r["input"] for r in out] == ["p3"]  # NeMo-Skills' pattern sees one box in p1 and p2


def test_fair_downsampling_to_exactly_the_rows_available_keeps_them_all(tmp_path):
    rows = [row("p1", "a"), row("p1", "b"), row("p2", "c")]
    _, out, _ = prepare(tmp_path, {"a.jsonl": rows}, "++downsampling_method=fair", "++num_output_samples=3")
    assert sorted(r["output"] for r in out) == ["a", "b", "c"]  # NeMo-Skills writes 0 rows here


def test_rows_made_identical_by_a_filter_are_removed_before_downsampling(tmp_path):
    rows = [row("p1", "x \\boxed{1}\njunk one"), row("p1", "x \\boxed{1}\njunk two"), row("p2", "y"), row("p3", "z")]
    _, out, stats = prepare(
        tmp_path, {"a.jsonl": rows}, "++filters.trim_solutions=true", "++downsampling_method=fair",
        "++num_output_samples=3",
    )  # fmt: skip
    assert len(out) == 3  # NeMo-Skills removes the duplicate after downsampling and writes 2
    assert stats["funnel"][-2] == {"stage": "deduplicate", "rows_in": 4, "dropped": 1}


def test_a_prompt_config_is_applied_without_a_tokenizer(tmp_path):
    _, out, _ = prepare(tmp_path, {"a.jsonl": [row("What is 2 + 2?", "4")]}, "++prompt_config=generic/math")
    assert out[0]["input"].startswith("Solve the following math problem.")  # NeMo-Skills: the bare problem
    assert out[0]["input"].endswith("\n\nWhat is 2 + 2?")


def test_an_empty_system_message_means_no_system_turn(tmp_path, demo_tokenizer_dir):
    _, out, _ = prepare(
        tmp_path, {"a.jsonl": [row("p", "s")]}, f"++tokenizer={demo_tokenizer_dir}", "++system_message="
    )
    assert out[0]["input"] == "<|im_start|>user\np<|im_end|>\n<|im_start|>assistant\n"  # NeMo-Skills: empty system


def test_exclude_optional_keys_false_keeps_every_field_and_a_string_answer(tmp_path):
    r = {"problem": "p", "generation": "s", "expected_answer": 7, "symbolic_correct": True, "my_field": [1, 2]}
    _, out, _ = prepare(tmp_path, {"a.jsonl": [r]}, "++exclude_optional_keys=false")
    assert out[0]["expected_answer"] == "7" and out[0]["my_field"] == [1, 2] and out[0]["generation"] == "s"
