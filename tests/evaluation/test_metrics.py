"""pass@k against brute-force enumeration, majority@k ties, standard error, and the Markdown table."""

from __future__ import annotations

import itertools
import json
import math
import statistics

import pytest

from sftflow.evaluation.metrics import (
    Sample,
    compute_metrics,
    k_values,
    majority_answers,
    majority_score,
    metrics_markdown,
    metrics_table,
    pass_at_k,
)


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of all k-subsets of n samples (the first c correct) that contain a correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_closed_forms():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # k=1 is the fraction correct
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 5) == 1.0
    assert pass_at_k(10, 6, 5) == 1.0  # only 4 wrong samples: any 5 include a correct one
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(4, 2))  # = 0.5
    assert 0 < pass_at_k(1000, 1, 500) < 1  # large n: exact integers, no overflow


@pytest.mark.parametrize(("n", "c", "k"), [(3, 4, 1), (3, -1, 1), (3, 1, 0), (3, 1, 4)])
def test_pass_at_k_rejects_impossible_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


@pytest.mark.parametrize(
    ("n", "ks"), [(0, []), (1, [1]), (2, [1, 2]), (3, [1, 2, 3]), (4, [1, 2, 4]), (6, [1, 2, 4, 6]), (8, [1, 2, 4, 8])]
)
def test_k_values(n, ks):
    assert k_values(n) == ks


# --- majority -----------------------------------------------------------------------------------


def S(answer, correct=False, **kwargs) -> Sample:
    return Sample(correct=correct, predicted_answer=answer, **kwargs)


def test_majority_picks_the_most_common_answer():
    samples = [S("3"), S("4", True), S("4", True), S(None), S(None), S(None)]
    [chosen] = majority_answers(samples)
    assert chosen.predicted_answer == "4" and chosen.correct  # None answers never win
    assert majority_score(samples) == 1.0
    assert majority_score([S("3"), S("3"), S("4", True)]) == 0.0


def test_majority_tie_gives_the_mean_correctness_of_the_tied_answers():
    # NeMo-Skills' rule: a 2-2 tie between a right and a wrong answer is worth half the problem, whatever the order.
    for tie in ([S("7"), S("8", True), S("8", True), S("7")], [S("8", True), S("7"), S("7"), S("8", True)]):
        assert [s.predicted_answer for s in majority_answers(tie)] == [tie[0].predicted_answer, tie[1].predicted_answer]
        assert majority_score(tie) == 0.5
    assert majority_score([S("1"), S("2", True)]) == 0.5  # 1-1
    assert majority_score([S("1"), S("2", True), S("3")]) == pytest.approx(1 / 3)  # three-way tie, one right
    both_right = [S("0.5", True), S("\\frac12", True), S("2"), S("\\frac12", True), S("0.5", True)]
    assert majority_score(both_right) == 1.0  # a tie between two right answers (equal, but not as strings)
    assert majority_score([S("1"), S("2"), S("3", True), S("3", True), S("1")]) == 0.5  # "2" is not tied


def test_majority_groups_answers_by_normalised_form():
    [chosen] = majority_answers([S("5"), S("1,000", True), S("1000", True), S("\\$1000", True)])
    assert chosen.predicted_answer == "1,000"


def test_majority_counts_an_answer_graded_both_ways_as_two():
    # As NeMo-Skills, which counts (answer, score) pairs: against `evelyn`, `\\text{Evelyn}` is right and `Evelyn`
    # is wrong, though both normalise to `Evelyn`; they vote apart, so here "Evelyn" and "Eve" tie.
    samples = [S("\\text{Evelyn}", True), S("Evelyn"), S("Eve"), S("Eve")]
    assert [s.predicted_answer for s in majority_answers(samples)] == ["Eve"]
    assert majority_score(samples) == 0.0


def test_majority_without_answers():
    assert majority_answers([S(None), S(None)]) == []
    assert majority_score([S(None), S(None)]) == 0.0  # NeMo-Skills: no valid answer scores 0
    assert majority_answers([]) == []
    assert majority_score([]) == 0.0


# --- compute_metrics ----------------------------------------------------------------------------


def test_metrics_by_hand():
    # 3 problems x 4 seeds. Correct per seed: seed0 3/3, seed1 1/3, seed2 2/3, seed3 0/3.
    problems = [
        [S("1", True, num_generated_tokens=10, generation_seconds=1.0), S("1", True), S("1", True), S("2")],
        [S("5", True), S("6"), S("6"), S("6")],
        [S("9", True), S(None), S("9", True), S(None)],
    ]
    m = compute_metrics(problems)
    per_seed = [100.0, 100 / 3, 200 / 3, 0.0]
    assert m["num_entries"] == 3 and m["num_samples"] == 4
    assert m["pass@1"] == pytest.approx(50.0) == pytest.approx(statistics.fmean(per_seed))
    assert m["pass@1_std_err"] == pytest.approx(statistics.stdev(per_seed) / 2)
    # Per problem c = 3, 1, 2 of n = 4.
    assert m["pass@2"] == pytest.approx(100 * (pass_at_k(4, 3, 2) + pass_at_k(4, 1, 2) + pass_at_k(4, 2, 2)) / 3)
    assert m["pass@4"] == pytest.approx(100.0)
    assert "pass@3" not in m and "majority@1" not in m
    # majority@2: p0 "1" (2 votes) right; p1 "5" right / "6" wrong tie -> 0.5; p2 "9" right (None does not vote).
    assert m["majority@2"] == pytest.approx(100 * 2.5 / 3)
    # majority@4: p0 "1" right; p1 "6" (3 votes) wrong; p2 "9" right.
    assert m["majority@4"] == pytest.approx(200 / 3)
    assert m["no_answer"] == pytest.approx(100 * 2 / 12)
    assert m["avg_tokens"] == 10 and m["avg_gen_seconds"] == 1.0 and m["total_gen_seconds"] == 1.0
    assert m["grading_errors"] == 0
    json.dumps(m, allow_nan=False)  # plain JSON


def test_majority_tie_scores_half_a_problem():
    # Problem 0: "7" right twice, "8" wrong twice -> 0.5 of the problem at k=2 and k=4; problem 1 all right;
    # problem 2 no answer at all -> 0.
    problems = [
        [S("7", True), S("8"), S("8"), S("7", True)],
        [S("1", True)] * 4,
        [S(None)] * 4,
    ]
    m = compute_metrics(problems)
    assert m["majority@2"] == pytest.approx(100 * 1.5 / 3)
    assert m["majority@4"] == pytest.approx(100 * 1.5 / 3)
    json.dumps(m, allow_nan=False)


def test_greedy_metrics_have_no_std_err_nor_k_above_one():
    m = compute_metrics([[S("1", True)], [S(None)], [S("3", grading_error=True)]])
    assert m["pass@1"] == pytest.approx(100 / 3)
    assert m["pass@1_std_err"] is None
    assert not [
        key
        for key in m
        if key.startswith("majority@") or (key.startswith("pass@") and key[5:] not in ("1", "1_std_err"))
    ]
    assert m["no_answer"] == pytest.approx(100 / 3)
    assert m["avg_tokens"] is None and m["total_gen_seconds"] is None
    assert m["grading_errors"] == 1
    json.dumps(m, allow_nan=False)


def test_std_err_of_two_seeds():
    # Seed accuracies 50 % and 100 %: sample std 35.355..., std err = 35.355 / sqrt(2) = 25.
    m = compute_metrics([[S("1", True), S("1", True)], [S("2", False), S("2", True)]])
    assert m["pass@1"] == pytest.approx(75.0)
    assert m["pass@1_std_err"] == pytest.approx(25.0)


def test_unequal_seed_counts_are_rejected():
    with pytest.raises(ValueError, match="problem 1 has 1 samples"):
        compute_metrics([[S("1"), S("1")], [S("1")]])
    with pytest.raises(ValueError):
        compute_metrics([])


def test_sample_from_output_rows():
    ours = Sample.from_row(
        {"is_correct": True, "predicted_answer": "4", "num_generated_tokens": 7, "generation_seconds": 0.5}
    )
    assert ours == Sample(True, "4", 7, 0.5)
    nemo = Sample.from_row({"symbolic_correct": False, "predicted_answer": None, "generation_time": 2.0})
    assert nemo == Sample(False, None, None, 2.0)
    with pytest.raises(ValueError, match="is_correct"):
        Sample.from_row({"predicted_answer": "4"})


# --- tables -------------------------------------------------------------------------------------


def results() -> dict:
    return {
        "gsm8k": compute_metrics([[S("1", True, num_generated_tokens=5), S("2")] for _ in range(3)]),
        "math": compute_metrics([[S("x", True)], [S(None)]]),
    }


def test_metrics_table_aligns_benchmarks_with_different_seeds():
    frame = metrics_table(results())
    assert list(frame.index) == ["gsm8k", "math"]
    assert list(frame.columns[:5]) == ["num_entries", "num_samples", "pass@1", "pass@1_std_err", "pass@2"]
    assert frame.columns[-1] == "grading_errors"
    assert frame.loc["gsm8k", "pass@2"] == pytest.approx(100.0)
    assert math.isnan(frame.loc["math", "pass@2"])


@pytest.mark.parametrize("use_tabulate", [True, False])
def test_markdown_table(use_tabulate):
    if use_tabulate:
        pytest.importorskip("tabulate")
    text = metrics_markdown(results(), use_tabulate=use_tabulate)
    lines = text.splitlines()
    assert len(lines) == 4
    assert all(line.startswith("|") and line.endswith("|") for line in lines)
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header[:4] == ["benchmark", "num_entries", "num_samples", "pass@1"]
    gsm8k = dict(zip(header, (cell.strip() for cell in lines[2].strip("|").split("|"))))
    math_row = dict(zip(header, (cell.strip() for cell in lines[3].strip("|").split("|"))))
    assert gsm8k["benchmark"] == "gsm8k" and gsm8k["pass@1"] == "50.00" and gsm8k["pass@2"] == "100.00"
    assert gsm8k["num_entries"] == "3" and gsm8k["avg_tokens"] == "5.00"
    assert math_row["pass@1"] == "50.00" and math_row["pass@2"] == "" and math_row["pass@1_std_err"] == ""


def test_markdown_renderings_agree():
    pytest.importorskip("tabulate")

    def cells(text: str) -> list[list[str]]:
        rows = [line for i, line in enumerate(text.splitlines()) if i != 1]
        return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]

    assert cells(metrics_markdown(results(), use_tabulate=True)) == cells(
        metrics_markdown(results(), use_tabulate=False)
    )
