"""Run the eval path (scripts/generate.py) once per inference server type that is installed here.

Usage: .venv/bin/python benchmarks/eval_servers_check.py --out eval_servers.json [--gpus 1]
       [--server-types transformers,vllm,sglang,trtllm] [--problems 32] [--seeds 0,2]

Builds a tiny random Llama (demo tokenizer, ChatML template) and a benchmark of arithmetic problems,
then for each server type whose package is installed starts the real server through generate.py
(once per --seeds value: 0 is greedy, N > 0 is N sampled seeds), and records wall time, requests/s and whether the outputs were written
and graded. A type whose package is missing is recorded as "not installed", not as a failure.
tests/gpu/run.sh runs it on a GPU machine; on a CPU machine, --gpus 0 --server-types transformers.
Exit status 1 if an installed server failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sftflow.config import yaml_value
from sftflow.evaluation.server import server_command

REPO = Path(__file__).resolve().parents[1]

INSTALLED = {
    "transformers": lambda: importlib.util.find_spec("fastapi") is not None,
    "vllm": lambda: shutil.which("vllm") is not None,
    "sglang": lambda: importlib.util.find_spec("sglang") is not None,
    "trtllm": lambda: shutil.which("trtllm-serve") is not None,
}


def build_inputs(root: Path, problems: int) -> tuple[Path, Path]:
    from sftflow.demo.data import corpus
    from sftflow.demo.model import build_model, build_tokenizer

    tokenizer = root / "tokenizer"
    build_tokenizer(corpus(0, n=800), 384, tokenizer)
    model = root / "model"
    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    build_model(tokenizer, model, seed=0, num_key_value_heads=2, **sizes)
    bench = root / "test.jsonl"
    rows = [{"problem": f"Compute {i} + {i + 7}.", "expected_answer": str(2 * i + 7)} for i in range(problems)]
    bench.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model, bench


def run_one(server_type: str, model: Path, bench: Path, root: Path, gpus: int, seeds: int) -> dict:
    run_dir = root / f"{server_type}-seeds{seeds}"
    cmd = [sys.executable, str(REPO / "scripts" / "generate.py"), "--model-label", "final", "--model", str(model)]
    cmd += ["--benchmark", "demo", "--benchmark-file", str(bench), "--seeds", str(seeds)]
    cmd += ["--output-dir", str(run_dir / "out"), "--resume-dir", str(run_dir / "resume")]
    cmd += ["--server-log", str(run_dir / "server.log"), "--log", str(run_dir / "generate.log")]
    settings = dict(server_type=server_type, max_new_tokens=32, concurrency=16, max_retries=2)
    cmd += [f"++eval.{key}={yaml_value(value)}" for key, value in settings.items()] + ["--"]
    cmd += server_command(server_type, str(model), gpus, python=sys.executable)
    started = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.monotonic() - started
    record = {"server_type": server_type, "seeds": seeds, "returncode": result.returncode, "wall_seconds": wall}
    if result.returncode == 0:
        metrics = json.loads((run_dir / "out" / "metrics.json").read_text())
        record.update(
            generation_seconds=metrics["generation"]["wall_seconds"],
            requests=metrics["generation"]["requests"],
            requests_per_second=metrics["generation"]["requests"] / max(metrics["generation"]["wall_seconds"], 1e-9),
            pass_at_1=metrics["metrics"]["pass@1"],
            files=sorted(p.name for p in (run_dir / "out").iterdir()),
        )
    else:
        record["stderr_tail"] = result.stderr[-3000:]
        server_log = run_dir / "server.log"
        record["server_log_tail"] = server_log.read_text()[-3000:] if server_log.exists() else ""
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--server-types", default="transformers,vllm,sglang,trtllm")
    parser.add_argument("--problems", type=int, default=32)
    parser.add_argument("--seeds", default="0,2", help="comma-separated runs: 0 greedy, N > 0 N sampled seeds")
    args = parser.parse_args()
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, bench = build_inputs(root, args.problems)
        for server_type in args.server_types.split(","):
            if not INSTALLED[server_type]():
                records.append({"server_type": server_type, "status": "not installed"})
                print(f"{server_type}: not installed, skipped", flush=True)
                continue
            for seeds in (int(s) for s in args.seeds.split(",")):
                record = run_one(server_type, model, bench, root, args.gpus, seeds)
                record["status"] = "ok" if record["returncode"] == 0 else "failed"
                records.append(record)
                print(json.dumps({k: v for k, v in record.items() if "tail" not in k}), flush=True)
                if record["status"] == "failed":
                    print(record["stderr_tail"], file=sys.stderr)
    Path(args.out).write_text(json.dumps(records, indent=2) + "\n")
    return 1 if any(r.get("status") == "failed" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
