"""Finding the plain arithmetic equations in solution prose ("There are 10 * 3 = 30 pencils"): only where their
extent is known exactly. Evaluating them is sftflow.prepare.exact_arithmetic's job."""

from __future__ import annotations

import re
from typing import NamedTuple

from sftflow.prepare.exact_arithmetic import NUMBER, count_operations, side_tokens

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
        tokens = side_tokens(text[s:e]) if clear and s < e and (n < last or _clear_after(text, e)) else None
        if tokens is not None:
            sides[n] = (s, e)
            run.append(n)
            operations += count_operations(tokens)
        if tokens is None or n == last:
            if len(run) >= 2 and operations:
                alone = all(a == b for i, (a, b) in enumerate(sides) if i not in run)
                found.append(Equation(sides[run[0]][0], sides[run[-1]][1], alone, operations))
            run, operations = [], 0
    return found


# The commonest chain, "a op b = c" of unsigned numbers ("There are 10 * 3 = 30 pencils"), has one answer:
# both sides are complete expressions and the second holds no operation, so it is one equation when the first
# side does not continue to the left and the last not to the right, else none (what _chain_equations finds).
_SIMPLE_CHAIN = re.compile(rf" *({NUMBER} *[-+*/] *{NUMBER}) *= *({NUMBER}) *")


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


def find_equations(text: str) -> list[Equation]:
    """The plain arithmetic equations in `text`, in order (see above for what counts)."""
    found: list[Equation] = []
    for start, end in _chains(text):
        simple = _simple_chain_equations(text, start, end)
        found += _chain_equations(text, start, end) if simple is None else simple
    return found
