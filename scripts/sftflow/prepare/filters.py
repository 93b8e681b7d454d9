"""Row filters of data preparation. Each takes a row, returns the (possibly modified) row or None to drop it.

The filters mirror NeMo-Skills' math_sft.yaml semantics; each is switched on in `filters:` of the config.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache

from sftflow.mathtext import find_boxed, normalize_problem
from sftflow.prepare import arithmetic

CODE_ERROR_MARKERS = ("Traceback (most recent call last)", "<output cut>", "Timed out", "SyntaxError")
MATPLOTLIB_MARKERS = ("from matplotlib", "import matplotlib")
VERIFICATION_MARKERS = (
    "Let's verify this with Python",
    "Let's verify this using Python",
    "Let's confirm this with Python",
    "Let's use Python to plot",
    "Let's verify this solution using Python",
    "Let's use Python to verify",
    "Let's confirm this result with some Python",
)
THINK_END = "</think>"  # remove_no_think_tags needs only the end: templates often put <think> in the prompt


@dataclass
class RowFilter:
    """A named per-row step with its counters; `fn` returns the new row or None (drop)."""

    name: str
    fn: Callable[[dict], dict | None]
    key: str  # the field this filter may rewrite; a changed value counts as "modified"
    rows_in: int = 0
    dropped: int = 0
    modified: int = 0
    notes: dict = field(default_factory=dict)  # extra counters, e.g. rows kept for lack of a field
    info: dict = field(default_factory=dict)  # fixed facts about the stage, e.g. its contamination file

    def __call__(self, row: dict) -> dict | None:
        self.rows_in += 1
        before = row[self.key]
        out = self.fn(row)
        if out is None:
            self.dropped += 1
        elif out[self.key] != before:
            self.modified += 1
        return out

    def take_counts(self) -> tuple:
        """Counters since the last call (a worker process sends these back per chunk), then reset."""
        counts = (self.rows_in, self.dropped, self.modified, dict(self.notes))
        self.rows_in = self.dropped = self.modified = 0
        self.notes.clear()
        return counts

    def add_counts(self, counts: tuple) -> None:
        rows_in, dropped, modified, notes = counts
        self.rows_in += rows_in
        self.dropped += dropped
        self.modified += modified
        for k, v in notes.items():
            self.notes[k] = self.notes.get(k, 0) + v

    def stats(self) -> dict:
        result = {"stage": self.name, "rows_in": self.rows_in, "dropped": self.dropped, "modified": self.modified}
        result.update(self.info)
        result.update(self.notes)
        return result


class TextMemo:
    """Results of a pure function of a solution text, kept for texts seen again: the same solution recurs across
    seeds and problems. Bounded by the characters it holds; when full it starts afresh (results never change)."""

    def __init__(self, fn: Callable[[str], object], max_chars: int = 16 << 20):
        self.fn = fn
        self.max_chars = max_chars
        self.results: dict[str, object] = {}
        self.chars = 0

    def __call__(self, text: str):
        try:
            return self.results[text]
        except KeyError:
            pass
        result = self.fn(text)
        self.chars += len(text)
        if self.chars > self.max_chars:
            self.results.clear()
            self.chars = len(text)
        self.results[text] = result
        return result


def text_filter(key: str, fn: Callable[[str], str | None]) -> Callable[[dict], dict | None]:
    """A row filter from a pure function of row[key] (the new text, or None to drop), memoised per text."""
    memo = TextMemo(fn)

    def row_fn(row: dict) -> dict | None:
        text = memo(row[key])
        if text is None:
            return None
        row[key] = text
        return row

    return row_fn


def drop_multi_boxed(key: str) -> Callable[[dict], dict | None]:
    return text_filter(key, lambda text: None if len(find_boxed(text)) > 1 else text)


def drop_if_contains(key: str, markers: Iterable[str]) -> Callable[[dict], dict | None]:
    markers = tuple(markers)  # `in` per marker: str.find's fast search beats one regex alternation

    def fn(row: dict) -> dict | None:
        text = row[key]
        for marker in markers:
            if marker in text:
                return None
        return row

    return fn


def drop_unless_contains_all(key: str, markers: Iterable[str]) -> Callable[[dict], dict | None]:
    markers = tuple(markers)
    return lambda row: row if all(m in row[key] for m in markers) else None


def remove_contaminated(key: str, contaminated: set[str]) -> Callable[[dict], dict | None]:
    """`contaminated` holds normalize_problem() forms, so copies differing in case/spacing/punctuation match."""
    return lambda row: None if normalize_problem(row[key]) in contaminated else row


def majority_filter(min_votes: int, min_fraction: float, counter: dict) -> Callable[[dict], dict | None]:
    def fn(row: dict) -> dict | None:
        votes, total = row.get("majority_votes"), row.get("total_votes")
        if votes is None or total is None:
            counter["kept_without_vote_fields"] = counter.get("kept_without_vote_fields", 0) + 1
            return row
        if votes < min_votes or votes < total * min_fraction:
            return None
        return row

    return fn


def trim_prefix(key: str, prefix: str) -> Callable[[dict], dict | None]:
    def fn(row: dict) -> dict:
        if prefix and row[key].startswith(prefix):
            row[key] = row[key][len(prefix) :]
        return row

    return fn


def trim_after_last_boxed(text: str) -> str:
    """Cut `text` at the end of the line that holds the end of its last \\boxed{}."""
    spans = find_boxed(text)
    if not spans:
        return text
    newline = text.find("\n", spans[-1][1])
    return text if newline < 0 else text[:newline]


def trim_solutions(key: str, counter: dict) -> Callable[[dict], dict | None]:
    def trim(text: str) -> tuple[str, bool]:
        return trim_after_last_boxed(text), not find_boxed(text)

    memo = TextMemo(trim)

    def fn(row: dict) -> dict:
        row[key], without_boxed = memo(row[key])
        if without_boxed:
            counter["kept_without_boxed"] = counter.get("kept_without_boxed", 0) + 1
        return row

    return fn


@lru_cache(maxsize=8)  # drop_incorrect_arithmetic and split_arithmetic look at the same text in turn
def _equations(text: str) -> list[arithmetic.Equation]:
    """The plain arithmetic equations in `text` (see arithmetic.py for what counts)."""
    return arithmetic.find_equations(text)


def drop_incorrect_arithmetic(key: str, rel_tol: float) -> Callable[[dict], dict | None]:
    """Drop a row with a wrong equation; equations not parsed exactly (see arithmetic.py) are never held against it."""

    def check(text: str) -> str | None:
        for eq in _equations(text):
            if arithmetic.equation_is_correct(text[eq.start : eq.end], rel_tol) is False:
                return None
        return text

    return text_filter(key, check)


def split_arithmetic(key: str) -> Callable[[dict], dict | None]:
    """Replace each correct equation by its step-by-step expansion; all other text stays byte for byte.

    Only an equation written alone ("x = 1 + 2 + 3 = 6") is expanded: a chain the author already wrote in steps
    ("AB^2 = 36 + 25 + 30 = 91") is left as it is, as NeMo-Skills' SplitArithmetic does.
    """

    def split(text: str) -> str:
        pieces, last = [], 0
        for eq in _equations(text):
            expanded = arithmetic.split_equation(text[eq.start : eq.end]) if eq.alone else None
            if expanded is not None:
                pieces += [text[last : eq.start], expanded]
                last = eq.end
        return "".join(pieces) + text[last:] if pieces else text

    return text_filter(key, split)


def code_text_choice(samples: list[dict], key: str, code_begin: str, mode: str) -> list[dict]:
    """Choose between code and text solutions of one problem (NeMo-Skills' CodeTextFilter modes)."""
    return [samples[i] for i in code_text_picks([code_begin in s[key] for s in samples], mode)]


def code_text_picks(has_code: list[bool], mode: str) -> list[int]:
    """code_text_choice on the samples' has-code flags: the indices of the samples kept, in the order kept."""
    code = [i for i, flag in enumerate(has_code) if flag]
    text = [i for i, flag in enumerate(has_code) if not flag]
    half = len(has_code) // 2
    if mode == "all":
        return code
    if mode == "majority_code":
        return code + (text if len(code) <= half else [])
    if mode == "majority_text":
        return code if len(code) > half else text
    if mode == "any_code":
        return code if code else text
    raise ValueError(f"unknown code_text_filter mode {mode!r}")
