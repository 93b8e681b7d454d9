"""Shared fixtures: the demo tokenizer, JSONL helpers, and the path of the shared reference data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def demo_tokenizer_dir(tmp_path_factory) -> Path:
    from sftflow.demo.data import corpus
    from sftflow.demo.model import build_tokenizer

    path = tmp_path_factory.mktemp("demo") / "tokenizer"
    build_tokenizer(corpus(0, n=800), 384, path)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
