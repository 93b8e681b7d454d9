"""Find training problems that copy test-benchmark problems (exact normalised match or word n-gram overlap)."""

from __future__ import annotations

import logging
from collections import Counter, defaultdict

import orjson

from sftflow.errors import SftflowError
from sftflow.io import atomic_path, iter_jsonl
from sftflow.mathtext import normalize_problem

LOG = logging.getLogger("sftflow.contamination")


def ngrams(words: list[str], n: int) -> set[tuple[str, ...]]:
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


class ContaminationIndex:
    """Normalised test problems, indexed by their word n-grams."""

    def __init__(self, test_problems: list[tuple[str, str]], n: int, threshold: float):
        self.n, self.threshold = n, threshold
        self.problems = test_problems  # (benchmark name, problem)
        self.exact: dict[str, int] = {}
        self.by_ngram: dict[tuple, list[int]] = defaultdict(list)
        for i, (_, text) in enumerate(test_problems):
            norm = normalize_problem(text)
            self.exact.setdefault(norm, i)
            for gram in ngrams(norm.split(), n):
                self.by_ngram[gram].append(i)

    def match(self, problem: str) -> dict | None:
        norm = normalize_problem(problem)
        if norm in self.exact:
            i = self.exact[norm]
            return {
                "benchmark": self.problems[i][0],
                "matched_problem": self.problems[i][1],
                "overlap": 1.0,
                "how": "exact",
            }
        grams = ngrams(norm.split(), self.n)
        if not grams:
            return None
        hits = Counter(i for g in grams for i in set(self.by_ngram.get(g, ())))
        if not hits:
            return None
        i, count = hits.most_common(1)[0]
        overlap = count / len(grams)
        if overlap >= self.threshold:
            return {
                "benchmark": self.problems[i][0],
                "matched_problem": self.problems[i][1],
                "overlap": round(overlap, 4),
                "how": f"{self.n}-gram",
            }
        return None


def find_contamination(
    train_files: list[str], benchmarks: dict[str, str], output: str, key: str, n: int, threshold: float
) -> dict:
    """Write a NeMo-Skills style contamination file: one row per distinct training problem with `contaminated`."""
    test = []
    for name, path in benchmarks.items():
        for line, row in iter_jsonl(path):
            if not isinstance(row.get("problem"), str):
                raise SftflowError(f"{path}:{line}: benchmark row has no string field 'problem'")
            test.append((name, row["problem"]))
    index = ContaminationIndex(test, n, threshold)
    seen: set[str] = set()
    matches = 0
    with atomic_path(output) as tmp, open(tmp, "wb") as out:
        for path in train_files:
            for _, row in iter_jsonl(path):
                problem = row.get(key)
                if not isinstance(problem, str) or problem in seen:
                    continue  # malformed rows are reported by prepare_data itself
                seen.add(problem)
                found = index.match(problem)
                matches += found is not None
                out.write(orjson.dumps({key: problem, "contaminated": found is not None, **(found or {})}) + b"\n")
    summary = {"training_problems": len(seen), "test_problems": len(test), "contaminated": matches}
    LOG.info("decontamination: %s", summary)
    return summary
