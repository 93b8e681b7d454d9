"""The data preparation run: read generation files, select, filter, deduplicate, downsample, format, write.

Rows stream through in chunks, and the formatted records wait in a spool on disk until their order is known
(sftflow.prepare.spool): memory grows by a few bytes per row, not with the rows' text.
"""

from __future__ import annotations

import functools
import glob
import io
import json
import logging
import multiprocessing
import os
import random
import re
import time
from array import array
from json.encoder import encode_basestring_ascii as quote_json
from pathlib import Path

import numpy as np
from orjson import JSONDecodeError
from orjson import loads as loads_json

from sftflow import native
from sftflow.errors import SftflowError
from sftflow.io import atomic_path, check_input_file, iter_jsonl, parse_json_object, write_json
from sftflow.mathtext import normalize_problem
from sftflow.packing.stream import available_cpus
from sftflow.prepare import digests as D
from sftflow.prepare import filters as F
from sftflow.prepare import spool as S
from sftflow.prepare.formatting import Formatter, load_tokenizer
from sftflow.prepare.prompts import load_prompt_config

LOG = logging.getLogger("sftflow.prepare")
# Input bytes per chunk of work, cut at a line boundary: ~4096 rows of a few hundred bytes, enough chunks to balance
# the workers' load. A worker reads its chunk from the file itself: the main process only finds where lines end.
CHUNK_BYTES = 2 << 20
PARALLEL_MIN_BYTES = 32 << 20  # below this, starting worker processes costs more than it saves
LENGTH_COUNTERS = ("rows_in", "dropped_too_short", "dropped_too_long")
SELECTION_KEYS = tuple(f"{k}_{w}" for k in ("correct", "incorrect", "unlabeled") for w in ("seen", "kept"))
_WORKER: Preparer | None = None


def _work_in_worker(task):
    return _WORKER.process_chunk(*task)


def _next_block(fd: int, offset: int, end: int, buffer: bytearray) -> tuple[int, int]:
    """The size of the block of the file `fd` (`end` bytes) at `offset`: about CHUNK_BYTES, up to a line end or the
    end of the file; and the line ends in it. Read into `buffer` (CHUNK_BYTES), only to find and count line ends."""
    size = 0
    while True:
        read = os.preadv(fd, [buffer], offset + size)
        if not read:
            return size, 0  # the file got shorter: the worker reading the block says so
        # The rest of the file, or up to the last line end read; counted by numpy, faster than bytearray.count.
        cut = read if offset + size + read >= end else buffer.rfind(b"\n", 0, read) + 1
        if cut:
            return size + cut, int(np.count_nonzero(np.frombuffer(buffer, dtype=np.uint8, count=cut) == ord("\n")))
        size += read  # a line longer than CHUNK_BYTES: read on


MAX_EXAMPLES = 20
_JUDGEMENT = re.compile(r"judge?ment\s*:\s*\**\s*(yes|no)\b", re.IGNORECASE)


def _float_like_json(value: float) -> str:
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "Infinity" if value > 0 else "-Infinity"
    return float.__repr__(value)


# How json.dumps writes each scalar type (exact types: a subclass, e.g. an IntEnum, goes through json.dumps).
_SCALAR_JSON = {
    str: quote_json,
    bool: lambda value: "true" if value else "false",
    int: int.__repr__,
    float: _float_like_json,
    type(None): lambda value: "null",
}


def dumps_like_json(record: dict) -> str:
    """json.dumps(record), with its default separators and ASCII escapes: a flat object of strings, numbers,
    booleans and nulls is joined here from the same C string encoder json.dumps uses (json.dumps' set-up costs
    more than the encoding); anything else goes through json.dumps itself."""
    parts = []
    for key, value in record.items():
        encode = _SCALAR_JSON.get(type(value))
        prefix = _KEY_PREFIXES.get(key) if encode is not None else None
        if prefix is None:
            if type(key) is not str or encode is None:
                return json.dumps(record)
            prefix = quote_json(key) + ": "
            if len(_KEY_PREFIXES) < 4096:  # the few keys of the records; a run with many distinct keys skips it
                _KEY_PREFIXES[key] = prefix
        parts.append(prefix + encode(value))
    return "{" + ", ".join(parts) + "}"


_KEY_PREFIXES: dict[str, str] = {}  # key -> '"key": ', as json.dumps writes it (exact str keys only)


def stats_path_for(output_path: str | Path) -> Path:
    output_path = Path(output_path)
    stem = output_path.name[: -len(".jsonl")] if output_path.name.endswith(".jsonl") else output_path.name
    return output_path.with_name(f"{stem}.stats.json")


def expand_input_files(patterns) -> list[Path]:
    """Glob patterns (a list, or one string separated by spaces/commas), recursive, each must match."""
    if patterns is None:
        raise SftflowError("input_files is not set: give ++input_files='dir/output-rs*.jsonl'")
    if isinstance(patterns, str):
        patterns = [p for p in re.split(r"[,\s]+", patterns.strip()) if p]
    if not patterns:
        raise SftflowError("input_files is empty")
    files: set[Path] = set()
    for pattern in patterns:
        matches = [Path(m) for m in glob.glob(pattern, recursive=True) if Path(m).is_file()]
        if not matches:
            raise SftflowError(f"input_files pattern '{pattern}' matches no file")
        files.update(matches)
    return sorted(files)


def is_correct_judgement(judgement) -> bool | None:
    if isinstance(judgement, bool):
        return judgement
    if not isinstance(judgement, str):
        return None
    found = _JUDGEMENT.findall(judgement)
    return found[-1].lower() == "yes" if found else None


# How many contamination matches the stats list in full (the count is always complete).
MAX_LISTED_MATCHES = 1000


def load_contaminated(path: str, key: str) -> tuple[set[str], int, list[dict]]:
    """Normalised problems marked contaminated in a NeMo-Skills style contamination file, the row count,
    and the contaminated rows themselves (with benchmark / matched_problem / how when our rule wrote them)."""
    contaminated = set()
    matches = []
    rows = 0
    for line, row in iter_jsonl(path):
        rows += 1
        if key not in row or not isinstance(row[key], str):
            raise SftflowError(f"{path}:{line}: contamination row has no string field '{key}'")
        if row.get("contaminated", True):
            contaminated.add(normalize_problem(row[key]))
            matches.append(
                {
                    "problem": row[key],
                    **{k: row[k] for k in ("benchmark", "matched_problem", "how", "overlap") if k in row},
                }
            )
    return contaminated, rows, matches


# Digests a worker remembers of the rows it sent (~16 bytes each), to skip formatting sure duplicates; when
# full it forgets them all, and a repeated row is formatted again and dropped when the output is ordered instead.
EMITTED_MAX = 1 << 20


class Preparer:
    def __init__(self, cfg: dict, cores: int | None = None):
        """`cfg`: a prepare_data config section; `cores` (the rule's threads) caps the automatic worker count."""
        self.cfg = cfg
        self.cores = cores
        self.input_key = cfg["input_key"]
        self.output_key = cfg["output_key"]
        self.stats: dict = {"input_files": [], "invalid_rows": {"count": 0, "examples": []}}
        self.filters: list[F.RowFilter] = []
        self.length_stages: list[dict] = []
        self.tokenizer = None
        if cfg.get("tokenizer"):
            self.tokenizer = load_tokenizer(cfg["tokenizer"], cfg.get("chat_template"))
        self.formatter = Formatter(
            load_prompt_config(cfg["prompt_config"], self.input_key),
            self.tokenizer,
            system_message=cfg["system_message"],
            chat_template_kwargs=cfg["chat_template_kwargs"],
            output_format=cfg["output_format"],
            assistant_end=cfg["assistant_end"],
        )
        self._build_filters()
        # What process_chunk runs: the filters, with consecutive pure text filters joined into one memoised step.
        self.steps = F.chain_text_filters(self.filters)
        self._emitted = D.SentDigests(EMITTED_MAX)  # digests of the rows this process has formatted and sent

    # ----------------------------------------------------------------- set-up
    def _build_filters(self) -> None:
        cfg, on, key = self.cfg, self.cfg["filters"], self.output_key

        def add(name, fn, field=key):
            stage = F.RowFilter(name, fn, field)
            self.filters.append(stage)
            return stage

        if on["drop_multi_boxed"]:
            add("drop_multi_boxed", F.drop_multi_boxed(key))
        self.skipped_stages: list[dict] = []
        if on["remove_contaminated"] and not cfg["contamination_file"]:
            # NeMo-Skills' default is on with no file; say loudly that nothing was checked.
            LOG.warning("filters.remove_contaminated is on but no contamination_file is set: nothing is decontaminated")
            self.skipped_stages.append(
                {"stage": "remove_contaminated", "skipped": "no contamination_file set", "rows_in": 0, "dropped": 0}
            )
        elif on["remove_contaminated"]:
            contaminated, rows, matches = load_contaminated(cfg["contamination_file"], self.input_key)
            stage = add("remove_contaminated", F.remove_contaminated(self.input_key, contaminated), self.input_key)
            # The matches themselves, so that a user can audit what decontamination removed (and why).
            stage.info.update(
                contamination_file=str(cfg["contamination_file"]),
                contaminated_problems=len(contaminated),
                matches=matches[:MAX_LISTED_MATCHES],
                matches_listed=min(len(matches), MAX_LISTED_MATCHES),
            )
        if on["remove_code_errors"]:
            add("remove_code_errors", F.drop_if_contains(key, F.CODE_ERROR_MARKERS))
        if on["remove_matplotlib"]:
            add("remove_matplotlib", F.drop_if_contains(key, F.MATPLOTLIB_MARKERS))
        if on["remove_no_code"]:
            add("remove_no_code", F.drop_unless_contains_all(key, (cfg["code_begin"], cfg["code_end"])))
        if on["remove_no_think_tags"]:
            add("remove_no_think_tags", F.drop_unless_contains_all(key, (F.THINK_END,)))
        if on["remove_verification_code"]:
            add("remove_verification_code", F.drop_if_contains(key, F.VERIFICATION_MARKERS))
        if on["majority_filter"]:
            mf = cfg["majority_filter"]
            stage = F.RowFilter("majority_filter", None, key)
            stage.fn = F.majority_filter(mf["min_majority_votes"], mf["min_majority_percentage"], stage.notes)
            self.filters.append(stage)
        if on["trim_prefix"]:
            add("trim_prefix", F.trim_prefix(key, cfg["trim_prefix_text"]))
        if on["trim_solutions"]:
            stage = F.RowFilter("trim_solutions", None, key)
            stage.fn = F.trim_solutions(key, stage.notes)
            self.filters.append(stage)
        if on["drop_incorrect_arithmetic"]:
            add("drop_incorrect_arithmetic", F.drop_incorrect_arithmetic(key, cfg["arithmetic_tolerance"]))
        if on["split_arithmetic"]:
            add("split_arithmetic", F.split_arithmetic(key))
        for what, field, flag in (
            ("problem", self.input_key, "remove_len_outlier_problems"),
            ("solution", key, "remove_len_outlier_solutions"),
        ):
            if on[flag]:
                if self.tokenizer is None:
                    raise SftflowError(
                        f"filters.{flag} counts tokens and needs a tokenizer: set ++tokenizer=<path or hub name>"
                    )
                self.length_stages.append(
                    {
                        "stage": flag,
                        "field": field,
                        "min": cfg[f"min_{what}_length"],
                        "max": cfg[f"max_{what}_length"],
                        **dict.fromkeys(LENGTH_COUNTERS, 0),
                    }
                )

    # ----------------------------------------------------------------- reading (main process)
    def chunks(self, files: list[Path]):
        """Yield (info, (path, offset, size, first line number)): each file cut into blocks of about CHUNK_BYTES that
        end at a line end, from after its skip_first rows (skipped here, and counted in `info`, the file's counts)."""
        for path in files:
            check_input_file(path)
            info = {"path": str(path), "rows": 0, "skipped_first": 0, "invalid": 0}
            self.stats["input_files"].append(info)
            with open(path, "rb") as f:
                offset, line_number = self._skip_first(f, info)
                end, buffer = os.fstat(f.fileno()).st_size, bytearray(CHUNK_BYTES)
                while offset < end:
                    size, lines = _next_block(f.fileno(), offset, end, buffer)
                    if not size:  # shorter than its size a moment ago: no row may go missing unsaid
                        raise SftflowError(f"{path}: the file changed while it was read (rerun prepare_data)")
                    yield info, (str(path), offset, size, line_number)
                    line_number += lines
                    offset += size

    def _skip_first(self, f, info: dict) -> tuple[int, int]:
        """Skip the file's first skip_first rows (blank lines are not rows); the offset and line number after them."""
        offset = line_number = 0
        while info["skipped_first"] < self.cfg["skip_first"]:
            raw = f.readline()
            if not raw:
                break
            offset += len(raw)
            line_number += 1
            if not raw.isspace():
                info["rows"] += 1
                info["skipped_first"] += 1
        return offset, line_number + 1

    # ----------------------------------------------------------------- per-chunk work (worker processes)
    def process_chunk(self, path: str, offset: int, size: int, first_line: int) -> dict:
        """Read, parse, validate, select, filter and format the lines of one block of a file; return the counters and
        the kept rows in a few objects: their records joined, each one's length, their (problem digest, row
        digest) keys joined and their has-code flags (Spool.add_block's arguments); "repeats" counts the rows that
        this process sent before, which are not formatted."""
        with open(path, "rb") as f:
            data = os.pread(f.fileno(), size, offset)
        if len(data) != size:
            raise SftflowError(f"{path}: the file changed while it was read (rerun prepare_data)")
        batch = [(n, raw) for n, raw in enumerate(io.BytesIO(data), start=first_line) if not raw.isspace()]
        result = {"rows_read": len(batch), "selection": dict.fromkeys(SELECTION_KEYS, 0), "invalid": []}
        self._emit(self._length_filter(self._select_and_filter(path, batch, result)), result)
        for step in self.steps:
            if isinstance(step, F.TextChain):
                step.settle()
        result["filters"] = [stage.take_counts() for stage in self.filters]
        result["length"] = []
        for st in self.length_stages:  # counts since the last chunk, then reset (as RowFilter.take_counts)
            result["length"].append({k: st[k] for k in LENGTH_COUNTERS})
            st.update(dict.fromkeys(LENGTH_COUNTERS, 0))
        return result

    def _select_and_filter(self, path: str, batch: list[tuple[int, bytes]], result: dict) -> list[dict]:
        """The rows of `batch` that are valid, selected and kept by the filters, each with its "__where".

        The common case (a JSON object with string input/output fields and a true/false symbolic_correct) is
        checked inline; any other row takes the full checks (_parse, _valid_fields, _label) and their messages."""
        cfg, input_key, output_key, steps = self.cfg, self.input_key, self.output_key, self.steps
        wanted = {"correct": cfg["add_correct"], "incorrect": cfg["add_incorrect"], "unlabeled": cfg["add_unlabeled"]}
        counter_keys = {label: (f"{label}_seen", f"{label}_kept") for label in wanted}
        selection = result["selection"]
        quick_label = not cfg["use_judgement"]
        kept = []
        for line_number, raw in batch:
            where = f"{path}:{line_number}"
            try:
                row = loads_json(raw)
            except JSONDecodeError:
                row = None
            if type(row) is not dict:
                row = self._parse(raw, where, result)
                if row is None:
                    continue
            if type(row.get(input_key)) is not str or type(row.get(output_key)) is not str:
                if not self._valid_fields(row, where, result):
                    continue
            verdict = row.get("symbolic_correct") if quick_label else None
            if verdict is True:
                label = "correct"
            elif verdict is False:
                label = "incorrect"
            else:
                label = self._label(row, where, result)
                if label is None:
                    continue
            seen, chosen = counter_keys[label]
            selection[seen] += 1
            if not wanted[label]:
                continue
            selection[chosen] += 1
            row["__where"] = where
            for step in steps:
                row = step(row)
                if row is None:
                    break
            else:
                kept.append(row)
        return kept

    def _emit(self, rows: list[dict], result: dict) -> None:
        """Format `rows` into result's "records", "lengths", "keys" and "has_code"; count in "repeats" (and do not
        format) the rows this process has sent before."""
        input_key, output_key, code_begin = self.input_key, self.output_key, self.cfg["code_begin"]
        problems = [D.problem_digest(row[input_key].encode()) for row in rows]
        digests, sent_before = [D.NO_DIGEST] * len(rows), [False] * len(rows)
        if self.cfg["deduplicate"]:
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
            records.append(dumps_like_json(self.to_record(row)).encode("ascii") + b"\n")
        result["repeats"] = len(rows) - len(records)
        result["records"] = b"".join(records)
        result["lengths"] = array("q", map(len, records))
        result["keys"] = b"".join(keys)
        result["has_code"] = bytes(has_code)

    def _parse(self, raw: bytes, where: str, result: dict) -> dict | None:
        row, reason = parse_json_object(raw)
        return row if reason is None else self._invalid(where, reason, result)

    def _invalid(self, where: str, reason: str, result: dict) -> None:
        if not self.cfg["skip_invalid_rows"]:
            raise SftflowError(f"{where}: {reason}")
        result["invalid"].append(f"{where}: {reason}")
        return None

    def _label(self, row: dict, where: str, result: dict) -> str | None:
        """'correct' / 'incorrect' / 'unlabeled', or None for an invalid row (already reported)."""
        if self.cfg["use_judgement"]:
            if "judgement" not in row or row["judgement"] is None:
                return "unlabeled"
            verdict = is_correct_judgement(row["judgement"])
            if verdict is None:
                return self._invalid(
                    where,
                    f"field 'judgement' has no 'Judgement: Yes/No' verdict: {str(row['judgement'])[:80]!r}",
                    result,
                )
            return "correct" if verdict else "incorrect"
        for field in ("symbolic_correct", "is_correct"):
            if field in row and row[field] is not None:
                if not isinstance(row[field], bool):
                    return self._invalid(
                        where,
                        f"field '{field}' should be true/false, got {type(row[field]).__name__} {row[field]!r}",
                        result,
                    )
                return "correct" if row[field] else "incorrect"
        return "unlabeled"

    def _valid_fields(self, row: dict, where: str, result: dict) -> bool:
        for key in (self.input_key, self.output_key):
            if key not in row:
                self._invalid(
                    where,
                    f"row has no field '{key}' (fields: {', '.join(sorted(row)) or 'none'}); set input_key/output_key",
                    result,
                )
                return False
            if not isinstance(row[key], str):
                self._invalid(where, f"field '{key}' should be a string, got {type(row[key]).__name__}", result)
                return False
        return True

    def _length_filter(self, rows: list[dict]) -> list[dict]:
        for stage in self.length_stages:
            if not rows:
                break
            stage["rows_in"] += len(rows)
            texts = [r[stage["field"]] for r in rows]
            counts = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
            kept = []
            for row, n, text in zip(rows, counts, texts):
                chars = self.cfg["use_chars_for_min_length"] and stage["stage"] == "remove_len_outlier_solutions"
                short_len = len(text) if chars else n  # NeMo-Skills: characters only for the solutions' minimum
                if stage["min"] is not None and short_len < stage["min"]:
                    stage["dropped_too_short"] += 1
                elif stage["max"] is not None and n > stage["max"]:
                    stage["dropped_too_long"] += 1
                else:
                    kept.append(row)
            rows = kept
        return rows

    # ----------------------------------------------------------------- output
    def to_record(self, row: dict) -> dict:
        where = row.pop("__where")
        solution = row[self.output_key]
        reasoning = row.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise SftflowError(f"{where}: field 'reasoning_content' should be a string, got {type(reasoning).__name__}")
        # Bundled prompt configs say {problem}; with another input_key that field still fills it.
        fields = row if "problem" in row else {**row, "problem": row[self.input_key]}
        formatted = self.formatter.record(fields, solution, where + ": ", reasoning or None)
        # NeMo-Skills' key order and types: expected_answer (always a string) first, then input and output.
        record = {}
        if "expected_answer" in row:
            record["expected_answer"] = str(row["expected_answer"])
        record.update(formatted)
        if not self.cfg["exclude_optional_keys"]:
            for k, v in row.items():
                record.setdefault(k, v)
        if self.cfg["metadata"]:
            record.update(self.cfg["metadata"])
        return record

    def _results(self, files: list[Path]):
        """Chunk results in input order, computed in worker processes when there is enough work."""
        workers = self.cfg["num_workers"] or min(available_cpus(), self.cores or 8)
        chunks = self.chunks(files)
        total_bytes = sum(p.stat().st_size for p in files if p.is_file())
        if workers <= 1 or total_bytes < PARALLEL_MIN_BYTES:
            for info, block in chunks:
                yield info, self.process_chunk(*block)
            return
        global _WORKER
        _WORKER = self  # inherited by the forked workers: filters, tokenizer and formatter are set up once
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        infos: list[dict] = []

        def tasks():
            for info, block in chunks:
                infos.append(info)
                yield block

        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for i, result in enumerate(pool.imap(_work_in_worker, tasks(), chunksize=1)):
                yield infos[i], result

    def filtered_rows(self, files: list[Path]):
        """Blocks of (record bytes, lengths, keys, has code) of the rows that reach deduplication (Spool.add_block's
        arguments), with every counter merged into the stats. Repeats that a worker recognised are not sent; the
        others are found when the output is ordered (Spool.grouped_rows), where a problem's rows come together."""
        dedup = self.stats["deduplicate"] = {"stage": "deduplicate", "rows_in": 0, "dropped": 0}
        sel = self.stats["selection"] = dict.fromkeys(SELECTION_KEYS, 0)
        inv = self.stats["invalid_rows"]
        length_totals = [dict.fromkeys(LENGTH_COUNTERS, 0) for _ in self.length_stages]
        self.stats["_length_totals"] = length_totals
        for info, result in self._results(files):
            info["rows"] += result["rows_read"]
            for k, v in result["selection"].items():
                sel[k] += v
            info["invalid"] += len(result["invalid"])
            inv["count"] += len(result["invalid"])
            inv["examples"].extend(result["invalid"][: MAX_EXAMPLES - len(inv["examples"])])
            for stage, counts in zip(self.filters, result["filters"]):
                stage.add_counts(counts)
            for total, counts in zip(length_totals, result["length"]):
                for k, v in counts.items():
                    total[k] += v
            if self.cfg["deduplicate"]:
                dedup["rows_in"] += len(result["lengths"]) + result["repeats"]
                dedup["dropped"] += result["repeats"]
            yield result["records"], result["lengths"], result["keys"], result["has_code"]

    def run(self, output_path: str | Path) -> dict:
        start = time.time()
        files = expand_input_files(self.cfg["input_files"])
        LOG.info("reading %d file(s): %s", len(files), ", ".join(map(str, files)))
        if native.missing_reason():
            LOG.warning("%s", native.missing_reason())
        written = 0
        with atomic_path(output_path) as tmp:
            written = self._write_reordered(self.filtered_rows(files), tmp)
            self.stats["rows_written"] = written
            self._finish_stats(files, start, output_path)
            if written == 0:
                message = empty_output_reason(self.stats, self.cfg)
                if not self.cfg["allow_empty_output"]:
                    for line in summary_lines(self.stats)[:-1]:  # the funnel, for the log (no file is written)
                        LOG.info("%s", line)
                    raise SftflowError(message + " (or set allow_empty_output=true to write an empty file)")
                LOG.warning("%s", message)
            write_json(stats_path_for(output_path), self.stats)
        return self.stats

    def _write_reordered(self, rows, tmp: Path) -> int:
        """Spool the formatted records to disk with what ordering them needs, order them (_reorder), then copy the
        records in that order."""
        spool = S.Spool(tmp.with_name(tmp.name + ".spool"))
        try:
            for block in rows:
                spool.add_block(*block)
            spool.close()
            order = self._reorder(spool)
            spool.copy(order, tmp)
            return len(order)
        finally:
            spool.remove()

    def _reorder(self, spool: S.Spool) -> np.ndarray:
        """NeMo-Skills' order (GroupSamples, then ShuffleAndDownsampleData with its seeded `random`) as spool row
        numbers: the rows grouped by problem (problems in order of first appearance, each problem's rows in file
        order) and deduplicated, the code/text choice per problem, downsampling, then one shuffle of the whole list
        (`random.shuffle` of a memoryview: the same swaps as of NeMo-Skills' list of the same length)."""
        cfg = self.cfg
        rows, starts, repeats = spool.grouped_rows(cfg["deduplicate"])
        if cfg["deduplicate"]:
            self.stats["deduplicate"]["dropped"] += repeats
        mode = cfg["filters"]["code_text_filter"]
        if mode:
            stage = {"stage": "code_text_filter", "mode": mode, "rows_in": len(rows), "dropped": 0}
            has_code = np.frombuffer(spool.has_code, dtype=bool)
            rows, starts = S.pick_code_text(rows, starts, has_code, functools.partial(F.code_text_picks, mode=mode))
            stage["dropped"] = stage["rows_in"] - len(rows)
            self.stats["code_text_filter"] = stage
        rng = random.Random(cfg["random_seed"])  # as random.seed(random_seed) before NeMo-Skills' shuffle
        method, n = cfg["downsampling_method"], cfg["num_output_samples"]
        if method:
            stage = {"stage": f"downsampling_{method}", "rows_in": len(rows), "num_output_samples": n}
            if method == "random":
                if cfg["do_shuffle"]:
                    rng.shuffle(memoryview(rows))
                rows = rows[:n]
            elif len(rows) > n:  # fair: round robin over the problems, each one's solutions in file order
                rows = S.pick_fair(rows, starts, n)
            if len(rows) < n:
                stage["note"] = f"only {len(rows)} rows available, fewer than num_output_samples"
            stage["dropped"] = stage["rows_in"] - len(rows)
            self.stats["downsampling"] = stage
            if method == "random":
                return rows
        if cfg["do_shuffle"]:
            rng.shuffle(memoryview(rows))
        return rows

    def _finish_stats(self, files, start, output_path) -> None:
        s = self.stats
        s["rows_read"] = sum(f["rows"] for f in s["input_files"])
        s["skipped_first"] = sum(f["skipped_first"] for f in s["input_files"])
        funnel = self.skipped_stages + [st.stats() for st in self.filters]
        for st, totals in zip(self.length_stages, s.pop("_length_totals")):
            funnel.append({**st, **totals, "dropped": totals["dropped_too_short"] + totals["dropped_too_long"]})
        if self.cfg["deduplicate"]:
            funnel.append(s.pop("deduplicate"))
        else:
            s.pop("deduplicate", None)
        for name in ("code_text_filter", "downsampling"):
            if name in s:
                funnel.append(s.pop(name))
        s["funnel"] = funnel
        sel = s["selection"]
        s["dropped_by_selection"] = sum(
            sel[f"{k}_seen"] - sel[f"{k}_kept"] for k in ("correct", "incorrect", "unlabeled")
        )
        s["output_path"] = str(output_path)
        s["formatting"] = {
            "mode": self.formatter.mode,
            "output_format": self.cfg["output_format"],
            "prompt_config": self.cfg["prompt_config"],
        }
        s["seconds"] = round(time.time() - start, 3)
        accounted = (
            s["skipped_first"]
            + s["invalid_rows"]["count"]
            + s["dropped_by_selection"]
            + sum(st["dropped"] for st in funnel)
            + s["rows_written"]
        )
        if accounted != s["rows_read"]:  # every row must be accounted for somewhere in the funnel
            raise RuntimeError(f"internal error: funnel accounts for {accounted} rows of {s['rows_read']} read")


def empty_output_reason(stats: dict, cfg: dict) -> str:
    """Why no row was written: the step of the funnel that removed the most rows, and the key that keeps them."""
    sel = stats["selection"]
    causes = []  # (rows removed, what removed them, the key that keeps them)
    for label in ("correct", "incorrect", "unlabeled"):
        lost = sel[f"{label}_seen"] - sel[f"{label}_kept"]
        if lost:
            hint = f"add_{label}=true"
            if label == "unlabeled":
                hint += " (rows without a correctness label: no symbolic_correct / is_correct / judgement)"
            causes.append((lost, f"selection dropped {lost} {label} rows", hint))
    for stage in stats["funnel"]:
        if stage.get("dropped"):
            name = stage["stage"]
            if name in cfg["filters"]:
                key = f"filters.{name}=false"
            elif name == "deduplicate":
                key = "deduplicate=false"
            else:
                key = "the settings of this step (the funnel above lists them)"
            causes.append((stage["dropped"], f"{name} dropped {stage['dropped']}", key))
    if stats["invalid_rows"]["count"]:
        causes.append((stats["invalid_rows"]["count"], f"{stats['invalid_rows']['count']} invalid rows", "the input"))
    if stats["skipped_first"]:
        causes.append((stats["skipped_first"], f"skip_first skipped {stats['skipped_first']}", "skip_first"))
    read = stats["rows_read"]
    if not causes:
        return f"prepare_data wrote 0 rows: the input files hold no rows ({read} read)"
    lost, what, key = max(causes, key=lambda c: c[0])
    others = "; ".join(c[1] for c in causes if c[1] != what)
    return (
        f"prepare_data wrote 0 of {read} rows read: {what}"
        + (f" ({others})" if others else "")
        + f". To keep them: {key}"
    )


def summary_lines(stats: dict) -> list[str]:
    """The funnel as log lines a user can read."""
    lines = [f"read {stats['rows_read']} rows from {len(stats['input_files'])} file(s)"]
    if stats["skipped_first"]:
        lines.append(f"  skipped (skip_first): {stats['skipped_first']}")
    if stats["invalid_rows"]["count"]:
        lines.append(f"  invalid rows skipped: {stats['invalid_rows']['count']}")
    sel = stats["selection"]
    for k in ("correct", "incorrect", "unlabeled"):
        lines.append(f"  {k}: {sel[f'{k}_seen']} seen, {sel[f'{k}_kept']} kept")
    for st in stats["funnel"]:
        if "skipped" in st:
            lines.append(f"  {st['stage']}: skipped ({st['skipped']})")
            continue
        extra = f", modified {st['modified']}" if st.get("modified") else ""
        lines.append(f"  {st['stage']}: {st['rows_in']} in, dropped {st['dropped']}{extra}")
        for match in st.get("matches", [])[:10]:
            how = (
                f" ({match['how']} match with {match['benchmark']}: {match['matched_problem']!r})"
                if "how" in match
                else ""
            )
            lines.append(f"    contaminated: {match['problem']!r}{how}")
        if len(st.get("matches", [])) > 10:
            lines.append(f"    ... {len(st['matches']) - 10} more in the stats file")
    lines.append(f"wrote {stats['rows_written']} rows to {stats['output_path']}")
    return lines
