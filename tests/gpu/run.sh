#!/usr/bin/env bash
# The repo's GPU checks in one prepared script: `bash tests/gpu/run.sh` (from anywhere).
#
#   1. benchmarks/train_bench_gpu.py - our trainer on a ~0.8B random Llama, bf16, 4096-token packed rows, with
#      backend fsdp and then backend megatron on the same model and data: tokens/s and MFU of each
#      (-> train_bench_gpu.json, train_bench_gpu.train.{fsdp,megatron}.log, train_bench_gpu.log);
#   2. pytest -m gpu tests/gpu, when tests/gpu has test files (-> pytest_gpu.log, pytest_gpu.xml): packed
#      attention isolation; the HF -> megatron-core import giving the HF logits; megatron training of a tiny
#      Llama and Qwen3-MoE in bf16 following the fsdp loss, resuming, and exporting (issue 6);
#   3. benchmarks/eval_servers_check.py - the eval path through each inference server installed here
#      (transformers serve always; vllm, sglang, trtllm-serve when present) -> eval_servers.json.
#
# Results go to $OUT when it is set, else results/gpu_checks/. Python: $PYTHON, else .venv/bin/python when it
# exists, else python3. Extra arguments are passed to the benchmark (e.g. --steps 10 --nproc 8).
# Fails fast (exit 3) when no CUDA device is visible. Exit status: 0 if every check passed, else 1.
set -uo pipefail

cd "$(dirname "$0")/../.."
if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
    PY=.venv/bin/python
else
    PY=python3
fi
RESULTS="${OUT:-results/gpu_checks}"

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() and torch.cuda.device_count() > 0 else 1)'; then
    echo "tests/gpu/run.sh: no CUDA device visible to $PY (or torch missing); these checks need a GPU." >&2
    command -v nvidia-smi >/dev/null && nvidia-smi -L >&2
    exit 3
fi
mkdir -p "$RESULTS"
nvidia-smi > "$RESULTS/nvidia-smi.txt" 2>&1 || true
"$PY" -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)' \
    | tee "$RESULTS/versions.txt"
"$PY" -c 'import flash_attn; print("flash_attn", flash_attn.__version__)' >> "$RESULTS/versions.txt" 2>/dev/null \
    || echo "flash_attn not installed (attention: per-segment SDPA)" >> "$RESULTS/versions.txt"

failed=0
echo "== train_bench_gpu =="
if ! "$PY" benchmarks/train_bench_gpu.py --out "$RESULTS/train_bench_gpu.json" "$@" 2>&1 | tee "$RESULTS/train_bench_gpu.log"; then
    echo "train_bench_gpu FAILED (see $RESULTS/train_bench_gpu.log)" >&2
    failed=1
fi

shopt -s nullglob
tests=(tests/gpu/test_*.py)
if (( ${#tests[@]} )); then
    echo "== pytest -m gpu tests/gpu =="
    if ! "$PY" -m pytest -m gpu tests/gpu -q -rA --junitxml "$RESULTS/pytest_gpu.xml" 2>&1 | tee "$RESULTS/pytest_gpu.log"; then
        echo "pytest -m gpu FAILED (see $RESULTS/pytest_gpu.log)" >&2
        failed=1
    fi
else
    echo "no tests/gpu/test_*.py: skipping pytest -m gpu"
fi

echo "== eval servers =="
if ! "$PY" benchmarks/eval_servers_check.py --out "$RESULTS/eval_servers.json" --gpus 1 2>&1 | tee "$RESULTS/eval_servers.log"; then
    echo "eval_servers_check FAILED (see $RESULTS/eval_servers.log)" >&2
    failed=1
fi

echo "results in $RESULTS"
exit "$failed"
