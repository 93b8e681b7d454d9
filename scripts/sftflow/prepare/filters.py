"""Row filters of data preparation. Each takes a row, returns the (possibly modified) row or None to drop it.

The filters mirror NeMo-Skills' math_sft.yaml semantics; each is switched on in `filters:` of the config.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache

from sftflow.mathtext import find_boxed, normalize_problem
from sftflow.prepare.equations import find_equations
from sftflow.prepare.exact_arithmetic import equation_is_correct, split_equation

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


_MISSING = object()


class TextMemo:
    """Results of a pure function of a solution text, kept for texts seen again: the same solution may recur across
    seeds and problems. Bounded by the characters it holds; when full it starts afresh (results never change).

    Where texts do not recur (real generations are nearly all distinct) the memo only costs: when fewer than 1 in
    64 of a window of lookups hit, it stops looking up and storing for the next PAUSE calls, then tries again."""

    WINDOW = 1 << 15
    PAUSE = 1 << 19

    def __init__(self, fn: Callable[[str], object], max_chars: int = 16 << 20):
        self.fn = fn
        self.max_chars = max_chars
        self.results: dict[str, object] = {}
        self.chars = 0
        self.calls = self.misses = self.paused = 0

    def __call__(self, text: str):
        if self.paused:
            self.paused -= 1
            return self.fn(text)
        result = self.results.get(text, _MISSING)  # not try/except: a miss, the common case, would raise
        if result is _MISSING:
            result = self.fn(text)
            self.misses += 1
            self.chars += len(text)
            if self.chars > self.max_chars:
                self.results.clear()
                self.chars = len(text)
            self.results[text] = result
        self.calls += 1
        if self.calls == self.WINDOW:
            if self.calls - self.misses < self.WINDOW // 64:
                self.paused = self.PAUSE
                self.results.clear()
                self.chars = 0
            self.calls = self.misses = 0
        return result


class TextFilter:
    """A row filter that is a pure function of row[key]: `fn(text)` is the new text, or None to drop the row.
    `note`, if given, is (name, predicate): rows whose text satisfies the predicate are counted in `notes[name]`.

    Being pure is what lets the pipeline run consecutive text filters as one TextChain."""

    def __init__(
        self,
        key: str,
        fn: Callable[[str], str | None],
        note: tuple[str, Callable[[str], bool]] | None = None,
        notes: dict | None = None,
    ):
        self.key = key
        self.fn = fn
        self.note = note
        self.notes = notes
        self.memo = TextMemo(lambda text: (fn(text), note is not None and note[1](text)))

    def __call__(self, row: dict) -> dict | None:
        text, noted = self.memo(row[self.key])
        if noted:
            self.notes[self.note[0]] = self.notes.get(self.note[0], 0) + 1
        if text is None:
            return None
        row[self.key] = text
        return row


def text_filter(key: str, fn: Callable[[str], str | None]) -> TextFilter:
    """A row filter from a pure function of row[key] (the new text, or None to drop), memoised per text."""
    return TextFilter(key, fn)


class TextChain:
    """Consecutive RowFilters whose functions are TextFilters of one field, run as one memoised function of the
    text: a row costs one lookup instead of one call per stage. Each distinct outcome (where the text was
    dropped, which stages changed it, which notes it counted) gets a number; rows are tallied per outcome, and
    `settle` turns the tallies into every stage's counters exactly as if the stages had run one by one."""

    def __init__(self, stages: list[RowFilter]):
        self.stages = stages
        self.key = stages[0].key
        self.memo = TextMemo(self._run)
        self._functions = [(i, stage.fn.fn, stage.fn.note) for i, stage in enumerate(stages)]
        self.outcomes: list[tuple] = []  # (index of the stage that dropped the text or None, modified, notes)
        self._outcome_ids: dict[tuple, int] = {}
        self.tally: list[int] = []

    def _run(self, text: str) -> tuple[str | None, int]:
        modified = notes = ()  # tuples: most texts leave both empty, and () costs no allocation
        dropped_at = None
        for i, fn, note in self._functions:
            new = fn(text)
            if note is not None and note[1](text):
                notes += ((i, note[0]),)
            if new is None:
                dropped_at = i
                break
            if new is not text and new != text:
                modified += (i,)
            text = new
        outcome = (dropped_at, modified, notes)
        number = self._outcome_ids.get(outcome)
        if number is None:
            number = self._outcome_ids[outcome] = len(self.outcomes)
            self.outcomes.append(outcome)
            self.tally.append(0)
        return (None if dropped_at is not None else text), number

    def __call__(self, row: dict) -> dict | None:
        text, outcome = self.memo(row[self.key])
        self.tally[outcome] += 1
        if text is None:
            return None
        row[self.key] = text
        return row

    def settle(self) -> None:
        """Add the rows tallied since the last call to the stages' counters."""
        for outcome, rows in enumerate(self.tally):
            if not rows:
                continue
            dropped_at, modified, notes = self.outcomes[outcome]
            reached = self.stages if dropped_at is None else self.stages[: dropped_at + 1]
            for stage in reached:
                stage.rows_in += rows
            if dropped_at is not None:
                self.stages[dropped_at].dropped += rows
            for i in modified:
                self.stages[i].modified += rows
            for i, note in notes:
                self.stages[i].notes[note] = self.stages[i].notes.get(note, 0) + rows
            self.tally[outcome] = 0


def chain_text_filters(filters: list[RowFilter]) -> list:
    """The steps that run `filters` in order: each run of consecutive TextFilters of one field becomes a
    TextChain, every other filter stays as it is."""
    runs: list = []  # a RowFilter, or a list of consecutive TextFilter stages of one field
    for stage in filters:
        if not isinstance(stage.fn, TextFilter):
            runs.append(stage)
        elif runs and isinstance(runs[-1], list) and runs[-1][0].key == stage.key:
            runs[-1].append(stage)
        else:
            runs.append([stage])
    return [TextChain(run) if isinstance(run, list) else run for run in runs]


def drop_multi_boxed(key: str) -> TextFilter:
    return text_filter(key, lambda text: None if len(find_boxed(text)) > 1 else text)


def drop_if_contains(key: str, markers: Iterable[str]) -> TextFilter:
    markers = tuple(markers)  # `in` per marker: str.find's fast search beats one regex alternation
    shared = os.path.commonprefix(markers)  # a text without it holds none of them ("Let's " before each)

    def fn(text: str) -> str | None:
        if shared and shared not in text:
            return text
        for marker in markers:
            if marker in text:
                return None
        return text

    return text_filter(key, fn)


def drop_unless_contains_all(key: str, markers: Iterable[str]) -> TextFilter:
    markers = tuple(markers)
    return text_filter(key, lambda text: text if all(m in text for m in markers) else None)


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


def trim_prefix(key: str, prefix: str) -> TextFilter:
    return text_filter(key, lambda text: text[len(prefix) :] if prefix and text.startswith(prefix) else text)


def trim_after_last_boxed(text: str) -> str:
    """Cut `text` at the end of the line that holds the end of its last \\boxed{}."""
    spans = find_boxed(text)
    if not spans:
        return text
    newline = text.find("\n", spans[-1][1])
    return text if newline < 0 else text[:newline]


def trim_solutions(key: str, counter: dict) -> TextFilter:
    return TextFilter(key, trim_after_last_boxed, ("kept_without_boxed", lambda text: not find_boxed(text)), counter)


@lru_cache(maxsize=8)  # drop_incorrect_arithmetic and split_arithmetic look at the same text in turn
def _equations(text: str) -> list[tuple[int, int, bool, int]]:
    """(start, end, alone, operations) of the plain arithmetic equations in `text` (see equations.py for what counts)."""
    return find_equations(text)


def drop_incorrect_arithmetic(key: str, rel_tol: float) -> TextFilter:
    """Drop a row with a wrong equation; equations not parsed exactly (see equations.py) are never held against it."""

    def check(text: str) -> str | None:
        for start, end, _alone, _operations in _equations(text):
            if equation_is_correct(text[start:end], rel_tol) is False:
                return None
        return text

    return text_filter(key, check)


def split_arithmetic(key: str) -> TextFilter:
    """Replace each correct equation by its step-by-step expansion; all other text stays byte for byte.

    Only an equation written alone ("x = 1 + 2 + 3 = 6") is expanded: a chain the author already wrote in steps
    ("AB^2 = 36 + 25 + 30 = 91") is left as it is, as NeMo-Skills' SplitArithmetic does.
    """

    def split(text: str) -> str:
        pieces, last = [], 0
        for start, end, alone, operations in _equations(text):
            # one operation leaves nothing to expand (split_equation answers None)
            expanded = split_equation(text[start:end]) if alone and operations > 1 else None
            if expanded is not None:
                pieces += [text[last:start], expanded]
                last = end
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
