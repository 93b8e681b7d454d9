"""Answer pairs on which our grader must agree with NeMo-Skills' math_equal, checked in both directions.

A user moving from NeMo-Skills expects the same verdicts on the same answers. These are our own cases of the
kinds of answers its grader equates or keeps apart; the first ones are regressions: a whole answer in a font
wrapper (`\\mathrm{E}`) and a stray trailing backslash (`185\\`), which we used to mark wrong, and bare words or
digit strings (`odd` vs `ddo`, `F` vs `f`), which math-verify equated and which are now compared as plain strings.
"""

from __future__ import annotations

import pytest

from sftflow.evaluation.grading import Grader, normalize_answer

EQUIVALENT = [
    # Regressions: a font wrapper around the whole answer, a backslash after the answer.
    ("E", "\\mathrm{E}"),
    ("C", "\\mathrm{(C)}"),
    ("x", "\\mathit{x}"),
    ("odd", "\\mathrm{odd}"),
    ("185", "185\\"),
    ("185\\", "185\\"),
    ("42", "42.\\"),
    ("42", "42 \\\\"),  # a LaTeX line break after the answer
    # Neighbours that already held and must keep holding.
    ("D", "\\textbf{D}"),
    ("E", "\\text{E}"),
    ("7", "7.0"),
    ("3/4", "0.75"),
    ("\\frac{3}{4}", "0.75"),
    ("3\\frac{1}{4}", "3.25"),
    (".25", "0.25"),
    ("\\frac {3}{4}", "\\dfrac{3}{4}"),
    ("a^2-2a+1", "(a-1)^2"),
    ("t = 3t^2 + 1", "1 + 3t^2"),
    ("12\\text{ apples}", "12"),
    ("\\$25", "25"),
    ("40\\%", "40"),
    ("40%", "40"),
    ("\\begin{pmatrix}1&0\\\\0&1\\end{pmatrix}", "\\begin{bmatrix} 1 & 0 \\\\ 0 & 1 \\end{bmatrix}"),
    # Words and digit strings compared as plain strings must still match themselves and their wrapped forms.
    ("odd", "odd"),
    ("\\text{odd}", "odd"),
    ("\\text{Odd}", "odd"),  # a word in a font wrapper ignores case (NeMo-Skills: via math-verify's text rule)
    ("\\mathrm{Evelyn}", "evelyn"),
    ("\\text{F}", "f"),
    ("north east", "northeast"),  # spaces are ignored in a plain-string comparison
    ("red, blue", "red,blue"),
    ("1 000", "1000"),
]

DIFFERENT = [
    # Next to the regressions: the wrapper or the backslash must not make different answers equal.
    ("E", "\\mathrm{E}*2"),
    ("E", "2\\mathrm{E}"),
    ("E", "\\mathrm{F}"),
    ("\\mathrm{odd}", "\\mathrm{dod}"),  # words are compared as words, not as products of symbols
    ("odd", "\\mathrm{oddd}"),
    ("185", "1850\\"),
    ("185", "18.5\\"),
    ("185\\", "186"),
    # Other pairs that must stay apart.
    ("7", "7.001"),
    ("a^2+1", "a^3+1"),
    ("\\sqrt{3},-\\sqrt{5}", "\\sqrt{3}"),
    # Regressions: bare words went to math-verify, which reads `odd` as o*d*d and folds case, so these were equal.
    # Answers made only of letters/spaces/commas (or only of digits) are now plain strings, as in NeMo-Skills.
    ("odd", "ddo"),
    ("F", "f"),
    ("Odd", "odd"),
    ("xy", "yx"),
    ("red, blue", "blue, red"),
    ("010", "10"),
    ("\\text{odd}", "ddo"),  # a wrapped word is still not an anagram of itself
    ("\\text{odd}", "\\mathrm{ddo}"),
]


@pytest.mark.parametrize(("first", "second"), EQUIVALENT)
def test_equivalent_both_ways(first, second):
    grader = Grader()
    assert grader.is_correct(first, second), f"{first!r} as the answer to {second!r}"
    assert grader.is_correct(second, first), f"{second!r} as the answer to {first!r}"
    assert grader.stats.errors == 0


@pytest.mark.parametrize(("first", "second"), DIFFERENT)
def test_different_both_ways(first, second):
    grader = Grader()
    assert not grader.is_correct(first, second), f"{first!r} as the answer to {second!r}"
    assert not grader.is_correct(second, first), f"{second!r} as the answer to {first!r}"


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("\\mathrm{E}", "E"),
        ("\\mathit{x}", "x"),
        ("\\mathrm{(B)}", "B"),
        ("185\\", "185"),
        ("185\\\\", "185"),
        ("185.\\", "185"),
        ("5\\%\\", "5"),
        # Left alone: a wrapper inside an expression, and a backslash that escapes something.
        ("\\mathrm{E}*2", "\\mathrm{E}*2"),
        ("5\\mathrm{cm}", "5\\mathrm{cm}"),
        ("\\mathrm{d}x", "\\mathrm{d}x"),
        ("\\{1,2\\}", "\\{1,2\\}"),
    ],
)
def test_normalize_font_wrapper_and_trailing_backslash(raw, normal):
    assert normalize_answer(raw) == normal


def test_the_letter_e_in_a_font_wrapper_is_not_eulers_number():
    # Where we differ on purpose: NeMo-Skills' math_equal lets math-verify read `\\mathrm{E}` as the constant e, so
    # it equates `\\mathrm{E}` with `e` (though not `E` with `e`). For us `\\mathrm{E}` is `E`, a letter that may
    # be a multiple-choice option, and a letter only equals the same letter.
    grader = Grader()
    assert not grader.is_correct("e", "\\mathrm{E}")
    assert not grader.is_correct("\\mathrm{E}", "e")
    assert grader.is_correct("e", "\\mathrm{e}")


@pytest.mark.parametrize(("first", "second"), [("odd", "ddo"), ("F", "f"), ("xy", "yx"), ("010", "10")])
def test_math_verify_alone_would_equate_plain_strings(first, second):
    # Why the plain-string rule exists: math-verify alone reads letters as a product of symbols and folds case.
    assert Grader(string_shortcut=False).is_correct(first, second)
    assert not Grader().is_correct(first, second)


def test_no_answer_is_never_equivalent():
    grader = Grader()
    assert not grader.is_correct(None, "0")
    assert not grader.is_correct("0", "None")
