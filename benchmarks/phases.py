"""Where a decode step's wall time goes on the host, phase by phase, on a bench workload.

Run on the GPU machine:
    python -m benchmarks.phases CONFIG_DIR --workloads sharedprefix,samples [--kernels-at 60]
Each workload runs as the bench builds it (one planned batch). The step's phases (scheduling,
step metadata with cascade planning, graph planning and replay, sampling, reading tokens back)
are wrapped in wall-clock timers; per phase it prints the mean milliseconds over decode-only
steps of at least --min-rows rows, and one line per step with prefill tokens. `to_host` is the
host blocked on the GPU for the previous step's tokens: when it is large, steps run at GPU time.
The bench's warm-up batches run first. A CUDA event recorded as each step call
starts gives the GPU clock from one step's queued work to the next's (the GPU time per step
when the host is ahead). --kernels-at N[,M...] adds a per-kernel profile of steps N.. (each listed
N; --kernels-steps of them, 3 unless told) and the GPU's idle time between kernels there, by the
kernels around each gap. --sync-debug lists the PyTorch calls that waited for the GPU (its sync
debug mode), by source line. The batch is validated and planned with the collector off and runs
with its walks paused, as in `LLM.generate`. Timers cost
microseconds per call; phases nest (build_metadata includes the cascade plan, DecodeGraphs.run
the graph's FlashInfer planning).
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.profiler import ProfilerActivity, profile

import forkserve.worker.runner as runner_module
from forkserve.api import LLM
from forkserve.gc_switches import gc_frozen_for_batch, gc_off_while_planning
from forkserve.worker.attention.cascade import CascadePlanner
from forkserve.worker.attention.flashinfer import FlashInferBackend
from benchmarks.profile import device_spans, idle_between_kernels, idle_per_marker, kernel_totals_ms
from benchmarks.run import model_dir_from_config
from benchmarks.worker import warm_up_workloads
from benchmarks.workloads import build
from forkserve.engine.engine import Engine
from forkserve.engine.scheduler import Scheduler
from forkserve.engine.sharing import BatchSharing
from forkserve.engine.step_builder import StepBuilder
from forkserve.model.llama import LlamaForCausalLM
from forkserve.sampler import Draws, Sampler
from forkserve.sampling_params import SamplingParams
from forkserve.worker.cuda_graphs import DecodeGraphs
from forkserve.worker.runner import ModelRunner

PHASES: list[tuple[object, str]] = [
    (Scheduler, "schedule"), (BatchSharing, "order"), (StepBuilder, "build"), (BatchSharing, "sharing"),
    (ModelRunner, "launch"), (runner_module, "build_metadata"), (CascadePlanner, "plan"), (FlashInferBackend, "prepare"), (FlashInferBackend, "_staged_plan"),
    (LlamaForCausalLM, "forward"), (LlamaForCausalLM, "compute_logits"), (DecodeGraphs, "run"), (Sampler, "draw"),
    (Draws, "copy_to_host"), (Draws, "to_host"), (runner_module, "to_device"), (Engine, "_resolve_in_flight"),
    (Engine, "_advance"),
]


@contextlib.contextmanager
def timed_phases(totals: dict[str, float]) -> Iterator[None]:
    """Add each phase's wall seconds to totals[name] while inside; the originals come back after."""
    originals = [(owner, name, getattr(owner, name)) for owner, name in PHASES]

    def timer(label: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[label] += time.perf_counter() - start
        return timed

    for owner, name, fn in originals:
        label = f"{getattr(owner, '__name__', owner)}.{name}".removeprefix("forkserve.")
        setattr(owner, name, timer(label, fn))
    try:
        yield
    finally:
        for owner, name, fn in originals:
            setattr(owner, name, fn)


STEP_MARKER = "FillFunctor<signed char>"  # the kernel of the one-byte fill queued as each profiled step starts


def print_kernels(profiler: profile, title: str, first_step: int, steps: int, name_chars: int) -> None:
    """Per step of the profiled ones: the kernels' time by name, and the GPU's idle time between
    them; then each step with over 2 ms of it (from one step's marker kernel to the next's)."""
    totals = kernel_totals_ms(profiler)
    spans = device_spans(profiler)
    span, busy, gaps = idle_between_kernels(spans)
    print(f"{title}: kernels {sum(totals.values()) / steps:.2f} ms per step; GPU timeline {span / steps:.2f} ms per "
          f"step, busy {busy / steps:.2f}, idle {(span - busy) / steps:.2f} ({span - busy:.1f} ms in all)", flush=True)
    for kernel, ms in sorted(totals.items(), key=lambda item: -item[1])[:16]:
        print(f"   {ms / steps:8.3f} ms  {kernel[:name_chars]}", flush=True)
    for ms, count, before, after in gaps:
        print(f"   idle {ms / steps:7.3f} ms per step in {count / steps:.1f} gaps: after {before} / before {after}",
              flush=True)
    for step, (idle, longest, before, after) in enumerate(idle_per_marker(spans, STEP_MARKER), first_step):
        if idle > 2.0:
            print(f"   step {step}: GPU idle {idle:.1f} ms, longest {longest:.1f} ms after {before} / before {after}",
                  flush=True)


@contextlib.contextmanager
def synchronizing_calls(enabled: bool) -> Iterator[None]:
    """With `enabled`, print where the host waited on the GPU inside PyTorch ops (its sync debug
    mode: reads of device values, pageable copies), by source line, when the block ends."""
    if not enabled:
        yield
        return
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
    where: dict[str, int] = defaultdict(int)
    for warning in caught:
        where[f"{warning.filename}:{warning.lineno} {str(warning.message)[:60]}"] += 1
    print(f"synchronizing calls: {len(caught)}", flush=True)
    for location, count in sorted(where.items(), key=lambda item: -item[1])[:12]:
        print(f"   {count:6d}  {location}", flush=True)


def run_workload(llm: LLM, name: str, min_rows: int, kernels_at: list[int], kernels_steps: int,
                 name_chars: int) -> None:
    engine = llm.engine
    workload = build(name)
    added = time.perf_counter()
    with gc_off_while_planning():  # as LLM.generate validates and plans
        engine.add_requests([(f"{name}-{i}", engine.make_prompt({"prompt_token_ids": r.prompt_token_ids}, name),
                              SamplingParams(**workload.sampling, n=r.n, max_tokens=r.max_tokens,
                                             ignore_eos=True))
                             for i, r in enumerate(workload.requests)])
    print(f"{name}: requests added and planned in {time.perf_counter() - added:.3f} s", flush=True)
    steps: list[tuple[float, int, int, dict[str, float]]] = []  # wall, decode rows, prefill tokens, phases
    marks: list[torch.cuda.Event] = []  # recorded on the stream as each step call starts (never waited on here)
    profiler, profiled_from = None, 0
    marker = torch.zeros(1, dtype=torch.int8, device="cuda")
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        if len(steps) in kernels_at:
            profiled_from = len(steps)
            profiler = profile(activities=[ProfilerActivity.CUDA])
            profiler.__enter__()
        phases: dict[str, float] = defaultdict(float)
        decodes, prefills = engine.counters.decode_tokens, engine.counters.prefill_tokens
        marks.append(torch.cuda.Event(enable_timing=True))
        marks[-1].record()
        if profiler is not None:
            marker.fill_(1)
        t = time.perf_counter()
        with timed_phases(phases):
            engine.step()
        wall = time.perf_counter() - t
        steps.append((wall, engine.counters.decode_tokens - decodes, engine.counters.prefill_tokens - prefills,
                      phases))
        if profiler is not None and (len(steps) == profiled_from + kernels_steps
                                     or not engine.has_unfinished_requests()):
            profiler.__exit__(None, None, None)
            window = steps[profiled_from:]
            print_kernels(profiler, f"{name}: steps {profiled_from}-{len(steps) - 1} "
                                    f"({sum(s[1] for s in window)} decode rows, {sum(s[2] for s in window)} "
                                    f"prefill tokens)", profiled_from, len(window), name_chars)
            profiler = None
    seconds = time.perf_counter() - start
    torch.cuda.synchronize()
    gpu_ms = [marks[i].elapsed_time(marks[i + 1]) for i in range(len(marks) - 1)
              if steps[i][2] == 0 and steps[i][1] >= min_rows]
    for i, (wall, decodes, prefills, phases) in enumerate(steps[:-1]):
        if prefills:  # one line each: a slow one shows whether the host or the GPU took the time
            top = sorted(phases.items(), key=lambda item: -item[1])[:8]
            print(f"   prefill step {i}: {decodes} decode rows + {prefills} prefill tokens, wall {wall * 1e3:.1f} ms, "
                  f"GPU clock to the next step {marks[i].elapsed_time(marks[i + 1]):.1f} ms; "
                  + ", ".join(f"{label} {t * 1e3:.1f}" for label, t in top), flush=True)
    decode = [s for s in steps if s[2] == 0 and s[1] >= min_rows]
    prefill = [s for s in steps if s[2] > 0]
    if not decode:
        print(f"{name}: {seconds:.2f} s, {len(steps)} steps; none decodes >= {min_rows} rows (see --min-rows)")
        return
    print(f"{name}: {seconds:.2f} s, {len(steps)} steps; {len(prefill)} with prefill "
          f"({sum(s[0] for s in prefill):.2f} s); {len(decode)} decode steps of >= {min_rows} rows: "
          f"mean {statistics.mean(s[1] for s in decode):.0f} rows, "
          f"wall {statistics.mean(s[0] for s in decode) * 1e3:.2f} ms", flush=True)
    print(f"   GPU clock from one step's queued work to the next's: median {statistics.median(gpu_ms):.2f} ms",
          flush=True)
    for label in sorted({label for s in decode for label in s[3]}):
        print(f"   {label:32s} {statistics.mean(s[3].get(label, 0.0) for s in decode) * 1e3:8.2f} ms", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_config")
    parser.add_argument("--workloads", default="sharedprefix,samples")
    parser.add_argument("--min-rows", type=int, default=500)
    parser.add_argument("--kernels-at", default="", metavar="STEP[,STEP...]")
    parser.add_argument("--kernels-steps", type=int, default=3, help="steps each --kernels-at profile covers")
    parser.add_argument("--name-chars", type=int, default=110, help="kernel names printed up to this length")
    parser.add_argument("--sync-debug", action="store_true",
                        help="list the PyTorch calls in the batch that waited for the GPU, by source line")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        llm = LLM(str(model_dir_from_config(args.model_config, Path(tmp) / "model")), load_format="dummy",
                  skip_tokenizer_init=True, dtype="bfloat16", max_num_seqs=1024, max_num_batched_tokens=16384, seed=0)
    for warmup in warm_up_workloads():  # what the bench runs first: kernels built, allocator grown
        llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in warmup.requests],
                     [SamplingParams(**warmup.sampling, n=r.n, max_tokens=r.max_tokens, ignore_eos=True)
                      for r in warmup.requests], use_tqdm=False)
    for name in args.workloads.split(","):
        with gc_frozen_for_batch(), synchronizing_calls(args.sync_debug):
            run_workload(llm, name, args.min_rows, [int(step) for step in args.kernels_at.split(",") if step],
                         args.kernels_steps, args.name_chars)


if __name__ == "__main__":
    main()
