"""Find plain arithmetic equations in solutions, check them, and expand them step by step."""

from __future__ import annotations

import re
from fractions import Fraction
from functools import lru_cache

_NUM = r"\d+(?:\.\d+)?"
_TERM = rf"\(*\s*{_NUM}\s*\)*"
_EXPR = rf"{_TERM}(?:\s*[-+*/]\s*{_TERM})*"
# At least one '=' and at least one operator somewhere in the chain.
EQUATION = re.compile(rf"(?<![\w.]){_EXPR}(?:\s*=\s*{_EXPR})+(?!\w)(?!\.\d)")
_TOKEN = re.compile(rf"\s*({_NUM}|[-+*/()])")
_OPS = {
    "+": (1, lambda a, b: a + b),
    "-": (1, lambda a, b: a - b),
    "*": (2, lambda a, b: a * b),
    "/": (2, lambda a, b: a / b),
}


def tokenize(expr: str) -> list:
    """Numbers become ints or Fractions (exact), operators and parentheses stay strings."""
    tokens, pos = [], 0
    expr = expr.rstrip()
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if not m:
            raise ValueError(f"cannot parse {expr!r}")
        tok = m.group(1)
        if tok in "+-*/()":
            tokens.append(tok)
        else:
            tokens.append(int(tok) if tok.isdigit() else Fraction(tok))
        pos = m.end()
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
    if expr.count("(") != expr.count(")"):
        raise ValueError("unbalanced parentheses")
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


def render(tokens: list) -> str | None:
    parts = []
    for tok in tokens:
        if not isinstance(tok, str):
            text = format_number(tok)
            if text is None:
                return None
            parts.append(text)
        else:
            parts.append(tok)
    return " ".join(parts).replace("( ", "(").replace(" )", ")")


def stated_tolerance(side: str) -> Fraction:
    """Half a unit in the last written decimal place of a plain number, e.g. 0.05 for '3.1'."""
    side = side.strip().strip("()").strip()
    if "." in side:
        return Fraction(1, 2 * 10 ** len(side.split(".")[1]))
    return Fraction(0)


# "a op b = c" with integers a and b: most equations in solutions, checked without the general parser.
_OPERATORS_IN = re.compile(r"[-+*/]")
_SIMPLE = re.compile(rf"\s*(\d+)\s*([-+*/])\s*(\d+)\s*=\s*({_NUM})\s*")


@lru_cache(maxsize=1 << 16)  # the same small computations recur across many solutions
def equation_is_correct(equation: str, rel_tol: float) -> bool | None:
    """True/False if every side of the equation has the value of the first; None if it cannot be checked."""
    simple = _SIMPLE.fullmatch(equation)
    if simple:
        a, op, b, stated = int(simple[1]), simple[2], int(simple[3]), simple[4]
        if op == "/" and b == 0:
            return None
        value = a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else Fraction(a, b)
        allowed = max(Fraction(rel_tol) * abs(value), stated_tolerance(stated))
        return abs(Fraction(stated) - value) <= allowed
    sides = equation.split("=")
    try:
        values = [evaluate(side) for side in sides]
    except (ValueError, ZeroDivisionError):
        return None
    first = values[0]
    for side, value in zip(sides[1:], values[1:]):
        allowed = max(Fraction(rel_tol) * abs(first), stated_tolerance(side) if _is_plain_number(side) else 0)
        if abs(value - first) > allowed:
            return False
    return True


def _is_plain_number(side: str) -> bool:
    return re.fullmatch(rf"\s*\(*\s*{_NUM}\s*\)*\s*", side) is not None


@lru_cache(maxsize=1 << 16)
def split_equation(equation: str) -> str | None:
    """'1 + 2 + 3 = 6' -> '1 + 2 + 3 = 3 + 3 = 6'; None if it is not a correct two-sided equation to expand."""
    sides = equation.split("=")
    if len(sides) != 2 or len(_OPERATORS_IN.findall(sides[0])) < 2 or not _is_plain_number(sides[1]):
        return None  # one operation (or none) leaves nothing to expand
    try:
        steps = solve_steps(sides[0])
        answer = evaluate(sides[1])
    except (ValueError, ZeroDivisionError):
        return None
    if len(steps) <= 2 or steps[-1][0] != answer:
        return None
    middle = [render(step) for step in steps[1:-1]]
    if any(text is None for text in middle):
        return None
    return " = ".join([sides[0].strip(), *middle, sides[1].strip()])
