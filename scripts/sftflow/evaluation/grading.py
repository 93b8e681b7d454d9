"""Answer extraction and grading: last \\boxed{} of a generation, normalised, compared with math-verify.

Grading is `normalize_answer` on both sides (the clean-ups users expect: units, `\\$`, degrees, `%`,
thousands separators, `\\dfrac`, `\\left`/`\\right`, multiple-choice letters), then

1. equal normalised strings are correct (fast path, and no symbolic engine can get that wrong);
2. multiple-choice letters and words are compared as strings only, because math-verify would read `Evelyn` as
   the product E*v*e*l*y*n (so anagrams would match) and folds case (`F` would equal `f`): a word answer in a font
   wrapper on either side (`\\text{Evelyn}`, `\\mathrm{even}`) ignoring case, and otherwise, as in NeMo-Skills'
   math_equal, two answers made only of letters, spaces and commas (or only of digits and spaces) as plain
   strings, spaces ignored (`odd` is not `ddo`, `F` is not `f`, `xy` is not `yx`, `010` is not `10`);
3. everything else goes through math-verify (`parse` of `\\boxed{answer}`, then `verify`), with
   its own signal-based timeouts so that a pathological answer (`9^{9^{9^9}}`) cannot hang grading.

An exception or timeout inside math-verify makes the answer incorrect and is counted in the
grader's `GradingStats`, so a run can report how many answers it could not grade.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from sftflow.mathtext import last_boxed

__all__ = [
    "Grade",
    "Grader",
    "GradingStats",
    "default_stats",
    "extract_answer",
    "grade_generation",
    "is_correct",
    "normalize_answer",
]

DEFAULT_TIMEOUT_SECONDS = 5


# NeMo-Skills' default for extract_from_boxed=False (its math grader's extract_regex).
DEFAULT_EXTRACT_REGEX = r"The final answer is (.+)$"


def extract_answer(
    generation: str | None, extract_from_boxed: bool = True, extract_regex: str = DEFAULT_EXTRACT_REGEX
) -> str | None:
    """Content of the last \\boxed{} (or \\fbox{}) of `generation`, braces balanced; None if there is none.
    With extract_from_boxed=False (eval.extract_from_boxed, as NeMo-Skills' option of that name): the last
    match of `extract_regex` (its first group, if it has one), e.g. r"#### (\\S+)" for GSM8K-style answers.

    An empty answer counts as no answer (None): there is nothing to grade and it should count in the
    no-answer rate, not as a wrong answer.
    """
    if not generation:
        return None
    if extract_from_boxed:
        content = last_boxed(generation)
    else:
        matches = re.findall(extract_regex, generation, flags=re.MULTILINE)
        content = matches[-1] if matches else None
        if isinstance(content, tuple):
            content = content[0]
    if content is None or not content.strip():
        return None
    return content.strip()


# --- normalisation ------------------------------------------------------------------------------

# Text-mode commands only: \mathbf{j} or \mathrm{d} at the end of an answer are maths, not units.
_TEXT_CMD = r"\\(?:text|textbf|textit|textrm|textnormal|mbox)"
# A font wrapper around the whole answer is formatting: `\text{(B)}`, `\mathrm{E}`, `\mathit{odd}` are `(B)`, `E`,
# `odd` (NeMo-Skills' math_equal gets the same through latex2sympy's normalize_latex, which rewrites
# \mathrm/\mathit/\textrm/... as \text). Only around the whole answer: inside an expression \mathrm{d} or
# \mathrm{cm} is left to math-verify.
_WHOLE_TEXT = re.compile(rf"^(?:{_TEXT_CMD}|\\math(?:rm|it))\s*\{{([^{{}}]*)\}}$")
# A unit: a \text{...} at the end after some maths, maybe squared/cubed (864 \mbox{ inches}^2).
_TRAILING_TEXT = re.compile(rf"^(.*?\S)\s*{_TEXT_CMD}\s*\{{[^{{}}]*\}}(?:\s*\^\s*\{{?\s*[23]\s*\}}?)?$", re.DOTALL)
# Plain-word units that math-verify's own unit list lacks; only after a digit or a closing brace so
# that a variable name is never eaten.
_TRAILING_WORD_UNIT = re.compile(r"(?<=[\d}])\s*(?:dollars?|cents?|degrees?|percent)$", re.IGNORECASE)
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree(?![A-Za-z])")
# Bold vector names (2\mathbf{i} + 3\mathbf{j}): math-verify drops \mathbf{...} altogether, which would make
# that answer equal to "2"; the bare letter keeps the meaning.
_BOLD = re.compile(r"\\(?:mathbf|boldsymbol|bm)\s*\{([^{}]*)\}")
_DFRAC = re.compile(r"\\[dt]frac(?![A-Za-z])")
# \left( ... \right): the sizing commands carry no meaning; `\left.` / `\right.` are empty delimiters.
_LEFT_RIGHT = re.compile(r"\\(?:left|right)(?![A-Za-z])\s*\.?")
_THIN_SPACE_THOUSANDS = re.compile(r"(?<=\d)\\,(?=\d{3}(?!\d))")
_LATEX_SPACES = re.compile(r"(?<!\\)\\[,;:! ]|\\q?quad(?![A-Za-z])|~")
_WHITESPACE = re.compile(r"\s+")
# A single number written with thousands separators. Only the whole answer qualifies, and only
# groups of exactly three digits with no space after the comma, so "(1,2)", "1,2" and "3, 5, 7"
# stay tuples/lists.
_THOUSANDS = re.compile(r"^[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_SPACE_AROUND_COMMA = re.compile(r"\s*,(\s*)")
_MCQ = re.compile(r"^\(?\s*([A-E])\s*\)?$")
_WORDS = re.compile(r"^[A-Za-z][A-Za-z '\-]*$")
# NeMo-Skills' math_equal: answers that are only letters/spaces/commas or only digits/spaces are plain strings.
_LITERAL = re.compile(r"[a-zA-Z ,]+|[0-9 ]+")


def _strip_math_delimiters(text: str) -> str:
    text = text.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(text) >= len(left) + len(right) and text.startswith(left) and text.endswith(right):
            text = text[len(left) : len(text) - len(right)].strip()
    return text


def _strip_trailing(text: str) -> str:
    """Remove trailing periods, stray backslashes, percent signs, degree marks and units until nothing changes.

    A backslash at the very end escapes nothing (`185\\`, or a `\\\\` line break after the answer); NeMo-Skills'
    math_grader strips it too (with the final period, `rstrip(".\\\\")`).
    """
    while True:
        before = text
        text = text.strip()
        text = text.rstrip(".\\").rstrip()
        if text.endswith("\\%"):
            text = text[:-2]
        elif text.endswith("%"):
            text = text[:-1]
        text = _TRAILING_WORD_UNIT.sub("", text).rstrip()
        match = _TRAILING_TEXT.match(text)
        if match and not _WHOLE_TEXT.match(text):
            text = match.group(1)
        if text == before:
            return text


def _squeeze_spaces(text: str) -> str:
    """Drop spaces that carry no meaning, so `( 3, \\frac 12 )` and `(3, \\frac12)` compare equal as strings.

    Kept: a space between two letters (`\\pi r` is not `\\pir`) and one space after a comma (`10, 200`
    is a list while `10,200` reads as ten thousand two hundred).
    """
    text = _SPACE_AROUND_COMMA.sub(lambda m: ", " if m.group(1) else ",", text)

    def keep(match: re.Match) -> str:
        before = text[match.start() - 1] if match.start() else ""
        after = text[match.end()] if match.end() < len(text) else ""
        return " " if before == "," or (before.isalpha() and after.isalpha()) else ""

    return _WHITESPACE.sub(keep, text)


def normalize_answer(answer: str) -> str:
    """The canonical string form of an answer, used both for the fast path and before math-verify.

    Only changes that never merge mathematically different answers: formatting (`\\dfrac`,
    `\\left`, LaTeX spaces), decorations (`\\$`, `^\\circ`, trailing `.`, `\\` and `%`, a trailing unit in
    `\\text{}`), a font wrapper around the whole answer (`\\text{E}`, `\\mathrm{E}` -> `E`), thousands
    separators of a single number, and `(B)` / `\\text{(B)}` -> `B`.
    """
    text = _strip_math_delimiters(answer)
    text = _DFRAC.sub(r"\\frac", text)
    text = _BOLD.sub(r"\1", text)
    text = _LEFT_RIGHT.sub("", text)
    # Thousands separators in LaTeX spellings: 10,\!080 / 1{,}000 / 1\,000.
    text = re.sub(r",\\!\s*", ",", text).replace("{,}", ",")
    text = _THIN_SPACE_THOUSANDS.sub("", text)
    text = _LATEX_SPACES.sub(" ", text)
    text = text.replace("\\$", "").replace("$", "")
    text = _DEGREES.sub("", text)
    text = _WHITESPACE.sub(" ", text).strip()
    text = _strip_trailing(text)
    # A whole-answer \text{...} is a word answer or an MCQ letter: keep its content only.
    while match := _WHOLE_TEXT.match(text):
        text = _strip_trailing(match.group(1).strip())
    text = _WHITESPACE.sub(" ", text).strip()
    if _THOUSANDS.match(text):
        text = text.replace(",", "")
    text = _squeeze_spaces(text)
    if match := _MCQ.match(text):
        text = match.group(1)
    return text


def _is_word_answer(raw: str, normalized: str) -> bool:
    """True for answers such as `\\text{Evelyn}` / `\\mathrm{even}` that must be compared as words."""
    return bool(_WHOLE_TEXT.match(_strip_math_delimiters(raw))) and bool(_WORDS.match(normalized))


def _is_literal(normalized: str) -> bool:
    """True for a normalised answer made only of letters, spaces and commas, or only of digits and spaces.

    NeMo-Skills' math_equal compares two such answers as plain strings (spaces ignored, case kept) rather than
    through math-verify, which reads `odd` as the product o*d*d (so `ddo` would match) and folds case.
    """
    return _LITERAL.fullmatch(normalized) is not None


# --- math-verify -------------------------------------------------------------------------------


@dataclass
class GradingStats:
    """Counts of what grading did, for the run's log and metrics."""

    graded: int = 0
    correct: int = 0
    no_answer: int = 0
    errors: int = 0
    timeouts: int = 0
    error_examples: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Grade:
    """Result of grading one answer: `error` is set when math-verify failed (then correct is False)."""

    correct: bool
    error: str | None = None


class _ParseFailure:
    """Cached marker for an answer math-verify raised or timed out on (so it is not retried)."""

    def __init__(self, message: str, timed_out: bool) -> None:
        self.message = message
        self.timed_out = timed_out


def _signal_timeout(timeout_seconds: int) -> int | None:
    # math-verify's timeouts use SIGALRM, which only the main thread may set; elsewhere it would
    # raise ValueError, so grading in a worker thread runs without the guard (documented limit).
    return timeout_seconds if threading.current_thread() is threading.main_thread() else None


@lru_cache(maxsize=65536)
def _parse(normalized: str, timeout_seconds: int) -> list | _ParseFailure:
    """math-verify's parse of one normalised answer, cached: benchmarks repeat answers a lot."""
    from math_verify import parse
    from math_verify.errors import TimeoutException

    # \boxed{} tells math-verify exactly which span is the answer (its LaTeX extractor gives boxed
    # content priority), so a bare "1,2" or "x=5" is not re-split by its free-text heuristics.
    try:
        return parse(
            "\\boxed{" + normalized + "}", parsing_timeout=_signal_timeout(timeout_seconds), raise_on_error=True
        )
    except TimeoutException:
        return _ParseFailure(f"math-verify parse timed out after {timeout_seconds} s", timed_out=True)
    except Exception as err:  # noqa: BLE001 - any failure inside sympy is an ungradable answer
        return _ParseFailure(f"math-verify parse failed: {type(err).__name__}: {err}"[:300], timed_out=False)


class Grader:
    """Grades predicted answers against expected ones and counts errors/timeouts in `stats`.

    `string_shortcut=False` skips the equal-strings fast path and the word/MCQ/literal string comparisons
    (everything goes through math-verify); the tests use it to see what math-verify alone does.
    """

    def __init__(self, timeout_seconds: int = DEFAULT_TIMEOUT_SECONDS, string_shortcut: bool = True) -> None:
        if int(timeout_seconds) < 1:
            raise ValueError("timeout_seconds must be a whole number of seconds >= 1 (math-verify uses signal.alarm)")
        self.timeout_seconds = int(timeout_seconds)
        self.string_shortcut = string_shortcut
        self.stats = GradingStats()

    def grade(self, predicted: str | None, expected: str) -> Grade:
        grade = self._grade(predicted, expected)
        self.stats.graded += 1
        if predicted is None:
            self.stats.no_answer += 1
        if grade.correct:
            self.stats.correct += 1
        if grade.error is not None:
            self.stats.errors += 1
            if "timed out" in grade.error:
                self.stats.timeouts += 1
            if len(self.stats.error_examples) < 20:
                self.stats.error_examples.append(f"{predicted!r} vs {expected!r}: {grade.error}")
        return grade

    def is_correct(self, predicted: str | None, expected: str) -> bool:
        return self.grade(predicted, expected).correct

    def _grade(self, predicted: str | None, expected: str) -> Grade:
        if predicted is None:
            return Grade(False)
        pred_norm = normalize_answer(predicted)
        gold_norm = normalize_answer(str(expected))
        if not pred_norm or not gold_norm:
            return Grade(False)
        if self.string_shortcut:
            if pred_norm == gold_norm:
                return Grade(True)
            if _MCQ.match(gold_norm) or _MCQ.match(pred_norm):
                # A letter is only equal to the same letter (already handled above).
                return Grade(False)
            # A word in a font wrapper on either side (`\\text{Evelyn}` vs `evelyn`) ignores case, as NeMo-Skills'
            # math_equal does through math-verify's text comparison.
            if _is_word_answer(str(expected), gold_norm) or _is_word_answer(predicted, pred_norm):
                return Grade(pred_norm.casefold() == gold_norm.casefold())
            if _is_literal(pred_norm) and _is_literal(gold_norm):
                return Grade(pred_norm.replace(" ", "") == gold_norm.replace(" ", ""))
        return self._verify(pred_norm, gold_norm)

    def _verify(self, pred_norm: str, gold_norm: str) -> Grade:
        from math_verify import verify
        from math_verify.errors import TimeoutException

        gold = _parse(gold_norm, self.timeout_seconds)
        pred = _parse(pred_norm, self.timeout_seconds)
        for parsed in (gold, pred):
            if isinstance(parsed, _ParseFailure):
                return Grade(False, parsed.message)
        # Pairwise so that one comparison that raises does not hide another that succeeds; an
        # error is reported only if no pair matched.
        error = None
        for g in gold:
            for p in pred:
                try:
                    if verify(g, p, timeout_seconds=_signal_timeout(self.timeout_seconds), raise_on_error=True):
                        return Grade(True)
                except TimeoutException:
                    error = f"math-verify comparison timed out after {self.timeout_seconds} s"
                except Exception as err:  # noqa: BLE001 - sympy can raise almost anything
                    error = f"math-verify comparison failed: {type(err).__name__}: {err}"[:300]
        return Grade(False, error)


_DEFAULT_GRADER = Grader()


def is_correct(predicted: str | None, expected: str) -> bool:
    """True if `predicted` (an extracted answer, or None) equals `expected`; errors count as incorrect.

    Uses a module-level Grader whose counts are in `default_stats()`; make your own Grader to count
    one run's errors separately.
    """
    return _DEFAULT_GRADER.is_correct(predicted, expected)


def default_stats() -> GradingStats:
    """Counts of the module-level grader behind `is_correct`."""
    return _DEFAULT_GRADER.stats


def grade_generation(
    generation: str | None,
    expected: str,
    grader: Grader | None = None,
    extract_from_boxed: bool = True,
    extract_regex: str = DEFAULT_EXTRACT_REGEX,
) -> dict[str, Any]:
    """Extract and grade one generation: {"predicted_answer", "is_correct", "grading_error"} for its row."""
    grader = grader or _DEFAULT_GRADER
    predicted = extract_answer(generation, extract_from_boxed, extract_regex)
    grade = grader.grade(predicted, expected)
    return {"predicted_answer": predicted, "is_correct": grade.correct, "grading_error": grade.error}
