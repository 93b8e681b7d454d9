"""Turn prepared SFT rows (input/output or messages) into token ids plus an assistant-only loss mask."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from sftflow.errors import SftflowError

# A row becomes a list of (text, is_loss) segments; each segment is tokenized on its own and the
# ids are concatenated. Splitting at the loss boundary (rather than tokenizing the whole text and
# mapping character offsets) means no token can straddle prompt and answer, and it is exactly how
# input/output rows are defined: tok(input) + tok(output).
Segments = list[tuple[str, bool]]

_SENTINEL = "\u2063SFTFLOW_ASSISTANT_TURN\u2063"


def row_segments(row: dict, where: str, tokenizer: Any = None, chat_template_kwargs: dict | None = None) -> Segments:
    """Split one prepared row into (text, is_loss) segments; `where` ("file:line") prefixes every error."""
    has_io = "input" in row or "output" in row
    has_messages = "messages" in row
    if has_io and has_messages:
        raise SftflowError(f"{where}: row has both 'messages' and 'input'/'output'; expected one shape")
    if has_messages:
        return _message_segments(row["messages"], where, tokenizer, chat_template_kwargs or {})
    if not has_io:
        keys = ", ".join(sorted(row)) or "none"
        raise SftflowError(
            f"{where}: row is neither an input/output row nor a messages row (keys: {keys}); "
            "expected the output of prepare_data"
        )
    inp, out = row.get("input"), row.get("output")
    if not isinstance(inp, str):
        raise SftflowError(f"{where}: 'input' must be a string, got {type(inp).__name__}")
    if not isinstance(out, str):
        raise SftflowError(f"{where}: 'output' must be a string, got {type(out).__name__}")
    if not out.strip():
        raise SftflowError(f"{where}: 'output' is empty (nothing to train on)")
    return [(inp, False), (out, True)]


def message_count(row: dict) -> int:
    """The chat messages of a row row_segments accepted: its messages, or 2 for an input/output row (prompt, answer)."""
    return len(row["messages"]) if "messages" in row else 2


def _render(tokenizer: Any, messages: list[dict], add_generation_prompt: bool, where: str, kwargs: dict) -> str:
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )
    except Exception as err:  # jinja errors (raise_exception in templates) surface as many types
        raise SftflowError(f"{where}: the chat template failed on this conversation ({err})") from None
    if not isinstance(text, str):
        raise SftflowError(f"{where}: the chat template did not render to text")
    return text


def _message_segments(messages: Any, where: str, tokenizer: Any, kwargs: dict) -> Segments:
    if not isinstance(messages, list) or not messages:
        raise SftflowError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise SftflowError(f"{where}: messages[{k}] must be an object with string 'role' and 'content'")
    assistant = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant:
        raise SftflowError(f"{where}: 'messages' has no assistant message (nothing to train on)")
    for k in assistant:
        if not messages[k]["content"].strip():
            raise SftflowError(f"{where}: messages[{k}] (assistant) has empty content")
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise SftflowError(
            f"{where}: messages rows need a tokenizer with a chat template (set model.chat_template or use "
            "prepare_data.output_format: input_output)"
        )
    # What an assistant turn contributes is the text between "conversation so far + generation
    # prompt" and "conversation including this turn": its content plus the template's end-of-turn
    # text. That only works for templates whose renders of growing prefixes are prefixes of the
    # full render; templates that rewrite earlier turns (e.g. strip old reasoning) are refused.
    full = _render(tokenizer, messages, False, where, kwargs)
    segments: Segments = []
    cursor = 0
    for k in assistant:
        before = _render(tokenizer, messages[:k], True, where, kwargs) if k else None
        upto = _render(tokenizer, messages[: k + 1], False, where, kwargs)
        if k == 0:
            # No earlier turns (and templates may not render an empty conversation): the prefix is
            # whatever the template writes before a lone assistant turn's content, found with a
            # sentinel content so that no coincidence with the template's own text can mislead.
            probe = _render(tokenizer, [{"role": "assistant", "content": _SENTINEL}], False, where, kwargs)
            before = probe.split(_SENTINEL, 1)[0] if _SENTINEL in probe else None
        if before is None or not upto.startswith(before) or not full.startswith(upto) or len(before) < cursor:
            raise SftflowError(
                f"{where}: the chat template does not render messages[{k}] (assistant) as an extension of the "
                "conversation before it, so its tokens cannot be located; use input_output rows instead"
            )
        span = upto[len(before) :]
        if messages[k]["content"].strip() not in span:
            raise SftflowError(f"{where}: the chat template dropped the content of messages[{k}] (assistant)")
        segments.append((full[cursor : len(before)], False))
        segments.append((span, True))
        cursor = len(upto)
    segments.append((full[cursor:], False))
    return [(text, loss) for text, loss in segments if text]


def encode_texts(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """`tokenizer(texts, add_special_tokens=False)["input_ids"]`, straight from the Rust tokenizer when there is one.

    A fast tokenizer's call builds a BatchEncoding around the same `encode_batch` (about 7% of the time
    on SFT rows); this sets the backend up as that call does (no truncation, no padding, the
    tokenizer's split_special_tokens) and keeps only the ids.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    if backend.truncation is not None:
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()
    split_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
    if backend.encode_special_tokens != split_special_tokens:
        backend.encode_special_tokens = split_special_tokens
    return [encoding.ids for encoding in backend.encode_batch(texts, add_special_tokens=False)]


def tokenize_flat(tokenizer: Any, rows_segments: list[Segments]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokenize a batch of rows' segments in one tokenizer call: (ids int32, loss_mask uint8, row_lengths int64).

    The rows' ids are back to back in one array (row j at row_lengths[:j].sum()), built with a few
    array operations for the whole batch rather than a few per row.
    """
    texts = [text for segs in rows_segments for text, _ in segs]
    encoded = encode_texts(tokenizer, texts) if texts else []
    segment_lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    num_tokens = int(segment_lengths.sum())
    ids = np.fromiter(itertools.chain.from_iterable(encoded), dtype=np.int32, count=num_tokens)
    is_loss = np.fromiter((loss for segs in rows_segments for _, loss in segs), dtype=np.uint8, count=len(texts))
    segment_row = np.repeat(np.arange(len(rows_segments)), [len(segs) for segs in rows_segments])
    row_lengths = np.bincount(segment_row, weights=segment_lengths, minlength=len(rows_segments))
    return ids, np.repeat(is_loss, segment_lengths), row_lengths.astype(np.int64)


def tokenize_segments(tokenizer: Any, rows_segments: list[Segments]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Tokenize a batch of rows' segments in one tokenizer call; yield (ids int32, loss_mask uint8) per row."""
    ids, mask, row_lengths = tokenize_flat(tokenizer, rows_segments)
    ends = np.cumsum(row_lengths)
    for start, end in zip((ends - row_lengths).tolist(), ends.tolist(), strict=True):
        yield ids[start:end], mask[start:end]


def tokenize_rows(
    tokenizer: Any, rows: Iterable[tuple[str, dict]], chat_template_kwargs: dict | None = None, batch_size: int = 1024
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Yield (where, ids, loss_mask) for each (where, row), tokenizing in batches for speed."""
    batch: list[tuple[str, Segments]] = []
    for where, row in rows:
        batch.append((where, row_segments(row, where, tokenizer, chat_template_kwargs)))
        if len(batch) >= batch_size:
            yield from _flush(tokenizer, batch)
            batch = []
    if batch:
        yield from _flush(tokenizer, batch)


def _flush(tokenizer: Any, batch: list[tuple[str, Segments]]) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    for (where, _), (ids, mask) in zip(batch, tokenize_segments(tokenizer, [s for _, s in batch]), strict=True):
        yield where, ids, mask
