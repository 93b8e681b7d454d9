"""Benchmarks: where they come from, `eval.benchmarks` spec parsing, and normalisation to grading rows.

Every prepared benchmark is a JSONL file of rows `{"problem", "expected_answer", ...}` (the
NeMo-Skills layout), written atomically by `prepare_benchmark` from a local source file:

- gsm8k: `question` -> problem; expected_answer is the number after `####` with commas removed;
  the solution before `####` with its `<<48/2=24>>` calculator annotations stripped is kept as
  `reference_solution`.
- math / math500: `problem`; expected_answer is `answer`, or the last `\\boxed{}` of `solution`
  when there is no `answer`; `solution` is kept as `reference_solution`, and `subject` (or the
  original MATH `type`), `level` and `unique_id` are kept when present.
- demo: already `problem` / `expected_answer` (checked, passed through).

Sources are data (`SOURCES`); `download_benchmark` fetches one for a real run. There is no network
in tests, so only its error path is tested.
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from sftflow.errors import SftflowError
from sftflow.io import atomic_path, iter_jsonl
from sftflow.mathtext import last_boxed

__all__ = [
    "BENCHMARK_NAME",
    "LOCAL_PATH_OPTION",
    "SOURCES",
    "BenchmarkSource",
    "download_benchmark",
    "normalize_row",
    "parse_benchmarks_spec",
    "prepare_benchmark",
]

# The config option through which a user points a benchmark at a local file instead of downloading
# it; named in the download error so that an offline user knows the way out.
LOCAL_PATH_OPTION = "eval.benchmark_files"

log = logging.getLogger("sftflow.benchmarks")

# Same characters as the workflow's {benchmark} wildcard (rules/common.smk), since names become paths.
BENCHMARK_NAME = re.compile(r"[A-Za-z0-9_\-]+")


@dataclass(frozen=True)
class BenchmarkSource:
    """Where a benchmark's raw test split lives: a JSONL URL, or a Hugging Face dataset and split."""

    name: str
    url: str | None = None
    hf_dataset: str | None = None
    hf_split: str | None = None
    rows: int | None = None  # expected row count, for the log and sanity checks

    @property
    def location(self) -> str:
        return self.url if self.url else f"hf://datasets/{self.hf_dataset} (split {self.hf_split})"


SOURCES: dict[str, BenchmarkSource] = {
    "gsm8k": BenchmarkSource(
        "gsm8k",
        url="https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/test.jsonl",
        rows=1319,
    ),
    "math500": BenchmarkSource("math500", hf_dataset="HuggingFaceH4/MATH-500", hf_split="test", rows=500),
    "math": BenchmarkSource(
        "math",
        url="https://raw.githubusercontent.com/QwenLM/Qwen2.5-Math/main/evaluation/data/math/test.jsonl",
        rows=5000,
    ),
}

# Benchmarks the workflow makes itself (rules/demo.smk) rather than downloads.
GENERATED = ("demo",)


# --- eval.benchmarks spec ----------------------------------------------------------------------


def parse_benchmarks_spec(spec: str, known: Iterable[str] | None = None) -> list[tuple[str, int]]:
    """Parse `eval.benchmarks`: "gsm8k:4,math" -> [("gsm8k", 4), ("math", 0)].

    As in NeMo-Skills, `name:N` asks for N random-seed samples per problem and a bare `name`
    (or `name:0`) for one greedy generation. Blank items ("gsm8k,") are skipped like the workflow's
    `benchmark_names()` does; anything else malformed raises SftflowError naming eval.benchmarks.
    `known`, if given, restricts the names.
    """
    key = "eval.benchmarks"
    if not isinstance(spec, str):
        raise SftflowError(f"{key}: expected a string such as 'gsm8k:4,math', got {type(spec).__name__}")
    known_names = sorted(known) if known is not None else None
    result: list[tuple[str, int]] = []
    seen: set[str] = set()
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, seeds_text = (part.strip() for part in item.partition(":"))
        if not BENCHMARK_NAME.fullmatch(name):
            raise SftflowError(
                f"{key}: bad benchmark name {name!r} in {item!r} (letters, digits, '_' and '-' only; "
                "write name or name:seeds, comma-separated, e.g. 'gsm8k:4,math')"
            )
        if known_names is not None and name not in known_names:
            raise SftflowError(f"{key}: unknown benchmark {name!r}; known: {', '.join(known_names)}")
        if name in seen:
            raise SftflowError(f"{key}: benchmark {name!r} is listed twice")
        seeds = 0
        if sep:
            if not re.fullmatch(r"\d+", seeds_text):
                raise SftflowError(
                    f"{key}: bad number of seeds {seeds_text!r} in {item!r} (a whole number >= 0; "
                    "0 or no ':N' means one greedy generation)"
                )
            seeds = int(seeds_text)
        seen.add(name)
        result.append((name, seeds))
    if not result:
        raise SftflowError(f"{key}: no benchmarks in {spec!r} (e.g. 'gsm8k:4,math')")
    return result


# --- row normalisation -------------------------------------------------------------------------

_CALCULATOR = re.compile(r"<<[^<>]*>>")
_GSM8K_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def _require_str(row: dict, key: str, where: str) -> str:
    if key not in row:
        raise SftflowError(f"{where}: missing key {key!r} (keys: {', '.join(sorted(row)) or 'none'})")
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise SftflowError(f"{where}: key {key!r} must be a string, got {type(value).__name__}")
    text = str(value).strip()
    if not text:
        raise SftflowError(f"{where}: key {key!r} is empty")
    return text


def _gsm8k(row: dict, where: str) -> dict[str, Any]:
    problem = _require_str(row, "question", where)
    answer = _require_str(row, "answer", where)
    if "####" not in answer:
        raise SftflowError(f"{where}: key 'answer' has no '#### <number>' final answer")
    solution, _, final = answer.rpartition("####")
    expected = final.strip().replace(",", "")
    if not _GSM8K_NUMBER.fullmatch(expected):
        raise SftflowError(f"{where}: the answer after '####' is not a number: {final.strip()!r}")
    return {
        "problem": problem,
        "expected_answer": expected,
        "reference_solution": _CALCULATOR.sub("", solution).strip(),
    }


def _math(row: dict, where: str) -> dict[str, Any]:
    problem = _require_str(row, "problem", where)
    solution = row.get("solution")
    if row.get("answer") is not None and str(row["answer"]).strip():
        expected = _require_str(row, "answer", where)
    else:
        boxed = last_boxed(solution) if isinstance(solution, str) else None
        if boxed is None or not boxed.strip():
            raise SftflowError(f"{where}: no 'answer' key and no \\boxed{{}} answer in 'solution'")
        expected = boxed.strip()
    out: dict[str, Any] = {"problem": problem, "expected_answer": expected}
    if isinstance(solution, str):
        out["reference_solution"] = solution
    # The original Hendrycks files call the subject "type"; MATH-500 and the Qwen copy call it "subject".
    subject = row.get("subject", row.get("type"))
    if subject is not None:
        out["subject"] = subject
    for key in ("level", "unique_id"):
        if key in row:
            out[key] = row[key]
    return out


def _demo(row: dict, where: str) -> dict[str, Any]:
    out = dict(row)
    out["problem"] = _require_str(row, "problem", where)
    out["expected_answer"] = _require_str(row, "expected_answer", where)
    return out


_NORMALIZERS: dict[str, Callable[[dict, str], dict[str, Any]]] = {
    "gsm8k": _gsm8k,
    "math": _math,
    "math500": _math,
    "demo": _demo,
}


# Every benchmark the workflow can prepare (and therefore evaluate).
NORMALIZED_BENCHMARKS = tuple(sorted(_NORMALIZERS))


def normalize_row(name: str, row: dict, where: str = "<row>") -> dict[str, Any]:
    """One source row of benchmark `name` as a grading row; `where` (file:line) prefixes errors."""
    try:
        normalizer = _NORMALIZERS[name]
    except KeyError:
        raise SftflowError(f"unknown benchmark {name!r}; known: {', '.join(sorted(_NORMALIZERS))}") from None
    return normalizer(row, where)


def _normalized_rows(name: str, source_path: Path) -> Iterator[dict[str, Any]]:
    for line_number, row in iter_jsonl(source_path):
        yield normalize_row(name, row, f"{source_path}:{line_number}")


def prepare_benchmark(name: str, source_path: str | os.PathLike, output_path: str | os.PathLike) -> int:
    """Normalise the local JSONL `source_path` of benchmark `name` into `output_path`; return the row count.

    Strict: any bad line or missing key raises SftflowError naming file:line, and nothing is written.
    """
    source = Path(source_path)
    if name not in _NORMALIZERS:
        raise SftflowError(f"unknown benchmark {name!r}; known: {', '.join(sorted(_NORMALIZERS))}")
    rows = list(_normalized_rows(name, source))
    with atomic_path(output_path) as tmp:
        tmp.write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in rows))
    return len(rows)


# --- download (real runs only) -----------------------------------------------------------------


def _offline_hint(name: str) -> str:
    return f"download it elsewhere and set {LOCAL_PATH_OPTION}.{name} in the config to the local JSONL file"


def _download_url(url: str, dest: Path, timeout: float) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": "sftflow"})
    with urllib.request.urlopen(request, timeout=timeout) as response, atomic_path(dest) as tmp:
        with open(tmp, "wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)


def _load_hub_dataset(dataset: str, split: str) -> Iterable[dict]:
    # Imported here: `datasets` is heavy and only this path needs it.
    from datasets import load_dataset

    return load_dataset(dataset, split=split)


def _download_hub(dataset: str, split: str, dest: Path) -> None:
    rows = _load_hub_dataset(dataset, split)
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as f:
            for row in rows:
                f.write(orjson.dumps(dict(row)) + b"\n")


def download_benchmark(name: str, dest: str | os.PathLike, timeout: float = 60.0) -> Path:
    """Download the raw test split of benchmark `name` to `dest` (JSONL, written atomically).

    The result is the source format (feed it to `prepare_benchmark`). A network failure raises
    SftflowError naming the URL/dataset and the config option for using a local copy instead.
    """
    if name not in SOURCES:
        hint = " (the workflow generates it)" if name in GENERATED else ""
        raise SftflowError(f"benchmark {name!r} cannot be downloaded{hint}; downloadable: {', '.join(sorted(SOURCES))}")
    source = SOURCES[name]
    dest = Path(dest)
    if source.url:
        try:
            _download_url(source.url, dest, timeout)
        except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as err:
            # URLError covers DNS failures, refused connections and HTTP errors (404 after a move).
            _raise_download_error(name, source, getattr(err, "reason", err), err)
    else:
        assert source.hf_dataset and source.hf_split
        try:
            _download_hub(source.hf_dataset, source.hf_split, dest)
        except OSError as err:
            # The hub client reports network trouble and offline mode as OSError subclasses
            # (ConnectionError, requests' and huggingface_hub's errors).
            _raise_download_error(name, source, err, err)
    return dest


def _raise_download_error(name: str, source: BenchmarkSource, reason: object, err: BaseException) -> None:
    raise SftflowError(
        f"could not download benchmark {name!r} from {source.location}: {reason}; "
        f"without network access, {_offline_hint(name)}"
    ) from err


# --- entry points (scripts/prepare_benchmark.py) -----------------------------------------------


def prepare_one(name: str, output_path: str | os.PathLike, source: str | None) -> int:
    """Normalise benchmark `name` from the local `source` file, or from a fresh download when it is None."""
    if source is not None:
        log.info("benchmark %s: reading the local source %s (%s.%s)", name, source, LOCAL_PATH_OPTION, name)
        count = prepare_benchmark(name, source, output_path)
    else:
        with tempfile.TemporaryDirectory(dir=Path(output_path).parent) as tmp:
            raw = Path(tmp) / "source.jsonl"
            log.info("benchmark %s: downloading %s", name, SOURCES[name].location if name in SOURCES else name)
            download_benchmark(name, raw)
            count = prepare_benchmark(name, raw, output_path)
    expected = SOURCES[name].rows if name in SOURCES else None
    log.info("benchmark %s: %d problems -> %s", name, count, output_path)
    if expected is not None and count != expected:
        log.warning("benchmark %s: %d problems, but its public test split has %d", name, count, expected)
    return count


def prepare_from_snakemake(smk) -> None:
    from sftflow.logs import setup_logging

    setup_logging(smk.log[0] if smk.log else None)
    try:
        prepare_one(smk.wildcards.benchmark, smk.output[0], smk.params.source)
    except SftflowError as err:
        log.error("%s", err)
        raise SystemExit(f"error: {err}") from None


def prepare_main(argv: list[str] | None = None) -> int:
    import argparse

    from sftflow.logs import setup_logging

    parser = argparse.ArgumentParser(prog="python scripts/prepare_benchmark.py")
    parser.add_argument("name", help=", ".join(sorted(_NORMALIZERS)))
    parser.add_argument("output")
    parser.add_argument("--source", help="local source JSONL (default: download it)")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        prepare_one(args.name, args.output, args.source)
    except SftflowError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
