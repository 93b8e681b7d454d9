"""Data-preparation throughput and peak memory on N synthetic generated rows, against a plain orjson read+write floor.

Usage: .venv/bin/python benchmarks/prepare_data_bench.py --rows 1000000 [--workdir /tmp/prep-bench]
Each measured run is a separate process, so its peak RSS (ru_maxrss) is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOOR = """
import sys, orjson
with open(sys.argv[1], "rb") as src, open(sys.argv[2], "wb") as dst:
    for line in src:
        dst.write(orjson.dumps(orjson.loads(line)) + b"\\n")
"""


def synthesize(path: Path, rows: int, seed: int = 0) -> None:
    """Rows in NeMo-Skills generation format: ~4 seeds per problem, 25% wrong, duplicates, junk after the answer."""
    import orjson

    rng = random.Random(seed)
    filler = "We simplify the expression step by step, keeping track of every term carefully. " * 4
    with open(path, "wb") as f:
        buf = []
        problems = max(rows // 4, 1)
        for i in range(rows):
            # Seed-major order, as when output-rs0..3.jsonl are read one after another: a problem's
            # duplicates are a quarter of the file apart, not neighbours.
            p = i % problems
            a, b = p % 997 + 10, p % 89 + 3
            problem = (
                f"Problem {p}: a store sells {a} boxes with {b} pencils each. How many pencils are there in total?"
            )
            correct = rng.random() < 0.75
            value = a * b if correct else a * b + rng.choice([-1, 1])
            style = rng.randrange(3)  # few styles -> duplicates across seeds
            gen = f"{'My solution:' + chr(10) if style == 0 else ''}{filler}\nThere are {a} * {b} = {value} pencils.\nThe answer is \\boxed{{{value}}}."
            if style == 2:
                gen += "\n\nQuestion:\nWhat else?"
            buf.append(
                orjson.dumps(
                    {
                        "problem": problem,
                        "generation": gen,
                        "expected_answer": str(a * b),
                        "predicted_answer": str(value),
                        "symbolic_correct": correct,
                        "majority_votes": 3,
                        "total_votes": 4,
                    }
                )
            )
            if len(buf) == 10000:
                f.write(b"\n".join(buf) + b"\n")
                buf = []
        if buf:
            f.write(b"\n".join(buf) + b"\n")


# Runs one command in a fresh wrapper process, so RUSAGE_CHILDREN covers that command (and its workers) alone.
WRAPPER = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
seconds = time.perf_counter() - start
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
if rc.returncode:
    sys.exit(rc.stderr[-3000:])
print(json.dumps({"seconds": round(seconds, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2)}))
"""


def measure(cmd: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--workdir", default="/tmp/sftflow-prep-bench")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    src = work / f"generated-seedmajor-{args.rows}.jsonl"
    if not src.exists():
        t = time.perf_counter()
        synthesize(src, args.rows)
        print(
            f"synthesized {args.rows} rows ({src.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t:.1f}s",
            flush=True,
        )
    py = sys.executable
    results = {"rows": args.rows, "input_mib": round(src.stat().st_size / 2**20, 1)}
    results["orjson_floor"] = measure([py, "-c", FLOOR, str(src), str(work / "floor.jsonl")])
    filters = [
        f"++filters.{name}=true"
        for name in (
            "drop_multi_boxed",
            "trim_solutions",
            "trim_prefix",
            "drop_incorrect_arithmetic",
            "split_arithmetic",
            "remove_code_errors",
            "remove_matplotlib",
            "remove_verification_code",
            "majority_filter",
        )
    ]
    base = [py, str(ROOT / "scripts" / "prepare_data.py"), f"++input_files={src}"]
    common = [*base, "++majority_filter.min_majority_votes=2", *filters]
    tokenizer = work / "chatml-tokenizer"
    if not tokenizer.exists():  # the demo's ChatML tokenizer: every row rendered through a chat template
        from sftflow.demo.data import corpus
        from sftflow.demo.model import build_tokenizer

        build_tokenizer(corpus(0, n=800), 384, tokenizer)
    # NeMo-Skills' math_sft.yaml defaults (no filter; grouped by problem, then shuffled), without a tokenizer.
    results["prepare_defaults"] = measure([*base, f"++output_path={work / 'sft-defaults.jsonl'}"])
    # The same with a tokenizer: input and output rendered through its chat template (NeMo-Skills' usual run).
    results["prepare_defaults_chat_template"] = measure(
        [*base, f"++output_path={work / 'sft-template.jsonl'}", f"++tokenizer={tokenizer}"]
    )
    results["prepare_all_filters"] = measure(
        [*common, f"++output_path={work / 'sft-stream.jsonl'}", "++do_shuffle=false"]
    )
    results["prepare_all_filters_shuffled"] = measure(
        [*common, f"++output_path={work / 'sft-shuffled.jsonl'}", "++do_shuffle=true"]
    )
    stats = json.loads((work / "sft-stream.stats.json").read_text())
    results["rows_written"] = stats["rows_written"]
    floor = results["orjson_floor"]["seconds"]
    for key in (
        "prepare_defaults",
        "prepare_defaults_chat_template",
        "prepare_all_filters",
        "prepare_all_filters_shuffled",
    ):
        results[key]["rows_per_second"] = round(args.rows / results[key]["seconds"])
        results[key]["x_floor"] = round(results[key]["seconds"] / floor, 2)
    results["orjson_floor"]["rows_per_second"] = round(args.rows / floor)
    results["cpu"] = os.cpu_count()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
