#!/usr/bin/env bash
# The repo's GPU checks as one command on a bare GPU machine (docs/gpu.md): `bash tests/gpu/run.sh [--dry-run] [ARGS]`.
#
# Before: `python tests/gpu/kit.py fetch` on a CPU machine with PyPI (-> tests/gpu/kit/cp312, carried along).
# On the GPU machine, with the image's python3 and its CUDA torch (never the project's .venv, a CPU torch):
#   kit               pip install --no-index --no-deps --target of the kit's wheels; tests/gpu/kit.py check imports
#                     everything the checks import and checks torch is the image's and CUDA is visible (else exit 3)
#   attention         pytest tests/gpu/test_gpu_attention.py: packed rows give the per-sequence loss (isolation)
#   attention_bench   benchmarks/attention_bench.py, when it exists: per-segment SDPA vs flex_attention vs varlen
#   megatron_import   pytest tests/gpu/test_gpu_megatron_import.py: the HF -> megatron-core import gives HF's logits
#   train_bench       benchmarks/train_bench_gpu.py: fsdp and megatron, bf16, tokens/s and MFU (ARGS go to it)
#   megatron_train    pytest tests/gpu/test_gpu_megatron_train.py: megatron follows fsdp, resumes, exports
#   eval_servers      benchmarks/eval_servers_check.py: the eval path through each server the kit can install
# Each part runs under its own timeout, cut to what is left of the whole budget (GPU_CHECKS_BUDGET_S, 465 s), so
# one hang cannot eat the rest; a part that cannot run is reported as skipped, with why.
# Results in $OUT (else results/gpu_checks): summary.json, kit_check.json, train_bench_gpu.json,
# attention_bench.json, eval_servers.json, run.log and logs.tar.gz (every part's log, junit XML, nvidia-smi).
#
# --dry-run (CPU, CI): the same steps up to the first CUDA call, with this Python's builds of the kit (fetched with
# `kit.py fetch --dry-run-builds`) in a fresh --target beside the project's torch, the image's versions of a few
# pure-Python packages below it, and only the image's packages of this environment visible (python -S); then
# every module the GPU checks import is imported. Python: $PYTHON, else .venv/bin/python, else python3.
# Exit status: 0 every part passed or was skipped, 1 a part failed or timed out, 2 no kit or a wrong Python,
# 3 no CUDA device.
set -uo pipefail

cd "$(dirname "$0")/../.." || exit 2
REPO=$PWD
DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
    DRY_RUN=1
    shift
fi
BENCH_ARGS=("$@")
BUDGET_S=${GPU_CHECKS_BUDGET_S:-465}
# Per-part timeouts in seconds (docs/gpu.md); they add up to 465.
declare -A PART_BUDGET=(
    [kit]=40 [attention]=40 [attention_bench]=40 [megatron_import]=45
    [train_bench]=120 [megatron_train]=125 [eval_servers]=55
)
PART_ORDER=(kit attention attention_bench megatron_import train_bench megatron_train eval_servers)

if (( DRY_RUN )); then
    if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
    elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
    else PY=python3
    fi
    RESULTS=${OUT:-results/gpu_checks_dry_run}
else
    PY=${PYTHON:-python3}
    RESULTS=${OUT:-results/gpu_checks}
    prefix=$("$PY" -c 'import sys; print(sys.prefix)') || { echo "run.sh: cannot run $PY" >&2; exit 2; }
    if [[ -e .venv && "$(realpath "$prefix")" == "$(realpath .venv)" ]]; then
        echo "run.sh: $PY is the project's .venv (a CPU torch); use the GPU image's python3 (or --dry-run)" >&2
        exit 2
    fi
fi
tag=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")') || exit 2
KIT_DIR=tests/gpu/kit/$tag
shopt -s nullglob
wheels=("$KIT_DIR"/*.whl)
if (( ${#wheels[@]} == 0 )); then
    echo "run.sh: no kit for $tag in $KIT_DIR: run 'python tests/gpu/kit.py fetch$( ((DRY_RUN)) && echo ' --dry-run-builds')'" \
        "on a machine with PyPI (and carry tests/gpu/kit/cp312 to the GPU machine)" >&2
    exit 2
fi

mkdir -p "$RESULTS"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_checks.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
LOGS=$WORK/logs
mkdir -p "$LOGS"
PARTS=$WORK/parts.tsv
: > "$PARTS"
exec > >(tee "$RESULTS/run.log") 2>&1
TEE_PID=$!
echo "tests/gpu/run.sh $( ((DRY_RUN)) && echo '--dry-run ')with $PY ($tag), kit $KIT_DIR (${#wheels[@]} wheels), results in $RESULTS"
START=$SECONDS

record() {  # name status seconds budget note
    printf '%s\t%s\t%s\t%s\t%s\n' "$@" >> "$PARTS"
    echo "== $1: $2 ($3 s of $4 s)${5:+: $5}"
}

skip() {  # name why
    record "$1" skipped 0 "${PART_BUDGET[$1]}" "$2"
}

# part NAME COMMAND...: run COMMAND under the part's timeout (cut to what is left of BUDGET_S), log to $LOGS/NAME.log
part() {
    local name=$1 budget=${PART_BUDGET[$1]} left t0 rc status
    shift
    left=$(( BUDGET_S - (SECONDS - START) ))
    if (( left < 15 )); then
        skip "$name" "only ${left} s left of the ${BUDGET_S} s budget"
        return
    fi
    (( budget > left )) && budget=$left
    echo "== $name (timeout ${budget} s): $*"
    t0=$SECONDS
    timeout --kill-after=5 "$budget" "$@" 2>&1 | tee "$LOGS/$name.log"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) status=ok ;;
        124 | 137) status=timeout ;;
        *) status=failed ;;
    esac
    record "$name" "$status" $(( SECONDS - t0 )) "$budget" "$( ((rc)) && echo "exit $rc, see logs.tar.gz:$name.log")"
}

# --- kit: install the wheels onto the image's torch, then import everything the checks import -----------------
kit_timeout() {  # COMMAND...: run it within what is left of the kit part's budget
    local left=$(( PART_BUDGET[kit] - (SECONDS - KIT_T0) ))
    (( left > 0 )) || return 124
    timeout --kill-after=5 "$left" "$@"
}
PIP_INSTALL=("$PY" -m pip install --quiet --no-index --no-deps --no-compile --disable-pip-version-check --target)
install_kit() {
    kit_timeout "${PIP_INSTALL[@]}" "$WORK/kit" "${wheels[@]}" || return
    if (( DRY_RUN )); then
        local standins=(tests/gpu/kit/image-standins/*.whl)
        if (( ${#standins[@]} )); then
            kit_timeout "${PIP_INSTALL[@]}" "$WORK/standins" "${standins[@]}" || return
        fi
        kit_timeout "$PY" tests/gpu/kit.py image-site "$WORK/image-site" || return
        # -S: no site-packages: only the kit, the image's versions and the image's packages of this environment
        PYTHONPATH="$WORK/kit:$WORK/standins:$WORK/image-site:$REPO/scripts:$REPO:$REPO/benchmarks" \
            kit_timeout "$PY" -S tests/gpu/kit.py check --dry-run --target "$WORK/kit" --out "$RESULTS/kit_check.json"
    else
        PYTHONPATH="$WORK/kit:$REPO/scripts:$REPO:$REPO/benchmarks" \
            kit_timeout "$PY" tests/gpu/kit.py check --target "$WORK/kit" --out "$RESULTS/kit_check.json"
    fi
}
export PYTHONUNBUFFERED=1
KIT_T0=$SECONDS
echo "== kit (timeout ${PART_BUDGET[kit]} s)"
install_kit 2>&1 | tee "$LOGS/kit.log"
kit_rc=${PIPESTATUS[0]}
case $kit_rc in
    0) record kit ok $(( SECONDS - KIT_T0 )) "${PART_BUDGET[kit]}" ;;
    3) record kit failed $(( SECONDS - KIT_T0 )) "${PART_BUDGET[kit]}" "no CUDA device visible" ;;
    124 | 137) record kit timeout $(( SECONDS - KIT_T0 )) "${PART_BUDGET[kit]}" ;;
    *) record kit failed $(( SECONDS - KIT_T0 )) "${PART_BUDGET[kit]}" "exit $kit_rc: a missing or conflicting package (kit_check.json)" ;;
esac
# The image's python3 has no install of this project: sftflow comes from scripts/ (an environment variable, as
# the project's code never edits sys.path), the tests' helpers from the repo root.
export PYTHONPATH="$WORK/kit:$REPO/scripts:$REPO${PYTHONPATH:+:$PYTHONPATH}"

finish() {
    local rc=$1
    "$PY" tests/gpu/kit.py summary --parts "$PARTS" --kit-report "$RESULTS/kit_check.json" --out "$RESULTS/summary.json"
    tar -C "$LOGS" -czf "$RESULTS/logs.tar.gz" .
    echo "results in $RESULTS"
    exec >&- 2>&-
    wait "$TEE_PID" 2>/dev/null  # run.log complete before the caller collects it
    exit "$rc"
}

if (( DRY_RUN )); then
    for name in "${PART_ORDER[@]:1}"; do
        skip "$name" "dry-run: would run with a ${PART_BUDGET[$name]} s timeout"
    done
    finish $(( kit_rc == 0 ? 0 : 1 ))
fi
if (( kit_rc == 3 )); then
    command -v nvidia-smi >/dev/null && nvidia-smi -L
    echo "tests/gpu/run.sh: no CUDA device visible to $PY; these checks need a GPU (or use --dry-run)." >&2
    for name in "${PART_ORDER[@]:1}"; do skip "$name" "no CUDA device"; done
    finish 3
fi
# Import problems are in kit_check.json; the parts still run, each failing on its own if it needs what is missing.

# --- the GPU checks ----------------------------------------------------------------------------------------------
nvidia-smi > "$LOGS/nvidia-smi.txt" 2>&1 || true
PYTEST=("$PY" -m pytest -m gpu -q -rA -p no:cacheprovider)

part attention "${PYTEST[@]}" tests/gpu/test_gpu_attention.py --junitxml "$LOGS/attention.xml"

if [[ -f benchmarks/attention_bench.py ]]; then
    part attention_bench "$PY" benchmarks/attention_bench.py --out "$LOGS/attention_bench.json"
    [[ -f $LOGS/attention_bench.json ]] && cp "$LOGS/attention_bench.json" "$RESULTS/"
else
    skip attention_bench "benchmarks/attention_bench.py is not in this checkout"
fi

part megatron_import "${PYTEST[@]}" tests/gpu/test_gpu_megatron_import.py --junitxml "$LOGS/megatron_import.xml"

# 2 warm-up + 8 measured steps of 8 x 4096 tokens per backend: ~0.5 s a step on an H200, the rest is start-up.
part train_bench "$PY" benchmarks/train_bench_gpu.py --warmup-steps 2 --steps 8 --out "$LOGS/train_bench_gpu.json" \
    "${BENCH_ARGS[@]}"
[[ -f $LOGS/train_bench_gpu.json ]] && cp "$LOGS/train_bench_gpu.json" "$RESULTS/"

part megatron_train "${PYTEST[@]}" tests/gpu/test_gpu_megatron_train.py --junitxml "$LOGS/megatron_train.xml"

# transformers serve is what the kit can install; vllm, sglang and trtllm are too large to carry (docs/gpu.md)
# and are recorded by the check as "not installed". One greedy run: a second server start would not fit.
part eval_servers "$PY" benchmarks/eval_servers_check.py --out "$LOGS/eval_servers.json" --gpus 1 --seeds 0
[[ -f $LOGS/eval_servers.json ]] && cp "$LOGS/eval_servers.json" "$RESULTS/"

if awk -F'\t' '$2 != "ok" && $2 != "skipped" {bad = 1} END {exit !bad}' "$PARTS"; then
    finish 1
fi
finish 0
