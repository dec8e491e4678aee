#!/usr/bin/env bash
# The GPU check, run on the device machine from the repo root, as one call:
#   bash scripts/device_check.sh STEP...
# STEP is one of:
#   tests[:EXPR]                   the GPU test suite (tests/test_gpu.py), or its tests matching pytest -k EXPR
#   bench:WORKLOADS:ENGINE         forkserve bench (ENGINE forkserve, vllm or both) on the model shape
#                                  (engine arguments: $ENGINE_ARGS, JSON, default the runs' max_num_seqs 1024, 16K tokens)
#   baseline:WORKLOADS             forkserve bench of the older tree in .baseline/ (before/after in one call)
#   benchargs:WORKLOADS:ENGINE:JSON  as bench, with these engine arguments (A/B of a switch in one call, e.g.
#                                  'benchargs:chat:forkserve:{"max_num_seqs": 1024, "max_num_batched_tokens": 16384,
#                                  "flashinfer_sampling": false}'; kv_cache_dtype goes to vLLM too)
#   profile:ARGS                   python -m benchmarks.profile .shared/$MODEL_SHAPE ARGS (ARGS space-separated)
#   phases:ARGS                    python -m benchmarks.phases .shared/$MODEL_SHAPE ARGS (host time per step phase)
#   probe[:PARTS]                  python scripts/attention_probe.py [PARTS, comma-separated: own,level,triton,gemm]
#   moe_probe[:ARGS]               python scripts/moe_probe.py .shared/$MODEL_SHAPE ARGS (MoE time per decode step vs
#                                  bytes; ARGS e.g. "--batches 1 64 1024 --configs default m=128,w=8", space-separated)
# The model shape is .shared/$MODEL_SHAPE/config.json with dummy weights: MODEL_SHAPE=llama-3.1-8b (default) or
# qwen3-30b-a3b (a mixture of experts), e.g. MODEL_SHAPE=qwen3-30b-a3b bash scripts/device_check.sh bench:samples:both
# e.g. bash scripts/device_check.sh tests "profile:--batch 1024 --context 2100 --shared 2000 --cascade on,off" \
#        bench:nosharing,sharedprefix,samples:both
#      bash scripts/device_check.sh tests:structured bench:extraction,extractionfree:both   (structured outputs:
#        apart from the other workloads, since with a tokenizer in the model directory both engines load it)
# Needs (carried, ignored): .wheels/ (flashinfer-python + its missing deps; for structured outputs xgrammar
# >= 0.2.7 with apache-tvm-ffi and pydantic (+ pydantic-core), and jsonschema with its deps for the tests), .shared/ (a copy of
# ../shared/bench), and optionally .fi-cache/ (FlashInfer + Triton JIT output from an earlier run,
# saved again under $OUT at the end). vLLM runs only where /tmp/vsite holds it (../shared/device/README.md).
set -uo pipefail
default_engine_args='{"max_num_seqs": 1024, "max_num_batched_tokens": 16384}'
shape=.shared/${MODEL_SHAPE:-llama-3.1-8b}
out=${OUT:-/tmp/out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .wheels/*.whl
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export FLASHINFER_WORKSPACE_BASE=/tmp/fibase
export TRITON_CACHE_DIR=/tmp/fibase/.cache/triton  # saved with FlashInfer's JIT output
mkdir -p /tmp/fibase/.cache
if [ -f .fi-cache/flashinfer.tar.xz.00 ] && [ ! -d /tmp/fibase/.cache/flashinfer ]; then
    # Ninja rebuilds a kernel whose sources look newer than its outputs, and the wheels were just
    # installed: date them back, and keep the cached outputs' own times (which its deps log records).
    find /tmp/site -exec touch -h -d 2000-01-01 {} +
    cat .fi-cache/flashinfer.tar.xz.* | xz -d | tar -xf - -C /tmp/fibase/.cache
fi
[ -d /tmp/vsite ] && export FORKSERVE_VLLM_PATH=/tmp/vsite
# WITH_VSITE=1: the project's own runs also import the packages of vLLM's bundle that .wheels lacks (xgrammar,
# pydantic, jsonschema for structured outputs), after /tmp/site so that .wheels' FlashInfer comes first
[ -d /tmp/vsite ] && [ -n "${WITH_VSITE:-}" ] && export PYTHONPATH=$PYTHONPATH:/tmp/vsite
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
save_jit_cache() {
    tar -cf - -C /tmp/fibase/.cache flashinfer $(cd /tmp/fibase/.cache && ls -d triton 2>/dev/null) \
        | xz -T8 -1 | split -b 15M -d - "$out/flashinfer.tar.xz."
}
trap save_jit_cache EXIT
for step in "$@"; do
    echo "=== $step"
    case "$step" in
        tests|tests:*)
            select=${step#tests}
            python3 -m pytest -q -p no:cacheprovider --durations=5 tests/test_gpu.py ${select:+-k "${select#:}"} 2>&1 \
                | tee "$out/tests.log" \
                | tail -25 ;;
        bench:*)
            IFS=: read -r _ workloads engine <<< "$step"
            timeout "${BENCH_TIMEOUT:-560}" python3 -m forkserve bench --model-config "$shape" \
                --engine "${engine:-forkserve}" --workloads "$workloads" --out "$out" \
                --engine-args "${ENGINE_ARGS:-$default_engine_args}" 2>&1 \
                | awk '!/ INFO / || /KV cache size|Maximum concurrency|KV pool/' | tee -a "$out/bench.log" ;;
        baseline:*)
            # the same bench from an older tree in .baseline/ (e.g. `git archive 356ab52 forkserve | tar -x -C
            # .baseline`), in this call, for before/after on one machine
            (cd .baseline && PYTHONPATH=/tmp/site:$PWD timeout "${BENCH_TIMEOUT:-560}" python3 -m forkserve bench \
                --model-config "../$shape" --engine forkserve --workloads "${step#baseline:}" --out "$out/baseline" \
                --engine-args "${ENGINE_ARGS:-$default_engine_args}" 2>&1 | grep RESULT | tee -a "$out/bench.log") ;;
        benchargs:*)
            IFS=: read -r _ workloads engine args <<< "$step"
            timeout "${BENCH_TIMEOUT:-560}" python3 -m forkserve bench --model-config "$shape" \
                --engine "${engine:-forkserve}" --workloads "$workloads" --out "$out/$(echo "$args" | md5sum | cut -c1-8)" \
                --engine-args "$args" 2>&1 \
                | awk '!/ INFO / || /KV cache size|Maximum concurrency|KV pool/' | tee -a "$out/bench.log" ;;
        profile:*)
            # shellcheck disable=SC2086
            timeout "${PROFILE_TIMEOUT:-300}" python3 -m benchmarks.profile "$shape" ${step#profile:} \
                --out "$out/profile-$(date +%s).json" 2>&1 | grep -vE " INFO |UserWarning|_warn_once" ;;
        phases:*)
            # shellcheck disable=SC2086
            timeout "${PROFILE_TIMEOUT:-300}" python3 -m benchmarks.phases "$shape" ${step#phases:} 2>&1 \
                | grep -vE " INFO |UserWarning|_warn_once" ;;
        probe|probe:*)
            parts=${step#probe}
            # shellcheck disable=SC2086
            timeout "${PROFILE_TIMEOUT:-300}" python3 scripts/attention_probe.py ${parts:+${parts#:}} 2>&1 \
                | grep -vE "UserWarning|_warn_once" ;;
        moe_probe|moe_probe:*)
            args=${step#moe_probe}
            # shellcheck disable=SC2086
            timeout "${PROFILE_TIMEOUT:-300}" python3 scripts/moe_probe.py "$shape" ${args#:} 2>&1 \
                | grep -vE "UserWarning|_warn_once" ;;
        *)
            echo "unknown step $step" ;;
    esac
done
