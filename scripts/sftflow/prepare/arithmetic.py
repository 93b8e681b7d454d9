"""Find plain arithmetic equations in solutions, check them, and expand them step by step."""

from __future__ import annotations

import functools
import re
from fractions import Fraction
from functools import lru_cache
from typing import NamedTuple

from sftflow.native import SCAN

_NUM = r"\d+(?:\.\d+)?"
# A number, with a minus glued to it when it stands where an operand is expected ("-3", "2 * -3", "(-3 + 1)").
_TOKEN = re.compile(rf"\s*(?:(-?{_NUM})|([-+*/()]))")
_OPS = {
    "+": (1, lambda a, b: a + b),
    "-": (1, lambda a, b: a - b),
    "*": (2, lambda a, b: a * b),
    "/": (2, lambda a, b: a / b),
}


def tokenize(expr: str) -> list:
    """Tokens of a complete plain expression: numbers (ints or exact Fractions), operators, parentheses.

    Raises ValueError unless all of `expr` is numbers joined by + - * / with balanced parentheses. A minus is
    unary only where an operand is expected and when glued to a number ("-3", "(-3", "* -3"); "- 3" or "-(3)"
    there is not parsed (at a line start "- 3 + 4" is more likely a list bullet than a negative three).
    """
    tokens: list = []
    pos, end, depth, want_operand = 0, len(expr.rstrip()), 0, True
    while pos < end:
        m = _TOKEN.match(expr, pos)
        if not m:
            raise ValueError(f"cannot parse {expr!r}")
        number, sym = m.groups()
        if number is not None:
            if not want_operand:
                if number[0] != "-":
                    raise ValueError(f"two numbers in a row in {expr!r}")
                tokens.append("-")  # "10 -3": a binary minus glued to its right operand
                number = number[1:]
            tokens.append(int(number) if "." not in number else Fraction(number))
            want_operand = False
        elif sym == "(":
            if not want_operand:
                raise ValueError(f"implicit product in {expr!r}")
            depth += 1
            tokens.append(sym)
        elif sym == ")":
            if want_operand or depth == 0:
                raise ValueError(f"misplaced ')' in {expr!r}")
            depth -= 1
            tokens.append(sym)
        else:
            if want_operand:
                raise ValueError(f"operator without a left operand in {expr!r}")
            tokens.append(sym)
            want_operand = True
        pos = m.end()
    if want_operand or depth:
        raise ValueError(f"incomplete expression {expr!r}")
    return tokens


def _find_innermost(tokens: list) -> tuple[int, int]:
    """Bounds (start, end) of the innermost parenthesised group, or the whole list if none."""
    start = 0
    for i, tok in enumerate(tokens):
        if tok == "(":
            start = i + 1
        elif tok == ")":
            return start, i
    return 0, len(tokens)


def _step(tokens: list) -> list:
    """Apply one operation (innermost parentheses first, * and / before + and -, left to right)."""
    start, end = _find_innermost(tokens)
    inner = tokens[start:end]
    if len(inner) == 1:  # "(8)" -> "8"
        if start == 0 and end == len(tokens):
            raise ValueError("nothing left to compute")
        return tokens[: start - 1] + inner + tokens[end + 1 :]
    if len(inner) < 3 or len(inner) % 2 == 0:
        raise ValueError("malformed expression")
    for i in range(1, len(inner), 2):
        if not isinstance(inner[i], str) or inner[i] not in _OPS or isinstance(inner[i - 1], str):
            raise ValueError("malformed expression")
    best = max(range(1, len(inner), 2), key=lambda i: (_OPS[inner[i]][0], -i))
    a, op, b = inner[best - 1], inner[best], inner[best + 1]
    if isinstance(b, str):
        raise ValueError("malformed expression")
    value = Fraction(a, b) if op == "/" and isinstance(a, int) and isinstance(b, int) else _OPS[op][1](a, b)
    if isinstance(value, Fraction) and value.denominator == 1:
        value = value.numerator  # ZeroDivisionError propagates from the division above
    inner = inner[: best - 1] + [value] + inner[best + 2 :]
    result = tokens[:start] + inner + tokens[end:]
    if len(inner) == 1 and start > 0:
        result = tokens[: start - 1] + inner + tokens[end + 1 :]
    return result


def solve_steps(expr: str) -> list[list]:
    """Every intermediate token list from `expr` to its value (the last list holds one Fraction)."""
    tokens = tokenize(expr)
    steps = [tokens]
    while len(tokens) > 1:
        tokens = _step(tokens)
        steps.append(tokens)
    if isinstance(tokens[0], str):
        raise ValueError("malformed expression")
    return steps


def evaluate(expr: str) -> int | Fraction:
    return solve_steps(expr)[-1][0]


def format_number(value: int | Fraction) -> str | None:
    """Exact decimal text of `value`, or None if it has no finite decimal form."""
    if isinstance(value, int):
        return str(value)
    if value.denominator == 1:
        return str(value.numerator)
    den, twos, fives = value.denominator, 0, 0
    while den % 2 == 0:
        den //= 2
        twos += 1
    while den % 5 == 0:
        den //= 5
        fives += 1
    if den != 1:
        return None
    places = max(twos, fives)
    scaled = abs(value.numerator) * 10**places // value.denominator
    text = f"{scaled // 10**places}.{scaled % 10**places:0{places}d}".rstrip("0")
    return ("-" if value < 0 else "") + text


def render(tokens: list, compact: bool = False) -> str | None:
    """Text of a step, "1 + 2 * (-3)" or, `compact`, "1+2*(-3)"; None if a number has no finite decimal form."""
    parts: list[str] = []
    for tok in tokens:
        if not isinstance(tok, str):
            text = format_number(tok)
            if text is None:
                return None
            if tok < 0 and parts and parts[-1] in _OPS:
                text = f"({text})"  # "2 * (-3)", not "2 * -3"
            parts.append(text)
        else:
            parts.append(tok)
    if compact:
        return "".join(parts)
    return " ".join(parts).replace("( ", "(").replace(" )", ")")


def stated_tolerance(side: str) -> Fraction:
    """Half a unit in the last written decimal place of a plain number, e.g. 0.05 for '3.1'."""
    side = side.strip().strip("()").strip()
    if "." in side:
        return Fraction(1, 2 * 10 ** len(side.split(".")[1]))
    return Fraction(0)


# "a op b = c" with natural numbers a and b: most equations in solutions, checked without the general parser.
_SIMPLE = re.compile(rf"\s*(\d+)\s*([-+*/])\s*(\d+)\s*=\s*({_NUM})\s*")
_PLAIN_NUMBER = re.compile(rf"\s*\(*\s*-?{_NUM}\s*\)*\s*")


@lru_cache(maxsize=1 << 16)  # the same small computations recur across many solutions
def equation_is_correct(equation: str, rel_tol: float) -> bool | None:
    """True/False if every side of the equation has the value of the first; None if it cannot be checked."""
    # Below Python's 4300-digit limit of int(str); a longer equation goes to the general parser, which answers
    # None for a number it cannot convert.
    simple = _SIMPLE.fullmatch(equation) if len(equation) < 4300 else None
    if simple:
        a, op, b, stated = int(simple[1]), simple[2], int(simple[3]), simple[4]
        if op == "/" and b == 0:
            return None
        if op != "/" and "." not in stated:  # integers: the same comparison as below, without Fraction objects
            value = a + b if op == "+" else a - b if op == "-" else a * b
            miss = abs(int(stated) - value)
            tol = _fraction(rel_tol)
            return miss == 0 or miss * tol.denominator <= tol.numerator * abs(value)
        value = a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else Fraction(a, b)
        allowed = max(_fraction(rel_tol) * abs(value), stated_tolerance(stated))
        return abs(Fraction(stated) - value) <= allowed
    sides = equation.split("=")
    try:
        values = [evaluate(side) for side in sides]
    except (ValueError, ZeroDivisionError):
        return None
    first = values[0]
    for side, value in zip(sides[1:], values[1:]):
        allowed = max(_fraction(rel_tol) * abs(first), stated_tolerance(side) if _is_plain_number(side) else 0)
        if abs(value - first) > allowed:
            return False
    return True


@lru_cache(maxsize=8)
def _fraction(rel_tol: float) -> Fraction:
    return Fraction(rel_tol)


def _is_plain_number(side: str) -> bool:
    return _PLAIN_NUMBER.fullmatch(side) is not None


def _operations(tokens: list) -> int:
    return sum(1 for tok in tokens if isinstance(tok, str) and tok in _OPS)


@lru_cache(maxsize=1 << 16)
def split_equation(equation: str) -> str | None:
    """'1 + 2 + 3 = 6' -> '1 + 2 + 3 = 3 + 3 = 6'; None if it is not a correct two-sided equation to expand."""
    if _SIMPLE.fullmatch(equation):
        return None  # "a op b = c": one operation, nothing to expand (what _expand finds, without parsing)
    return _expand(equation)


def _expand(equation: str) -> str | None:
    sides = equation.split("=")
    if len(sides) != 2 or not _is_plain_number(sides[1]):
        return None
    tokens = _side_tokens(sides[0])
    if tokens is None or _operations(tokens) <= 1:
        return None  # not an expression, or one operation: nothing to expand (as `len(shown) <= 2` below)
    try:
        steps = solve_steps(sides[0])
        answer = evaluate(sides[1])
    except (ValueError, ZeroDivisionError):
        return None
    if steps[-1][0] != answer:
        return None
    shown = steps[:1]
    for step in steps[1:]:
        if _operations(step) < _operations(shown[-1]):  # a step that only drops the parentheses of "(6)" is not shown
            shown.append(step)
    if len(shown) <= 2:
        return None  # one operation (or none) leaves nothing to expand
    left = sides[0].strip()
    middle = [render(step, compact=" " not in left) for step in shown[1:-1]]  # in the author's spacing style
    if any(text is None for text in middle):
        return None
    return " = ".join([left, *middle, sides[1].strip()])


# Finding equations in text.
#
# An equation is checked or expanded only where it was parsed exactly: the rule is that a row is never dropped
# (and no text is rewritten) over an equation whose true extent we do not know. A chain "s0 = s1 = ... = sn" is
# a maximal run of the characters below around an '='; each side of it is used only if
#   * all of it is a complete plain expression (see `tokenize`: numbers, + - * /, parentheses, a glued unary
#     minus), and
#   * the first side does not continue to the left, and the last side not to the right, into text that could
#     belong to it: a power ("9^2", "AB^2 = ..."), a variable ("OD + 1", "5x"), a LaTeX command ("\cdots + 15",
#     "2 \times 3 + 4"), a factorial, percent, digit grouping ("1,000"), ellipsis, an operator word ("3 times
#     4 + 1"), .... Text that cannot (line start, '$', "\[", prose words, sentence punctuation, "\quad",
#     "\Rightarrow", "\text", relations) is a safe neighbour. Inner sides lie between two '=' and are safe.
# Consecutive usable sides (at least two, with an operator among them) form one equation; e.g. in
# "AB^2 = 36 + 25 + 30 = 91" the equation is "36 + 25 + 30 = 91", in "\cdots + 15 + 17 = 9^2" there is none.
# A first side that starts with a minus is used only at a line start or right after '$', "\[" or "\(" (after
# a word, "AB -10 + 15" may be AB - 10 + 15), and only glued to its number: "- 3 + 4" at a line start may be a
# markdown bullet or minus three, so it is not checked (bullets "* " and "+ " are skipped: no sign ambiguity).

_OPERATOR = re.compile(r"[-+*/]")
# LaTeX commands that separate formula parts, so the number beside them stands alone.
_SEPARATING_COMMANDS = frozenset(
    "quad qquad text textbf textit mbox Rightarrow Longrightarrow implies iff therefore because "
    "approx neq ne le leq ge geq lt gt equiv end".split()
)
# Words that join a neighbouring number into a larger expression ("3 times 4 + 1", "half of 10 + 2").
_OPERATOR_WORDS = frozenset("times plus minus over divided by mod of squared cubed".split())


# A run of chain characters: '(' and ')' unless escaped (\( and \) delimit math), '.' only as a decimal point
# (not a full stop or an ellipsis). The second pattern reads the same run backwards, in the reversed text.
_CHAIN_RUN = re.compile(r"(?:[0-9 +\-*/=]|(?<!\\)[()]|(?<=\d)\.(?=\d))*")
_CHAIN_RUN_REVERSED = re.compile(r"(?:[0-9 +\-*/=]|[()](?!\\)|(?<=\d)\.(?=\d))*")


def _word_is_safe(word: str, command: bool) -> bool:
    if command:
        return word in _SEPARATING_COMMANDS
    return len(word) >= 2 and word.lower() not in _OPERATOR_WORDS  # a lone letter may be a variable


def _clear_before(text: str, i: int, minus: bool) -> bool:
    """Whether the side starting at text[i] cannot continue to the left (`minus`: it starts with a minus)."""
    k = i
    while k > 0 and text[k - 1] in " \t":
        k -= 1
    if k == 0:
        return True
    c, spaced = text[k - 1], k < i
    prev = text[k - 2] if k >= 2 else ""
    if c in "\n$" or (c in "[(" and prev == "\\"):  # line start, math opening $ \[ \(
        return True
    if minus or not spaced:  # touching the side: part of it ("^2 = ...", "OD+1", "1,000")
        return False
    if c in ",;:":
        return prev != "\\"  # "\," "\;" "\:" are LaTeX spaces inside a formula
    if c == ".":
        return prev != "."  # a full stop, not an ellipsis
    if c in "?!":
        return True
    if c == "\\":
        return prev == "\\"  # "\\" line break
    if c.isalpha():
        m = k - 1
        while m > 0 and text[m - 1].isalpha():
            m -= 1
        return _word_is_safe(text[m:k], m > 0 and text[m - 1] == "\\")
    return False


def _clear_after(text: str, j: int) -> bool:
    """Whether the side ending before text[j] cannot continue to the right."""
    n, k = len(text), j
    while k < n and text[k] in " \t":
        k += 1
    if k == n:
        return True
    c, spaced = text[k], k > j
    nxt = text[k + 1] if k + 1 < n else ""
    if c in "\n$?":
        return True
    if c in ",;:":
        return not nxt.isdigit()  # "3,000", "3:4"
    if c == ".":
        return nxt != "." and not nxt.isdigit()  # a full stop, not an ellipsis
    if c == "!":
        return spaced  # "5!" is a factorial
    if c == "\\":
        m = k + 1
        while m < n and text[m].isalpha():
            m += 1
        if m > k + 1:
            return _word_is_safe(text[k + 1 : m], True)
        return nxt in ("]", ")", "\\")  # \] \) and the "\\" line break; not "\%" or "\,"
    if c.isalpha():
        if not spaced:
            return False  # "5x", "16cm"
        m = k
        while m < n and text[m].isalpha():
            m += 1
        return _word_is_safe(text[k:m], False)
    return False


@lru_cache(maxsize=1 << 16)
def _side_tokens(side: str) -> tuple | None:
    try:
        return tuple(tokenize(side))
    except ValueError:
        return None


def _after_bullet(text: str, s: int, e: int) -> int:
    """Start of the side text[s:e] after a markdown bullet "* " or "+ " at a line start, else s.

    "+ 3 * 4" is 12 whether the '+' is a bullet or a sign; "- 3 + 4" is not stripped: a bullet, or minus three.
    """
    if e - s < 3 or text[s] not in "*+" or text[s + 1] != " ":
        return s
    k = s
    while k > 0 and text[k - 1] in " \t":
        k -= 1
    if k > 0 and text[k - 1] != "\n":
        return s
    return e - len(text[s + 2 : e].lstrip(" "))


class Equation(NamedTuple):
    start: int  # text[start:end] is the equation, from its first side to its last, without surrounding space
    end: int
    alone: bool  # the other sides of its chain are empty: "x = 1 + 2 + 3 = 6", not "AB^2 = 36 + 25 + 30 = 91"
    operations: int  # + - * / in all its sides (one: nothing to expand)


def _chain_equations(text: str, start: int, end: int) -> list[Equation]:
    """Equations (see above) in the chain text[start:end]."""
    sides, s = [], start
    for part in text[start:end].split("="):
        lead = len(part) - len(part.lstrip(" "))
        sides.append((s + lead, s + lead + len(part.strip(" "))))  # an empty side: start == end
        s += len(part) + 1
    last = len(sides) - 1
    found: list[Equation] = []
    run: list[int] = []  # indices of consecutive usable sides
    operations = 0
    for n, (s, e) in enumerate(sides):
        clear = n > 0
        if n == 0 and s < e:
            bullet_end = _after_bullet(text, s, e)
            clear = bullet_end > s or _clear_before(text, s, text[s] == "-")
            s = bullet_end
        tokens = _side_tokens(text[s:e]) if clear and s < e and (n < last or _clear_after(text, e)) else None
        if tokens is not None:
            sides[n] = (s, e)
            run.append(n)
            operations += _operations(tokens)
        if tokens is None or n == last:
            if len(run) >= 2 and operations:
                alone = all(a == b for i, (a, b) in enumerate(sides) if i not in run)
                found.append(Equation(sides[run[0]][0], sides[run[-1]][1], alone, operations))
            run, operations = [], 0
    return found


# The commonest chain, "a op b = c" of unsigned numbers ("There are 10 * 3 = 30 pencils"), has one answer:
# both sides are complete expressions and the second holds no operation, so it is one equation when the first
# side does not continue to the left and the last not to the right, else none (what _chain_equations finds).
_SIMPLE_CHAIN = re.compile(rf" *({_NUM} *[-+*/] *{_NUM}) *= *({_NUM}) *")


def _simple_chain_equations(text: str, start: int, end: int) -> list[Equation] | None:
    """_chain_equations(text, start, end) for a chain "a op b = c", without splitting it; None for other chains."""
    simple = _SIMPLE_CHAIN.fullmatch(text, start, end)
    if simple is None:
        return None
    first, last = simple.start(1), simple.end(2)
    if _clear_before(text, first, False) and _clear_after(text, last):
        return [Equation(first, last, True, 1)]
    return []


def _chains(text: str):
    """(start, end) of each chain: the maximal run of chain characters around an '=' that holds an operator."""
    pos = text.find("=")
    reversed_text = text[::-1] if pos >= 0 else ""
    while pos >= 0:  # each chain around an '=', found from there: scanning all of the text costs more
        start = len(text) - _CHAIN_RUN_REVERSED.match(reversed_text, len(text) - pos).end()
        end = _CHAIN_RUN.match(text, pos + 1).end()
        if _OPERATOR.search(text, start, end):
            yield start, end
        pos = text.find("=", end)


def find_equations_python(text: str) -> list[Equation]:
    """The plain arithmetic equations in `text`, in order (see above for what counts): the reference reading."""
    found: list[Equation] = []
    for start, end in _chains(text):
        simple = _simple_chain_equations(text, start, end)
        found += _chain_equations(text, start, end) if simple is None else simple
    return found


if SCAN is not None:
    SCAN.set_callbacks(_word_is_safe, _side_tokens)  # what it defers to Python (see _scan.c)


def find_equations(text: str) -> list[tuple[int, int, bool, int]]:
    """The plain arithmetic equations in `text`, in order (see above for what counts), as (start, end, alone,
    operations): find_equations_python's answer, from the compiled reading when it is built (about 15x faster)."""
    if SCAN is None:
        return find_equations_python(text)
    return SCAN.find_equations(text)


def equation_checker(rel_tol: float):
    """A function (text, start, end) -> equation_is_correct(text[start:end], rel_tol): the compiled scan answers
    for "a op b = c" with + - * and integers of up to 9 (a, b) and 18 (c) digits, the commonest equations, and
    equation_is_correct for every other one."""
    tol = _fraction(rel_tol)
    if SCAN is None or not (0 <= tol.numerator < 2**63 and 0 < tol.denominator < 2**127):
        return lambda text, start, end: equation_is_correct(text[start:end], rel_tol)
    simple = functools.partial(
        SCAN.simple_equation_is_correct,
        numerator=tol.numerator,
        denominator_high=tol.denominator >> 64,
        denominator_low=tol.denominator & (2**64 - 1),
    )

    def check(text: str, start: int, end: int) -> bool | None:
        verdict = simple(text, start, end)
        return equation_is_correct(text[start:end], rel_tol) if verdict is None else verdict

    return check
