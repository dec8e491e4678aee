"""Where a decode step's time goes: attention kernels vs GEMMs vs other kernels vs host.

Run on the GPU machine:
    python -m benchmarks.profile CONFIG_DIR --batch 256,1024 --context 1024,2100 [--shared 2000 --group 64]
For each (batch, context) it fills the engine with `batch` requests of `context` prompt tokens
(with --shared S, requests in groups of --group share their first S tokens, as in the
sharedprefix workload), lets prefill finish, then times steady decode steps: wall time per step,
and from the profiler the GPU time per step split by kernel kind. Wall minus GPU busy time is
host time the GPU waited for (with async scheduling, host work that did not fit under the
previous step's GPU time). KV pages read per layer per step, against what plain attention
would read, show what shared-prefix attention saved.
"""
from __future__ import annotations

import argparse
import bisect
import cProfile
import json
import logging
import pstats
import statistics
import tempfile
import time
from pathlib import Path
from typing import Iterator

import torch
from torch.profiler import ProfilerActivity, profile

from forkserve.api import LLM
from forkserve.engine.sharing import BatchSharing, CascadeRule
from benchmarks.run import model_dir_from_config
from forkserve.sampling_params import SamplingParams

logger = logging.getLogger("forkserve.bench")

ATTENTION_KERNELS = ("batchdecode", "batchprefill", "flashinfer", "attention", "merge_state", "cascade")
GEMM_KERNELS = ("gemm", "nvjet", "cutlass", "xmma", "cublas")


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    if any(k in lowered for k in ATTENTION_KERNELS):
        return "attention"
    if any(k in lowered for k in GEMM_KERNELS):
        return "gemm"
    return "other"


def kernel_totals_ms(prof: profile) -> dict[str, float]:
    """Total GPU time of each kernel (memcpy/memset included), by name."""
    totals: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] = totals.get(event.name, 0.0) + event.device_time / 1000.0
    return totals


def device_spans(prof: profile) -> list[tuple[float, float, str]]:
    """(start, end, name) of every kernel and copy on the GPU timeline, in start order (microseconds)."""
    return sorted((event.time_range.start, event.time_range.end, event.name) for event in prof.events()
                  if event.device_type == torch.autograd.DeviceType.CUDA)


def _gaps(spans: list[tuple[float, float, str]]) -> Iterator[tuple[float, float, str, str]]:
    """Each stretch with nothing running: (start, end, name before, name after)."""
    if not spans:
        return
    end, before = spans[0][0], spans[0][2]
    for start, stop, name in spans:
        if start > end:
            yield end, start, before, name
        if stop > end:
            end, before = stop, name


def idle_between_kernels(spans: list[tuple[float, float, str]], top: int = 8
                         ) -> tuple[float, float, list[tuple[float, int, str, str]]]:
    """The GPU timeline of a profile (its `device_spans`): span and busy milliseconds, and where it sat idle.

    Idle time is attributed to the pair of kernels (or copies) around each gap, summed by pair:
    (ms, gaps, before, after), largest first. Gaps inside a CUDA graph are launch latency; gaps
    around copies and launches outside one are where the stream waited for the host.
    """
    if not spans:
        return 0.0, 0.0, []
    by_pair: dict[tuple[str, str], list[float]] = {}
    idle = 0.0
    for start, end, before, after in _gaps(spans):
        pair = by_pair.setdefault((before[:60], after[:60]), [0.0, 0])
        pair[0] += (end - start) / 1000.0
        pair[1] += 1
        idle += (end - start) / 1000.0
    span = (max(stop for _, stop, _ in spans) - spans[0][0]) / 1000.0
    ranked = sorted(((ms, count, a, b) for (a, b), (ms, count) in by_pair.items()), reverse=True)[:top]
    return span, span - idle, ranked


def idle_per_marker(spans: list[tuple[float, float, str]], marker: str) -> list[tuple[float, float, str, str]]:
    """The GPU's idle time (in a profile's `device_spans`) between consecutive kernels named
    `marker` (one queued as each step starts), per such interval: (idle ms, longest gap ms, name
    before it, name after it)."""
    starts = [start for start, _, name in spans if marker in name] + [float("inf")]
    intervals = [[0.0, 0.0, "", ""] for _ in starts[:-1]]
    for start, end, before, after in _gaps(spans):
        index = bisect.bisect_right(starts, start) - 1
        if 0 <= index < len(intervals):
            interval = intervals[index]
            interval[0] += (end - start) / 1000.0
            if (end - start) / 1000.0 > interval[1]:
                interval[1:] = [(end - start) / 1000.0, before[:60], after[:60]]
    return [tuple(interval) for interval in intervals]


def kernel_times_ms(totals: dict[str, float]) -> dict[str, float]:
    """Total GPU kernel time by kind (memcpy/memset included in 'other')."""
    kinds = {"attention": 0.0, "gemm": 0.0, "other": 0.0}
    for name, ms in totals.items():
        kinds[kernel_kind(name)] += ms
    return kinds


def profile_decode(llm: LLM, batch: int, context: int, steps: int, temperature: float, shared: int = 0,
                   group: int = 1, host_profile: int = 0) -> dict[str, float]:
    engine = llm.engine
    params = SamplingParams(temperature=temperature, max_tokens=steps * 3 + 8, ignore_eos=True)
    for i in range(batch):
        prompt = [100 + ((i // group) * 7919 + j * 104729) % 30000 for j in range(shared)]
        prompt += [100 + (i * 7919 + j * 104729) % 30000 for j in range(shared, context)]
        engine.add_request(f"profile-{batch}-{context}-{i}", engine.make_prompt({"prompt_token_ids": prompt}, "p"), params)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    for _ in range(steps):  # warm-up decode steps
        engine.step()
    torch.cuda.synchronize()
    runner = engine.worker.runner
    read, listed = runner.kv_pages_read, runner.kv_pages_listed
    walls = []
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            start = time.perf_counter()
            engine.step()  # waits for a step's draws: this one's, or the previous one's with async scheduling
            walls.append((time.perf_counter() - start) * 1000)
    if host_profile:
        print_host_profile(engine, steps, host_profile)
    totals = kernel_totals_ms(prof)
    kernels = {k: v / steps for k, v in kernel_times_ms(totals).items()}
    if host_profile:
        for name, ms in sorted(totals.items(), key=lambda item: -item[1])[:host_profile]:
            print(f"KERNEL {ms / steps:8.3f} ms/step  {name[:150]}", flush=True)
    running = len(engine.scheduler.running)
    for rid in list(engine.requests):
        engine.abort_request(rid)
    wall = statistics.median(walls)
    gpu = sum(kernels.values())
    row = dict(batch=batch, context=context, shared=shared, group=group, running=running, wall_ms=round(wall, 2),
               gpu_ms=round(gpu, 2), host_ms=round(max(wall - gpu, 0.0), 2),
               **{f"{k}_ms": round(v, 2) for k, v in kernels.items()},
               kv_pages_read=(runner.kv_pages_read - read) // steps, kv_pages_listed=(runner.kv_pages_listed - listed) // steps)
    return row


def print_host_profile(engine, steps: int, top: int) -> None:
    """The host's own time per function over `steps` more steps (cProfile, so Python costs look ~2x)."""
    host = cProfile.Profile()
    host.enable()
    for _ in range(steps):
        engine.step()
    host.disable()
    for order in ("tottime", "cumulative"):
        pstats.Stats(host).sort_stats(order).print_stats(top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_config")
    parser.add_argument("--batch", default="256,1024")
    parser.add_argument("--context", default="1024")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--shared", type=int, default=0, help="prompt tokens shared within each group")
    parser.add_argument("--group", type=int, default=64, help="requests per group sharing --shared tokens")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--cascade", default="on", help="shared-prefix attention: on, off, or on,off to compare")
    parser.add_argument("--host-profile", type=int, default=0, metavar="N",
                        help="also print the N functions with the most host time (cProfile)")
    parser.add_argument("--engine-args", default="{}")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    batches = [int(b) for b in args.batch.split(",")]
    engine_args = dict(load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
                       max_num_seqs=max(batches), max_num_batched_tokens=16384)
    engine_args.update(json.loads(args.engine_args))
    with tempfile.TemporaryDirectory() as tmp:
        llm = LLM(str(model_dir_from_config(args.model_config, Path(tmp) / "model")), **engine_args)
    rows = []
    for context in (int(c) for c in args.context.split(",")):
        for batch in batches:
            for cascade in args.cascade.split(","):
                llm.engine.steps.sharing = BatchSharing(CascadeRule(), llm.engine.config.page_size) \
                    if cascade == "on" else None
                row = profile_decode(llm, batch, context, args.steps, args.temperature, args.shared, args.group,
                                     args.host_profile)
                row["cascade"] = cascade
                print("PROFILE " + json.dumps(row), flush=True)
                rows.append(row)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
