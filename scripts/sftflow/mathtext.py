"""Text utilities for math solutions: \\boxed{} extraction with balanced braces, problem normalisation."""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_FLAT_CONTENT = re.compile(r"[^{}\\]*\}")  # content without braces or escapes: no need to count depth


def _find_boxed(text: str) -> list[tuple[int, int, str]]:
    """All \\boxed{...} spans as (start, end, content), braces balanced; an unclosed one is ignored."""
    spans = []
    for match in _BOXED.finditer(text):
        flat = _FLAT_CONTENT.match(text, match.end())
        if flat:
            spans.append((match.start(), flat.end(), text[match.end() : flat.end() - 1]))
            continue
        depth, i = 1, match.end()
        while i < len(text) and depth:
            ch = text[i]
            if ch == "\\" and i + 1 < len(text):
                i += 2
                continue
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            i += 1
        if depth == 0:
            spans.append((match.start(), i, text[match.end() : i - 1]))
    return spans


# Several filters in a row ask about the same solution text, hence the cache.
find_boxed = lru_cache(maxsize=8)(_find_boxed)


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{} in `text`, or None."""
    spans = find_boxed(text)
    return spans[-1][2] if spans else None


# Sentence punctuation carries no meaning for matching copies; math symbols (+ - * / = ^ < > ( ) ...) do,
# so they are kept, as separate tokens. A '.' or ',' between digits is part of a number.
_SENTENCE_PUNCT = re.compile(r"[!?;:\"'`\u2018\u2019\u201c\u201d]|(?<!\d)[.,]|[.,](?!\d)")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_SYMBOL = re.compile(r"([^\w\s.,])")
_SPACE = re.compile(r"\s+")


def normalize_problem(text: str) -> str:
    """Case-, whitespace- and sentence-punctuation-insensitive form of a problem, for matching copies.

    'What is 47 + 86?' and 'WHAT  IS 47+86' match; 'What is 47 - 86?' does not.
    """
    text = unicodedata.normalize("NFKC", text).lower()
    text = _THOUSANDS.sub("", text)
    text = _SENTENCE_PUNCT.sub(" ", text)
    text = _SYMBOL.sub(r" \1 ", text)
    return _SPACE.sub(" ", text).strip()
