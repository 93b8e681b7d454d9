"""Each filter on its own, with the cases NeMo-Skills' math_sft.yaml pins, plus ours."""

import pytest

from sftflow.mathtext import find_boxed, last_boxed, normalize_problem
from sftflow.prepare import filters as F

K = "generation"


def run(fn, text):
    out = fn({K: text, "problem": "p"})
    return None if out is None else out[K]


def test_find_boxed_balances_braces_and_skips_unclosed():
    text = r"a \boxed{\frac{1}{2}} b \boxed{x^{2}} c \boxed{open"
    assert [c for _, _, c in find_boxed(text)] == [r"\frac{1}{2}", "x^{2}"]
    assert last_boxed(r"\boxed{3} then \boxed{\{1,2\}}") == r"\{1,2\}"
    assert last_boxed("no answer") is None


def test_drop_multi_boxed():
    fn = F.drop_multi_boxed(K)
    assert run(fn, r"He had \boxed{3} 4090s and \boxed{2} 4080s") is None
    assert run(fn, r"She had \boxed{6} 4090s") == r"She had \boxed{6} 4090s"
    assert run(fn, "boxed boxed 42") == "boxed boxed 42"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Solution ends at \\boxed{0}\nThis line is useless.", "Solution ends at \\boxed{0}"),
        ("Solution continues \\boxed{7} after boxed", "Solution continues \\boxed{7} after boxed"),
        ("Solution\n\ncontinues \n\n\\boxed{7} after\n boxed", "Solution\n\ncontinues \n\n\\boxed{7} after"),
        (
            "Works with newlines inside \\boxed{7\n5} and properly\ncuts after",
            "Works with newlines inside \\boxed{7\n5} and properly",
        ),
        ("\\boxed{1}\nmiddle\n\\boxed{2}\ntail", "\\boxed{1}\nmiddle\n\\boxed{2}"),
        ("no boxed answer\nat all", "no boxed answer\nat all"),
    ],
)
def test_trim_solutions_cuts_after_line_of_last_boxed(text, expected):
    counter = {}
    assert run(F.trim_solutions(K, counter), text) == expected


def test_trim_solutions_counts_rows_without_boxed():
    counter = {}
    F.trim_solutions(K, counter)({K: "nothing"})
    assert counter == {"kept_without_boxed": 1}


def test_trim_prefix():
    fn = F.trim_prefix(K, "My solution:\n")
    assert run(fn, "My solution:\n2 + 2 = 4") == "2 + 2 = 4"
    assert run(fn, "Not my solution:\nx") == "Not my solution:\nx"


@pytest.mark.parametrize(
    "markers, text, dropped",
    [
        (F.CODE_ERROR_MARKERS, "My solution:\n---Traceback (most recent call last)---\nSomething else", True),
        (F.CODE_ERROR_MARKERS, "Some long output<output cut>\nx", True),
        (F.CODE_ERROR_MARKERS, "My solution:\nTimed out\nSomething", True),
        (F.CODE_ERROR_MARKERS, "\x1b[0;31mSyntaxError\x1b\nx", True),
        (F.CODE_ERROR_MARKERS, "My solution, no errors", False),
        (F.MATPLOTLIB_MARKERS, "x\nimport matplotlib.pyplot as plt", True),
        (F.MATPLOTLIB_MARKERS, "from matplotlib import pyplot", True),
        (F.MATPLOTLIB_MARKERS, "plain text", False),
        (F.VERIFICATION_MARKERS, "Here it is. Let's verify this with Python. It works.", True),
        (F.VERIFICATION_MARKERS, "Let's use Python to plot the results.", True),
        (F.VERIFICATION_MARKERS, "This is the correct solution without any verification code.", False),
    ],
)
def test_drop_if_contains(markers, text, dropped):
    assert (run(F.drop_if_contains(K, markers), text) is None) is dropped


@pytest.mark.parametrize(
    "text, kept",
    [("<tool_call>code</tool_call>", True), ("x <tool_call> y", False), ("code</tool_call>", False), ("none", False)],
)
def test_remove_no_code_needs_both_tags(text, kept):
    assert (run(F.drop_unless_contains_all(K, ("<tool_call>", "</tool_call>")), text) is not None) is kept


@pytest.mark.parametrize(
    "text, kept",
    [
        ("<think>t</think>s", True),
        ("</think>s", True),  # NeMo-Skills needs only the end tag: the template often opens <think> in the prompt
        ("My solution:\n---</think>---\nSomething else", True),
        ("<think>My solution:\n\nSomething else", False),
    ],
)
def test_remove_no_think_tags_needs_the_end_tag(text, kept):
    assert (run(F.drop_unless_contains_all(K, (F.THINK_END,)), text) is not None) is kept


def test_remove_contaminated_matches_normalised_copies():
    bad = {normalize_problem("What is 12 + 30?")}
    fn = F.remove_contaminated("problem", bad)
    assert fn({"problem": "WHAT  is 12 + 30"}) is None
    assert fn({"problem": "what is 12 + 31?"}) is not None


def test_majority_filter_thresholds_and_rows_without_votes():
    counter = {}
    fn = F.majority_filter(min_votes=3, min_fraction=0.5, counter=counter)
    assert fn({"majority_votes": 2, "total_votes": 3}) is None  # too few votes
    assert fn({"majority_votes": 3, "total_votes": 8}) is None  # too small a fraction
    assert fn({"majority_votes": 4, "total_votes": 8}) is not None
    assert fn({"generation": "x"}) is not None
    assert counter == {"kept_without_vote_fields": 1}


@pytest.mark.parametrize(
    "mode, kept",
    [
        ("all", ["c1", "c2"]),
        ("majority_code", ["c1", "c2", "t1", "t2"]),  # 2 code of 4 is not a majority: text kept too
        ("majority_text", ["t1", "t2"]),
        ("any_code", ["c1", "c2"]),
    ],
)
def test_code_text_choice(mode, kept):
    samples = [{K: "<tool_call>a"}, {K: "<tool_call>b"}, {K: "text a"}, {K: "text b"}]
    names = {id(s): n for s, n in zip(samples, ["c1", "c2", "t1", "t2"])}
    assert [names[id(s)] for s in F.code_text_choice(samples, K, "<tool_call>", mode)] == kept


def test_code_text_choice_falls_back_to_text_without_code():
    samples = [{K: "t1"}, {K: "t2"}]
    assert F.code_text_choice(samples, K, "<tool_call>", "any_code") == samples
    assert F.code_text_choice(samples, K, "<tool_call>", "all") == []


@pytest.mark.parametrize(
    "a, b, same",
    [
        ("What is 47 + 86?", "WHAT  IS 47+86", True),
        ("What is 47 + 86?", "what is 47 + 86 .", True),
        ("What is 47 + 86?", "What is 47 - 86?", False),  # operators are meaning, not punctuation
        ("Compute 3.5 * 2.", "Compute 35 * 2.", False),  # a decimal point is part of the number
        ("Sell 1,000 pens.", "Sell 1000 pens", True),
    ],
)
def test_normalize_problem_ignores_case_space_punctuation_not_math(a, b, same):
    assert (normalize_problem(a) == normalize_problem(b)) is same


def test_text_memo_returns_the_functions_result_and_starts_afresh_when_full():
    calls = []
    memo = F.TextMemo(lambda text: calls.append(text) or text.upper(), max_chars=5)
    assert [memo("ab"), memo("ab"), memo("cd"), memo("ab")] == ["AB", "AB", "CD", "AB"]
    assert calls == ["ab", "cd"]  # repeated texts are not recomputed
    assert memo("xyz") == "XYZ" and memo.chars <= 5  # over the bound: the memo was cleared
    assert memo("ab") == "AB" and calls[-1] == "ab"


def test_text_memo_pauses_where_texts_do_not_recur_and_tries_again(monkeypatch):
    monkeypatch.setattr(F.TextMemo, "WINDOW", 128)
    monkeypatch.setattr(F.TextMemo, "PAUSE", 256)
    calls = []
    memo = F.TextMemo(lambda text: calls.append(text) or text.upper())
    for i in range(128):  # all distinct: the memo stops looking up and storing
        assert memo(f"t{i}") == f"T{i}"
    assert memo.paused == 256 and not memo.results
    assert [memo("same") for _ in range(256)] == ["SAME"] * 256
    assert len(calls) == 128 + 256  # paused: every call computes
    assert memo("same") == "SAME" and memo("same") == "SAME"  # after the pause it remembers again
    assert len(calls) == 128 + 256 + 1
    for _ in range(126):
        memo("same")
    assert memo.paused == 0  # a window with hits keeps it on


@pytest.mark.parametrize("mode", ["all", "majority_code", "majority_text", "any_code"])
def test_code_text_picks_on_flags_match_code_text_choice(mode):
    for flags in ([True, False, False], [False, True, True, False], [False, False], [True]):
        samples = [{K: "<tool_call>x" if f else "text"} for f in flags]
        chosen = F.code_text_choice(samples, K, "<tool_call>", mode)
        assert [samples[i] for i in F.code_text_picks(flags, mode)] == chosen


ALL_TEXT_FILTERS = [
    f"++filters.{name}=true"
    for name in (
        "drop_multi_boxed",
        "remove_code_errors",
        "remove_matplotlib",
        "remove_verification_code",
        "majority_filter",
        "trim_prefix",
        "trim_solutions",
        "drop_incorrect_arithmetic",
        "split_arithmetic",
    )
]
# Rows for every outcome of the chained stages: dropped at each stage (before and after the majority filter
# between the two chains), modified by several stages, counted without a boxed answer, repeated (memo hits),
# and texts that become another row's text after trim_prefix.
TRICKY_TEXTS = [
    "My solution:\nx = 1 + 2 + 3 = 6 so \\boxed{6}\ntail",
    "x = 1 + 2 + 3 = 6 so \\boxed{6}",
    "Two answers \\boxed{1} and \\boxed{2}",
    "Traceback (most recent call last): \\boxed{3}",
    "import matplotlib\n\\boxed{1}",
    "Let's verify this with Python. \\boxed{1}",
    "My solution:\n2 * 3 = 7, so \\boxed{7}",
    "no boxed answer, 2 + 2 = 4",
    "My solution:\nno boxed answer at all",
    "",
    "My solution:\n",
    "AB^2 = 36 + 25 + 30 = 91\n\\boxed{91}\n\nQuestion: more?",
    "$(2 + 3) * 4 - 1 = 19$ and \\boxed{19}",
]


def test_chained_text_filters_give_the_same_rows_and_counters_as_the_stages_one_by_one():
    from sftflow import config as C
    from sftflow.prepare.rows import RowProcessor
    from sftflow.prepare.settings import PrepareConfig

    args = ["++input_files=x", "++output_path=y", "++majority_filter.min_majority_votes=2", *ALL_TEXT_FILTERS]
    cfg = PrepareConfig.from_section(C.parse_overrides(args))
    one_by_one, chained = RowProcessor(cfg), RowProcessor(cfg)
    assert [type(step).__name__ for step in chained.steps] == ["TextChain", "RowFilter", "TextChain"]
    rows = [
        {K: text, "problem": "p", "majority_votes": votes, "total_votes": 4}
        for votes in (3, 1)
        for text in TRICKY_TEXTS * 2
    ] + [{K: text, "problem": "p"} for text in TRICKY_TEXTS]

    def run_all(steps):
        out = []
        for row in rows:
            row = dict(row)
            for step in steps:
                row = step(row)
                if row is None:
                    break
            out.append(row)
        return out

    assert run_all(chained.steps) == run_all(one_by_one.filters)
    for step in chained.steps:
        if isinstance(step, F.TextChain):
            step.settle()
    stats = [stage.stats() for stage in chained.filters]
    assert stats == [stage.stats() for stage in one_by_one.filters]
    never_drop = ("trim_prefix", "trim_solutions", "split_arithmetic")
    assert all(s["rows_in"] for s in stats) and all(s["dropped"] for s in stats if s["stage"] not in never_drop)
    assert {s["stage"] for s in stats if s["modified"]} == {"trim_prefix", "trim_solutions", "split_arithmetic"}
    assert stats[6]["kept_without_boxed"] > 0


def test_text_chain_settle_counts_each_row_once():
    stage = F.RowFilter("trim_prefix", F.trim_prefix(K, "a"), K)
    chain = F.TextChain([stage])
    for text in ("ab", "ab", "b"):
        chain({K: text})
    chain.settle()
    chain.settle()  # a second settle adds nothing: the tallies were moved into the counters
    assert (stage.rows_in, stage.dropped, stage.modified) == (3, 0, 2)
