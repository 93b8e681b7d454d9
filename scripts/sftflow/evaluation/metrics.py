"""Benchmark metrics from graded samples: pass@1 over seeds (with standard error), pass@k, majority@k.

Input is one list of samples per problem, in seed order (sample i of every problem comes from
seed i). Rates are percentages (0-100), as in NeMo-Skills' metrics; everything returned is plain
Python (float/int/None), ready for `json.dumps`.

- pass@1: mean correctness over all samples = mean over seeds of each seed's accuracy;
  pass@1_std_err: standard deviation of the per-seed accuracies (n-1 denominator) / sqrt(seeds),
  None with a single seed (greedy).
- pass@k, for k = 1, 2, 4, ... <= n and k = n: the unbiased estimator 1 - C(n-c, k) / C(n, k) per
  problem (n samples, c correct), averaged over problems (Chen et al., 2021).
- majority@k, for the same k >= 2: the most common non-None answer among the first k samples
  (answers compared after `normalize_answer`) solves the problem if it was graded correct. A tie
  gives the problem the mean correctness of the tied answers, as NeMo-Skills' `_compute_majority_at_k`
  does (a 2-2 tie between a right and a wrong answer scores 0.5), so the score favours neither and does
  not depend on sample order. Samples without an answer do not vote; with no answer at all the problem
  scores 0.
- no_answer: percentage of samples without an extracted answer.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sftflow.evaluation.grading import normalize_answer

__all__ = [
    "Sample",
    "compute_metrics",
    "k_values",
    "majority_answers",
    "majority_score",
    "metrics_markdown",
    "metrics_table",
    "pass_at_k",
]


@dataclass(frozen=True)
class Sample:
    """One graded generation of one problem."""

    correct: bool
    predicted_answer: str | None = None
    num_generated_tokens: int | None = None
    generation_seconds: float | None = None
    grading_error: bool = False

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Sample:
        """From an output row: `is_correct` (ours) or `symbolic_correct` (NeMo-Skills), `predicted_answer`,
        `num_generated_tokens`, `generation_seconds` or `generation_time`, `grading_error`."""
        correct = row.get("is_correct", row.get("symbolic_correct"))
        if not isinstance(correct, bool):
            raise ValueError(f"row has no boolean 'is_correct' or 'symbolic_correct': keys {sorted(row)}")
        seconds = row.get("generation_seconds", row.get("generation_time"))
        return cls(
            correct=correct,
            predicted_answer=row.get("predicted_answer"),
            num_generated_tokens=row.get("num_generated_tokens"),
            generation_seconds=seconds,
            grading_error=bool(row.get("grading_error")),
        )


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem: probability that k of the n samples (c correct) include a correct one."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0  # every choice of k samples contains a correct one
    # Exact integers, then one division: no float overflow for large n.
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def k_values(n: int) -> list[int]:
    """The k reported for n samples: powers of two up to n, plus n itself (n=6 -> [1, 2, 4, 6])."""
    if n < 1:
        return []
    ks = []
    k = 1
    while k <= n:
        ks.append(k)
        k *= 2
    if ks[-1] != n:
        ks.append(n)
    return ks


def majority_answers(samples: Sequence[Sample]) -> list[Sample]:
    """One sample for each most common answer among `samples` (several on a tie), in order of first appearance;
    [] if no sample has an answer.

    A vote is the pair (normalised answer, correctness), as NeMo-Skills counts (answer, score) pairs: the rare
    answer graded both ways (against `evelyn`, `\\text{Evelyn}` is right and `Evelyn` wrong, one normalised form)
    counts as two answers.
    """
    counts: dict[tuple[str, bool], int] = {}
    first: dict[tuple[str, bool], Sample] = {}
    for sample in samples:
        if sample.predicted_answer is None:
            continue
        key = (normalize_answer(sample.predicted_answer), sample.correct)
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, sample)
    if not counts:
        return []
    most = max(counts.values())
    return [first[key] for key, count in counts.items() if count == most]


def majority_score(samples: Sequence[Sample]) -> float:
    """Majority-vote credit of one problem, 0..1: the mean correctness of the most common answers.

    1 or 0 without a tie; a tie gives fractional credit (NeMo-Skills' rule), e.g. 0.5 for a 2-2 tie between a
    right and a wrong answer. 0 when no sample has an answer.
    """
    winners = majority_answers(samples)
    return sum(s.correct for s in winners) / len(winners) if winners else 0.0


def _percent(numerator: float, denominator: int) -> float:
    return 100.0 * numerator / denominator


def compute_metrics(problems: Sequence[Sequence[Sample]]) -> dict[str, Any]:
    """Metrics of one benchmark from per-problem sample lists (all the same length, in seed order)."""
    if not problems:
        raise ValueError("no problems to compute metrics for")
    n = len(problems[0])
    if n == 0:
        raise ValueError("problem 0 has no samples")
    for index, samples in enumerate(problems):
        if len(samples) != n:
            raise ValueError(
                f"problem {index} has {len(samples)} samples, problem 0 has {n}: every seed must cover every problem"
            )

    num_problems = len(problems)
    per_seed_accuracy = [_percent(sum(p[s].correct for p in problems), num_problems) for s in range(n)]
    metrics: dict[str, Any] = {
        "num_entries": num_problems,
        "num_samples": n,
        "pass@1": statistics.fmean(per_seed_accuracy),
        "pass@1_std_err": statistics.stdev(per_seed_accuracy) / math.sqrt(n) if n > 1 else None,
    }
    for k in k_values(n)[1:]:
        metrics[f"pass@{k}"] = 100.0 * statistics.fmean(pass_at_k(n, sum(s.correct for s in p), k) for p in problems)
    for k in k_values(n)[1:]:
        solved = math.fsum(majority_score(samples[:k]) for samples in problems)
        metrics[f"majority@{k}"] = _percent(solved, num_problems)

    all_samples = [s for p in problems for s in p]
    tokens = [s.num_generated_tokens for s in all_samples if s.num_generated_tokens is not None]
    seconds = [s.generation_seconds for s in all_samples if s.generation_seconds is not None]
    metrics["no_answer"] = _percent(sum(s.predicted_answer is None for s in all_samples), len(all_samples))
    metrics["avg_tokens"] = statistics.fmean(tokens) if tokens else None
    metrics["avg_gen_seconds"] = statistics.fmean(seconds) if seconds else None
    metrics["total_gen_seconds"] = math.fsum(seconds) if seconds else None
    metrics["grading_errors"] = sum(s.grading_error for s in all_samples)
    return metrics


# --- tables -------------------------------------------------------------------------------------

_LEADING_COLUMNS = ("num_entries", "num_samples", "pass@1", "pass@1_std_err")
_TRAILING_COLUMNS = ("no_answer", "avg_tokens", "avg_gen_seconds", "total_gen_seconds", "grading_errors")


def _column_order(columns: list[str]) -> list[str]:
    def k_of(column: str) -> int:
        return int(column.split("@", 1)[1])

    lead = [c for c in _LEADING_COLUMNS if c in columns]
    trail = [c for c in _TRAILING_COLUMNS if c in columns]
    passes = sorted((c for c in columns if c.startswith("pass@") and c not in lead), key=k_of)
    majorities = sorted((c for c in columns if c.startswith("majority@")), key=k_of)
    other = [c for c in columns if c not in {*lead, *trail, *passes, *majorities}]
    return lead + passes + majorities + other + trail


def metrics_table(results: Mapping[str, Mapping[str, Any]], index_name: str = "benchmark"):
    """A pandas DataFrame with one row per benchmark (index "benchmark") and one column per metric.

    Benchmarks with fewer seeds simply have no pass@8 etc. (NaN), so several benchmarks fit one table.
    """
    import pandas as pd

    columns: list[str] = []
    for metrics in results.values():
        columns.extend(c for c in metrics if c not in columns)
    frame = pd.DataFrame([{c: m.get(c) for c in columns} for m in results.values()], index=list(results))
    frame.index.name = index_name
    return frame[_column_order(columns)]


def _cell(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def metrics_markdown(
    results: Mapping[str, Mapping[str, Any]],
    digits: int = 2,
    use_tabulate: bool | None = None,
    index_name: str = "benchmark",
) -> str:
    """The metrics of several benchmarks as a Markdown table (rows: benchmarks).

    Uses `DataFrame.to_markdown` when `tabulate` is installed, else a renderer of our own with the
    same content; `use_tabulate` forces one or the other (tests use it).
    """
    frame = metrics_table(results, index_name)
    if use_tabulate is None:
        try:
            import tabulate  # noqa: F401  (only checking that to_markdown can work)

            use_tabulate = True
        except ImportError:
            use_tabulate = False
    # Format cells ourselves in both paths so that the two renderings show the same numbers.
    cells = frame.astype(object).apply(lambda column: column.map(lambda v: _cell(v, digits)))
    if use_tabulate:
        # disable_numparse: keep our formatting (tabulate would re-parse "100.00" and print "100").
        return cells.to_markdown(disable_numparse=True, colalign=("left",) + ("right",) * len(cells.columns))
    header = [frame.index.name or "", *map(str, frame.columns)]
    rows = [[str(index), *row] for index, row in zip(cells.index, cells.itertuples(index=False))]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
        "|" + "|".join(":" + "-" * (w + 1) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|",
    ]
    for row in rows:
        lines.append(
            "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) + " |"
        )
    return "\n".join(lines)
