"""The data preparation run: read generation files, select, filter, deduplicate, downsample, format, write.

Rows stream through in chunks, so memory stays flat except for the deduplication set (and, when the
output must be reordered, one small index entry per surviving row).
"""

from __future__ import annotations

import glob
import hashlib
import logging
import random
import re
import time
from collections import defaultdict
from pathlib import Path

import orjson

from sftflow.errors import SftflowError
from sftflow.io import atomic_path, iter_jsonl, write_json
from sftflow.mathtext import normalize_problem
from sftflow.prepare import filters as F
from sftflow.prepare.formatting import Formatter, load_tokenizer
from sftflow.prepare.prompts import load_prompt_config

LOG = logging.getLogger("sftflow.prepare")
CHUNK_ROWS = 4096
MAX_EXAMPLES = 20
_JUDGEMENT = re.compile(r"judge?ment\s*:\s*\**\s*(yes|no)\b", re.IGNORECASE)


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


def load_contaminated(path: str, key: str) -> tuple[set[str], int]:
    """Normalised problems marked contaminated in a NeMo-Skills style contamination file."""
    contaminated = set()
    rows = 0
    for line, row in iter_jsonl(path):
        rows += 1
        if key not in row or not isinstance(row[key], str):
            raise SftflowError(f"{path}:{line}: contamination row has no string field '{key}'")
        if row.get("contaminated", True):
            contaminated.add(normalize_problem(row[key]))
    return contaminated, rows


class Preparer:
    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.input_key = cfg["input_key"]
        self.output_key = cfg["output_key"]
        self.stats: dict = {"input_files": [], "invalid_rows": {"count": 0, "examples": []}}
        self.filters: list[F.RowFilter] = []
        self.length_stages: list[dict] = []
        self.tokenizer = None
        if cfg.get("tokenizer"):
            self.tokenizer = load_tokenizer(cfg["tokenizer"], cfg.get("chat_template"))
        self.formatter = Formatter(
            load_prompt_config(cfg["prompt_config"]),
            self.tokenizer,
            system_message=cfg["system_message"],
            chat_template_kwargs=cfg["chat_template_kwargs"],
            output_format=cfg["output_format"],
        )
        self._build_filters()

    # ----------------------------------------------------------------- set-up
    def _build_filters(self) -> None:
        cfg, on, key = self.cfg, self.cfg["filters"], self.output_key

        def add(name, fn, field=key):
            stage = F.RowFilter(name, fn, field)
            self.filters.append(stage)
            return stage

        if on["drop_multi_boxed"]:
            add("drop_multi_boxed", F.drop_multi_boxed(key))
        if on["remove_contaminated"]:
            if not cfg["contamination_file"]:
                raise SftflowError(
                    "filters.remove_contaminated is on but contamination_file is not set: "
                    "set ++contamination_file=<file> or ++filters.remove_contaminated=false"
                )
            contaminated, rows = load_contaminated(cfg["contamination_file"], self.input_key)
            stage = add("remove_contaminated", F.remove_contaminated(self.input_key, contaminated), self.input_key)
            stage.notes.update(contamination_file=str(cfg["contamination_file"]), contaminated_problems=len(contaminated))
        if on["remove_code_errors"]:
            add("remove_code_errors", F.drop_if_contains(key, F.CODE_ERROR_MARKERS))
        if on["remove_matplotlib"]:
            add("remove_matplotlib", F.drop_if_contains(key, F.MATPLOTLIB_MARKERS))
        if on["remove_no_code"]:
            add("remove_no_code", F.drop_unless_contains_all(key, (cfg["code_begin"], cfg["code_end"])))
        if on["remove_no_think_tags"]:
            add("remove_no_think_tags", F.drop_unless_contains_all(key, F.THINK_TAGS))
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
        for what, field, flag in (("problem", self.input_key, "remove_len_outlier_problems"), ("solution", key, "remove_len_outlier_solutions")):
            if on[flag]:
                if self.tokenizer is None:
                    raise SftflowError(f"filters.{flag} counts tokens and needs a tokenizer: set ++tokenizer=<path or hub name>")
                self.length_stages.append(
                    {
                        "stage": flag,
                        "field": field,
                        "min": cfg[f"min_{what}_length"],
                        "max": cfg[f"max_{what}_length"],
                        "rows_in": 0,
                        "dropped_too_short": 0,
                        "dropped_too_long": 0,
                    }
                )

    # ----------------------------------------------------------------- reading
    def _invalid(self, where: str, reason: str) -> None:
        if not self.cfg["skip_invalid_rows"]:
            raise SftflowError(f"{where}: {reason}")
        inv = self.stats["invalid_rows"]
        inv["count"] += 1
        if len(inv["examples"]) < MAX_EXAMPLES:
            inv["examples"].append(f"{where}: {reason}")

    def _label(self, row: dict, where: str) -> str | None:
        """'correct' / 'incorrect' / 'unlabeled', or None for an invalid row (already reported)."""
        if self.cfg["use_judgement"]:
            if "judgement" not in row or row["judgement"] is None:
                return "unlabeled"
            verdict = is_correct_judgement(row["judgement"])
            if verdict is None:
                self._invalid(where, f"field 'judgement' has no 'Judgement: Yes/No' verdict: {str(row['judgement'])[:80]!r}")
                return None
            return "correct" if verdict else "incorrect"
        for field in ("symbolic_correct", "is_correct"):
            if field in row and row[field] is not None:
                if not isinstance(row[field], bool):
                    self._invalid(where, f"field '{field}' should be true/false, got {type(row[field]).__name__} {row[field]!r}")
                    return None
                return "correct" if row[field] else "incorrect"
        return "unlabeled"

    def read_rows(self, files: list[Path]):
        cfg = self.cfg
        wanted = {"correct": cfg["add_correct"], "incorrect": cfg["add_incorrect"], "unlabeled": cfg["add_unlabeled"]}
        sel = self.stats["selection"] = {f"{k}_{w}": 0 for k in wanted for w in ("seen", "kept")}
        for path in files:
            info = {"path": str(path), "rows": 0, "skipped_first": 0, "invalid": 0}
            self.stats["input_files"].append(info)
            bad_lines: list | None = [] if cfg["skip_invalid_rows"] else None
            invalid_before = self.stats["invalid_rows"]["count"]
            for line, row in iter_jsonl(path, bad_lines):
                info["rows"] += 1
                if info["rows"] <= cfg["skip_first"]:
                    info["skipped_first"] += 1
                    continue
                where = f"{path}:{line}"
                if not self._valid_fields(row, where):
                    continue
                label = self._label(row, where)
                if label is None:
                    continue
                sel[f"{label}_seen"] += 1
                if not wanted[label]:
                    continue
                sel[f"{label}_kept"] += 1
                row["__where"] = where
                yield row
            for line, reason in bad_lines or []:
                info["rows"] += 1
                self._invalid(f"{path}:{line}", reason)
            info["invalid"] = self.stats["invalid_rows"]["count"] - invalid_before

    def _valid_fields(self, row: dict, where: str) -> bool:
        for key in (self.input_key, self.output_key):
            if key not in row:
                self._invalid(where, f"row has no field '{key}' (fields: {', '.join(sorted(row)) or 'none'}); set input_key/output_key")
                return False
            if not isinstance(row[key], str):
                self._invalid(where, f"field '{key}' should be a string, got {type(row[key]).__name__}")
                return False
        return True

    # ----------------------------------------------------------------- filtering
    def _length_filter(self, rows: list[dict]) -> list[dict]:
        for stage in self.length_stages:
            if not rows:
                break
            stage["rows_in"] += len(rows)
            texts = [r[stage["field"]] for r in rows]
            counts = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
            kept = []
            for row, n, text in zip(rows, counts, texts):
                short_len = len(text) if self.cfg["use_chars_for_min_length"] else n
                if stage["min"] is not None and short_len < stage["min"]:
                    stage["dropped_too_short"] += 1
                elif stage["max"] is not None and n > stage["max"]:
                    stage["dropped_too_long"] += 1
                else:
                    kept.append(row)
            rows = kept
        return rows

    def filtered_chunks(self, rows):
        dedup = {"stage": "deduplicate", "rows_in": 0, "dropped": 0}
        self.stats["deduplicate"] = dedup
        seen: set[bytes] = set()
        chunk: list[dict] = []

        def flush(chunk):
            kept = self._length_filter(chunk)
            if not self.cfg["deduplicate"]:
                return kept
            out = []
            for row in kept:
                dedup["rows_in"] += 1
                digest = hashlib.blake2b(
                    row[self.input_key].encode() + b"\x00" + row[self.output_key].encode(), digest_size=16
                ).digest()
                if digest in seen:
                    dedup["dropped"] += 1
                    continue
                seen.add(digest)
                out.append(row)
            return out

        for row in rows:
            for stage in self.filters:
                row = stage(row)
                if row is None:
                    break
            else:
                chunk.append(row)
                if len(chunk) >= CHUNK_ROWS:
                    yield flush(chunk)
                    chunk = []
        if chunk:
            yield flush(chunk)

    # ----------------------------------------------------------------- output
    def to_record(self, row: dict) -> dict:
        where = row.pop("__where")
        solution = row[self.output_key]
        # Bundled prompt configs say {problem}; with another input_key that field still fills it.
        fields = row if "problem" in row else {**row, "problem": row[self.input_key]}
        record = self.formatter.record(fields, solution, where + ": ")
        if self.cfg["exclude_optional_keys"]:
            if "expected_answer" in row:
                record["expected_answer"] = row["expected_answer"]
        else:
            for k, v in row.items():
                record.setdefault(k, v)
        if self.cfg["metadata"]:
            record.update(self.cfg["metadata"])
        return record

    def needs_reordering(self) -> bool:
        return bool(self.cfg["do_shuffle"] or self.cfg["downsampling_method"] or self.cfg["filters"]["code_text_filter"])

    def run(self, output_path: str | Path) -> dict:
        start = time.time()
        files = expand_input_files(self.cfg["input_files"])
        LOG.info("reading %d file(s): %s", len(files), ", ".join(map(str, files)))
        rows = self.read_rows(files)
        written = 0
        with atomic_path(output_path) as tmp:
            if not self.needs_reordering():
                with open(tmp, "wb") as out:
                    for chunk in self.filtered_chunks(rows):
                        out.write(b"".join(orjson.dumps(self.to_record(r)) + b"\n" for r in chunk))
                        written += len(chunk)
            else:
                written = self._write_reordered(self.filtered_chunks(rows), tmp)
            self.stats["rows_written"] = written
            self._finish_stats(files, start, output_path)
            write_json(stats_path_for(output_path), self.stats)
        return self.stats

    def _write_reordered(self, chunks, tmp: Path) -> int:
        """Spool surviving rows to disk, reorder an index of (offset, length, problem), then write in order."""
        cfg = self.cfg
        spool_path = tmp.with_name(tmp.name + ".spool")
        index: list[tuple[int, int, int]] = []
        problem_ids: dict[str, int] = {}
        try:
            with open(spool_path, "wb") as spool:
                offset = 0
                for chunk in chunks:
                    for row in chunk:
                        data = orjson.dumps(row)
                        pid = problem_ids.setdefault(row[self.input_key], len(problem_ids))
                        index.append((offset, len(data), pid))
                        spool.write(data)
                        offset += len(data)
            order = self._reorder(index, spool_path)
            with open(spool_path, "rb") as spool, open(tmp, "wb") as out:
                for off, length, _ in order:
                    spool.seek(off)
                    out.write(orjson.dumps(self.to_record(orjson.loads(spool.read(length)))) + b"\n")
            return len(order)
        finally:
            spool_path.unlink(missing_ok=True)

    def _reorder(self, index: list, spool_path: Path) -> list:
        cfg = self.cfg
        rng = random.Random(cfg["random_seed"])
        mode = cfg["filters"]["code_text_filter"]
        if mode:
            stage = {"stage": "code_text_filter", "mode": mode, "rows_in": len(index), "dropped": 0}
            groups = defaultdict(list)
            for entry in index:
                groups[entry[2]].append(entry)
            kept = []
            with open(spool_path, "rb") as spool:
                for entries in groups.values():
                    samples = []
                    for off, length, pid in entries:
                        spool.seek(off)
                        samples.append({self.output_key: orjson.loads(spool.read(length))[self.output_key], "__entry": (off, length, pid)})
                    chosen = F.code_text_choice(samples, self.output_key, cfg["code_begin"], mode)
                    kept.extend(s["__entry"] for s in chosen)
            kept.sort()
            stage["dropped"] = len(index) - len(kept)
            self.stats["code_text_filter"] = stage
            index = kept
        method, n = cfg["downsampling_method"], cfg["num_output_samples"]
        if method:
            stage = {"stage": f"downsampling_{method}", "rows_in": len(index), "num_output_samples": n}
            if method == "random":
                index = rng.sample(index, n) if n < len(index) else list(index)
            else:
                groups = defaultdict(list)
                for entry in index:
                    groups[entry[2]].append(entry)
                queues = list(groups.values())
                rng.shuffle(queues)
                for q in queues:
                    rng.shuffle(q)
                picked, depth = [], 0
                while len(picked) < n and any(depth < len(q) for q in queues):
                    picked.extend(q[depth] for q in queues if depth < len(q))
                    depth += 1
                index = picked[:n]
            if len(index) < n:
                stage["note"] = f"only {len(index)} rows available, fewer than num_output_samples"
            stage["dropped"] = stage["rows_in"] - len(index)
            self.stats["downsampling"] = stage
        if cfg["do_shuffle"]:
            rng.shuffle(index)
        else:
            index.sort()
        return index

    def _finish_stats(self, files, start, output_path) -> None:
        s = self.stats
        s["rows_read"] = sum(f["rows"] for f in s["input_files"])
        s["skipped_first"] = sum(f["skipped_first"] for f in s["input_files"])
        funnel = [st.stats() for st in self.filters]
        for st in self.length_stages:
            funnel.append({**st, "dropped": st["dropped_too_short"] + st["dropped_too_long"]})
        if self.cfg["deduplicate"]:
            funnel.append(s.pop("deduplicate"))
        else:
            s.pop("deduplicate", None)
        for name in ("code_text_filter", "downsampling"):
            if name in s:
                funnel.append(s.pop(name))
        s["funnel"] = funnel
        sel = s["selection"]
        s["dropped_by_selection"] = sum(sel[f"{k}_seen"] - sel[f"{k}_kept"] for k in ("correct", "incorrect", "unlabeled"))
        s["output_path"] = str(output_path)
        s["formatting"] = {"mode": self.formatter.mode, "output_format": self.cfg["output_format"], "prompt_config": self.cfg["prompt_config"]}
        s["seconds"] = round(time.time() - start, 3)
        accounted = (
            s["skipped_first"] + s["invalid_rows"]["count"] + s["dropped_by_selection"] + sum(st["dropped"] for st in funnel) + s["rows_written"]
        )
        if accounted != s["rows_read"]:  # every row must be accounted for somewhere in the funnel
            raise RuntimeError(f"internal error: funnel accounts for {accounted} rows of {s['rows_read']} read")


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
        extra = f", modified {st['modified']}" if st.get("modified") else ""
        lines.append(f"  {st['stage']}: {st['rows_in']} in, dropped {st['dropped']}{extra}")
    lines.append(f"wrote {stats['rows_written']} rows to {stats['output_path']}")
    return lines
