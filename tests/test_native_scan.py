"""The compiled text scans (scripts/sftflow/_scan.c) give their pure-Python references' answers.

find_equations_python (arithmetic.py: its comments say what counts as an equation) and find_boxed_python (mathtext.py)
are the references; the compiled scans are what prepare_data runs. They are compared on real solutions, on the
contexts the arithmetic fast-path test uses, and on generated texts made of the characters and words each rule of
the readings looks at.
"""

from __future__ import annotations

import json
import random

import pytest

from sftflow import native
from sftflow.mathtext import find_boxed_python
from sftflow.prepare import arithmetic as A
from tests.conftest import SHARED_DATA, needs_shared_data, read_jsonl
from tests.prepare.conftest import LEFT, RIGHT, SIMPLE_CHAINS

NATIVE = native.SCAN


def test_the_compiled_scans_are_built_and_used():
    """`make install` (pip install -e .) compiles them; without them prepare_data's filters cost ~25% more CPU."""
    assert NATIVE is not None, "sftflow._scan is not built or is stale: run `make install`"
    assert A.find_equations("So 2 + 3 = 5.") == [(3, 12, True, 1)]
    from sftflow import mathtext

    assert mathtext.find_boxed.__wrapped__ is NATIVE.find_boxed


def same_answer(text: str) -> None:
    assert NATIVE.find_equations(text) == A.find_equations_python(text), repr(text)
    assert NATIVE.find_boxed(text) == find_boxed_python(text), repr(text)


def test_same_answer_on_the_fast_path_contexts():
    for left in LEFT:
        for chain in [*SIMPLE_CHAINS, "x = 1 + 2 + 3 = 6", "AB^2 = 36 + 25 + 30 = 91", "(2 + 3) * 4 = 20 = 20"]:
            for right in RIGHT:
                same_answer(left + chain + right)


def real_texts() -> list[str]:
    texts = []
    for path in sorted(SHARED_DATA.glob("*/*.jsonl")):
        for row in read_jsonl(path):
            texts += [value for value in row.values() if isinstance(value, str)]
    return texts


@needs_shared_data("*/*.jsonl")
def test_same_answer_on_real_solutions():
    texts = real_texts()
    found = boxes = 0
    for text in texts:
        same_answer(text)
        found += len(NATIVE.find_equations(text))
        boxes += len(NATIVE.find_boxed(text))
    assert found > 100 and boxes > 100  # the texts hold equations, so the comparison covers more than "none found"


# What the reading looks at: chain characters, the neighbours that end or continue a side (words, LaTeX commands,
# punctuation, line starts, bullets), decimal points, glued minus signs, non-ASCII letters and digits (Python's
# isalpha / isdigit / lower decide those), and numbers longer than the compiled code reads itself.
FRAGMENTS = [
    *"0123456789",
    "12",
    "3.5",
    "0.25",
    "1.2.3",
    " ",
    "  ",
    "\t",
    "\n",
    "+",
    "-",
    "*",
    "/",
    "=",
    " = ",
    " + ",
    " - ",
    " * ",
    " / ",
    "(",
    ")",
    "\\(",
    "\\)",
    "\\[",
    "\\]",
    "$",
    ".",
    "...",
    ",",
    ";",
    ":",
    "!",
    "?",
    "\\",
    "\\\\",
    "\\,",
    "\\;",
    "\\quad",
    "\\text",
    "\\Rightarrow",
    "\\cdots",
    "\\times",
    "\\%",
    "^2",
    "x",
    "ab",
    " times ",
    " TIMES ",
    " Of ",
    " pencils",
    "cm",
    "\n* ",
    "\n+ ",
    "\n- ",
    "é",
    "Ωmega",
    "\u212aab",  # Kelvin sign: lower() is ASCII "k"
    "\u0130s",  # lower() is two characters
    "٣",  # an Arabic-Indic digit: isdigit and isdecimal
    "²",  # isdigit, not isdecimal
    "\\boxed{",
    "\\boxed {",
    "\\boxed\u00a0{",  # Unicode whitespace before the brace
    "\\boxed",
    "\\fbox{",
    "\\boxe{",
    "{",
    "}",
    "}}",
    "\\{",
    "\\}",
    "\\frac{1}{2}",
    "9" * 700,  # past the digits the compiled code converts itself
    "1." + "5" * 650,
]


def chain(rng: random.Random) -> str:
    """A chain of 2-4 sides, each a few numbers joined by operators, with random spacing, parentheses and signs."""
    sides = []
    for _ in range(rng.randint(2, 4)):
        numbers = [rng.choice(["7", "12", "3.5", "0", "-4", "100", "9" * 700, "1." + "5" * 650]) for _ in range(3)]
        side = numbers[0]
        for number in numbers[1 : rng.randint(1, 3)]:
            side += rng.choice(["", " "]) + rng.choice("+-*/") + rng.choice(["", " "]) + number
        if rng.random() < 0.2:
            side = f"({side})" + rng.choice(["", " * 2", "2"])
        sides.append(side)
    return rng.choice(["=", " = ", " =", "= "]).join(sides)


@pytest.mark.parametrize("seed", range(4))
def test_same_answer_on_generated_texts(seed):
    rng = random.Random(seed)
    found = boxes = 0
    for _ in range(2500):
        parts = []
        for _ in range(rng.randint(1, 4)):
            parts += rng.choices(FRAGMENTS, k=rng.randint(0, 4))
            parts.append(chain(rng))
            parts += rng.choices(FRAGMENTS, k=rng.randint(0, 4))
            if rng.random() < 0.5:  # a box around what came before, closed or not, nested or not
                parts = [rng.choice(["\\boxed{", "\\fbox {", "\\boxed{\\boxed{"]), *parts, rng.choice("}}{")]
        text = "".join(parts)
        same_answer(text)
        found += len(NATIVE.find_equations(text))
        boxes += len(NATIVE.find_boxed(text))
    assert found > 1000 and boxes > 1000


def test_stale_or_switched_off_build_is_not_used(monkeypatch):
    """A build from an older _scan.c is not used (with a warning), nor is any with SFTFLOW_PURE_PYTHON set."""
    monkeypatch.setattr(NATIVE, "SOURCE_SHA256", "0" * 64)
    with pytest.warns(UserWarning, match="changed since it was compiled"):
        assert native.load_scan() is None
    monkeypatch.undo()
    assert native.load_scan() is NATIVE
    monkeypatch.setenv("SFTFLOW_PURE_PYTHON", "1")
    assert native.load_scan() is None


@pytest.mark.parametrize("rel_tol", [0.0, 1e-4, 1e-9, 0.01, 0.5, 3.0, 1e-30])
def test_equation_checker_gives_equation_is_correct(rel_tol):
    """equation_checker answers "a op b = c" in compiled code (integers, limited digits) and hands every other
    equation to equation_is_correct; either way its verdict is equation_is_correct's."""
    rng = random.Random(int(rel_tol * 1e6) + 7)
    check = A.equation_checker(rel_tol)
    tol = A._fraction(rel_tol)
    compiled = None  # 1e-30 is a 48-bit num over 2^147: past the compiled path, so equation_is_correct answers all
    if tol.denominator < 2**127:
        compiled = dict(
            numerator=tol.numerator, denominator_high=tol.denominator >> 64, denominator_low=tol.denominator % 2**64
        )
    answered = 0
    for _ in range(4000):
        a, b = rng.choice([0, 1, 7, 12, 999, 10**9 - 1, 10**9, 123456789012]), rng.randint(0, 10 ** rng.randint(1, 9))
        op = rng.choice("+-*/")
        exact = {"+": a + b, "-": a - b, "*": a * b, "/": a // max(b, 1)}[op]
        stated = rng.choice([exact, exact + 1, exact - 1, exact * (1 + rng.choice([1e-5, 1e-3, 0.3])), -exact, 0])
        stated_text = rng.choice([str(int(stated)), f"{stated:.2f}", str(int(stated)) + "0" * rng.randint(0, 12)])
        space = lambda: rng.choice(["", " ", "  "])  # noqa: E731
        equation = f"{space()}{a}{space()}{op}{space()}{b}{space()}={space()}{stated_text}{space()}"
        text = rng.choice(["", "So ", "x\n"]) + equation + rng.choice(["", " apples.", "\n"])
        start = text.index(equation)
        expected = A.equation_is_correct(equation, rel_tol)
        assert check(text, start, start + len(equation)) is expected, (equation, rel_tol)
        if compiled:
            answered += NATIVE.simple_equation_is_correct(text, start, start + len(equation), **compiled) is not None
    if compiled:
        assert answered > 600  # the compiled path answered a good share of them itself


def test_prepare_data_says_when_the_pure_python_scans_run(tmp_path, monkeypatch, capfd):
    """A user whose install could not compile the scans is told why the run costs more CPU, and how to fix it."""
    from sftflow.prepare.cli import main

    data = tmp_path / "gen.jsonl"
    row = {"problem": "p", "generation": "So 2 + 3 = 5. \\boxed{5}", "symbolic_correct": True}
    data.write_text(json.dumps(row) + "\n")
    args = [f"++input_files={data}", f"++output_path={tmp_path / 'sft.jsonl'}", "++filters.remove_contaminated=false"]
    assert main(args) == 0
    assert "pure-Python" not in capfd.readouterr().err
    monkeypatch.setattr(native, "SCAN", None)
    assert main(args) == 0
    log = capfd.readouterr().err
    assert "WARNING" in log and "not built or are stale" in log and "make install" in log
