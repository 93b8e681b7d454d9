"""Exact arithmetic on plain expressions ("1 + 2 * (3 - 4.5)"): parse, evaluate step by step with Fractions, check
and expand equations. Finding the equations in prose is sftflow.prepare.equations' job."""

from __future__ import annotations

import re
from fractions import Fraction
from functools import lru_cache

NUMBER = r"\d+(?:\.\d+)?"
# A number, with a minus glued to it when it stands where an operand is expected ("-3", "2 * -3", "(-3 + 1)").
_TOKEN = re.compile(rf"\s*(?:(-?{NUMBER})|([-+*/()]))")
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
_SIMPLE = re.compile(rf"\s*(\d+)\s*([-+*/])\s*(\d+)\s*=\s*({NUMBER})\s*")
_PLAIN_NUMBER = re.compile(rf"\s*\(*\s*-?{NUMBER}\s*\)*\s*")


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


def count_operations(tokens: list) -> int:
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
    tokens = side_tokens(sides[0])
    if tokens is None or count_operations(tokens) <= 1:
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
        # a step that only drops the parentheses of "(6)" is not shown
        if count_operations(step) < count_operations(shown[-1]):
            shown.append(step)
    if len(shown) <= 2:
        return None  # one operation (or none) leaves nothing to expand
    left = sides[0].strip()
    middle = [render(step, compact=" " not in left) for step in shown[1:-1]]  # in the author's spacing style
    if any(text is None for text in middle):
        return None
    return " = ".join([left, *middle, sides[1].strip()])


@lru_cache(maxsize=1 << 16)
def side_tokens(side: str) -> tuple | None:
    """tokenize(side) as a tuple (memoised: sides recur), or None if it is not a complete plain expression."""
    try:
        return tuple(tokenize(side))
    except ValueError:
        return None
