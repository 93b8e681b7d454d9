"""prepare_data's output order over its on-disk spool (grouping by problem, deduplication per problem bucket,
code/text choice, downsampling, shuffle) is the order and the counts of the plain in-memory restatement below,
also when the spool's rows span many buckets, blocks and copy batches."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from sftflow.prepare import digests as D
from sftflow.prepare import spool as S
from sftflow.prepare.cli import main
from sftflow.prepare.filters import code_text_picks
from tests.conftest import read_jsonl, write_jsonl

CODE = "<tool_call>"  # the default code_begin


def generations(n: int = 3000, problems: int = 400, seed: int = 0) -> list[dict]:
    """Seed-major rows (a problem's repeats far apart), a few hot problems, few distinct solutions (repeats)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        p = i % problems if rng.random() < 0.8 else rng.randrange(5)
        code = f"{CODE}print({p}){CODE.replace('<', '</')}\n" if rng.random() < 0.4 else ""
        rows.append(
            {
                "problem": f"Problem {p}: what is {p} + 1?",
                "generation": f"Style {rng.randrange(3)}. {code}The answer is \\boxed{{{p + 1}}}.",
                "expected_answer": str(p + 1),
                "symbolic_correct": rng.random() < 0.9,
            }
        )
    return rows


def restated(rows, *, deduplicate=True, mode=None, method=None, num=None, do_shuffle=True, seed=42):
    """NeMo-Skills' order, with whole rows in Python lists; and the rows each step dropped."""
    kept, seen = [], set()
    for row in rows:
        if not row["symbolic_correct"]:
            continue
        key = (row["problem"], row["generation"])
        if deduplicate and key in seen:
            continue
        seen.add(key)
        kept.append(row)
    dropped = {"deduplicate": sum(r["symbolic_correct"] for r in rows) - len(kept)}
    groups: dict[str, list] = {}
    for row in kept:
        groups.setdefault(row["problem"], []).append(row)
    if mode:
        for problem, group in groups.items():
            groups[problem] = [group[i] for i in code_text_picks([CODE in r["generation"] for r in group], mode)]
    grouped = [row for group in groups.values() for row in group]
    dropped["code_text_filter"] = len(kept) - len(grouped)
    rng = random.Random(seed)
    if method == "random":
        if do_shuffle:
            rng.shuffle(grouped)
        return [(r["problem"], r["generation"]) for r in grouped[:num]], dropped
    if method == "fair" and len(grouped) > num:
        queues, grouped, depth = [g for g in groups.values() if g], [], 0
        while len(grouped) < num:
            grouped += [q[depth] for q in queues if depth < len(q)][: num - len(grouped)]
            depth += 1
    if do_shuffle:
        rng.shuffle(grouped)
    return [(r["problem"], r["generation"]) for r in grouped], dropped


@pytest.fixture
def small_spool_blocks(monkeypatch):
    """Buckets of 64 rows, blocks of 100, copies of 7: every multi-bucket and block-boundary path runs."""
    monkeypatch.setattr(S, "BUCKET_ROWS", 64)
    monkeypatch.setattr(S, "BLOCK_ROWS", 100)
    monkeypatch.setattr(S, "COPY_ROWS", 7)


@pytest.mark.parametrize(
    "args, expected",
    [
        ((), {}),
        (("++do_shuffle=false",), {"do_shuffle": False}),
        (("++deduplicate=false", "++random_seed=3"), {"deduplicate": False, "seed": 3}),
        (("++downsampling_method=fair", "++num_output_samples=700"), {"method": "fair", "num": 700}),
        (("++downsampling_method=fair", "++num_output_samples=99999"), {"method": "fair", "num": 99999}),
        (("++downsampling_method=random", "++num_output_samples=700"), {"method": "random", "num": 700}),
        (
            ("++downsampling_method=random", "++num_output_samples=700", "++do_shuffle=false"),
            {"method": "random", "num": 700, "do_shuffle": False},
        ),
        (("++filters.code_text_filter=all",), {"mode": "all"}),
        (
            ("++filters.code_text_filter=majority_code", "++downsampling_method=fair", "++num_output_samples=500"),
            {"mode": "majority_code", "method": "fair", "num": 500},
        ),
        (("++filters.code_text_filter=any_code", "++do_shuffle=false"), {"mode": "any_code", "do_shuffle": False}),
        (("++filters.code_text_filter=majority_text",), {"mode": "majority_text"}),
    ],
)
def test_order_and_counts_are_nemo_skills_over_many_buckets(tmp_path, small_spool_blocks, args, expected):
    rows = generations()
    write_jsonl(tmp_path / "gen" / "a.jsonl", rows[:1700])
    write_jsonl(tmp_path / "gen" / "b.jsonl", rows[1700:])
    out = tmp_path / "sft.jsonl"
    argv = [f"++input_files={tmp_path}/gen/*.jsonl", f"++output_path={out}", "++exclude_optional_keys=false", *args]
    assert main(argv) == 0
    reference, dropped = restated(rows, **expected)
    assert [(r["problem"], r["generation"]) for r in read_jsonl(out)] == reference
    funnel = {s["stage"]: s for s in json.loads((tmp_path / "sft.stats.json").read_text())["funnel"]}
    if expected.get("deduplicate", True):
        assert funnel["deduplicate"]["dropped"] == dropped["deduplicate"] > 100
    else:
        assert "deduplicate" not in funnel
    if "mode" in expected:
        assert funnel["code_text_filter"]["dropped"] == dropped["code_text_filter"] > 0
    assert not list(tmp_path.glob("*.spool*")), "the spool and its bucket files are removed"


def test_grouped_rows_keep_first_appearance_and_drop_later_repeats(tmp_path, small_spool_blocks):
    """Problems in order of their first row, rows in file order, a pair's first row kept wherever it falls."""
    spool = S.Spool(tmp_path / "x.spool")
    problems = [f"p{i % 37 if i % 11 else 5}" for i in range(1000)]
    solutions = [f"s{(i * 7) % 13}" for i in range(1000)]
    for problem, solution in zip(problems, solutions):
        digest = D.problem_digest(problem.encode())
        spool.add(f"{problem} {solution}\n".encode(), digest, D.row_digest(digest, solution.encode()), False)
    spool.close()
    rows, starts, repeats = spool.grouped_rows(deduplicate=True)
    first_rows, seen = {}, set()
    for i, pair in enumerate(zip(problems, solutions)):
        if pair not in seen:
            seen.add(pair)
            first_rows.setdefault(pair[0], []).append(i)
    assert rows.tolist() == [i for group in first_rows.values() for i in group]
    assert repeats == 1000 - len(seen)
    assert starts.tolist() == np.cumsum([0] + [len(g) for g in first_rows.values()])[:-1].tolist()
    spool.copy(rows, tmp_path / "out")
    lines = (tmp_path / "out").read_text().splitlines()
    assert lines == [f"{problems[i]} {solutions[i]}" for i in rows.tolist()]
    spool.remove()


def test_a_problem_and_a_solution_cannot_run_into_each_other():
    """The row digest is keyed by the problem's: ("a b", "c") and ("a", "b c") are different rows."""
    assert D.row_digest(D.problem_digest(b"a\x00b"), b"c") != D.row_digest(D.problem_digest(b"a"), b"b\x00c")


def test_a_spool_added_in_blocks_is_the_spool_added_row_by_row(tmp_path, small_spool_blocks):
    """Spool.add_block (what a worker's chunk gives) writes the same files however the rows are cut into blocks."""
    rows = [
        (f"record {i} {'x' * (i % 7)}\n".encode(), bytes([i % 256]) * 16, bytes([i % 3]) * 16, i % 4 == 0)
        for i in range(450)
    ]
    one_by_one, in_blocks = S.Spool(tmp_path / "a.spool"), S.Spool(tmp_path / "b.spool")
    for record, problem, digest, has_code in rows:
        one_by_one.add(record, problem, digest, has_code)
    bounds = [0, 1, 130, 130, 260, 450]  # blocks of 1, 129, no, 130 and 190 rows: across offset blocks of 100
    for start, end in zip(bounds, bounds[1:]):
        block = rows[start:end]
        in_blocks.add_block(
            b"".join(r[0] for r in block),
            np.array([len(r[0]) for r in block], dtype=np.int64),
            b"".join(r[1] + r[2] for r in block),
            bytes(r[3] for r in block),
        )
    for spool in (one_by_one, in_blocks):
        spool.close()
    assert (one_by_one.rows, one_by_one.size, one_by_one.has_code) == (
        in_blocks.rows,
        in_blocks.size,
        in_blocks.has_code,
    )
    for a, b in ((one_by_one.path, in_blocks.path), (one_by_one.keys_path, in_blocks.keys_path)):
        assert a.read_bytes() == b.read_bytes()
    assert one_by_one.offsets_path.read_bytes() == in_blocks.offsets_path.read_bytes()
    expected_offsets = np.cumsum([0] + [len(r[0]) for r in rows])  # row r spans offsets r to r + 1
    assert np.fromfile(in_blocks.offsets_path, dtype=np.int64).tolist() == expected_offsets.tolist()
    assert in_blocks.has_code == bytes(r[3] for r in rows)
    for spool in (one_by_one, in_blocks):
        spool.remove()
