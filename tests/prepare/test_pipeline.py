"""Selection, dedup, downsampling, formatting and the stats funnel of prepare_data, through its ++ command line."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from sftflow import config as C
from tests.conftest import write_jsonl
from tests.prepare.conftest import prepare, row


def accounted(stats: dict) -> int:
    return (
        stats["skipped_first"]
        + stats["invalid_rows"]["count"]
        + stats["dropped_by_selection"]
        + sum(s["dropped"] for s in stats["funnel"])
        + stats["rows_written"]
    )


ROWS = [
    row("p1", "a \\boxed{1}", True),
    row("p1", "b \\boxed{2}", False),
    row("p2", "c \\boxed{1}", None),
    row("p2", "a \\boxed{1}", True),
]


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["++add_correct=true"], {"a \\boxed{1}"}),
        (["++add_correct=false", "++add_incorrect=true"], {"b \\boxed{2}"}),
        (["++add_correct=false", "++add_unlabeled=true"], {"c \\boxed{1}"}),
        (["++add_incorrect=true", "++add_unlabeled=true"], {"a \\boxed{1}", "b \\boxed{2}", "c \\boxed{1}"}),
    ],
)
def test_selection_by_label(tmp_path, flags, expected):
    rc, out, stats = prepare(tmp_path, {"output-rs0.jsonl": ROWS}, "++exclude_optional_keys=false", *flags)
    assert rc == 0
    assert {r["generation"] for r in out} == expected
    assert stats["selection"]["correct_seen"] == 2 and stats["selection"]["incorrect_seen"] == 1
    assert accounted(stats) == stats["rows_read"] == 4


def test_use_judgement_overrides_symbolic_correct(tmp_path):
    rows = [
        row("p1", "x", True, judgement="Reasoning...\nJudgement: No"),
        row("p2", "y", False, judgement="Judgement: Yes"),
        row("p3", "z", True),  # no judgement: unlabeled
    ]
    rc, out, stats = prepare(tmp_path, {"a.jsonl": rows}, "++use_judgement=true", "++exclude_optional_keys=false")
    assert [r["problem"] for r in out] == ["p2"]
    assert stats["selection"]["unlabeled_seen"] == 1


def test_dedup_across_files_and_skip_first(tmp_path):
    files = {
        "output-rs0.jsonl": [row("p0", "first-line"), row("p1", "s")],
        "output-rs1.jsonl": [row("p0", "other"), row("p1", "s"), row("p2", "t")],
    }
    rc, out, stats = prepare(tmp_path, files, "++skip_first=1", "++exclude_optional_keys=false")
    assert [(r["problem"], r["generation"]) for r in out] == [("p1", "s"), ("p2", "t")]
    assert stats["skipped_first"] == 2
    dedup = next(s for s in stats["funnel"] if s["stage"] == "deduplicate")
    assert dedup["dropped"] == 1
    rc, out, _ = prepare(tmp_path, {}, "++skip_first=1", "++deduplicate=false")
    assert len(out) == 3


def test_a_worker_forgetting_the_rows_it_sent_changes_nothing(tmp_path, monkeypatch):
    """A worker skips formatting rows it sent before (sure duplicates); its memory of them is bounded, and
    forgetting (here after every 2 rows) gives the same file and the same counts."""
    from sftflow.prepare import rows as R

    rows = [row(f"p{i % 3}", f"s{i % 4}") for i in range(40)]
    _, out, stats = prepare(tmp_path / "a", {"a.jsonl": rows})
    monkeypatch.setattr(R, "EMITTED_MAX", 2)
    _, forgetful, forgetful_stats = prepare(tmp_path / "b", {"a.jsonl": rows})
    assert forgetful == out and len(out) == 12
    assert forgetful_stats["funnel"] == stats["funnel"]


def test_exclude_optional_keys_and_metadata(tmp_path):
    rows = [row("p", "s", True, predicted_answer="1", level="Level 3")]
    _, out, _ = prepare(tmp_path, {"a.jsonl": rows}, "++metadata={dataset: demo, generation_type: cot}")
    assert set(out[0]) == {"input", "output", "expected_answer", "dataset", "generation_type"}
    assert out[0]["dataset"] == "demo"
    _, out, _ = prepare(tmp_path, {}, "++exclude_optional_keys=false")
    assert out[0]["level"] == "Level 3" and out[0]["predicted_answer"] == "1"


def test_input_and_output_keys(tmp_path):
    rows = [{"question": "q1", "generated_solution": "s1", "symbolic_correct": True}]
    _, out, _ = prepare(
        tmp_path,
        {"a.jsonl": rows},
        "++input_key=question",
        "++output_key=generated_solution",
        "++prompt_config=generic/default",
    )
    assert out == [{"input": "q1", "output": "s1"}]


def _many(n_problems=10, per_problem=5):
    return [row(f"p{i}", f"sol{i}-{j}") for i in range(n_problems) for j in range(per_problem)]


def test_downsampling_fair_is_round_robin_over_problems(tmp_path):
    rows = [row("big", f"b{j}") for j in range(20)] + [row(f"small{i}", "s") for i in range(5)]
    _, out, stats = prepare(
        tmp_path,
        {"a.jsonl": rows},
        "++downsampling_method=fair",
        "++num_output_samples=10",
        "++exclude_optional_keys=false",
    )
    counts = Counter(r["problem"] for r in out)
    assert len(out) == 10
    # fair: every problem gets one before any gets a second
    assert counts["big"] == 5 and all(counts[f"small{i}"] == 1 for i in range(5))
    assert accounted(stats) == 25


def test_downsampling_random_seeded_and_shuffle(tmp_path):
    args = ["++downsampling_method=random", "++num_output_samples=7", "++exclude_optional_keys=false"]
    _, a, _ = prepare(tmp_path, {"a.jsonl": _many()}, *args, "++random_seed=1", "++do_shuffle=true")
    _, b, _ = prepare(tmp_path, {}, *args, "++random_seed=1", "++do_shuffle=true")
    _, c, _ = prepare(tmp_path, {}, *args, "++random_seed=2", "++do_shuffle=true")
    assert a == b and len(a) == 7 and a != c
    # As NeMo-Skills: without do_shuffle, "random" takes the first rows (grouped by problem), whatever the seed.
    _, first, _ = prepare(tmp_path, {}, *args, "++random_seed=2")
    _, everything, _ = prepare(tmp_path, {}, "++exclude_optional_keys=false")
    assert first == everything[:7]
    _, unshuffled, _ = prepare(tmp_path, {}, "++exclude_optional_keys=false")
    _, shuffled, _ = prepare(tmp_path, {}, "++exclude_optional_keys=false", "++do_shuffle=true")
    assert unshuffled != shuffled and sorted(map(json.dumps, unshuffled)) == sorted(map(json.dumps, shuffled))


def test_num_output_samples_without_method_is_an_error(tmp_path, capsys):
    rc, _, _ = prepare(tmp_path, {"a.jsonl": _many()}, "++num_output_samples=3")
    assert rc == 2
    assert "num_output_samples" in capsys.readouterr().err


def test_code_text_filter_per_problem(tmp_path):
    rows = [
        row("p1", "<tool_call>x</tool_call> \\boxed{1}"),
        row("p1", "text \\boxed{1}"),
        row("p2", "only text \\boxed{1}"),
    ]
    _, out, stats = prepare(
        tmp_path, {"a.jsonl": rows}, "++filters.code_text_filter=any_code", "++exclude_optional_keys=false"
    )
    assert sorted(r["generation"] for r in out) == ["<tool_call>x</tool_call> \\boxed{1}", "only text \\boxed{1}"]
    stage = next(s for s in stats["funnel"] if s["stage"] == "code_text_filter")
    assert stage["dropped"] == 1


def test_chat_template_formatting_matches_full_conversation(tmp_path, demo_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_tokenizer_dir)
    rows = [row("What is 2 + 2?", "2 + 2 = 4.\nThe answer is \\boxed{4}.")]
    _, out, stats = prepare(
        tmp_path,
        {"a.jsonl": rows},
        f"++tokenizer={demo_tokenizer_dir}",
        "++system_message=Be brief.",
        "++prompt_config=generic/math",
    )
    rec = out[0]
    full = tok.apply_chat_template(
        [
            {"role": "system", "content": "Be brief."},
            {
                "role": "user",
                "content": "Solve the following math problem. Make sure to put the answer (and only answer) inside \\boxed{}.\n\nWhat is 2 + 2?",
            },
            {"role": "assistant", "content": rows[0]["generation"]},
        ],
        tokenize=False,
    )
    assert rec["input"] + rec["output"] == full
    assert rec["input"].endswith("<|im_start|>assistant\n")
    assert rec["output"] == rows[0]["generation"] + "<|im_end|>\n"
    assert stats["formatting"]["mode"] == "chat_template"


def test_messages_output_format(tmp_path):
    rows = [row("What is 1 + 1?", "2")]
    _, out, _ = prepare(tmp_path, {"a.jsonl": rows}, "++output_format=messages", "++prompt_config=qwen/math-cot")
    assert out[0]["messages"] == [
        {"role": "system", "content": "Please reason step by step, and put your final answer within \\boxed{}."},
        {"role": "user", "content": "What is 1 + 1?"},
        {"role": "assistant", "content": "2"},
    ]


def test_base_tokenizer_without_template_gets_bos_plus_prompt(tmp_path, demo_tokenizer_dir):
    import shutil

    base = tmp_path / "base_tok"
    shutil.copytree(demo_tokenizer_dir, base)
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(cfg))
    (base / "chat_template.jinja").unlink(missing_ok=True)
    _, out, stats = prepare(
        tmp_path, {"a.jsonl": [row("What is 3 + 4?", "7")]}, f"++tokenizer={base}", "++prompt_config=generic/math-base"
    )
    assert stats["formatting"]["mode"] == "bos_prompt"
    assert out[0]["input"].startswith("<|endoftext|>Solve each problem step by step")
    assert "Problem:\nWhat is 3 + 4?\n\nSolution:" in out[0]["input"]
    assert out[0]["output"] == "7<|im_end|>"


def test_user_prompt_config_file(tmp_path):
    prompt = tmp_path / "mine.yaml"
    prompt.write_text("system: ''\nuser: 'Q: {problem} (level {level})'\n")
    _, out, _ = prepare(tmp_path, {"a.jsonl": [row("p", "s", level=3)]}, f"++prompt_config={prompt}")
    assert out[0]["input"] == "Q: p (level 3)"


def test_length_filters_min_or_max_alone(tmp_path, demo_tokenizer_dir):
    rows = [row("What is 1 + 1?", "2"), row("What is 1 + 2?", "The sum is three, written as 3 " * 20)]
    base = [
        f"++tokenizer={demo_tokenizer_dir}",
        "++filters.remove_len_outlier_solutions=true",
        "++exclude_optional_keys=false",
    ]
    _, out, stats = prepare(
        tmp_path, {"a.jsonl": rows}, *base, "++min_solution_length=null", "++max_solution_length=20"
    )
    assert [r["problem"] for r in out] == ["What is 1 + 1?"]
    stage = next(s for s in stats["funnel"] if s["stage"] == "remove_len_outlier_solutions")
    assert stage["dropped_too_long"] == 1 and stage["dropped_too_short"] == 0
    _, out, _ = prepare(tmp_path, {}, *base, "++min_solution_length=3", "++max_solution_length=null")
    assert [r["problem"] for r in out] == ["What is 1 + 2?"]
    _, out, _ = prepare(
        tmp_path, {}, *base, "++min_solution_length=3", "++max_solution_length=null", "++use_chars_for_min_length=true"
    )
    assert [r["problem"] for r in out] == ["What is 1 + 2?"]


def test_length_filter_without_tokenizer_is_an_error(tmp_path, capsys):
    rc, _, _ = prepare(
        tmp_path, {"a.jsonl": [row("p", "s")]}, "++filters.remove_len_outlier_problems=true", "++max_problem_length=9"
    )
    assert rc == 2
    assert "tokenizer" in capsys.readouterr().err


def test_contamination_file_removes_listed_problems(tmp_path):
    contamination = write_jsonl(
        tmp_path / "contamination.jsonl",
        [{"problem": "What is 5 + 5?", "contaminated": True}, {"problem": "What is 6 + 6?", "contaminated": False}],
    )
    rows = [row("what is 5+5", "x"), row("What is 5 + 5 ?", "y"), row("What is 6 + 6?", "z")]
    _, out, stats = prepare(
        tmp_path,
        {"a.jsonl": rows},
        "++filters.remove_contaminated=true",
        f"++contamination_file={contamination}",
        "++exclude_optional_keys=false",
    )
    assert [r["problem"] for r in out] == ["What is 6 + 6?"]
    stage = next(s for s in stats["funnel"] if s["stage"] == "remove_contaminated")
    assert stage["dropped"] == 2 and stage["contaminated_problems"] == 1


def test_remove_contaminated_without_file_is_reported_not_silent(tmp_path, capsys):
    _, out, stats = prepare(tmp_path, {"a.jsonl": [row("p", "s")]}, "++filters.remove_contaminated=true")
    assert len(out) == 1
    assert stats["funnel"][0] == {
        "stage": "remove_contaminated",
        "skipped": "no contamination_file set",
        "rows_in": 0,
        "dropped": 0,
    }
    err = capsys.readouterr().err
    assert "nothing is decontaminated" in err and "remove_contaminated: skipped (no contamination_file set)" in err


def test_funnel_counts_every_row(tmp_path, demo_tokenizer_dir):
    from sftflow.demo.data import DemoDataSpec, write_demo_data

    spec = DemoDataSpec(seed=3, num_train_problems=80, num_test_problems=10, num_seeds=3, num_contaminated=2)
    write_demo_data(tmp_path / "gen", tmp_path / "bench.jsonl", spec)
    on = [
        f"++filters.{f}=true"
        for f in (
            "drop_multi_boxed",
            "drop_incorrect_arithmetic",
            "split_arithmetic",
            "trim_prefix",
            "remove_code_errors",
            "remove_matplotlib",
            "remove_verification_code",
            "majority_filter",
            "remove_len_outlier_solutions",
        )
    ]
    _, out, stats = prepare(
        tmp_path,
        {},
        f"++tokenizer={demo_tokenizer_dir}",
        "++max_solution_length=150",
        "++majority_filter.min_majority_votes=2",
        "++add_incorrect=true",
        *on,
    )
    assert stats["rows_read"] == 3 * 82
    assert accounted(stats) == stats["rows_read"]
    assert stats["rows_written"] == len(out) > 0
    assert all(
        s["dropped"] > 0
        for s in stats["funnel"]
        if s["stage"] not in ("trim_prefix", "split_arithmetic", "remove_len_outlier_problems")
    )


def test_parse_overrides():
    parsed = C.parse_overrides(["++a=1", "++b.c=true", "++d=null", "++e=*.jsonl", "++f=[1, 2]", "++g=x y", "++h="])
    assert parsed == {"a": 1, "b": {"c": True}, "d": None, "e": "*.jsonl", "f": [1, 2], "g": "x y", "h": ""}


@pytest.mark.parametrize("shuffle", ["false", "true"])
def test_worker_processes_give_the_same_output_and_stats(tmp_path, monkeypatch, demo_tokenizer_dir, shuffle):
    from sftflow.demo.data import DemoDataSpec, write_demo_data
    from sftflow.prepare import blocks

    spec = DemoDataSpec(seed=5, num_train_problems=300, num_test_problems=10, num_seeds=2, num_contaminated=0)
    write_demo_data(tmp_path / "gen", tmp_path / "bench.jsonl", spec)
    monkeypatch.setattr(blocks, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(blocks, "CHUNK_BYTES", 4000)
    args = [
        f"++tokenizer={demo_tokenizer_dir}",
        "++filters.drop_multi_boxed=true",
        "++filters.remove_len_outlier_solutions=true",
        "++max_solution_length=100",
        f"++do_shuffle={shuffle}",
    ]
    _, one, stats_one = prepare(tmp_path, {}, *args, "++num_workers=1")
    _, two, stats_two = prepare(tmp_path, {}, *args, "++num_workers=2")
    assert one == two and len(one) > 100
    for key in ("funnel", "selection", "rows_read", "rows_written", "input_files"):
        assert stats_one[key] == stats_two[key], key


def test_records_are_written_as_json_dumps_writes_them(tmp_path):
    """NeMo-Skills writes json.dumps(record): its separators, ASCII escapes, float and big int forms, key order."""
    extra = {
        "id": 7,
        "x": None,
        "is_correct": False,
        "votes": -3,
        "big": 2**62,
        "p": 0.1,
        "q": -0.0,
        "r": 1e300,
        "nested": [1, "a", None],
        "d": {"k": True},
    }
    rows = [row("é\u2028 problem", 'é\u2028\n"\\ 😀 \\boxed{1}', **extra)]
    _, out, _ = prepare(tmp_path, {"a.jsonl": rows}, "++exclude_optional_keys=false", "++do_shuffle=false")
    text = (tmp_path / "out" / "sft.jsonl").read_text(encoding="ascii")
    assert text == json.dumps(out[0]) + "\n"
    assert list(out[0])[:3] == ["expected_answer", "input", "output"] and out[0]["big"] == 2**62
