"""One engine, timed on the workloads, in its own process (so two engines never share a GPU's memory).

Run as `python -m benchmarks.worker ENGINE CONFIG_DIR WORKLOADS SCALE JSON_ENGINE_ARGS`; prints
one `RESULT {json}` line per workload as it finishes, so a partial run still shows numbers.
"""
from __future__ import annotations

import gc
import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from benchmarks.workloads import Workload, build
from forkserve.engine.summary import batch_summary, step_breakdown

logger = logging.getLogger("forkserve.bench")

Generate = Callable[[Workload], list[Any]]


@dataclass
class EngineUnderTest:
    """What the timing loop needs of an engine: generate, and counters where the engine has them."""

    generate: Generate
    stats: Callable[[], dict] = dict  # cumulative counters (forkserve's Engine.stats)
    steps: Callable[[], list[tuple[float, int, int]]] = list  # per-step trace (summary.StepTimes)
    pages: Callable[[], list[int]] = list  # pages in use per step (Engine.pages_in_use_series)


def has_tokenizer(model_dir: str) -> bool:
    """The bench writes a tokenizer into the model directory for workloads with a schema (run.py)."""
    return (Path(model_dir) / "tokenizer.json").exists()


SHARED_ENGINE_ARGS = ("kv_cache_dtype",)


def forkserve_runner(model_dir: str, engine_args: dict[str, Any]) -> EngineUnderTest:
    import torch

    from forkserve import LLM, SamplingParams, StructuredOutputsParams
    from forkserve.engine.summary import StepTimes

    on_gpu = torch.cuda.is_available() and engine_args.get("device", "auto") != "cpu"
    args = dict(load_format="dummy", skip_tokenizer_init=not has_tokenizer(model_dir),
                dtype="bfloat16" if on_gpu else "float32", enable_prefix_caching=True, seed=0)
    args.update(engine_args)
    llm = LLM(model_dir, **args)
    step_times = StepTimes()
    llm.engine.counters.hooks.append(step_times)

    def generate(w: Workload) -> list[Any]:
        prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in w.requests]
        # A schema's object ends at EOS (the one token its grammar allows once complete); without
        # one, every request runs to max_tokens.
        schema = None if w.schema is None else StructuredOutputsParams(json=w.schema, disable_any_whitespace=True)
        params = [SamplingParams(**w.sampling, n=r.n, max_tokens=r.max_tokens, ignore_eos=schema is None,
                                 structured_outputs=schema) for r in w.requests]
        return llm.generate(prompts, params, use_tqdm=False)

    return EngineUnderTest(generate, llm.engine.stats, lambda: list(step_times.series), llm.engine.pages_in_use_series)


def vllm_runner(model_dir: str, engine_args: dict[str, Any]) -> EngineUnderTest:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import StructuredOutputsParams

    # Arguments that change what is computed (the KV cache's dtype) go to both engines; the rest
    # of --engine-args are forkserve's own switches.
    shared = {name: engine_args[name] for name in SHARED_ENGINE_ARGS if name in engine_args}
    llm = LLM(model=model_dir, load_format="dummy", skip_tokenizer_init=not has_tokenizer(model_dir),
              dtype="bfloat16", gpu_memory_utilization=0.90, enable_prefix_caching=True, seed=0, **shared)

    def generate(w: Workload) -> list[Any]:
        prompts = [TokensPrompt(prompt_token_ids=r.prompt_token_ids) for r in w.requests]
        schema = None if w.schema is None else StructuredOutputsParams(json=w.schema, disable_any_whitespace=True)
        params = [SamplingParams(**w.sampling, n=r.n, max_tokens=r.max_tokens, ignore_eos=schema is None,
                                 structured_outputs=schema) for r in w.requests]
        return llm.generate(prompts, params, use_tqdm=False)

    return EngineUnderTest(generate)


def schema_check(schema: dict[str, Any], outputs: list[Any]) -> dict[str, Any]:
    """How many outputs are valid JSON objects of the schema (jsonschema where installed), and
    their finish reasons: both engines' outputs are checked alike, after the clock stops."""
    try:
        from jsonschema import Draft202012Validator
        validator = Draft202012Validator(schema)
    except ImportError:
        validator = None
    valid, reasons = 0, {}
    for completion in (c for o in outputs for c in o.outputs):
        reasons[completion.finish_reason] = reasons.get(completion.finish_reason, 0) + 1
        try:
            value = json.loads(completion.text, strict=False)  # xgrammar lets maxLength strings hold control characters
        except ValueError:
            continue
        valid += validator.is_valid(value) if validator is not None else isinstance(value, dict)
    return {"schema_valid": valid, "finish_reasons": reasons}


def warm_up_workloads(structured: bool = False) -> list[Workload]:
    """What each engine runs before the clock starts: half-size batches (full 16K-token prefill
    steps, decodes at many batch sizes, prefill and decode steps with shared prefixes, forked
    samples), so every kernel is built and the allocator holds blocks for the largest activations,
    as after vLLM's start-up (its profiling forward of a full step). The earlier warm-up (a few
    thousand tokens) never ran a full prefill step. Seeds of their own: no prompt may share a
    cached prefix with the timed batches. `structured` (a tokenizer is there): a small extraction
    batch too, which builds the mask kernels and compiles its schema in both engines."""
    warm_ups = [build("nosharing", 2, seed=1002), build("sharedprefix", 2, seed=1000), build("samples", 4, seed=1001),
                build("chat", 4, seed=1004)]
    return warm_ups + ([build("extraction", 8, seed=1003)] if structured else [])


def _alloc_retries() -> int | None:
    """How often PyTorch's CUDA allocator had to free its cache and retry (each a device sync):
    a run short of activation memory shows here, not as an error."""
    import torch

    return torch.cuda.memory_stats().get("num_alloc_retries", 0) if torch.cuda.is_available() else None


def _peak_memory() -> dict[str, float]:
    """The most device memory PyTorch's allocator has held at once (KV pool, weights, activations,
    graph pools: how close the pool's sizing came to the memory limit), and the most its tensors
    used at once (the difference is its cache's fragmentation), in GiB."""
    import torch

    return {"cuda_peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
            "cuda_peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def _device_used_gib() -> float | None:
    """Device memory in use by every process on the GPU (nvidia-smi), in GiB: compares the two
    engines at the same gpu_memory_utilization, vLLM's engine running in a process of its own."""
    try:
        used = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                              capture_output=True, text=True, timeout=30, check=True).stdout
        return round(int(used.split()[0]) / 1024, 2)
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def _memory_segments(stage: str) -> None:
    """Log where the allocator's reserved memory sits (why `cuda_peak_reserved_gib` exceeds the
    tensors' peak): per pool (the default one, the decode graphs' private one), reserved,
    allocated, segment count, bytes in wholly free segments and the largest free block; and the
    biggest segments. In GiB (MiB for segments)."""
    import torch

    if not torch.cuda.is_available():
        return
    pools: dict[str, dict[str, float]] = {}
    biggest = []
    for seg in torch.cuda.memory_snapshot():
        pool = "default" if tuple(seg.get("segment_pool_id", (0, 0))) == (0, 0) else "graphs"
        entry = pools.setdefault(pool, dict(reserved=0, allocated=0, segments=0, free_segments=0, largest_free=0))
        entry["reserved"] += seg["total_size"]
        entry["allocated"] += seg["allocated_size"]
        entry["segments"] += 1
        if seg["allocated_size"] == 0:
            entry["free_segments"] += seg["total_size"]
        free = [b["size"] for b in seg["blocks"] if b["state"] == "inactive"]
        entry["largest_free"] = max([entry["largest_free"], *free])
        biggest.append((seg["total_size"] >> 20, seg["allocated_size"] >> 20, pool))
    for entry in pools.values():
        for key in ("reserved", "allocated", "free_segments", "largest_free"):
            entry[key] = round(entry[key] / 2**30, 3)
    biggest.sort(reverse=True)
    free, total = torch.cuda.mem_get_info()
    print(f"MEMORY {stage} " + json.dumps(dict(pools=pools, biggest_segments_mib=biggest[:16],
                                              device_used_gib=round((total - free) / 2**30, 2),
                                              device_total_gib=round(total / 2**30, 2), **_peak_memory())),
          flush=True)


def main(argv: list[str]) -> int:
    engine, model_dir, names, scale, engine_args = argv[0], argv[1], argv[2].split(","), int(argv[3]), json.loads(argv[4])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    under_test = (vllm_runner if engine == "vllm" else forkserve_runner)(model_dir, engine_args)
    print(f"STARTUP {time.perf_counter() - start:.1f}", flush=True)
    if engine == "forkserve":
        _memory_segments("start-up")
    for warmup in warm_up_workloads(has_tokenizer(model_dir)):
        under_test.generate(warmup)
    for name in names:
        w = build(name, scale)
        before = under_test.stats()
        retries = _alloc_retries()
        # Both engines start from a collected heap: building the workload (millions of prompt ids)
        # leaves a full collection due, which would otherwise land inside the timed call (70 ms
        # on the CPU harness for sharedprefix, while the call builds its prompts' parameters).
        gc.collect()
        t = time.perf_counter()
        outputs = under_test.generate(w)
        end = time.perf_counter()
        seconds = end - t
        out_tok = sum(len(c.token_ids) for o in outputs for c in o.outputs)
        in_tok = sum(len(o.prompt_token_ids) for o in outputs)
        stats = batch_summary(before, under_test.stats(), under_test.pages())
        trace = [step for step in under_test.steps() if step[0] >= t]
        if trace:
            stats.update(step_breakdown(trace, end))
        stats["device_used_gib"] = _device_used_gib()
        if w.schema is not None:
            stats.update(schema_check(w.schema, outputs))
        if engine == "forkserve" and retries is not None:  # vLLM allocates in its engine process
            stats["cuda_alloc_retries"] = _alloc_retries() - retries
            stats.update(_peak_memory())
            _memory_segments(name)
        result = dict(engine=engine, workload=name, seconds=round(seconds, 3), prompt_tokens=in_tok,
                      output_tokens=out_tok, output_tok_s=round(out_tok / seconds, 1),
                      total_tok_s=round((in_tok + out_tok) / seconds, 1), stats=stats)
        print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
