"""The engine's host work per step, without a GPU: the real core and worker with the model swapped
for a stand-in that returns at once.

    PYTHONPATH=$PWD python -m benchmarks.host_overhead --workloads samples,sharedprefix
    PYTHONPATH=/tmp/base356:$PWD python -m benchmarks.host_overhead ...   (an older forkserve tree)

Everything the host does per step runs as in a bench run (scheduling, ordering, the step plan,
the runner's metadata and cascade plan, the sampler's per-row set-up, reading draws back, stop
checks, outputs); only the model's forward is replaced (hidden states of zeros) and its LM head
(logits over STAND_IN_VOCAB tokens, so the sampler's tensor work stays small). What remains is the
host's per-step cost, which async scheduling must keep under the GPU's step time. Per workload it
prints the time to add and plan the batch, the first step, and the mean wall time and per-phase
time of decode-only steps of at least --min-rows rows. The harness imports only `forkserve.api`
and names phases by their qualified names, each looked up where it exists, so one file measures
trees from before the core/worker split too.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterator

import torch

from benchmarks.workloads import build

STAND_IN_VOCAB = 64  # logits columns the stand-in LM head returns
MODEL_CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=128,
                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, vocab_size=32000,
                    max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, torch_dtype="float32",
                    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)

# (module, attribute path): each phase timed where the tree has it (the split moved some)
PHASES = [
    ("forkserve.engine.scheduler", "Scheduler.schedule"),
    ("forkserve.engine.step_builder", "StepBuilder.order"),
    ("forkserve.engine.step_builder", "StepBuilder.build"),
    ("forkserve.engine.sharing", "BatchSharing.order"),
    ("forkserve.engine.sharing", "BatchSharing.sharing"),
    ("forkserve.attention.cascade", "CascadePlanner.order"),
    ("forkserve.worker.runner", "build_metadata"),
    ("forkserve.runner", "build_metadata"),
    ("forkserve.worker.attention.cascade", "CascadePlanner.plan"),
    ("forkserve.attention.cascade", "CascadePlanner.plan"),
    ("forkserve.sampler", "Sampler.draw"),
    ("forkserve.sampler", "Draws.to_host"),
    ("forkserve.engine.in_flight", "InFlightStep.resolve"),
    ("forkserve.engine.engine", "Engine._resolve"),
    ("forkserve.engine.engine", "Engine._advance"),
    ("forkserve.engine.engine", "Engine._finished_outputs"),
    ("forkserve.engine.scheduler", "Scheduler.after_step"),
]


class StandInModel:
    """Takes the model's place in the runner: zeros for hidden states, small logits, no attention."""

    def __init__(self, hidden_size: int) -> None:
        self.hidden_size = hidden_size
        self.logits = torch.zeros(0, STAND_IN_VOCAB)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, attention: Callable) -> torch.Tensor:
        return torch.zeros(input_ids.shape[0], self.hidden_size)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.logits.shape[0] < hidden.shape[0]:
            self.logits = torch.randn(hidden.shape[0], STAND_IN_VOCAB, generator=torch.Generator().manual_seed(0))
        return self.logits[:hidden.shape[0]]


def _resolve(module: str, path: str) -> tuple[object, str, Callable] | None:
    try:
        owner: object = importlib.import_module(module)
    except ImportError:
        return None
    *parents, name = path.split(".")
    for parent in parents:
        owner = getattr(owner, parent, None)
        if owner is None:
            return None
    fn = getattr(owner, name, None)
    return None if fn is None else (owner, name, fn)


@contextlib.contextmanager
def timed_phases(totals: dict[str, float]) -> Iterator[None]:
    """Add each phase's wall seconds to totals[name] while inside; the originals come back after."""
    found = [(path, hit) for module, path in PHASES if (hit := _resolve(module, path)) is not None]

    def timer(label: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[label] += time.perf_counter() - start
        return timed

    for label, (owner, name, fn) in found:
        setattr(owner, name, timer(label, fn))
    try:
        yield
    finally:
        for _, (owner, name, fn) in found:
            setattr(owner, name, fn)


def run_workload(llm, name: str, scale: int, min_rows: int, max_steps: int) -> dict:
    """Run the workload through `LLM.generate` as the bench does (garbage collected first), timing
    its first max_steps steps."""
    from forkserve.sampling_params import SamplingParams

    engine = llm.engine
    workload = build(name, scale)
    steps: list[tuple[float, int, int, dict[str, float]]] = []  # wall, decode rows, prefill tokens, phases
    first_step_at: list[float] = []
    real_step = engine.step

    def timed_step():
        first_step_at.append(time.perf_counter())
        if len(steps) == max_steps:
            return real_step()
        phases: dict[str, float] = defaultdict(float)
        decodes, prefills = engine.counters.decode_tokens, engine.counters.prefill_tokens
        start = time.perf_counter()
        with timed_phases(phases):
            outputs = real_step()
        wall = time.perf_counter() - start
        steps.append((wall, engine.counters.decode_tokens - decodes, engine.counters.prefill_tokens - prefills,
                      phases))
        return outputs

    engine.step = timed_step
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in workload.requests]
    params = [SamplingParams(temperature=workload.temperature, n=r.n, max_tokens=r.max_tokens, ignore_eos=True)
              for r in workload.requests]
    gc.collect()
    called = time.perf_counter()
    try:
        llm.generate(prompts, params, use_tqdm=False)
    finally:
        del engine.step
    decode = [s for s in steps if s[2] == 0 and s[1] >= min_rows]
    report = dict(workload=name, before_first_step_s=first_step_at[0] - called, first_step_s=steps[0][0],
                  steps=len(steps), decode_steps=len(decode), prefill_s=sum(s[0] for s in steps if s[2]))
    if decode:
        report["rows"] = statistics.mean(s[1] for s in decode)
        report["step_us"] = statistics.median(s[0] for s in decode) * 1e6
        report["phases_us"] = {label: statistics.median(s[3].get(label, 0.0) for s in decode) * 1e6
                               for label in sorted({label for s in decode for label in s[3]})}
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="samples,sharedprefix")
    parser.add_argument("--scale", type=int, default=1, help="shrink the workloads (benchmarks/workloads.py)")
    parser.add_argument("--min-rows", type=int, default=1000)
    parser.add_argument("--max-steps", type=int, default=400, help="steps timed per workload (the rest run untimed)")
    parser.add_argument("--json", action="store_true", help="one JSON line per workload instead of a table")
    args = parser.parse_args()
    from forkserve.api import LLM

    torch.set_num_threads(1)  # the host's work is one thread; a shared machine's other cores stay out of it
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(MODEL_CONFIG))
        llm = LLM(tmp, load_format="dummy", skip_tokenizer_init=True, device="cpu", dtype="float32",
                  max_num_seqs=1024, max_num_batched_tokens=16384, num_gpu_blocks_override=40000, seed=0)
    engine = llm.engine
    runner = getattr(engine, "runner", None) or engine.worker.runner
    runner.model = StandInModel(MODEL_CONFIG["hidden_size"])
    import forkserve
    print(f"forkserve from {Path(forkserve.__file__).parent}", flush=True)
    for name in args.workloads.split(","):
        report = run_workload(llm, name, args.scale, args.min_rows, args.max_steps)
        if args.json:
            print(json.dumps(report), flush=True)
            continue
        print(f"{name}: {report['before_first_step_s']:.3f} s before the first step, first step {report['first_step_s']:.3f} s, "
              f"{report['steps']} steps ({report['prefill_s']:.2f} s with prefill)", flush=True)
        if "step_us" in report:
            print(f"   {report['decode_steps']} decode steps of {report['rows']:.0f} rows: "
                  f"median {report['step_us']:.0f} us per step", flush=True)
            for label, us in report["phases_us"].items():
                print(f"   {label:32s} {us:9.0f} us", flush=True)


if __name__ == "__main__":
    main()
