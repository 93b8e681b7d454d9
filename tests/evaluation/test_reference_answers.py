"""Every GSM8K (1319) and MATH-500 (500) reference answer graded against itself and against other answers.

Self: each expected answer, rendered as `\\boxed{...}` inside a sentence, goes through
`extract_answer` + grading and must be correct, both with the default grader and with math-verify
alone (`string_shortcut=False`, so the equal-strings fast path cannot hide a parse problem).

Others: each answer is graded against the answers of the next problems (cyclically) whose answer
differs mathematically, and must be incorrect. "Differs mathematically" is decided without the
grader under test, so the check is not circular:

- GSM8K answers are plain numbers: they differ when their exact `Decimal` values differ.
- MATH-500 answers are LaTeX: they differ when their normalised strings differ after also dropping
  a leading single-variable assignment (`x=5` states the value 5; MATH-500 has both "5" and "x=5").
  Normalisation only removes decorations (see grading.normalize_answer), so different strings
  could still be equal values ("\\frac12" vs "0.5"); we checked that no such pair occurs among the
  partners chosen here, and the test would show any new one as a failure to look at by hand.
"""

from __future__ import annotations

import re
from decimal import Decimal

import pytest

from sftflow.evaluation.benchmarks import normalize_row
from sftflow.evaluation.grading import Grader, extract_answer, grade_generation, normalize_answer
from tests.conftest import SHARED_DATA, needs_shared_data, read_jsonl

GSM8K = SHARED_DATA / "gsm8k" / "test.jsonl"
MATH500 = SHARED_DATA / "math500" / "test.jsonl"
GEN = SHARED_DATA / "generations"
pytestmark = needs_shared_data("gsm8k/test.jsonl", "math500/test.jsonl")

PARTNERS = 2  # other answers each reference answer is graded against


@pytest.fixture(scope="module")
def gsm8k_answers() -> list[str]:
    return [normalize_row("gsm8k", row)["expected_answer"] for row in read_jsonl(GSM8K)]


@pytest.fixture(scope="module")
def math500_answers() -> list[str]:
    return [normalize_row("math500", row)["expected_answer"] for row in read_jsonl(MATH500)]


def render(answer: str) -> str:
    return f"Putting it together, the answer is $\\boxed{{{answer}}}$."


def test_reference_answer_counts(gsm8k_answers, math500_answers):
    assert len(gsm8k_answers) == 1319
    assert len(math500_answers) == 500


@pytest.mark.parametrize("string_shortcut", [True, False], ids=["default", "math-verify-only"])
def test_every_reference_answer_is_correct_against_itself(gsm8k_answers, math500_answers, string_shortcut):
    grader = Grader(string_shortcut=string_shortcut)
    failures = []
    for benchmark, answers in (("gsm8k", gsm8k_answers), ("math500", math500_answers)):
        for index, answer in enumerate(answers):
            predicted = extract_answer(render(answer))
            assert predicted == answer.strip()
            if not grader.is_correct(predicted, answer):
                failures.append((benchmark, index, answer))
    assert failures == []
    assert grader.stats.graded == 1819 and grader.stats.errors == 0


def partners(answers: list[str], key) -> list[tuple[int, int]]:
    """(i, j) pairs: each i with the next PARTNERS answers j whose key differs from i's."""
    keys = [key(a) for a in answers]
    pairs = []
    for i in range(len(answers)):
        j, found = i, 0
        while found < PARTNERS:
            j = (j + 1) % len(answers)
            assert j != i, "ran out of different answers"
            if keys[j] != keys[i]:
                pairs.append((i, j))
                found += 1
    return pairs


_ASSIGNMENT = re.compile(r"^[A-Za-z]\s*=\s*")


def math_key(answer: str) -> str:
    return _ASSIGNMENT.sub("", normalize_answer(answer))


def test_gsm8k_answers_are_incorrect_against_different_answers(gsm8k_answers):
    grader = Grader()
    pairs = partners(gsm8k_answers, Decimal)
    assert len(pairs) == PARTNERS * 1319
    wrongly_equal = [
        (gsm8k_answers[i], gsm8k_answers[j])
        for i, j in pairs
        if grader.is_correct(extract_answer(render(gsm8k_answers[j])), gsm8k_answers[i])
    ]
    assert wrongly_equal == []
    assert grader.stats.errors == 0


def test_math500_answers_are_incorrect_against_different_answers(math500_answers):
    grader = Grader()
    pairs = partners(math500_answers, math_key)
    wrongly_equal = [
        (math500_answers[i], math500_answers[j])
        for i, j in pairs
        if grader.is_correct(extract_answer(render(math500_answers[j])), math500_answers[i])
    ]
    assert wrongly_equal == []
    assert grader.stats.errors == 0


def test_assignment_form_of_a_reference_answer_is_accepted(math500_answers):
    # The pair the MATH-500 key above treats as the same answer: the grader agrees.
    assert "x=5" in math500_answers and "5" in math500_answers
    assert Grader().is_correct("x=5", "5")


# NeMo-Skills' own grading of the reference generations, where ours differs on purpose:
# (seed, id): (NeMo-Skills predicted_answer, our predicted_answer, our is_correct)
KNOWN_DIFFERENCES = {
    # "1320 km" with expected 1320: we strip units.
    (0, "train/prealgebra/737.json"): ("1320 km", "1320 km", True),
    # \boxed{(x+y)^2=81} for "what is (x+y)^2": math-verify takes the right-hand side of the relation.
    (0, "train/algebra/2027.json"): ("(x+y)^2=81", "(x+y)^2=81", True),
    # \fbox{958}: we read \fbox like \boxed (sftflow.mathtext).
    (1, "train/number_theory/7086.json"): (None, "958", True),
    # an empty \boxed{}: we report no answer (None) rather than "".
    (2, "train/algebra/635.json"): ("", None, False),
    (2, "train/number_theory/918.json"): ("", None, False),
}


@needs_shared_data(*(f"generations/output-rs{seed}.jsonl" for seed in range(3)))
def test_grading_agrees_with_nemo_skills_on_reference_generations():
    grader = Grader()
    differences = {}
    for seed in range(3):
        for row in read_jsonl(GEN / f"output-rs{seed}.jsonl"):
            ours = grade_generation(row["generation"], row["expected_answer"], grader)
            if (ours["predicted_answer"], ours["is_correct"]) != (row["predicted_answer"], row["symbolic_correct"]):
                differences[(seed, row["id"])] = (row["predicted_answer"], ours["predicted_answer"], ours["is_correct"])
    assert differences == KNOWN_DIFFERENCES
    assert grader.stats.graded == 150 and grader.stats.errors == 0
