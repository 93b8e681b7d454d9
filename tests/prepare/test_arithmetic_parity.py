"""drop_incorrect_arithmetic and split_arithmetic on what real solutions write (found by comparing with NeMo-Skills).

The rule under test: a row is never dropped over an equation that was not parsed exactly. An equation counts only
where all of it, up to the neighbouring text, is plain arithmetic; a sign, power, variable or LaTeX command next to
it means "not checked", not "wrong". split_arithmetic replaces only the equation and keeps all other text as is.
"""

from __future__ import annotations

import pytest

from sftflow.prepare import equations as Q
from sftflow.prepare import exact_arithmetic as A
from sftflow.prepare import filters as F
from tests.conftest import SHARED_DATA, needs_shared_data, read_jsonl

GEN = SHARED_DATA / "generations"


def kept(text: str) -> bool:
    return F.drop_incorrect_arithmetic("generation", 1e-4)({"generation": text}) is not None


def split(text: str) -> str:
    return F.split_arithmetic("generation")({"generation": text})["generation"]


def equations(text: str) -> list[str]:
    return [text[start:end] for start, end, *_ in Q.find_equations(text)]


# Correct solutions (from ../shared/data/generations) that were dropped: the equation was misread.
@pytest.mark.parametrize(
    "text",
    [
        "Thus, for each set of ten numbers, her sum is $-10 + 15 = 5$ more than Jo's sum.",  # read as 10 + 15 = 5
        "Thus, for the numbers 1 to 10, her sum is $-10+15=5$ more than Jo's sum.",
        "So, the result is:\n-32 - 18 + 50 = 0\n",  # a leading minus at a line start
        "\\[ \\lim_{x \\to -1} y = \\lim_{x \\to -1} (x + 2) = -1 + 2 = 1 \\]",  # ... and after '='
        "our answer is:\n\\[ 1 + 3 + 5 + \\cdots + 15 + 17 = 9^2 = \\boxed{81} \\]",  # \cdots before, ^2 after
        "\\[OA^2 = AD^2 + OD^2 = 1^2 + (\\sqrt{3})^2 = 1 + 3 = 4 \\Rightarrow OA = \\sqrt{4} = 2 \\]",
        "The radius of the large circle is $OD + 1 = 2 + 1 = \\boxed{\\frac{3 + 2\\sqrt{3}}{3}}$",  # a variable
        "\\cos 120^\\circ \\Rightarrow AB^2 = 36 + 25 + 30 = 91 \\Rightarrow AB = \\sqrt{91} \\]",  # "2 = ..." in NeMo
        "1. When $x = 3$ and $y = 6$:\n\\[ (x+y)^2 = (3+6)^2 = 9^2 = 81 \\]",
        "x -10 + 15 = 5",  # x - 10 + 15 or x times -10 ...: a minus after a variable is not checked
        "x = 2 * -3 + 10 = 4",  # a sign after an operator
    ],
)
def test_correct_solutions_are_kept(text):
    assert kept(text)


@pytest.mark.parametrize(
    "text",
    [
        "her sum is $-10 + 15 = 25$ more",  # -10 + 15 is 5: the sign is read, not dropped
        "So:\n-32 - 18 + 50 = 64\n",
        "\\[ (x + 2) = -1 + 2 = 3 \\]",
        "x = 2 * -3 + 10 = 16",
        "\\[ AB^2 = 36 + 25 + 30 = 92 \\]",  # the plain part of a chain is still checked
    ],
)
def test_negative_numbers_and_plain_parts_of_chains_are_checked(text):
    assert not kept(text)


@pytest.mark.parametrize(
    "text, ok",
    [
        ("3 * (1 + 7) / 4 = 3 * 8 / 4 = 100", False),
        ("3 * (1 + 7) / 4 = 3 * 8 / 4 = 6", True),
        ("1 + 2 + 3 + 4 = 10", True),
        ("Kate's sum is $0 + 0 + 0 + 0 + 10 + 10 + 10 + 10 + 10 + 10 = 50$, which is", False),
        ("So 83 + 94 = 174. Then", False),
        ("Step 1. 3 + 4 = 8", False),
        ("\\(3 + 4 = 8\\)", False),
        ("\n* 3 + 4 = 8", False),  # a bullet
    ],
)
def test_checking_power_is_kept(text, ok):
    assert kept(text) is ok


@pytest.mark.parametrize(
    "text, found",
    [
        ("$-10 + 15 = 5$", ["-10 + 15 = 5"]),
        ("x = -1 + 2 = 1", ["-1 + 2 = 1"]),
        ("\\[ 1 + 3 + \\cdots + 15 + 17 = 81 \\]", []),  # \cdots before the first side
        ("$1 + 2 = 9^2$", []),  # a power after the last side
        ("$OD + 1 = 2 + 1$", []),  # the first side starts with an operator: its operand is outside
        ("$2 \\times 3 + 4 = 10$", []),
        ("3 times 4 + 1 = 13", []),
        ("$1,000 + 2,000 = 3,000$", []),
        ("$5! + 1 = 121$", []),
        ("$20\\% + 5 = 25$", []),
        ("so 2 / 3 = 0.666... and", []),  # an ellipsis continues the number
        ("1 + 2 = 4cm", []),
        ("AB -10 + 15 = 5", []),  # after a word, a leading minus may be binary
        ("\n- 3 + 4 = 8", []),  # a bullet, or minus three: not checked
        ("2(3 + 4) = 14, (3)(6) = 18, 2 ** 3 = 8", []),  # implicit products and powers are not parsed
        ("a == 2 + 3", []),
        ("total 1 + 2 = 3 cm, 22 / 7 = 3.14.", ["1 + 2 = 3", "22 / 7 = 3.14"]),
        ("\\(3 + 4 = 7\\) and \\[ 7 - 2 = 5 \\quad 5 * 2 = 10 \\]", ["3 + 4 = 7", "7 - 2 = 5", "5 * 2 = 10"]),
        ("(3)(6) - (2)(4) = 18 - 8 = 10 \\Rightarrow", ["18 - 8 = 10"]),
    ],
)
def test_what_counts_as_an_equation(text, found):
    assert equations(text) == found


def test_tokenize_reads_signs_only_where_an_operand_is_expected():
    assert A.tokenize("-3 + 2 * -4") == [-3, "+", 2, "*", -4]
    assert A.tokenize("(-3 - 6)") == ["(", -3, "-", 6, ")"]
    assert A.tokenize("10 -3") == [10, "-", 3]
    for bad in ["- 3", "-(3)", "+ 3", "2(3)", "(3)(4)", "3 4", "2 ** 3", "(1 + 2", "1 + 2)", "", "3 +"]:
        with pytest.raises(ValueError):
            A.tokenize(bad)


@pytest.mark.parametrize(
    "text, expanded",
    [
        (  # the space after the equation was lost
            "\\[ 8 + 5 + 3 = 16 \\text{ blue balls} \\]",
            "\\[ 8 + 5 + 3 = 13 + 3 = 16 \\text{ blue balls} \\]",
        ),
        ("Sum:\t10 + 20 + 30 = 60  and more", "Sum:\t10 + 20 + 30 = 30 + 30 = 60  and more"),
        ("10 + 20 + 30 = 60\nNext line", "10 + 20 + 30 = 30 + 30 = 60\nNext line"),
        ("by $1+2+3+4=10$, and", "by $1+2+3+4 = 3+3+4 = 6+4 = 10$, and"),  # steps in the author's spacing
        ("x = 1 + 2 + 3 = 6", "x = 1 + 2 + 3 = 3 + 3 = 6"),
        ("x = 2 * (1 - 4) + 1 = -5.", "x = 2 * (1 - 4) + 1 = 2 * (-3) + 1 = -6 + 1 = -5."),
        ("$-1 + 2 + 3 = 4$", "$-1 + 2 + 3 = 1 + 3 = 4$"),
    ],
)
def test_split_replaces_only_the_equation(text, expanded):
    assert split(text) == expanded


@pytest.mark.parametrize(
    "text",
    [
        "AB^2 = 36 + 25 + 30 = 91 \\Rightarrow",  # a chain the author wrote in steps stays as it is
        "$-10 + 15 = 5$",  # one operation: nothing to expand
        "x+y = -3+(-6) = -9",  # dropping the parentheses of "(-6)" is no step
        "\\[ 1 + 3 + 5 + \\cdots + 15 + 17 = 81 \\]",
    ],
)
def test_split_leaves_what_it_does_not_expand(text):
    assert split(text) == text


needs_generations = needs_shared_data(*(f"generations/output-rs{i}.jsonl" for i in range(3)))


def correct_generations() -> list[str]:
    rows = [row for i in range(3) for row in read_jsonl(GEN / f"output-rs{i}.jsonl")]
    return [row["generation"] for row in rows if row["symbolic_correct"] is True]


@needs_generations
def test_real_correct_generations_dropped():
    """107 correct solutions: one has wrong arithmetic (NeMo-Skills drops it too); before the fix 8 were dropped.

    NeMo-Skills' DropIncorrectArithmetic drops 3: this one, and two that read the exponent of "AB^2 = 36 + 25 +
    30 = 91" and "(x+y)^2 = (-3 - 6)^2" as the left side ("2 = ...").
    """
    texts = correct_generations()
    assert len(texts) == 107
    dropped = [text for text in texts if not kept(text)]
    assert len(dropped) == 1
    wrong = [eq for eq in equations(dropped[0]) if A.equation_is_correct(eq, 1e-4) is False]
    assert wrong == ["0 + 0 + 0 + 0 + 10 + 10 + 10 + 10 + 10 + 10 = 50"]


@needs_generations
def test_real_correct_generations_split_only_inserts_steps():
    texts = correct_generations()
    changed = 0
    for text in texts:
        out = split(text)
        rest = iter(out)
        assert all(ch in rest for ch in text)  # the input is a subsequence of the output: nothing was removed
        changed += out != text
    assert changed == 3
