#!/usr/bin/env bash
# The GPU check, run on the device machine from the repo root:
#   bash scripts/device_check.sh [WORKLOADS] [ENGINE] [PROFILE_BATCHES] [PROFILE_CONTEXTS]
# GPU tests, then the bench, then (if PROFILE_BATCHES is given) the decode step breakdown.
# Needs (carried, ignored): .wheels/ (flashinfer-python + its missing deps), .shared/ (a copy of
# ../shared/bench), and optionally .fi-cache/ (FlashInfer JIT output from an earlier run).
# vLLM runs only where /tmp/vsite holds it (see ../shared/device/README.md).
set -euo pipefail
workloads=${1:-nosharing,sharedprefix,samples}
engine=${2:-forkserve}
profile_batches=${3:-}
profile_contexts=${4:-1024}
out=${OUT:-/tmp/out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .wheels/*.whl
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export FLASHINFER_WORKSPACE_BASE=/tmp/fibase
export TRITON_CACHE_DIR=/tmp/fibase/.cache/triton  # saved with FlashInfer's JIT output
mkdir -p /tmp/fibase/.cache
if [ -f .fi-cache/flashinfer.tar.xz.00 ]; then cat .fi-cache/flashinfer.tar.xz.* | xz -d | tar -xf - -C /tmp/fibase/.cache; fi
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv
save_jit_cache() {
    tar -cf - -C /tmp/fibase/.cache flashinfer $(cd /tmp/fibase/.cache && ls -d triton 2>/dev/null) | xz -T8 -1 | split -b 15M -d - "$out/flashinfer.tar.xz."
}
trap save_jit_cache EXIT
if [ "${SKIP_GPU_TESTS:-0}" != 1 ]; then
    python3 -m pytest -q -p no:cacheprovider --durations=5 tests/test_gpu.py 2>&1 | tail -22 || true
fi
if [ -d /tmp/vsite ] && [ "$engine" != forkserve ]; then
    export FORKSERVE_VLLM_PATH=/tmp/vsite
fi
timeout "${BENCH_TIMEOUT:-540}" python3 -m forkserve bench --model-config .shared/llama-3.1-8b --engine "$engine" --workloads "$workloads" \
    --out "$out" --engine-args '{"max_num_seqs": 1024, "max_num_batched_tokens": 16384}' || true
if [ -n "$profile_batches" ]; then
    python3 -m forkserve.bench.profile .shared/llama-3.1-8b --batch "$profile_batches" --context "$profile_contexts" \
        --out "$out/profile.json"
fi
