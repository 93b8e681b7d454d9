"""Atomic file writing and strict JSONL reading with file:line error messages."""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from sftflow.errors import SftflowError


@contextlib.contextmanager
def atomic_path(final_path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `final_path`; rename it into place only if the block succeeds.

    Works for files and directories: whatever the block creates at the temporary path is moved
    over `final_path` on success and deleted on failure, so no partial output is ever left behind.
    """
    final = Path(final_path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".tmp{suffix}", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"internal error: nothing was written to {tmp} for {final}")
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a whole JSONL file of objects strictly (any bad line is an error naming file:line)."""
    return [row for _, row in iter_jsonl(path)]


def iter_jsonl(path: str | os.PathLike, invalid_rows: list | None = None) -> Iterator[tuple[int, dict]]:
    """Yield (line_number, object) for each non-blank line of a JSONL file.

    A line that is not UTF-8, not JSON, or not a JSON object raises SftflowError naming file:line,
    unless `invalid_rows` is a list: then the problem is appended to it as (line, reason) and the
    line is skipped, so the caller can count and report it.
    """
    path = check_input_file(path)
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            row, reason = parse_json_object(raw)
            if reason is None:
                yield line_number, row
            elif invalid_rows is not None:
                invalid_rows.append((line_number, reason))
            else:
                raise SftflowError(f"{path}:{line_number}: {reason}")


def check_input_file(path: str | os.PathLike) -> Path:
    """`path` as a Path, or SftflowError if it is missing or empty."""
    path = Path(path)
    if not path.is_file():
        raise SftflowError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise SftflowError(f"{path}: file is empty (expected one JSON object per line)")
    return path


def parse_json_object(raw: bytes) -> tuple[dict | None, str | None]:
    """(object, None) for a line holding a JSON object, else (None, why not): bad UTF-8, bad JSON, not an object.

    A UTF-8 byte-order mark before the object is accepted (editors on Windows write one at the start of a file;
    `cat` of such files puts one at the start of a line): it is not part of the JSON text."""
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8) :]
    try:
        row = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as uerr:
            return None, f"not valid UTF-8 (byte {uerr.start}: {raw[uerr.start : uerr.start + 1]!r})"
        return None, f"invalid JSON ({err})"
    if not isinstance(row, dict):
        return None, f"expected a JSON object, got {type(row).__name__}"
    return row, None


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory's entries (a rename into it) to disk, where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
