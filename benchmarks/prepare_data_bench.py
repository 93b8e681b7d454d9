"""Data-preparation throughput and peak memory on N synthetic generated rows, against a plain orjson read+write floor.

Usage: .venv/bin/python benchmarks/prepare_data_bench.py --rows 1000000 [--workdir /tmp/prep-bench]
Each measured run is a separate process, so its peak RSS (ru_maxrss) is its own; the process tree's peak
(sampled, an upper bound: forked workers share pages) is reported beside it.

Memory only, the NeMo-Skills defaults with and without a chat template, against another checkout's scripts:
  .venv/bin/python benchmarks/prepare_data_bench.py --rows 4000000 --runs defaults,chat_template \
      --scripts-dir /work/main/scripts
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


RUNS = ("floor", "defaults", "chat_template", "all_filters", "all_filters_shuffled")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--workdir", default="/tmp/sftflow-prep-bench")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {','.join(RUNS)}")
    parser.add_argument("--scripts-dir", default=str(ROOT / "scripts"), help="whose prepare_data.py to run")
    args = parser.parse_args()
    runs = args.runs.split(",")
    if set(runs) - set(RUNS):
        sys.exit(f"unknown --runs {sorted(set(runs) - set(RUNS))}; choose from {RUNS}")
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
    results = {"rows": args.rows, "input_mib": round(src.stat().st_size / 2**20, 1)}
    results.update(run_all(src, work, runs, Path(args.scripts_dir)))
    floor = results.get("orjson_floor", {}).get("seconds")
    for key, value in results.items():
        if isinstance(value, dict) and "seconds" in value:
            value["rows_per_second"] = round(args.rows / value["seconds"])
            if floor and key != "orjson_floor":
                value["x_floor"] = round(value["seconds"] / floor, 2)
    results["cpu"] = os.cpu_count()
    print(json.dumps(results, indent=2))


def run_all(src: Path, work: Path, runs: list[str], scripts_dir: Path) -> dict:
    """The selected runs, each its own measured process: peak RSS of the largest process and of the process tree."""
    from scale_bench import measure as measure_tree  # a sibling: benchmarks/ is this script's folder

    py = sys.executable
    results: dict = {}
    if "floor" in runs:
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
    base = [py, str(scripts_dir / "prepare_data.py"), f"++input_files={src}"]
    common = [*base, "++majority_filter.min_majority_votes=2", *filters]
    tokenizer = work / "chatml-tokenizer"
    if "chat_template" in runs and not tokenizer.exists():  # the demo's ChatML tokenizer: a chat template per row
        from sftflow.demo.data import corpus
        from sftflow.demo.model import build_tokenizer

        build_tokenizer(corpus(0, n=800), 384, tokenizer)
    commands = {
        # NeMo-Skills' math_sft.yaml defaults (no filter; grouped by problem, then shuffled), without a tokenizer.
        "defaults": [*base, f"++output_path={work / 'sft-defaults.jsonl'}"],
        # The same with a tokenizer: input and output rendered through its chat template (NeMo-Skills' usual run).
        "chat_template": [*base, f"++output_path={work / 'sft-template.jsonl'}", f"++tokenizer={tokenizer}"],
        "all_filters": [*common, f"++output_path={work / 'sft-stream.jsonl'}", "++do_shuffle=false"],
        "all_filters_shuffled": [*common, f"++output_path={work / 'sft-shuffled.jsonl'}", "++do_shuffle=true"],
    }
    for name, cmd in commands.items():
        if name in runs:
            results[f"prepare_{name}"] = measure_tree(cmd)
            print(f"prepare_{name}: {results[f'prepare_{name}']}", file=sys.stderr, flush=True)
    if "all_filters" in runs:
        results["rows_written"] = json.loads((work / "sft-stream.stats.json").read_text())["rows_written"]
    return results


if __name__ == "__main__":
    main()
