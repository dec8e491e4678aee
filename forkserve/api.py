"""`LLM`: the offline entry point, with vLLM's names and shapes."""
from __future__ import annotations

import itertools
import logging
from typing import Any, Callable, Sequence

from tqdm import tqdm

from forkserve.chat import render_chat
from forkserve.config import EngineConfig
from forkserve.engine.engine import Engine, PromptInput
from forkserve.engine.summary import batch_summary, describe
from forkserve.gc_switches import gc_frozen_for_batch, gc_off_while_planning
from forkserve.metrics import Metric, engine_metrics
from forkserve.outputs import BeamSearchOutput, RequestOutput
from forkserve.sampling_params import BeamSearchParams, SamplingParams, is_valid_text
from forkserve.search.beam import beam_search
from forkserve.search.tree import Node, TreeSearch

logger = logging.getLogger(__name__)

PromptType = str | dict[str, Any]
ChatMessages = list[dict[str, Any]]


class LLM:
    """Generate from a local Hugging Face checkpoint directory.

    Keyword arguments are engine settings named as in vLLM (dtype, max_model_len, block_size,
    num_gpu_blocks_override, max_num_seqs, max_num_batched_tokens, enable_prefix_caching, seed,
    gpu_memory_utilization, load_format, ...); see `forkserve.config.EngineConfig`.

    `data_parallel_size=N` (vLLM's name) runs N engines as Ray actors (`pip install forkserve[ray]`;
    a local Ray unless RAY_ADDRESS names a cluster) and plans each `generate` batch across them
    by its prefix tree (forkserve/scaleout); the other methods need one engine.
    """

    def __init__(self, model: str, data_parallel_size: int = 1, **kwargs: Any) -> None:
        self.data_parallel = None
        self._request_counter = itertools.count()
        if data_parallel_size != 1:
            from forkserve.scaleout import data_parallel_llm

            self.data_parallel = data_parallel_llm(LLM, str(model), data_parallel_size, kwargs)
            self.engine = None
            return
        self.engine = Engine(EngineConfig.from_kwargs(str(model), **kwargs))
        self._tree_search = TreeSearch(self.engine)

    def get_tokenizer(self):
        if self.data_parallel is not None:
            return self.data_parallel.get_tokenizer()
        return self.engine.tokenizer

    def _one_engine(self, what: str) -> None:
        if self.data_parallel is not None:
            raise ValueError(f"{what} runs on one engine: use data_parallel_size=1 for it "
                             "(data parallelism covers generate)")

    @property
    def llm_engine(self) -> Engine:
        """vLLM's `llm.llm_engine`: here the engine itself (get_tokenizer, add_request, step,
        abort_request, has_unfinished_requests)."""
        return self.engine

    def get_default_sampling_params(self) -> SamplingParams:
        """vLLM's defaults, overridden by the checkpoint's generation_config.json (generation_config="auto")."""
        if self.data_parallel is not None:
            return self.data_parallel.default_sampling_params()
        return SamplingParams(**self.engine.default_sampling_overrides)

    def reset_prefix_cache(self) -> bool:
        """Drop the prefix cache's idle pages (those no sequence holds); True when none is left."""
        self._one_engine("reset_prefix_cache")
        return self.engine.reset_prefix_cache()

    def get_metrics(self) -> list[Metric]:
        """vLLM's metrics (`vllm:*` names, vllm.v1.metrics.reader's shapes) for this engine."""
        self._one_engine("get_metrics")
        return engine_metrics(self.engine, self.engine.config.model)

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, lora_request: None = None,
                 priority: Sequence[int] | None = None) -> list[RequestOutput]:
        """Run a batch to completion; outputs come back in input order.

        Every prompt and parameter set is validated before any work starts, so one bad request
        raises a ValueError naming it and nothing is left half-run. `sampling_params=None` means
        `get_default_sampling_params()`. `priority` is vLLM's: all zeros (the default) is the
        only value without priority scheduling, which forkserve does not have.
        """
        prompt_list = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        _check_no_lora(lora_request)
        _check_priority(priority, len(prompt_list))
        if self.data_parallel is not None:
            return self.data_parallel.generate(prompt_list, sampling_params, use_tqdm)
        return self._run(lambda params: [self.engine.make_prompt(p, f"request {i}", params[i].truncate_prompt_tokens)
                                         for i, p in enumerate(prompt_list)],
                         len(prompt_list), sampling_params, use_tqdm)

    def chat(self, messages: ChatMessages | Sequence[ChatMessages],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, lora_request: None = None, chat_template: str | None = None,
             chat_template_content_format: str = "auto", add_generation_prompt: bool = True,
             continue_final_message: bool = False, tools: list[dict[str, Any]] | None = None,
             chat_template_kwargs: dict[str, Any] | None = None,
             mm_processor_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to each conversation (vLLM's arguments: a message's
        content may be a list of text parts, joined by newlines), then generate."""
        self._one_engine("chat")
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise ValueError("chat needs a tokenizer (skip_tokenizer_init is set)")
        _check_no_lora(lora_request)
        if tools:
            raise ValueError("chat: tools are not supported yet: describe the tools in a system message instead")
        if mm_processor_kwargs:
            raise ValueError("chat: mm_processor_kwargs is not supported: forkserve runs text-only models")
        if chat_template_content_format not in ("auto", "string"):
            raise ValueError(f"chat: chat_template_content_format={chat_template_content_format!r} is not supported: "
                             "text parts are joined into a string ('auto' or 'string')")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)

        def make_inputs(params: list[SamplingParams]) -> list[PromptInput]:
            inputs = []
            for i, conversation in enumerate(conversations):
                label = f"conversation {i}"
                if not conversation or not all(isinstance(m, dict) and "role" in m and "content" in m
                                               for m in conversation):
                    raise ValueError(f"{label}: messages must be a non-empty list of {{'role', 'content'}} dicts")
                if any(isinstance(v, str) and not is_valid_text(v) for m in conversation for v in m.values()):
                    raise ValueError(f"{label}: a message holds text that is not valid Unicode (a lone surrogate)")
                text = render_chat(tokenizer, conversation, label, chat_template=chat_template,
                                   add_generation_prompt=add_generation_prompt,
                                   continue_final_message=continue_final_message,
                                   chat_template_kwargs=chat_template_kwargs)
                ids = tokenizer(text, add_special_tokens=False).input_ids
                inputs.append(self.engine.make_prompt({"prompt_token_ids": ids, "prompt": text}, label,
                                                      params[i].truncate_prompt_tokens))
            return inputs

        return self._run(make_inputs, len(conversations), sampling_params, use_tqdm)

    def beam_search(self, prompts: PromptType | Sequence[PromptType], params: BeamSearchParams,
                    lora_request: None = None, use_tqdm: bool = False,
                    concurrency_limit: int | None = None) -> list[BeamSearchOutput]:
        """vLLM's `LLM.beam_search`, with HF transformers' selection and length penalty.

        Per prompt, a `BeamSearchOutput` whose `sequences` (beam_width of them, best first by
        length-penalised score) have `tokens` (prompt included), `text` and `cum_logprob`.
        The beams of all prompts advance together (at most `concurrency_limit` prompts at a
        time, as in vLLM); beams share pages through the prefix tree. `use_tqdm` is accepted
        for vLLM compatibility.
        """
        self._one_engine("beam_search")
        if not isinstance(params, BeamSearchParams):
            raise ValueError(f"beam_search: params must be BeamSearchParams, got {type(params).__name__}")
        _check_no_lora(lora_request)
        if concurrency_limit is not None and (not isinstance(concurrency_limit, int) or concurrency_limit < 1):
            raise ValueError(f"beam_search: concurrency_limit must be a positive integer or None, "
                             f"got {concurrency_limit!r}")
        self.engine.check_width(params.beam_width, "beam_width", "beam_search")
        prompt_list = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        inputs = [self.engine.make_prompt(p, f"prompt {i}") for i, p in enumerate(prompt_list)]
        step = concurrency_limit or max(len(inputs), 1)
        outputs: list[BeamSearchOutput] = []
        for start in range(0, len(inputs), step):
            chunk = inputs[start:start + step]
            ids = [f"beam-{next(self._request_counter)}" for _ in chunk]
            outputs += beam_search(self.engine, ids, chunk, params)
        return outputs

    def start(self, prompt: PromptType, params: SamplingParams | None = None) -> Node:
        """The root of a search tree (see `forkserve.search.tree`); `params` are its forks' default."""
        self._one_engine("tree search")
        params = self._check_params(SamplingParams() if params is None else params, "start")
        return self._tree_search.start(self.engine.make_prompt(prompt, "start"), params)

    def advance(self, nodes: Sequence[Node] | None = None) -> None:
        """Generate the given pending tree-search nodes (default: all pending ones), batched together."""
        self._one_engine("tree search")
        self._tree_search.advance(nodes)

    def _run(self, make_inputs: Callable[[list[SamplingParams]], list[PromptInput]], count: int,
             sampling_params: SamplingParams | Sequence[SamplingParams] | None,
             use_tqdm: bool) -> list[RequestOutput]:
        """Validate (make_inputs raises on a bad prompt) and plan the whole batch, then run it."""
        engine = self.engine
        before = engine.stats()
        results: dict[str, RequestOutput] = {}
        with gc_frozen_for_batch():
            with gc_off_while_planning():
                params = self._params_per_request(sampling_params, count)
                inputs = make_inputs(params)
                for i, (prompt, request_params) in enumerate(zip(inputs, params)):
                    engine.check_fits(prompt, request_params, f"request {i}")
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
            sampling_params = self.get_default_sampling_params()
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


def _check_no_lora(lora_request: object) -> None:
    if lora_request is not None:
        raise ValueError("lora_request is not supported yet: merge the adapter into the weights and load that checkpoint")


def _check_priority(priority: Sequence[int] | None, count: int) -> None:
    """vLLM refuses a non-zero priority unless priority scheduling is on; forkserve has none."""
    if priority is None:
        return
    priority = list(priority)
    if len(priority) != count:
        raise ValueError(f"priority has {len(priority)} entries for {count} prompts: give one per prompt")
    if any(p != 0 for p in priority):
        raise ValueError("priority other than 0 needs priority scheduling, which forkserve does not have yet: "
                         "requests run in the planner's order (shared prefixes together); leave priority at 0")
