"""Unit tests of answer extraction, normalisation and grading (with cases that must stay different)."""

from __future__ import annotations

import threading

import pytest

from sftflow.evaluation.grading import Grader, extract_answer, grade_generation, is_correct, normalize_answer

# --- extract_answer -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("generation", "expected"),
    [
        ("The answer is $\\boxed{42}$.", "42"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("nested \\boxed{\\frac{\\sqrt{3}}{\\left(2\\right)}} end", "\\frac{\\sqrt{3}}{\\left(2\\right)}"),
        ("first \\boxed{1} then \\boxed{2}", "2"),  # the last box is the final answer
        ("\\boxed{ 7 }", "7"),
        ("\\fbox{958} values", "958"),
        ("\\boxed {x^{2}}", "x^{2}"),
        ("no box here, the answer is 5", None),
        ("", None),
        (None, None),
        ("\\boxed{}", None),  # an empty box is no answer
        ("unclosed \\boxed{12", None),
        ("closed \\boxed{3} then unclosed \\boxed{4", "3"),
        ("escaped braces \\boxed{\\{1,2\\}}", "\\{1,2\\}"),
    ],
)
def test_extract_answer(generation, expected):
    assert extract_answer(generation) == expected


@pytest.mark.parametrize(
    "generation, regex, expected",
    [
        ("Janet sells 16 - 3 - 4 = 9 eggs.\n#### 18", r"#### (\S+)", "18"),
        ("#### 3\nthen again\n#### 42", r"#### (\S+)", "42"),  # the last match
        ("so \\boxed{7}. The final answer is 8", r"The final answer is (.+)$", "8"),  # NeMo-Skills' default regex
        ("The final answer is 5\nmore text", r"The final answer is (.+)$", "5"),  # '$' at a line's end
        ("no answer here", r"#### (\S+)", None),
        ("answer: 12", r"answer: \d+", "answer: 12"),  # no group: the whole match
    ],
)
def test_extract_answer_with_a_regex_instead_of_boxed(generation, regex, expected):
    assert extract_answer(generation, extract_from_boxed=False, extract_regex=regex) == expected
    graded = grade_generation(generation, "18", extract_from_boxed=False, extract_regex=regex)
    assert graded["predicted_answer"] == expected and graded["is_correct"] is (expected == "18")


def test_a_mostly_unanswered_run_warns_naming_the_prompt_and_the_answer_format():
    from dataclasses import replace

    from sftflow.evaluation.run import no_answer_warning
    from sftflow.evaluation.settings import EvalSettings

    settings = EvalSettings.from_values({"prompt_config": "generic/default"}, "test")
    assert no_answer_warning({"no_answer": 49.9}, settings) is None
    warning = no_answer_warning({"no_answer": 100.0}, settings)
    assert warning.startswith("100.0% of the generations have no answer: the grader looks for the last \\boxed{...}")
    assert "eval.prompt_config / prepare_data.prompt_config, now 'generic/default'" in warning
    assert "eval.extract_from_boxed: false and eval.extract_regex" in warning
    regex = no_answer_warning(
        {"no_answer": 60.0}, replace(settings, extract_from_boxed=False, extract_regex="#### (\\S+)")
    )
    assert "the last match of eval.extract_regex '#### (\\\\S+)'" in regex


# --- normalisation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("5.", "5"),
        ("5\\%", "5"),
        ("50%", "50"),
        ("5\\text{ cm}", "5"),
        ("864 \\mbox{ inches}^2", "864"),
        ("\\frac{270}7\\text{ degrees}", "\\frac{270}7"),
        ("5.4 \\text{ cents}", "5.4"),
        ("18 dollars", "18"),
        ("\\$18.90", "18.90"),
        ("$18$", "18"),
        ("\\dfrac{33}{100}", "\\frac{33}{100}"),
        ("\\tfrac12", "\\frac12"),
        ("55^\\circ", "55"),
        ("55^{\\circ}", "55"),
        ("55°", "55"),
        ("1,000", "1000"),
        ("-1,234,567.5", "-1234567.5"),
        ("10,\\!080", "10080"),
        ("11,\\! 111,\\! 111,\\! 100", "11111111100"),
        ("1{,}000", "1000"),
        ("1\\,000", "1000"),
        ("\\$32,\\!348", "32348"),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\frac{\\pi}{2})"),
        ("\\left\\{1,2\\right\\}", "\\{1,2\\}"),
        ("(B)", "B"),
        ("B", "B"),
        ("\\text{(B)}", "B"),
        ("\\textbf{(C)}", "C"),
        ("\\text{Evelyn}", "Evelyn"),
        ("\\frac 34", "\\frac34"),
        ("\\pi r^2", "\\pi r^2"),  # a space between letters is kept: \pir is another command
        ("2\\mathbf{i} + 3\\mathbf{j}", "2i+3j"),  # maths-mode \mathbf is no unit: math-verify would drop it
        ("\\text{ east }", "east"),
        ("\\begin{pmatrix} -2 \\\\ -14 \\end{pmatrix}", "\\begin{pmatrix}-2\\\\-14\\end{pmatrix}"),
    ],
)
def test_normalize_answer(raw, normal):
    assert normalize_answer(raw) == normal


@pytest.mark.parametrize(
    "raw",
    [
        "(1,2)",  # a tuple/interval, not one thousand two... or twelve
        "1,2",  # a list of two answers
        "3, 5, 7",
        "10, 200",  # a comma followed by a space separates list items
        "(1,000)",  # inside brackets a comma is never a thousands separator
        "1,23",  # not a group of three digits
        "1,2345",
    ],
)
def test_commas_that_are_not_thousands_separators_are_kept(raw):
    assert "," in normalize_answer(raw)


# --- is_correct: pairs that must be equal --------------------------------------------------------


@pytest.mark.parametrize(
    ("predicted", "expected"),
    [
        ("5\\text{ cm}", "5"),
        ("5", "5\\text{ cm}"),
        ("5 cm", "5"),
        ("1,000", "1000"),
        ("1000", "1,000"),
        ("\\$1,000", "1000"),
        ("1000 dollars", "1000"),
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("\\tfrac{1}{2}", "0.5"),
        ("\\frac12", "\\frac{1}{2}"),
        ("90^\\circ", "90"),
        ("90", "90^{\\circ}"),
        ("25\\%", "25"),
        ("18.", "18"),
        ("\\$18.90", "18.9"),
        ("(B)", "B"),
        ("B", "\\text{(B)}"),
        ("\\text{(B)}", "(B)"),
        ("\\left(3, \\frac{\\pi}{2}\\right)", "(3,\\frac{\\pi}{2})"),
        ("( 3 , \\frac{\\pi}{2} )", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("x=5", "5"),  # an assignment states the value
        ("\\frac{9}{5}", "1\\frac{4}{5}"),
        ("137.5", "137 \\frac{1}{2}"),
        ("-2,1", "1,-2"),  # unordered list of solutions
        ("evelyn", "\\text{Evelyn}"),
        ("\\text{ellipse}", "\\text{ellipse}"),
        ("2\\sqrt{5}", "2 \\sqrt{5}"),
        ("\\sqrt{20}", "2\\sqrt{5}"),
        ("10080", "10,\\!080"),
        ("$\\frac{3}{4}$", "\\frac 34"),
    ],
)
def test_equal_answers(predicted, expected):
    assert is_correct(predicted, expected)


# --- is_correct: pairs that must stay different ---------------------------------------------------


@pytest.mark.parametrize(
    ("predicted", "expected"),
    [
        ("12", "(1,2)"),
        ("(1,2)", "12"),
        ("12", "1,2"),
        ("10200", "10, 200"),
        ("0.5", "5"),
        ("5", "0.5"),
        ("50", "0.5"),
        ("(1,2)", "[1,2]"),  # open vs closed interval
        ("B", "C"),
        ("(B)", "\\text{(C)}"),
        ("B", "2"),
        ("A", "(B)"),
        ("\\text{Navin}", "\\text{Evelyn}"),
        ("Nevyle", "\\text{Evelyn}"),  # an anagram: as a product of symbols it would be "equal"
        ("\\pi r", "\\pi"),
        ("2j", "2k"),
        ("1001", "1000"),
        ("-5", "5"),
        ("\\frac{1}{3}", "0.33"),
        ("\\sqrt{2}", "2"),
        ("5\\text{ cm}", "6"),
        ("1,001", "1000"),
        ("2\\mathbf{i}", "2\\mathbf{i}+3\\mathbf{j}"),
        ("50", "50\\%+1"),
    ],
)
def test_different_answers(predicted, expected):
    assert not is_correct(predicted, expected)


def test_no_answer_is_incorrect_and_counted_as_no_answer():
    grader = Grader()
    assert grader.grade(None, "5").correct is False
    assert grader.stats.no_answer == 1 and grader.stats.errors == 0


def test_grade_generation_row():
    assert grade_generation("so $\\boxed{1,000}$ apples", "1000") == {
        "predicted_answer": "1,000",
        "is_correct": True,
        "grading_error": None,
    }
    assert grade_generation("I don't know", "1000")["predicted_answer"] is None


# --- robustness ---------------------------------------------------------------------------------


def test_pathological_answer_times_out_as_an_error_instead_of_hanging():
    grader = Grader(timeout_seconds=1)
    # Comparing this tower with a number makes sympy try to evaluate 9^(9^(9^9)).
    grade = grader.grade("9^{9^{9^{9}}}", "5")
    assert grade.correct is False
    assert grade.error is not None and "timed out" in grade.error
    assert grader.stats.errors == 1 and grader.stats.timeouts == 1
    assert grader.stats.error_examples


def test_grading_error_counts_as_incorrect(monkeypatch):
    import math_verify

    def boom(*args, **kwargs):
        raise RuntimeError("sympy fell over")

    monkeypatch.setattr(math_verify, "verify", boom)
    grader = Grader()
    grade = grader.grade("\\frac{7}{3}", "\\frac{5}{3}")
    assert grade.correct is False and "RuntimeError" in grade.error
    assert grader.stats.errors == 1 and grader.stats.timeouts == 0


def test_grading_works_outside_the_main_thread():
    # math-verify's SIGALRM timeouts cannot be set there; the grader must not crash.
    results = []
    thread = threading.Thread(target=lambda: results.append(Grader().is_correct("\\frac{2}{4}", "0.5")))
    thread.start()
    thread.join(60)
    assert results == [True]


def test_timeout_must_be_whole_seconds():
    with pytest.raises(ValueError, match="timeout_seconds"):
        Grader(timeout_seconds=0)
