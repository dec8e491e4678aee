"""Data parallelism on Ray: replica actors each owning one engine, and the driver that plans a whole
batch across them (`LLM(..., data_parallel_size=N)`; run-batch's side is
entrypoints/batch_data_parallel.py).

The driver asks the replicas to validate and tokenise the batch (in parallel, a contiguous chunk
each), partitions it by its prefix trie (partition.py: each shared prefix on one replica unless a
group is too large for one), and feeds each replica waves of whole-group units from its queue,
stealing from the most loaded queue when its own runs dry (work_queues.py). A replica runs each
wave through its engine's whole-batch planner, so prefixes shared inside a wave, and across
waves through its prefix cache, are computed once.

A replica that dies (actor lost, OOM kill) is dropped: its queue and its unfinished work go to
the least loaded live replica. In run-batch, replicas append each finished record to their own
part file (`<output>.parts/`, fsynced per write, as run-batch does), so what a lost replica had
finished is kept and only the rest runs again; the driver merges the parts into the output file
in input order at the end, and a rerun after a kill of the driver merges them first
(batch_output.merge_parts) and skips what is answered. On a multi-node cluster the output
directory must be on a filesystem every node sees.

This module imports Ray; `import forkserve` does not import it.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Sequence

import numpy as np
import ray
from ray.exceptions import RayActorError, RayTaskError
from tqdm import tqdm

from forkserve.config import EngineConfig
from forkserve.engine.inputs import PromptInput
from forkserve.outputs import RequestOutput
from forkserve.sampling_params import SamplingParams
from forkserve.scaleout.partition import Partition, partition, prefix_layout
from forkserve.scaleout.work_queues import Unit, WorkQueues

logger = logging.getLogger(__name__)

# A wave (what a replica runs as one batch) is at least this share of a replica's estimated work.
WAVE_FRACTION = 0.25
# Decode tokens assumed for a request without max_tokens (it may run to the context's end).
UNBOUNDED_DECODE_ESTIMATE = 512


def connect_ray() -> None:
    """Join the cluster at RAY_ADDRESS, else start a local Ray (unless this process is connected already)."""
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
                 log_to_driver=True, logging_level=logging.WARNING)


class Replica:
    """One single-engine `LLM` in its own Ray actor (its GPU(s) assigned by Ray). `make_llm` is
    the LLM class, passed in so that this package depends on no front end; `call` runs a
    front end's module-level function on it."""

    def __init__(self, make_llm: Callable[..., Any], model: str, engine_kwargs: dict[str, Any]) -> None:
        self.llm = make_llm(model, **engine_kwargs)

    def call(self, function: Callable[..., Any], *args: Any) -> Any:
        return function(self.llm, *args)

    def stats(self) -> dict[str, int | float]:
        return self.llm.engine.stats()


def prepare_prompts(llm: Any, items: list[tuple[int, Any, SamplingParams]]) -> list[PromptInput]:
    """Validate and tokenise `(index, prompt, params)` items as `LLM.generate` does, labelled by
    their index in the whole batch; a ValueError names the first bad one."""
    engine, prompts = llm.engine, []
    for index, prompt, params in items:
        label = f"request {index}"
        params = llm._check_params(params, label)
        prompt_input = engine.make_prompt(prompt, label, params.truncate_prompt_tokens)
        engine.check_fits(prompt_input, params, label)
        prompts.append(prompt_input)
    return prompts


def generate_prompts(llm: Any, prompts: list[PromptInput], params: list[SamplingParams]) -> list[RequestOutput]:
    raw = [{"prompt_token_ids": p.token_ids, **({"prompt": p.text} if p.text is not None else {})} for p in prompts]
    return llm.generate(raw, params, use_tqdm=False)


def default_sampling_params(llm: Any) -> SamplingParams:
    return llm.get_default_sampling_params()


def decode_estimate(params: SamplingParams) -> int:
    """Decode tokens a request may cost: max_tokens for each sample (its samples share the prompt)."""
    samples = max(params.n, params.best_of or 1)
    return samples * (params.max_tokens if params.max_tokens is not None else UNBOUNDED_DECODE_ESTIMATE)


class ReplicaSet:
    """N replica actors of one model; each asks Ray for its device(s): GPUs when the cluster has
    them (tensor_parallel_size each) and the engine is not pinned to the CPU, else one CPU."""

    def __init__(self, make_llm: Callable[..., Any], model: str, size: int, engine_kwargs: dict[str, Any]) -> None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"data_parallel_size must be a positive integer, got {size!r}")
        config = EngineConfig.from_kwargs(model, **engine_kwargs)  # bad settings fail before any actor starts
        self.page_size, self.min_shared_len = config.page_size, config.min_shared_prefix_len
        connect_ray()
        gpus = ray.cluster_resources().get("GPU", 0)
        options: dict[str, Any] = ({"num_gpus": config.tensor_parallel_size} if gpus and config.device != "cpu"
                                   else {"num_cpus": 1})
        actor = ray.remote(**options)(Replica)
        self.actors = [actor.remote(make_llm, model, engine_kwargs) for _ in range(size)]
        self.size = size
        ray.get([a.stats.remote() for a in self.actors])  # surfaces a load failure here, not mid-batch

    def call_chunks(self, function: Callable[..., list[Any]], items: Sequence[Any], *args: Any) -> list[Any]:
        """Split `items` into one contiguous chunk per replica, run `function(llm, chunk, *args)`
        on each in parallel, and return the results concatenated in item order."""
        bounds = np.linspace(0, len(items), self.size + 1).astype(int)
        refs = [actor.call.remote(function, list(items[a:b]), *args)
                for actor, a, b in zip(self.actors, bounds[:-1], bounds[1:]) if b > a]
        return [result for chunk in _get(refs) for result in chunk]

    def plan(self, tokens: list[list[int]], extra_cost: Sequence[int]) -> Partition:
        """Partition the batch by its prefix trie; extra_cost is each request's cost beyond its prompt."""
        layout = prefix_layout(tokens, self.page_size, self.min_shared_len)
        planned = partition(layout, np.asarray(extra_cost, dtype=np.float64), self.size)
        logger.info("data parallel plan: %d requests on %d replicas, imbalance %.3f, %d prefix tokens computed "
                    "on more than one replica (%.2f%% of %d unique)", len(tokens), self.size, planned.imbalance,
                    planned.duplicated_tokens, 100 * planned.duplicated_tokens / max(planned.unique_tokens, 1),
                    planned.unique_tokens)
        return planned

    def drive(self, planned: Partition, submit: Callable[[int, list[int]], Any],
              done: Callable[[list[int], Any], None], unfinished: Callable[[int, list[Unit[int]]], list[Unit[int]]]
              ) -> WorkQueues[int]:
        """Run every unit of the plan: `submit(replica, items)` starts a wave (an ObjectRef),
        `done(items, result)` takes its result, `unfinished(replica, wave)` says what of a lost
        replica's wave must run again. Raises when every replica is lost with work left."""
        share = float(planned.loads.mean()) if len(planned.loads) else 0.0
        queues: WorkQueues[int] = WorkQueues([[Unit(items, cost) for items, cost in zip(units, costs)]
                                              for units, costs in zip(planned.units, planned.unit_costs)],
                                             WAVE_FRACTION * share)
        in_flight: dict[Any, tuple[int, list[Unit[int]]]] = {}

        def feed(replica: int) -> None:
            wave = queues.next_wave(replica)
            if wave:
                items = [i for unit in wave for i in unit.items]
                in_flight[submit(replica, items)] = (replica, wave)

        for replica in range(self.size):
            feed(replica)
        while in_flight:
            [ref], _ = ray.wait(list(in_flight), num_returns=1)
            replica, wave = in_flight.pop(ref)
            try:
                result = _get(ref)
            except RayActorError as err:
                logger.warning("replica %d is lost (%s); its unfinished work runs on the others", replica,
                               type(err).__name__)
                queues.lose(replica, unfinished(replica, wave))
                if not queues.live:
                    raise RuntimeError("every data-parallel replica is lost; results so far are kept: rerun to "
                                       "resume") from err
                busy = {r for r, _ in in_flight.values()}
                for idle in queues.live - busy:
                    feed(idle)
                continue
            done([i for unit in wave for i in unit.items], result)
            feed(replica)
        if queues.stolen:
            logger.info("work stealing moved %d unit(s) between replicas", queues.stolen)
        return queues

    def stats(self) -> list[dict[str, int | float]]:
        """Each live replica's engine totals (prefill_tokens_computed, ...)."""
        stats = []
        for actor in self.actors:
            try:
                stats.append(_get(actor.stats.remote()))
            except RayActorError:
                continue
        return stats

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


def _get(refs: Any) -> Any:
    """ray.get, with an actor's own exception (a ValueError naming a bad request) re-raised as itself."""
    try:
        return ray.get(refs)
    except RayTaskError as err:
        cause = err.cause if isinstance(getattr(err, "cause", None), BaseException) else None
        if isinstance(cause, ValueError):
            raise ValueError(str(cause)) from None
        raise


class DataParallelLLM:
    """`LLM.generate` over a ReplicaSet: every prompt validated first, outputs in input order."""

    def __init__(self, make_llm: Callable[..., Any], model: str, size: int, engine_kwargs: dict[str, Any]) -> None:
        self.replicas = ReplicaSet(make_llm, model, size, engine_kwargs)
        self.model, self.engine_kwargs = model, engine_kwargs
        self._tokenizer = None

    def get_tokenizer(self):
        from forkserve.engine.inputs import load_tokenizer

        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.engine_kwargs.get("tokenizer") or self.model)
        return self._tokenizer

    def default_sampling_params(self) -> SamplingParams:
        return _get(self.replicas.actors[0].call.remote(default_sampling_params))

    def generate(self, prompts: list[Any], sampling_params: SamplingParams | Sequence[SamplingParams] | None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        if sampling_params is None:
            sampling_params = self.default_sampling_params()
        params = ([sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams)
                  else list(sampling_params))
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts: give one, or one per prompt")
        inputs: list[PromptInput] = self.replicas.call_chunks(prepare_prompts,
                                                              list(zip(range(len(prompts)), prompts, params)))
        planned = self.replicas.plan([p.token_ids for p in inputs], [decode_estimate(p) for p in params])
        results: dict[int, RequestOutput] = {}
        with tqdm(total=len(prompts), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True) as bar:
            def done(items: list[int], outputs: list[RequestOutput]) -> None:
                for i, output in zip(items, outputs):
                    output.request_id = str(i)
                    results[i] = output
                bar.update(len(items))

            self.replicas.drive(planned,
                                lambda replica, items: self.replicas.actors[replica].call.remote(
                                    generate_prompts, [inputs[i] for i in items], [params[i] for i in items]),
                                done, lambda replica, wave: wave)  # outputs of a lost wave are lost with it
        return [results[i] for i in range(len(prompts))]
