"""Evaluate one model on one benchmark: serve it, generate (with resume), grade, write outputs and metrics.

`python scripts/generate.py --model-label final --model DIR --benchmark demo --benchmark-file F
--seeds 0 --output-dir DIR --resume-dir DIR --server-log F [--config FILE ...] -- SERVER COMMAND...`
(the `generate` rule writes this command line; `snakemake -n -p` shows it, server command included). The
`--config` files hold the evaluation settings (sftflow.evaluation.settings): the rule passes the eval stage
file and eval.run.json that the workflow wrote while planning.

The output directory (written atomically) holds NeMo-Skills-format generation files - the benchmark
rows plus `generation`, `predicted_answer`, `symbolic_correct`, `num_generated_tokens`,
`generation_seconds`, `finish_reason` - and `metrics.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import shutil
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import orjson

from sftflow.errors import SftflowError
from sftflow.evaluation.generation import Client, GenerationSettings, build_requests, generate, model_fingerprint
from sftflow.evaluation.grading import Grader, grade_generation
from sftflow.evaluation.metrics import Sample, compute_metrics
from sftflow.evaluation.server import InferenceServer, Terminated
from sftflow.evaluation.settings import EvalSettings
from sftflow.io import atomic_path, read_jsonl, write_json
from sftflow.logs import setup_logging

__all__ = ["evaluate", "main"]

log = logging.getLogger("sftflow.evaluate")


def _prompts(rows: list[dict], settings: EvalSettings, tokenizer_path: str, where: str) -> list[str | list[dict]]:
    from sftflow.prepare.formatting import Formatter, load_tokenizer
    from sftflow.prepare.prompts import load_prompt_config

    prompt = load_prompt_config(settings.prompt_config)
    if settings.endpoint == "chat":
        # The server applies its own chat template; we send the same messages training saw.
        formatter = Formatter(prompt, None, settings.system_message)
        return [formatter.messages(prompt.fill(row, f"{where}:{i + 1}: ")) for i, row in enumerate(rows)]
    tokenizer = load_tokenizer(tokenizer_path, settings.chat_template)
    formatter = Formatter(prompt, tokenizer, settings.system_message, settings.chat_template_kwargs)
    log.info("prompts rendered as in training (%s, prompt config %s)", formatter.mode, settings.prompt_config)
    return [formatter.prompt_text(row, f"{where}:{i + 1}: ") for i, row in enumerate(rows)]


NO_ANSWER_WARN_PERCENT = 50.0


def no_answer_warning(metrics: dict[str, Any], settings: EvalSettings) -> str | None:
    """A loud note when most generations have no answer the grader can find: usually the model does not
    write the answer format the extraction expects, not a model that knows nothing."""
    no_answer = metrics.get("no_answer")
    if no_answer is None or no_answer < NO_ANSWER_WARN_PERCENT:
        return None
    how = (
        "the last \\boxed{...}"
        if settings.extract_from_boxed
        else f"the last match of eval.extract_regex {settings.extract_regex!r}"
    )
    return (
        f"{no_answer:.1f}% of the generations have no answer: the grader looks for {how}. Check that the prompt "
        f"(eval.prompt_config / prepare_data.prompt_config, now {settings.prompt_config!r}) asks for that format "
        "and that eval.max_new_tokens lets the model reach it; a model that answers e.g. '#### 42' is graded with "
        "eval.extract_from_boxed: false and eval.extract_regex: '#### (\\S+)'"
    )


def _graded_rows(rows: list[dict], answers: list[dict], grader: Grader, settings: EvalSettings) -> list[dict]:
    graded = []
    extraction = {"extract_from_boxed": settings.extract_from_boxed, "extract_regex": settings.extract_regex}
    for row, answer in zip(rows, answers, strict=True):
        grade = grade_generation(answer["generation"], str(row["expected_answer"]), grader, **extraction)
        graded.append(
            {
                **row,
                "generation": answer["generation"],
                "predicted_answer": grade["predicted_answer"],
                "symbolic_correct": grade["is_correct"],
                "grading_error": grade["grading_error"],
                "num_generated_tokens": answer["num_generated_tokens"],
                "generation_seconds": answer["generation_seconds"],
                "finish_reason": answer["finish_reason"],
            }
        )
    return graded


def evaluate(args: argparse.Namespace, settings: EvalSettings) -> dict[str, Any]:
    """Run one (model, benchmark) evaluation; returns what metrics.json holds."""
    started = time.monotonic()
    benchmark_file = Path(args.benchmark_file)
    rows, total = _read_benchmark(benchmark_file, settings)
    gen = GenerationSettings(
        server_type=settings.server_type,
        model_name=settings.server_model or args.model,
        endpoint=settings.endpoint,
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        concurrency=settings.concurrency,
        max_retries=settings.max_retries,
        request_timeout=settings.request_timeout,
        api_key_env=settings.api_key_env,
    )
    prompts = _prompts(rows, settings, args.tokenizer or args.model, str(benchmark_file))
    fingerprint = model_fingerprint(args.model) if settings.server_type != "openai" else gen.model_name
    requests = build_requests(prompts, args.seeds, gen, fingerprint)
    answers, counts = _serve_and_generate(args, settings, gen, requests)

    grader = Grader(timeout_seconds=settings.grading_timeout)
    outputs: dict[str, list[dict]] = {}
    for request in requests:
        outputs.setdefault(request.output, []).append(answers[request.key])
    graded = {name: _graded_rows(rows, file_answers, grader, settings) for name, file_answers in outputs.items()}
    problems = [[Sample.from_row(graded[name][i]) for name in graded] for i in range(len(rows))]
    metrics = compute_metrics(problems)
    warning = no_answer_warning(metrics, settings)
    if warning:
        log.warning("%s: %s", args.model_label, warning)
    result = {
        "model": args.model_label,
        "model_path": args.model,
        "benchmark": args.benchmark,
        "seeds": args.seeds,
        "num_problems_in_benchmark": total,
        "metrics": metrics,
        "generation": counts,
        "grading": {
            "graded": grader.stats.graded,
            "errors": grader.stats.errors,
            "timeouts": grader.stats.timeouts,
            "error_examples": grader.stats.error_examples,
        },
        "settings": settings.recorded(),
        "model_fingerprint": fingerprint,
        "warnings": [warning] if warning else [],
        "wall_seconds": round(time.monotonic() - started, 3),
    }
    with atomic_path(args.output_dir) as tmp:
        tmp.mkdir()
        for name, file_rows in graded.items():
            (tmp / name).write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in file_rows))
        write_json(tmp / "metrics.json", result)
    shutil.rmtree(args.resume_dir, ignore_errors=True)
    _log_scores(args, metrics)
    return result


def _read_benchmark(benchmark_file: Path, settings: EvalSettings) -> tuple[list[dict], int]:
    """The benchmark's rows (the first eval.max_samples of them) and how many it has in all."""
    rows = read_jsonl(benchmark_file)
    if not rows:
        raise SftflowError(f"{benchmark_file}: the benchmark has no rows")
    for line, row in enumerate(rows, start=1):
        if "expected_answer" not in row:
            raise SftflowError(f"{benchmark_file}:{line}: row has no 'expected_answer'")
    total = len(rows)
    if settings.max_samples is not None:
        rows = rows[: settings.max_samples]
        log.info("eval.max_samples = %d: evaluating %d of %d problems", settings.max_samples, len(rows), total)
    return rows, total


def _serve_and_generate(args: argparse.Namespace, settings: EvalSettings, gen: GenerationSettings, requests: list):
    """Start the inference server (none for server_type openai), send every request; (answers, counts)."""
    if settings.server_type == "openai":
        if not settings.server_address:
            raise SftflowError("eval.server_address: required with server_type 'openai' (e.g. http://host:8000/v1)")
        server = None
        context = contextlib.nullcontext()
        base_url = settings.server_address
        Path(args.server_log).parent.mkdir(parents=True, exist_ok=True)
        Path(args.server_log).write_text(f"server_type openai: no server started; requests go to {base_url}\n")
    else:
        if not args.server_command:
            raise SftflowError("no server command after '--' (the generate rule supplies it)")
        server = InferenceServer(args.server_command, args.server_log, start_timeout=settings.server_start_timeout)
        context = server
        base_url = server.base_url
    with context:
        client = Client(
            base_url,
            gen,
            server_alive=server.alive if server else None,
            server_death=server.death_message if server else None,
        )
        return generate(requests, client, Path(args.resume_dir))


def _log_scores(args: argparse.Namespace, m: dict) -> None:
    log.info(
        "%s on %s: pass@1 %.2f%% over %d problems x %d sample(s); no answer %.2f%%; %s",
        args.model_label,
        args.benchmark,
        m["pass@1"],
        m["num_entries"],
        m["num_samples"],
        m["no_answer"],
        ", ".join(f"{k} {v:.2f}%" for k, v in m.items() if re.fullmatch(r"(pass|majority)@\d+", k) and k != "pass@1")
        or "greedy",
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python scripts/generate.py",
        description="Evaluate one model on one benchmark through an inference server (started here unless "
        "server_type is openai). Everything after '--' is the server command; '{port}' in it is replaced.",
        epilog="Evaluation settings come in --config files (JSON, or YAML by the suffix), a mapping of setting "
        "names to values, e.g. {max_new_tokens: 512}; a setting left out takes its config key's default from "
        "config/schema.yaml. Settings: "
        + ", ".join(f"{f.name} ({f.metadata['keys'][0]})" for f in fields(EvalSettings)),
    )
    p.add_argument("--model-label", required=True, help="name in eval.json (final, base, averaged, step_N)")
    p.add_argument("--model", required=True, help="model directory or hub name the server loads")
    p.add_argument("--tokenizer", help="tokenizer for rendering prompts (default: --model)")
    p.add_argument("--benchmark", required=True)
    p.add_argument("--benchmark-file", required=True, help="prepared benchmark JSONL (problem, expected_answer)")
    p.add_argument("--seeds", type=int, default=0, help="0: one greedy generation; N: N sampled seeds")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--resume-dir", required=True, help="answers of an interrupted run (kept until success)")
    p.add_argument("--server-log", required=True)
    p.add_argument("--log", help="also log to this file")
    p.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FILE",
        help="evaluation settings file (repeatable; a later file's settings win)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, server_command = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    args = parser().parse_args(own)
    args.server_command = server_command
    if args.log:
        Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    setup_logging(args.log)
    for noisy in ("httpx", "httpx2", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        settings = EvalSettings.from_files(*args.config)
        if args.seeds < 0:
            raise SftflowError(f"--seeds must be >= 0, got {args.seeds}")
        evaluate(args, settings)
    except SftflowError as err:
        log.error("error: %s", err)
        return 2
    except Terminated:
        log.error("stopped by SIGTERM (Slurm cancel or time limit); the answers so far are kept for the rerun")
        return 143
    return 0
