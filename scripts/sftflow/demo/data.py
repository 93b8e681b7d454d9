"""Synthetic arithmetic problems, a held-out test benchmark, and 'generated' solutions in NeMo-Skills' format.

The generated rows carry every defect the data-preparation filters exist for: wrong answers, duplicates
across seeds, multi-boxed answers, over-long rambling, trailing junk after the answer, a 'My solution:'
prefix, wrong intermediate arithmetic, code blocks (with tracebacks, matplotlib, verification code),
<think> tags, unlabeled rows, and test-benchmark problems planted into the training data.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import orjson

from sftflow.io import atomic_path
from sftflow.mathtext import last_boxed

PHRASINGS = ("What is {expr}?", "Compute {expr}.", "Find the value of {expr}.", "Calculate {expr}.")


def make_problem(rng: random.Random) -> tuple[str, str, int]:
    """(problem text, expression, answer) for one random arithmetic question."""
    kind = rng.choices(["add", "sub", "mul", "add3"], weights=[4, 3, 2, 1])[0]
    if kind == "add":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        expr, value = f"{a} + {b}", a + b
    elif kind == "sub":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        a, b = max(a, b), min(a, b)
        expr, value = f"{a} - {b}", a - b
    elif kind == "mul":
        a, b = rng.randint(10, 99), rng.randint(2, 9)
        expr, value = f"{a} * {b}", a * b
    else:
        a, b, c = rng.randint(10, 99), rng.randint(10, 99), rng.randint(10, 99)
        expr, value = f"{a} + {b} + {c}", a + b + c
    return rng.choice(PHRASINGS).format(expr=expr), expr, value


def make_problems(n: int, rng: random.Random, exclude: set[str] = frozenset()) -> list[tuple[str, str, int]]:
    problems, seen = [], set(exclude)
    while len(problems) < n:
        p = make_problem(rng)
        if p[0] not in seen:
            seen.add(p[0])
            problems.append(p)
    return problems


PLACES = ("ones", "tens", "hundreds")


def worked_steps(expr: str) -> str:
    """Digit-by-digit working (the way a tiny model can learn it: each line is a one-digit fact)."""
    parts = expr.split()
    if len(parts) == 5:  # a + b + c: two additions
        a, b, c = int(parts[0]), int(parts[2]), int(parts[4])
        return f"First {a} + {b} = {a + b}.\nThen {a + b} + {c} = {a + b + c}.\n"
    a, op, b = int(parts[0]), parts[1], int(parts[2])
    lines, carry = [], 0
    if op == "+":
        for i, place in enumerate(PLACES[:2]):
            x, y = a // 10**i % 10, b // 10**i % 10
            total = x + y + carry
            terms = f"{x} + {y}" + (f" + {carry}" if carry else "")
            lines.append(f"{place}: {terms} = {total}, write {total % 10}" + (", carry 1." if total >= 10 else "."))
            carry = total // 10
        if carry:
            lines.append("hundreds: write the carry 1.")
    elif op == "-":
        for i, place in enumerate(PLACES[:2]):
            x, y = a // 10**i % 10, b // 10**i % 10
            terms = f"{x} - 1 - {y}" if carry else f"{x} - {y}"
            if x - carry < y:
                lines.append(f"{place}: borrow, 1{terms} = {x + 10 - carry - y}.")
                carry = 1
            else:
                lines.append(f"{place}: {terms} = {x - carry - y}.")
                carry = 0
    else:  # two-digit times one-digit
        for i, place in enumerate(PLACES[:2]):
            x = a // 10**i % 10
            total = x * b + carry
            terms = f"{x} * {b}" + (f" + {carry}" if carry else "")
            lines.append(
                f"{place}: {terms} = {total}, write {total % 10}" + (f", carry {total // 10}." if total >= 10 else ".")
            )
            carry = total // 10
        if carry:
            lines.append(f"hundreds: write the carry {carry}.")
    return "\n".join(lines) + "\n"


def correct_solution(expr: str, value: int, rng: random.Random) -> str:
    ending = rng.choice(["The answer is", "The answer is", "So the answer is", "Therefore the answer is"])
    return f"{worked_steps(expr)}So {expr} = {value}.\n{ending} \\boxed{{{value}}}."


def generated_solution(expr: str, value: int, rng: random.Random) -> tuple[str, int | None]:
    """One sampled 'model' solution and the value it boxes last (None: no answer)."""
    r = rng.random()
    if r < 0.18:  # wrong answer
        wrong = value + rng.choice([-10, -2, -1, 1, 2, 10])
        return f"{worked_steps(expr)}So {expr} = {wrong}.\nThe answer is \\boxed{{{wrong}}}.", wrong
    if r < 0.22:  # two boxed answers
        other = value + rng.choice([-1, 1])
        return f"It is either \\boxed{{{other}}} or \\boxed{{{value}}}.", value
    if r < 0.26:  # right answer, wrong intermediate arithmetic
        slip = value + rng.choice([-3, 3])
        return f"{expr} = {slip}. Checking again, {expr} = {value}.\nThe answer is \\boxed{{{value}}}.", value
    if r < 0.30:  # over-long rambling
        ramble = "".join(f"Let me double-check the digits once more, step {i}.\n" for i in range(1, 31))
        return f"{ramble}{expr} = {value}.\nThe answer is \\boxed{{{value}}}.", value
    if r < 0.33:  # code-interpreter style solutions, some broken
        code = f"<tool_call>\nprint({expr})\n</tool_call>\n```output\n{value}\n```\n"
        variant = rng.choice(["ok", "traceback", "matplotlib", "verify"])
        if variant == "traceback":
            code = f"<tool_call>\nprint({expr}\n</tool_call>\n```output\nTraceback (most recent call last):\nSyntaxError: unexpected EOF\n```\n"
        elif variant == "matplotlib":
            code = (
                f"<tool_call>\nimport matplotlib.pyplot as plt\nprint({expr})\n</tool_call>\n```output\n{value}\n```\n"
            )
        elif variant == "verify":
            code = f"{expr} = {value}. Let's verify this with Python.\n" + code
        return f"{code}The answer is \\boxed{{{value}}}.", value
    if r < 0.36:
        return f"<think>\n{expr} = {value}\n</think>\n{expr} = {value}.\nThe answer is \\boxed{{{value}}}.", value
    if r < 0.37:  # no answer at all
        return f"I am not sure how to compute {expr}.", None
    text = correct_solution(expr, value, rng)
    if rng.random() < 0.1:
        text = "My solution:\n" + text
    if rng.random() < 0.12:  # keeps talking after the answer, like real generations
        junk_problem, junk_expr, junk_value = make_problem(rng)
        text += f"\n\nQuestion:\n{junk_problem}\n\nMy solution:\n{junk_expr} = {junk_value}."
    return text, value


def perturb(problem: str, rng: random.Random) -> str:
    """A copy differing only in case, spacing and punctuation (what decontamination must still catch)."""
    text = problem.upper() if rng.random() < 0.5 else problem.lower()
    text = text.replace(" ", "  ").rstrip("?.") + " ?"
    return text


@dataclass(frozen=True)
class DemoDataSpec:
    """What the demo's generations hold: the fields are the `demo:` config keys of the same names."""

    seed: int
    num_train_problems: int
    num_test_problems: int
    num_seeds: int  # generation files output-rs{0..num_seeds-1}.jsonl, one solution per problem in each
    num_contaminated: int  # test problems planted into the training data

    @classmethod
    def from_section(cls, demo: Mapping) -> DemoDataSpec:
        """From the validated `demo:` config section (its other keys, the model's sizes, are left out)."""
        return cls(**{f.name: demo[f.name] for f in fields(cls)})


def write_demo_data(out_dir: str | Path, benchmark_path: str | Path, spec: DemoDataSpec) -> dict:
    """Write output-rs{i}.jsonl generation files and the test benchmark; return counts for the log."""
    rng = random.Random(spec.seed)
    num_seeds = spec.num_seeds
    test = make_problems(spec.num_test_problems, rng)
    train = make_problems(spec.num_train_problems, rng, exclude={p[0] for p in test})
    planted = []
    for i, (problem, expr, value) in enumerate(test[: spec.num_contaminated]):
        planted.append((problem if i % 2 == 0 else perturb(problem, rng), expr, value))
    train_all = train + planted
    rng.shuffle(train_all)

    per_seed: list[list[dict]] = [[] for _ in range(num_seeds)]
    for problem, expr, value in train_all:
        answers = []
        for s in range(num_seeds):
            text, boxed = generated_solution(expr, value, rng)
            answers.append(boxed)
            row = {"problem": problem, "generation": text, "expected_answer": str(value)}
            predicted = last_boxed(text)
            row["predicted_answer"] = predicted
            if rng.random() < 0.02:
                pass  # unlabeled: the judge did not run on this row
            else:
                correct = predicted is not None and predicted == str(value)
                row["symbolic_correct"] = correct
                row["judgement"] = (
                    f"Reasoning: the final answer {'matches' if correct else 'does not match'}.\nJudgement: {'Yes' if correct else 'No'}"
                )
            per_seed[s].append(row)
        votes = Counter(a for a in answers if a is not None)
        majority = votes.most_common(1)[0][1] if votes else 0
        for s in range(num_seeds):
            per_seed[s][-1]["majority_votes"] = majority
            per_seed[s][-1]["total_votes"] = num_seeds

    out_dir = Path(out_dir)
    for s, rows in enumerate(per_seed):
        with atomic_path(out_dir / f"output-rs{s}.jsonl") as tmp:
            tmp.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    with atomic_path(benchmark_path) as tmp:
        tmp.write_bytes(b"".join(orjson.dumps({"problem": p, "expected_answer": str(v)}) + b"\n" for p, _, v in test))
    return {
        "train_problems": len(train),
        "planted_test_problems": len(planted),
        "test_problems": len(test),
        "rows_per_seed": len(train_all),
    }


def corpus(seed: int, n: int = 3000) -> list[str]:
    """Texts to train the demo tokenizer on: problems, solutions and prompt wording."""
    rng = random.Random(seed + 1)
    texts = []
    for problem, expr, value in make_problems(n, rng):
        texts.append(problem)
        texts.append(generated_solution(expr, value, rng)[0])
    from sftflow.prepare.prompts import PROMPTS_DIR

    texts += [p.read_text(encoding="utf-8") for p in sorted(PROMPTS_DIR.rglob("*.yaml"))]
    return texts
