"""`LLM`: the offline entry point, with vLLM's names and shapes."""
from __future__ import annotations

import contextlib
import gc
import itertools
import logging
from typing import Any, Callable, Iterator, Sequence

from tqdm import tqdm

from forkserve.config import EngineConfig
from forkserve.engine.engine import Engine, PromptInput
from forkserve.engine.summary import batch_summary, describe
from forkserve.outputs import BeamSearchOutput, RequestOutput
from forkserve.sampling_params import BeamSearchParams, SamplingParams, is_valid_text
from forkserve.search.beam import beam_search
from forkserve.search.tree import Node, TreeSearch

logger = logging.getLogger(__name__)

PromptType = str | dict[str, Any]
ChatMessages = list[dict[str, Any]]


FULL_COLLECTIONS_DEFERRED = 1 << 30  # young collections before a full one, while a batch runs: never


@contextlib.contextmanager
def out_of_the_collectors_sight() -> Iterator[None]:
    """Objects alive when a batch starts running (its prompts and sequences, the engine) skip
    Python's garbage collections until it ends, and the oldest generation is not collected while
    it runs. A full collection walks every tracked object, and a batch's prompts are lists of
    millions of token ids: one such walk took 0.1 s on a CPU harness of the bench's shared-prefix
    batch. Even with those frozen, the objects a batch makes as it runs drew five full collections
    there (0.05 s each, time the GPU may wait for its next step) that freed 37 objects in all.
    Unreferenced objects are still freed at once (reference counting) and young cycles by the
    young collections; only cycles that grew old wait for the batch's end. A freeze the caller
    made (a host application's) is the caller's to undo."""
    already_frozen = gc.get_freeze_count() > 0
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(thresholds[0], thresholds[1], FULL_COLLECTIONS_DEFERRED)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        if not already_frozen:
            gc.unfreeze()


@contextlib.contextmanager
def planning_a_batch() -> Iterator[None]:
    """No garbage collection while a batch is validated and planned, inside
    `out_of_the_collectors_sight`: what planning makes all stays alive (copies of millions of
    prompt ids, sequences, tree nodes), so a collection there only walks it again (on a CPU
    harness, 41 young collections took 20% of the shared-prefix batch's validation and planning).
    On the way out it joins the batch's frozen objects: otherwise the first young collection
    once the collector is back on walks it all (12-16 ms there, each time)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


class LLM:
    """Generate from a local Hugging Face checkpoint directory.

    Keyword arguments are engine settings named as in vLLM (dtype, max_model_len, block_size,
    num_gpu_blocks_override, max_num_seqs, max_num_batched_tokens, enable_prefix_caching, seed,
    gpu_memory_utilization, load_format, ...); see `forkserve.config.EngineConfig`.
    """

    def __init__(self, model: str, **kwargs: Any) -> None:
        self.engine = Engine(EngineConfig.from_kwargs(str(model), **kwargs))
        self._request_counter = itertools.count()
        self._tree_search = TreeSearch(self.engine)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Run a batch to completion; outputs come back in input order.

        Every prompt and parameter set is validated before any work starts, so one bad request
        raises a ValueError naming it and nothing is left half-run.
        """
        prompt_list = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        return self._run(lambda: [self.engine.make_prompt(p, f"request {i}") for i, p in enumerate(prompt_list)],
                         sampling_params, use_tqdm)

    def chat(self, messages: ChatMessages | Sequence[ChatMessages],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, chat_template: str | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to each conversation, then generate."""
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise ValueError("chat needs a tokenizer (skip_tokenizer_init is set)")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        inputs: list[PromptInput] = []
        for i, conversation in enumerate(conversations):
            label = f"conversation {i}"
            if not conversation or not all(isinstance(m, dict) and "role" in m and "content" in m for m in conversation):
                raise ValueError(f"{label}: messages must be a non-empty list of {{'role', 'content'}} dicts")
            if any(isinstance(v, str) and not is_valid_text(v) for m in conversation for v in m.values()):
                raise ValueError(f"{label}: a message holds text that is not valid Unicode (a lone surrogate)")
            text = tokenizer.apply_chat_template(conversation, chat_template=chat_template, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
            ids = tokenizer(text, add_special_tokens=False).input_ids
            inputs.append(self.engine.make_prompt({"prompt_token_ids": ids, "prompt": text}, label))
        return self._run(lambda: inputs, sampling_params, use_tqdm)

    def beam_search(self, prompts: PromptType | Sequence[PromptType], params: BeamSearchParams,
                    use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """vLLM's `LLM.beam_search`, with HF transformers' selection and length penalty.

        Per prompt, a `BeamSearchOutput` whose `sequences` (beam_width of them, best first by
        length-penalised score) have `tokens` (prompt included), `text` and `cum_logprob`.
        The beams of all prompts advance together; beams share pages through the prefix tree.
        `use_tqdm` is accepted for vLLM compatibility.
        """
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"beam_search: params must be BeamSearchParams, got {type(params).__name__}")
        self.engine.check_width(params.beam_width, "beam_width", "beam_search")
        prompt_list = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        inputs = [self.engine.make_prompt(p, f"prompt {i}") for i, p in enumerate(prompt_list)]
        ids = [f"beam-{next(self._request_counter)}" for _ in inputs]
        return beam_search(self.engine, ids, inputs, params)

    def start(self, prompt: PromptType, params: SamplingParams | None = None) -> Node:
        """The root of a search tree (see `forkserve.search.tree`); `params` are its forks' default."""
        params = self._check_params(SamplingParams() if params is None else params, "start")
        return self._tree_search.start(self.engine.make_prompt(prompt, "start"), params)

    def advance(self, nodes: Sequence[Node] | None = None) -> None:
        """Generate the given pending tree-search nodes (default: all pending ones), batched together."""
        self._tree_search.advance(nodes)

    def _run(self, make_inputs: Callable[[], list[PromptInput]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None,
             use_tqdm: bool) -> list[RequestOutput]:
        """Validate (make_inputs raises on a bad prompt) and plan the whole batch, then run it."""
        engine = self.engine
        before = engine.stats()
        results: dict[str, RequestOutput] = {}
        with out_of_the_collectors_sight():
            with planning_a_batch():
                inputs = make_inputs()
                params = self._params_per_request(sampling_params, len(inputs))
                ids = [f"{next(self._request_counter)}" for _ in inputs]
                engine.add_requests(list(zip(ids, inputs, params)))
            with tqdm(total=len(inputs), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True) as bar:
                while engine.has_unfinished_requests():
                    for output in engine.step():
                        results[output.request_id] = output
                        bar.update(1)
        logger.info("%s", describe(batch_summary(before, engine.stats(), engine.pages_in_use_series())))
        return [results[i] for i in ids]

    def _params_per_request(self, sampling_params: SamplingParams | Sequence[SamplingParams] | None,
                            count: int) -> list[SamplingParams]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * count
        else:
            params = list(sampling_params)
            if len(params) != count:
                raise ValueError(f"got {len(params)} sampling params for {count} prompts: give one, or one per prompt")
        return [self._check_params(p, f"request {i}") for i, p in enumerate(params)]

    def _check_params(self, params: object, label: str) -> SamplingParams:
        """The engine's checks, after validating the fields again (a caller may have set one since)."""
        if isinstance(params, SamplingParams):
            params.check(label)
        return self.engine.check_params(params, label)
