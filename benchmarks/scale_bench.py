"""Prepare → pack at scale: wall time and peak memory on N synthetic NeMo-Skills rows with a 32k byte-level BPE.

Usage: .venv/bin/python benchmarks/scale_bench.py --rows 250000 [--rows 1000000 ...] [--workdir benchmarks/out/scale]

Per size: synthesize N rows (prepare_data_bench's generator), run prepare_data with the tokenizer (so every
row goes through its ChatML template), then pack_data, each as its own process; then time the tokenizer's
own `encode_batch` (all cores) on the same rendered texts, in another process. Peak RSS is reported three
times: the largest single process (getrusage, children), pack_data's main process alone (its own getrusage,
written at exit) and the sum over the process tree (sampled every 0.1 s, an upper bound: forked workers
share pages). Prints a markdown table and writes results JSON. `--reuse-prepared` skips prepare_data when its
output is newer than the synthesized input (pack_data and raw encode_batch still run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from prepare_data_bench import WRAPPER, synthesize  # a sibling: benchmarks/ is this script's folder

ROOT = Path(__file__).resolve().parents[1]

VOCAB_SIZE = 32768
CHATML = (
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Run in its own process: the tokenizer's own batch encoding of the rendered input and output texts
# (what pack_data tokenizes), with every core (the Rust thread pool), reading excluded from the time.
RAW_ENCODE = """
import json, os, sys, time
os.environ["TOKENIZERS_PARALLELISM"] = "true"
import orjson
from tokenizers import Tokenizer
tok = Tokenizer.from_file(os.path.join(sys.argv[1], "tokenizer.json"))
seconds, rows, tokens, batch = 0.0, 0, 0, []
def run(batch):
    global seconds, tokens
    start = time.perf_counter()
    encoded = tok.encode_batch(batch, add_special_tokens=False)
    seconds += time.perf_counter() - start
    tokens += sum(len(e.ids) for e in encoded)
with open(sys.argv[2], "rb") as f:
    for line in f:
        row = orjson.loads(line)
        batch += [row["input"], row["output"]]
        rows += 1
        if len(batch) >= 16384:
            run(batch)
            batch = []
if batch:
    run(batch)
print(json.dumps({"rows": rows, "tokens": tokens, "seconds": round(seconds, 2), "rows_per_second": round(rows / seconds)}))
"""

# Runs a script as __main__ and, at exit, writes this process's own peak RSS (not its children's) to argv[1].
SELF_PEAK = """
import atexit, os, resource, runpy, sys
out, pid = sys.argv[1], os.getpid()
def record():
    if os.getpid() == pid:
        with open(out, "w") as f:
            f.write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
atexit.register(record)
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def corpus_files() -> list[Path]:
    """Varied local text to train the BPE on (math problems + Python sources), in a fixed order."""
    data = ROOT.parent / "shared" / "data"
    files = sorted(data.glob("*/test.jsonl")) + sorted(data.glob("generations/*.jsonl"))
    site = Path(psutil.__file__).resolve().parents[1]
    for package in ("numpy", "pandas", "sympy", "transformers", "torch"):
        files += sorted((site / package).rglob("*.py"))
    return files


def build_tokenizer(directory: Path, corpus_mib: int = 48) -> Path:
    """A byte-level BPE of VOCAB_SIZE tokens with a ChatML template, saved as an HF tokenizer folder (cached)."""
    if (directory / "tokenizer.json").is_file():
        return directory
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def texts():
        budget = corpus_mib * 2**20
        for path in corpus_files():
            text = path.read_text(encoding="utf-8", errors="ignore")
            budget -= len(text)
            yield text
            if budget <= 0:
                return

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    start = time.perf_counter()
    bpe.train_from_iterator(texts(), trainer)
    print(f"trained a {bpe.get_vocab_size()}-token BPE in {time.perf_counter() - start:.0f} s", flush=True)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    hf.chat_template = CHATML
    tmp = directory.with_name(directory.name + ".tmp")
    hf.save_pretrained(tmp)
    os.replace(tmp, directory)
    return directory


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Wall time, CPU time and peak RSS of `cmd` (largest process, and sum over its process tree)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WRAPPER, *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    peak_tree = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_tree
        root = psutil.Process(proc.pid)
        while not done.is_set():
            total = 0
            try:
                for p in root.children(recursive=True):
                    total += p.memory_info().rss
            except psutil.Error:
                pass
            peak_tree = max(peak_tree, total)
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{err[-3000:]}")
    result = json.loads(out)
    result["peak_tree_rss_mib"] = round(peak_tree / 2**20, 1)
    return result


def run_size(rows: int, work: Path, tokenizer: Path, workers: int | None, reuse_prepared: bool = False) -> dict:
    py = sys.executable
    src = work / f"generated-{rows}.jsonl"
    if not src.exists():
        start = time.perf_counter()
        synthesize(src, rows)
        print(f"synthesized {rows} rows in {time.perf_counter() - start:.0f} s", flush=True)
    sft = work / f"sft-{rows}.jsonl"
    result: dict = {"rows": rows, "input_mib": round(src.stat().st_size / 2**20, 1)}
    prepare_cmd = [py, str(ROOT / "scripts" / "prepare_data.py"), f"++input_files={src}", f"++output_path={sft}"]
    prepared = work / f"prepare-{rows}.json"
    if reuse_prepared and prepared.is_file() and sft.is_file() and sft.stat().st_mtime > src.stat().st_mtime:
        result["prepare_data"] = {**json.loads(prepared.read_text()), "reused": True}
    else:
        result["prepare_data"] = measure([*prepare_cmd, f"++tokenizer={tokenizer}"])
        prepared.write_text(json.dumps(result["prepare_data"]) + "\n")
    print(f"{rows}: prepare_data {result['prepare_data']}", flush=True)
    main_peak = work / f"pack-main-peak-{rows}.kib"
    pack_cmd = [py, "-c", SELF_PEAK, str(main_peak), str(ROOT / "scripts" / "pack_data.py")]
    pack_cmd += ["--input", str(sft), "--tokenizer", str(tokenizer)]
    pack_cmd += ["--output", str(work / f"packed-{rows}"), "--max-total-sequence-length", "4096"]
    if workers:
        pack_cmd += ["--num-workers", str(workers)]
    result["pack_data"] = measure(pack_cmd)
    result["pack_data"]["peak_main_rss_mib"] = round(int(main_peak.read_text()) / 1024, 1)
    print(f"{rows}: pack_data {result['pack_data']}", flush=True)
    result["pack_stats"] = json.loads((work / f"packed-{rows}" / "stats.json").read_text())
    raw = subprocess.run([py, "-c", RAW_ENCODE, str(tokenizer), str(sft)], capture_output=True, text=True)
    if raw.returncode != 0:
        sys.exit(raw.stderr[-3000:])
    result["raw_encode_batch"] = json.loads(raw.stdout)
    print(f"{rows}: raw encode_batch {result['raw_encode_batch']}", flush=True)
    result["sft_rows"] = result["raw_encode_batch"]["rows"]
    result["pack_rows_per_second"] = round(result["sft_rows"] / result["pack_data"]["seconds"])
    result["pack_vs_raw"] = round(result["pack_rows_per_second"] / result["raw_encode_batch"]["rows_per_second"], 3)
    # The same ratio over pack_data's tokenize phase alone (its own clock: start-up, bins and shards excluded).
    tokenize_seconds = result["pack_stats"]["seconds"]["tokenize"]
    result["pack_tokenize_vs_raw"] = round(result["raw_encode_batch"]["seconds"] / tokenize_seconds, 3)
    return result


def projection(results: list[dict], target_rows: int) -> dict:
    """Linear projection of the largest run's time to `target_rows`; memory as measured (flat by design)."""
    last = results[-1]
    scale = target_rows / last["rows"]
    return {
        "rows": target_rows,
        "prepare_seconds": round(last["prepare_data"]["seconds"] * scale),
        "pack_seconds": round(last["pack_data"]["seconds"] * scale),
        "from_rows": last["rows"],
    }


def table(results: list[dict]) -> str:
    lines = [
        "| rows | stage | seconds | rows/s | peak RSS, largest process | peak RSS, main process | peak RSS, process tree |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for stage, n in (("prepare_data", r["rows"]), ("pack_data", r["sft_rows"])):
            m = r[stage]
            main = f"{m['peak_main_rss_mib']:.0f} MiB" if "peak_main_rss_mib" in m else ""
            lines.append(
                f"| {r['rows']:,} | {stage} | {m['seconds']:.1f} | {round(n / m['seconds']):,} | "
                f"{m['peak_rss_mib']:.0f} MiB | {main} | {m['peak_tree_rss_mib']:.0f} MiB |"
            )
        raw = r["raw_encode_batch"]
        lines.append(
            f"| {r['rows']:,} | raw encode_batch (all cores) | {raw['seconds']:.1f} | {raw['rows_per_second']:,} | "
            f"| | pack / raw = {r['pack_vs_raw']:.2f} (tokenize phase {r['pack_tokenize_vs_raw']:.2f}) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, action="append", help="sizes to run (repeatable); default 250000")
    parser.add_argument("--workdir", default=str(ROOT / "benchmarks" / "out" / "scale"))
    parser.add_argument("--num-workers", type=int, help="pack_data workers (default: its own, all cores)")
    parser.add_argument("--project-to", type=int, default=14_000_000)
    parser.add_argument(
        "--reuse-prepared", action="store_true", help="skip prepare_data where its output is newer than the input"
    )
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(ROOT / "benchmarks" / "out" / "bpe32k-chatml")
    sizes = sorted(args.rows or [250_000])
    results = [run_size(n, work, tokenizer, args.num_workers, args.reuse_prepared) for n in sizes]
    summary = {
        "cpus": len(os.sched_getaffinity(0)),
        "tokenizer": str(tokenizer),
        "results": results,
        "projection": projection(results, args.project_to),
    }
    out = work / f"scale-{'-'.join(str(r['rows']) for r in results)}.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(table(results))
    print(json.dumps(summary["projection"]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
