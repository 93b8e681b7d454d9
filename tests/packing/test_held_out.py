"""The held-out validation share of the prepared data (training.val_set_size): whole problems, a fixed seed,
disjoint from the training rows, counted; pack_data packs the two sides into two directories."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sftflow.errors import SftflowError
from sftflow.packing.cli import pack_with_held_out
from sftflow.packing.held_out import split_problems

EOT = "<|im_end|>\n"
PACKING = {"max_total_sequence_length": 256, "sequences_per_shard": 5}


def problem_rows() -> list[dict]:
    """12 problems with 1-3 solutions each, their rows interleaved (seeds of a generation run one after another);
    problems divisible by 4 are messages rows."""
    rows = []
    for seed in range(3):
        for p in range(12):
            if seed > p % 3:
                continue
            solution = f"solution {seed} of problem {p}: {p} + {seed} = {p + seed}."
            if p % 4 == 0:
                messages = [{"role": "user", "content": f"Problem {p}"}, {"role": "assistant", "content": solution}]
                rows.append({"messages": messages})
            else:
                prompt = f"<|im_start|>user\nProblem {p}<|im_end|>\n<|im_start|>assistant\n"
                rows.append({"input": prompt, "output": solution + EOT})
    return rows


def problem_of(row: dict) -> int:
    text = row["messages"][0]["content"] if "messages" in row else row["input"]
    return int(text.split("Problem ")[1].split("<")[0])


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in problem_rows()))
    return path


def sides(split) -> tuple[list[int], list[int]]:
    """The line numbers (from 1) on the training and the validation side."""
    return [int(n) for n in np.flatnonzero(split.training.keep)], [
        int(n) for n in np.flatnonzero(split.validation.keep)
    ]


@pytest.mark.parametrize("size", [0.25, 7])
def test_whole_problems_are_held_out_deterministically_and_counted(source, size):
    rows = problem_rows()
    split = split_problems(source, size, seed=3)
    training, validation = sides(split)
    assert sorted(training + validation) == list(range(1, len(rows) + 1))  # every row once
    held = {problem_of(rows[n - 1]) for n in validation}
    assert held.isdisjoint(problem_of(rows[n - 1]) for n in training)  # no problem on both sides
    want = 6 if size == 0.25 else 7  # round(0.25 x 24 rows), or the count
    assert len(validation) >= want
    # The documented rule, replayed: the problems in the order of their first row (here problem p is the p-th) are
    # permuted by numpy's default_rng(seed) and taken until at least `want` rows are held out.
    expected, count = set(), 0
    for p in np.random.default_rng(3).permutation(12):
        if count >= want:
            break
        expected.add(int(p))
        count += sum(problem_of(r) == p for r in rows)
    assert held == expected and len(validation) == count
    assert split.summary == {
        "val_set_size": size, "val_set_seed": 3, "rows": 24, "problems": 12, "held_out_rows": len(validation),
        "held_out_problems": len(held), "training_rows": len(training), "training_problems": 12 - len(held),
    }  # fmt: skip
    assert sides(split_problems(source, size, seed=3)) == (training, validation)  # the same seed, the same rows
    assert any(sides(split_problems(source, size, seed=s))[1] != validation for s in range(4, 8))


@pytest.mark.parametrize(
    "size, message",
    [
        (0.01, r"'training.val_set_size' \(0.01\) holds out no row of the 24 rows"),
        (24, r"'training.val_set_size' \(24\) holds out every problem .* no training data would be left"),
        (2.5, r"'training.val_set_size' \(2.5\) is neither a fraction below 1 nor a whole number"),
    ],
)
def test_a_share_that_leaves_no_training_or_no_validation_data_is_refused(source, size, message):
    with pytest.raises(SftflowError, match=message):
        split_problems(source, size, seed=0)


def test_pack_data_packs_the_held_out_rows_apart_and_never_into_training(tmp_path, source, demo_tok):
    """Each side packed is what packing a file of only its rows gives (the control: were the held-out rows also in
    training, the training side would have every row)."""
    from sftflow.packing import PackedDataset, pack_jsonl

    rows = problem_rows()
    pack = {"tokenizer": demo_tok, "cfg": PACKING}
    stats = pack_with_held_out(
        str(source), (str(tmp_path / "packed"), str(tmp_path / "packed_validation")), {"val_set_size": 0.25, "val_set_seed": 3}, **pack
    )  # fmt: skip
    training, validation = sides(split_problems(source, 0.25, seed=3))
    summary = json.loads((tmp_path / "packed_validation" / "held_out.json").read_text())
    assert (summary["held_out_rows"], summary["training_rows"]) == (len(validation), len(training))
    assert stats["rows_read"] == len(training) < len(rows)
    assert json.loads((tmp_path / "packed" / "stats.json").read_text())["held_out"] == summary == stats["held_out"]
    for name, lines in (("packed", training), ("packed_validation", validation)):
        alone = tmp_path / f"{name}.jsonl"
        alone.write_text("".join(json.dumps(rows[n - 1]) + "\n" for n in lines))
        pack_jsonl(alone, tmp_path / f"{name}_alone", demo_tok, PACKING)
        got, expected = PackedDataset(tmp_path / name), PackedDataset(tmp_path / f"{name}_alone")
        assert len(got) == len(expected) == len(lines)
        for i in range(len(got)):
            a, b = got.get_bin(i), expected.get_bin(i)
            assert a["input_ids"].tolist() == b["input_ids"].tolist()
            assert a["loss_mask"].tolist() == b["loss_mask"].tolist()


def test_without_a_held_out_share_pack_data_packs_every_row(tmp_path, source, demo_tok):
    stats = pack_with_held_out(str(source), (str(tmp_path / "packed"), None), None, tokenizer=demo_tok, cfg=PACKING)
    assert stats["rows_read"] == len(problem_rows())
    assert not (tmp_path / "packed_validation").exists()


def test_the_command_line_packs_both_sides_and_needs_an_output_for_the_held_out_rows(
    tmp_path, source, demo_tokenizer_dir
):
    from sftflow.packing.cli import main

    common = ["--input", str(source), "--tokenizer", str(demo_tokenizer_dir), "--output", str(tmp_path / "packed")]
    assert main([*common, "--val-set-size", "0.25", "--val-set-seed", "3"]) == 2  # no --validation-output
    assert not (tmp_path / "packed").exists()
    validation = tmp_path / "packed_validation"
    assert main([*common, "--val-set-size", "0.25", "--val-set-seed", "3", "--validation-output", str(validation)]) == 0
    training, held = sides(split_problems(source, 0.25, seed=3))
    index = json.loads((validation / "index.json").read_text())
    assert index["num_sequences"] == len(held)
    assert json.loads((tmp_path / "packed" / "index.json").read_text())["num_sequences"] == len(training)
