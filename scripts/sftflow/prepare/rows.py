"""The work on one block of input lines, in a worker process: parse each row, check it, select it by its label, run
the filters, and format the rows kept into NeMo-Skills' JSON records."""

from __future__ import annotations

import io
import json
import os
import re
from array import array
from dataclasses import dataclass, field

from sftflow.errors import SftflowError
from sftflow.io import parse_json_object
from sftflow.prepare import digests as D
from sftflow.prepare import filters as F
from sftflow.prepare.filter_table import build_row_filters
from sftflow.prepare.formatting import Formatter, load_tokenizer
from sftflow.prepare.prompts import load_prompt_config
from sftflow.prepare.settings import PrepareConfig

LABELS = ("correct", "incorrect", "unlabeled")
SELECTION_KEYS = tuple(f"{label}_{what}" for label in LABELS for what in ("seen", "kept"))
# Digests a worker remembers of the rows it sent (~16 bytes each), to skip formatting sure duplicates; when
# full it forgets them all, and a repeated row is formatted again and dropped when the output is ordered instead.
EMITTED_MAX = 1 << 20
_JUDGEMENT = re.compile(r"judge?ment\s*:\s*\**\s*(yes|no)\b", re.IGNORECASE)


@dataclass(frozen=True)
class Block:
    """Lines of an input file: `size` bytes at `offset`, ending at a line end; the first is line `first_line`."""

    path: str
    offset: int
    size: int
    first_line: int


@dataclass
class BlockResult:
    """What a block gave: counters, and the rows kept as Spool.add_block's arguments (records joined, each one's
    length, (problem digest, row digest) keys joined, has-code flags)."""

    rows_read: int
    selection: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SELECTION_KEYS, 0))
    invalid: list[str] = field(default_factory=list)  # "file:line: reason"
    filters: list[tuple] = field(default_factory=list)  # each row filter's RowFilter.take_counts()
    lengths_filtered: list[tuple[int, int, int]] = field(default_factory=list)  # each LengthStage's counts
    repeats: int = 0  # rows this process had sent before: sure duplicates, not formatted
    records: bytes = b""
    lengths: array = field(default_factory=lambda: array("q"))
    keys: bytes = b""
    has_code: bytes = b""


@dataclass
class LengthStage:
    """A token-length filter (remove_len_outlier_problems / _solutions) with its counters since the last block."""

    stage: str
    field: str
    min: int | None
    max: int | None
    chars_for_min: bool  # NeMo-Skills: the solutions' minimum may count characters (use_chars_for_min_length)
    rows_in: int = 0
    dropped_too_short: int = 0
    dropped_too_long: int = 0

    def apply(self, rows: list[dict], tokenizer) -> list[dict]:
        self.rows_in += len(rows)
        texts = [row[self.field] for row in rows]
        counts = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        kept = []
        for row, tokens, text in zip(rows, counts, texts):
            short_len = len(text) if self.chars_for_min else tokens
            if self.min is not None and short_len < self.min:
                self.dropped_too_short += 1
            elif self.max is not None and tokens > self.max:
                self.dropped_too_long += 1
            else:
                kept.append(row)
        return kept

    def take_counts(self) -> tuple[int, int, int]:
        counts = (self.rows_in, self.dropped_too_short, self.dropped_too_long)
        self.rows_in = self.dropped_too_short = self.dropped_too_long = 0
        return counts


def length_stages(cfg: PrepareConfig, tokenizer) -> list[LengthStage]:
    stages = []
    for what, field_name, flag in (
        ("problem", cfg.input_key, "remove_len_outlier_problems"),
        ("solution", cfg.output_key, "remove_len_outlier_solutions"),
    ):
        if cfg.filters[flag]:
            if tokenizer is None:
                raise SftflowError(
                    f"filters.{flag} counts tokens and needs a tokenizer: set ++tokenizer=<path or hub name>"
                )
            lo, hi = getattr(cfg, f"min_{what}_length"), getattr(cfg, f"max_{what}_length")
            chars = cfg.use_chars_for_min_length and what == "solution"
            stages.append(LengthStage(flag, field_name, lo, hi, chars))
    return stages


class InvalidRow(Exception):
    """A row that cannot be used, and why (the user's error, named by file and line)."""


def is_correct_judgement(judgement) -> bool | None:
    if isinstance(judgement, bool):
        return judgement
    if not isinstance(judgement, str):
        return None
    found = _JUDGEMENT.findall(judgement)
    return found[-1].lower() == "yes" if found else None


class RowProcessor:
    """The filters, tokenizer and formatter of a run, set up once (and inherited by forked workers); process_block
    runs them on the rows of a block."""

    def __init__(self, cfg: PrepareConfig):
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.tokenizer, cfg.chat_template) if cfg.tokenizer else None
        self.formatter = Formatter(
            load_prompt_config(cfg.prompt_config, cfg.input_key),
            self.tokenizer,
            system_message=cfg.system_message,
            chat_template_kwargs=cfg.chat_template_kwargs,
            output_format=cfg.output_format,
            assistant_end=cfg.assistant_end,
        )
        self.filters, self.skipped_stages = build_row_filters(cfg)
        # What runs per row: the filters, with consecutive pure text filters joined into one memoised step.
        self.steps = F.chain_text_filters(self.filters)
        self.length_stages = length_stages(cfg, self.tokenizer)
        self.wanted = {label: getattr(cfg, f"add_{label}") for label in LABELS}
        self._emitted = D.SentDigests(EMITTED_MAX)  # digests of the rows this process has formatted and sent

    def process_block(self, block: Block) -> BlockResult:
        """Read, parse, check, select, filter and format the rows of one block."""
        with open(block.path, "rb") as f:
            data = os.pread(f.fileno(), block.size, block.offset)
        if len(data) != block.size:
            raise SftflowError(f"{block.path}: the file changed while it was read (rerun prepare_data)")
        lines = [(n, raw) for n, raw in enumerate(io.BytesIO(data), start=block.first_line) if not raw.isspace()]
        result = BlockResult(rows_read=len(lines))
        rows = self._select_and_filter(block.path, lines, result)
        for stage in self.length_stages:
            if rows:
                rows = stage.apply(rows, self.tokenizer)
        self._emit(rows, result)
        for step in self.steps:
            if isinstance(step, F.TextChain):
                step.settle()
        result.filters = [stage.take_counts() for stage in self.filters]
        result.lengths_filtered = [stage.take_counts() for stage in self.length_stages]
        return result

    def _select_and_filter(self, path: str, lines: list[tuple[int, bytes]], result: BlockResult) -> list[dict]:
        """The rows of `lines` that are valid, selected and kept by the filters, each with its "__where"."""
        selection, wanted, steps = result.selection, self.wanted, self.steps
        kept = []
        for line_number, raw in lines:
            where = f"{path}:{line_number}"
            try:
                row = self._parse(raw)
                label = self._label(row)
            except InvalidRow as err:
                if not self.cfg.skip_invalid_rows:
                    raise SftflowError(f"{where}: {err}") from None
                result.invalid.append(f"{where}: {err}")
                continue
            selection[label + "_seen"] += 1
            if not wanted[label]:
                continue
            selection[label + "_kept"] += 1
            row["__where"] = where
            for step in steps:
                row = step(row)
                if row is None:
                    break
            else:
                kept.append(row)
        return kept

    def _parse(self, raw: bytes) -> dict:
        """The JSON object of a line, with string input and output fields."""
        row, reason = parse_json_object(raw)
        if reason is not None:
            raise InvalidRow(reason)
        for key in (self.cfg.input_key, self.cfg.output_key):
            value = row.get(key)
            if type(value) is not str:
                if key not in row:
                    fields = ", ".join(sorted(row)) or "none"
                    raise InvalidRow(f"row has no field '{key}' (fields: {fields}); set input_key/output_key")
                raise InvalidRow(f"field '{key}' should be a string, got {type(value).__name__}")
        return row

    def _label(self, row: dict) -> str:
        """'correct' / 'incorrect' / 'unlabeled': from the judgement (use_judgement), else from the first of
        symbolic_correct / is_correct that is set."""
        if self.cfg.use_judgement:
            judgement = row.get("judgement")
            if judgement is None:
                return "unlabeled"
            verdict = is_correct_judgement(judgement)
            if verdict is None:
                raise InvalidRow(f"field 'judgement' has no 'Judgement: Yes/No' verdict: {str(judgement)[:80]!r}")
            return "correct" if verdict else "incorrect"
        for key in ("symbolic_correct", "is_correct"):
            value = row.get(key)
            if value is True:
                return "correct"
            if value is False:
                return "incorrect"
            if value is not None:
                raise InvalidRow(f"field '{key}' should be true/false, got {type(value).__name__} {value!r}")
        return "unlabeled"

    def _emit(self, rows: list[dict], result: BlockResult) -> None:
        """Format `rows` into `result`; count in result.repeats (and do not format) the rows this process has sent
        before."""
        input_key, output_key, code_begin = self.cfg.input_key, self.cfg.output_key, self.cfg.code_begin
        problems = [D.problem_digest(row[input_key].encode()) for row in rows]
        digests, sent_before = [D.NO_DIGEST] * len(rows), [False] * len(rows)
        if self.cfg.deduplicate:
            digests = [D.row_digest(p, row[output_key].encode()) for p, row in zip(problems, rows)]
            sent_before = self._emitted.add(digests)
        records, keys, has_code = [], [], []
        for row, problem, digest, repeat in zip(rows, problems, digests, sent_before):
            if repeat:
                # This process already sent this (problem, solution) in an earlier row, which is kept first: this
                # one is a sure duplicate, so it is not formatted at all.
                continue
            has_code.append(code_begin in row[output_key])  # for code_text_filter
            keys.append(problem + digest)
            # json.dumps' text, as NeMo-Skills writes its rows: the same settings give a byte-identical file
            records.append(json.dumps(self.to_record(row)).encode("ascii") + b"\n")
        result.repeats = len(rows) - len(records)
        result.records = b"".join(records)
        result.lengths = array("q", map(len, records))
        result.keys = b"".join(keys)
        result.has_code = bytes(has_code)

    def to_record(self, row: dict) -> dict:
        """The output record of a kept row: NeMo-Skills' keys, in its order and with its types."""
        cfg = self.cfg
        where = row.pop("__where")
        solution = row[cfg.output_key]
        reasoning = row.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise SftflowError(f"{where}: field 'reasoning_content' should be a string, got {type(reasoning).__name__}")
        # Bundled prompt configs say {problem}; with another input_key that field still fills it.
        fields = row if "problem" in row else {**row, "problem": row[cfg.input_key]}
        formatted = self.formatter.record(fields, solution, where + ": ", reasoning or None)
        # expected_answer (always a string) first, then input and output.
        record = {}
        if "expected_answer" in row:
            record["expected_answer"] = str(row["expected_answer"])
        record.update(formatted)
        if not cfg.exclude_optional_keys:
            for k, v in row.items():
                record.setdefault(k, v)
        if cfg.metadata:
            record.update(cfg.metadata)
        return record
