"""prepare_data with NeMo-Skills' defaults gives, row for row and in the same order, what NeMo-Skills'
prepare_data (math_sft.yaml at commit 8b18f39) writes for the real generations in ../shared/data (issue 13).

`nemo_skills_rows` below is our own restatement of that pipeline's documented behaviour, step by step:
ReadData (files of each pattern in sorted order, rows without symbolic_correct skipped, correct rows kept,
(problem, generation) duplicates dropped), GroupSamples (problems in order of first appearance),
ShuffleAndDownsampleData (`random.seed(random_seed)`, then fair / random / no downsampling and one shuffle),
WriteFinalSftManifest (expected_answer as str(), input = the chat template's rendering of the user turn with
the generation prompt, output = the template's rendering of the assistant turn). docs/nemo-skills-parity.md
says how this was also checked against NeMo-Skills itself.
"""

from __future__ import annotations

import glob
import json
import random

import pytest

from sftflow.prepare.cli import main
from tests.conftest import SHARED_DATA, needs_shared_data, read_jsonl

GENERATIONS = SHARED_DATA / "generations" / "output-rs*.jsonl"
pytestmark = needs_shared_data("generations/output-rs*.jsonl")


def assistant_turn(tok, content: str) -> str:
    """NeMo-Skills' Prompt.format_assistant_response: [user ""] + assistant, minus [user ""] + generation prompt."""
    user = tok.apply_chat_template([{"role": "user", "content": ""}], tokenize=False, add_generation_prompt=True)
    both = tok.apply_chat_template(
        [{"role": "user", "content": ""}, {"role": "assistant", "content": content}], tokenize=False
    )
    assert both.startswith(user)
    return both[len(user) :]


def nemo_skills_rows(tok, *, method=None, num=None, do_shuffle=True, seed=42) -> list[dict]:
    samples, seen = [], set()
    for path in sorted(glob.glob(str(GENERATIONS))):
        for line in open(path, encoding="utf-8"):
            row = json.loads(line)
            if not row or "symbolic_correct" not in row or not row["symbolic_correct"]:
                continue
            if (row["problem"], row["generation"]) in seen:
                continue
            seen.add((row["problem"], row["generation"]))
            samples.append(row)
    groups: dict[str, list] = {}
    for row in samples:
        groups.setdefault(row["problem"], []).append(row)
    grouped = list(groups.values())
    rng = random.Random(seed)
    rows = [row for group in grouped for row in group]
    if method == "random":
        if do_shuffle:
            rng.shuffle(rows)
        rows = rows[:num]
    elif method == "fair":
        if len(rows) > num:
            picked, depth = [], 0
            while len(picked) < num:
                for group in grouped:
                    if len(picked) == num:
                        break
                    if len(group) > depth:
                        picked.append(group[depth])
                depth += 1
            rows = picked
        if do_shuffle:
            rng.shuffle(rows)
    elif do_shuffle:
        rng.shuffle(rows)
    return [
        {
            "expected_answer": str(row["expected_answer"]),
            "input": tok.apply_chat_template(
                [{"role": "user", "content": row["problem"]}], tokenize=False, add_generation_prompt=True
            ),
            "output": assistant_turn(tok, row["generation"]),
        }
        for row in rows
    ]


def ours(tmp_path, tokenizer_dir, *args: str) -> list[dict]:
    out = tmp_path / "sft.jsonl"
    assert main([f"++input_files={GENERATIONS}", f"++output_path={out}", f"++tokenizer={tokenizer_dir}", *args]) == 0
    return read_jsonl(out)


@pytest.mark.parametrize(
    "args, expected",
    [
        ((), {}),
        (("++do_shuffle=false",), {"do_shuffle": False}),
        (("++downsampling_method=fair", "++num_output_samples=60"), {"method": "fair", "num": 60}),
        (("++downsampling_method=random", "++num_output_samples=50"), {"method": "random", "num": 50}),
        (("++random_seed=7",), {"seed": 7}),
    ],
    ids=["defaults", "no-shuffle", "fair-60", "random-50", "seed-7"],
)
def test_same_rows_in_the_same_order_as_nemo_skills(tmp_path, demo_tokenizer_dir, args, expected):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_tokenizer_dir)  # a local ChatML tokenizer
    reference = nemo_skills_rows(tok, **expected)
    assert len(reference) == {"fair": 60, "random": 50}.get(expected.get("method"), 107)
    assert ours(tmp_path, demo_tokenizer_dir, *args) == reference


def test_same_rows_with_smollm2s_template(tmp_path, smollm2_tokenizer_dir):
    """A real template that inserts a default system message: NeMo-Skills' empty-user difference and our
    whole-conversation difference give the same assistant turn."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    assert ours(tmp_path, smollm2_tokenizer_dir) == nemo_skills_rows(tok)
