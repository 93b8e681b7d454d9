from fractions import Fraction

import pytest

from sftflow.prepare import equations as Q
from sftflow.prepare import exact_arithmetic as A
from sftflow.prepare import filters as F
from tests.prepare.conftest import LEFT, RIGHT, SIMPLE_CHAINS


@pytest.mark.parametrize(
    "equation, expanded",
    [
        ("1 + 2 + 3 + 4 = 10", "1 + 2 + 3 + 4 = 3 + 3 + 4 = 6 + 4 = 10"),
        ("1 + 7 * 19 = 134", "1 + 7 * 19 = 1 + 133 = 134"),
        ("3 * (1 + 7) / 4 = 6", "3 * (1 + 7) / 4 = 3 * 8 / 4 = 24 / 4 = 6"),
        ("10 - 4 - 3 = 3", "10 - 4 - 3 = 6 - 3 = 3"),
        ("1 / 4 + 1 = 1.25", "1 / 4 + 1 = 0.25 + 1 = 1.25"),
    ],
)
def test_split_equation_expands_step_by_step(equation, expanded):
    assert A.split_equation(equation) == expanded


@pytest.mark.parametrize(
    "equation",
    [
        "2 + 3 = 5",  # a single operation has nothing to expand
        "1 + 2 + 3 = 7",  # wrong: left as it is
        "1 / 3 + 1 / 3 = 0.67",  # intermediate 1/3 has no finite decimal form
        "4 / (2 - 2) + 1 = 3",  # division by zero
    ],
)
def test_split_equation_leaves_what_it_cannot_expand(equation):
    assert A.split_equation(equation) is None


@pytest.mark.parametrize(
    "equation, ok",
    [
        ("1 + 2 + 3 + 4 = 10", True),
        ("3 * (1 + 7) / 4 = 3 * 8 / 4 = 100", False),
        ("3 * (1 + 7) / 4 = 3 * 8 / 4 = 6", True),
        ("22 / 7 = 3.14", True),  # correctly rounded to the written places
        ("1 / 3 = 0.3334", False),  # wrongly rounded
        ("12 * 12 = 144", True),
        ("12 * 12 = 145", False),
    ],
)
def test_equation_is_correct(equation, ok):
    assert A.equation_is_correct(equation, 1e-4) is ok


def test_exact_fractions_and_formatting():
    assert A.evaluate("1 / 4 + 1 / 4") == Fraction(1, 2)
    assert A.format_number(Fraction(5, 4)) == "1.25"
    assert A.format_number(Fraction(-1, 8)) == "-0.125"
    assert A.format_number(Fraction(1, 3)) is None


def test_equations_found_in_prose_with_sentence_punctuation():
    text = "First 83 + 94 = 174. Then 2 * 3 = 6, done. Version 1.2 = 1.2 is not arithmetic."
    found = [text[start:end] for start, end, *_ in F._equations(text)]
    assert found == ["83 + 94 = 174", "2 * 3 = 6"]


def test_drop_incorrect_arithmetic_and_split_filters():
    drop = F.drop_incorrect_arithmetic("generation", 1e-4)
    assert drop({"generation": "So 83 + 94 = 174.\n\\boxed{174}"}) is None
    assert drop({"generation": "So 83 + 94 = 177.\n\\boxed{177}"}) is not None
    split = F.split_arithmetic("generation")
    row = split({"generation": "Sum: 10 + 20 + 30 = 60. Also 5 * 2 = 10."})
    assert row["generation"] == "Sum: 10 + 20 + 30 = 30 + 30 = 60. Also 5 * 2 = 10."


def test_split_equation_leaves_one_operation_alone():
    assert A.split_equation("10 * 3 = 30") is None
    assert A.split_equation("(10 * 3) = 30") is None
    assert A.split_equation("10 * 3 + 1 = 31") == "10 * 3 + 1 = 30 + 1 = 31"


def test_integer_fast_path_uses_the_exact_tolerance():
    assert A.equation_is_correct("10000 + 1 = 10002", 1e-4) is True  # off by 1 of 10001: within 1e-4
    assert A.equation_is_correct("1000 + 1 = 1002", 1e-4) is False
    assert A.equation_is_correct("7 - 9 = -2", 0.0) is True  # a negative stated value: the general path
    assert A.equation_is_correct("9 - 7 = 2", 0.0) is True


def test_simple_chain_fast_path_finds_what_the_general_reading_finds():
    taken = 0
    for left in LEFT:
        for chain in SIMPLE_CHAINS:
            for right in RIGHT:
                text = left + chain + right
                for start, end in Q._chains(text):
                    simple = Q._simple_chain_equations(text, start, end)
                    if simple is not None:
                        taken += 1
                        assert simple == Q._chain_equations(text, start, end), repr(text)
    assert taken > len(LEFT) * len(SIMPLE_CHAINS) * len(RIGHT) // 2  # most chains take the fast path
    text = "x = 1 + 2 = 3"
    [(start, end)] = Q._chains(text)
    assert Q._simple_chain_equations(text, start, end) is None  # other chains take the general reading


def test_split_equation_of_one_operation_is_none_as_the_general_reading():
    for equation in ("10 * 3 = 30", "2+2=4", " 7 / 2 = 3.5 ", "10 -3 = 7"):
        assert A._SIMPLE.fullmatch(equation)  # the fast path's case
        assert A.split_equation(equation) is None and A._expand(equation) is None


def test_numbers_beyond_pythons_int_digit_limit_are_left_unchecked_not_an_error():
    """int(str) refuses more than 4300 digits: such an equation cannot be checked (None), and neither arithmetic
    filter fails on the row or changes it."""
    big = "9" * 5000
    for equation in (f"{big} + 1 = {big}0", f"{big} * 2 + 3 = 5"):
        assert A.equation_is_correct(equation, 1e-9) is None
    for text in (f"So {big} + 1 = {big}0 here.", f"x = {big} * 2 + 3 = 5"):
        assert F.drop_incorrect_arithmetic("g", 1e-9)({"g": text}) == {"g": text}
        assert F.split_arithmetic("g")({"g": text}) == {"g": text}
