"""A Ray Data entry point, called the way Ray Data's LLM processor is:

    config = ForkserveEngineProcessorConfig(model_source=DIR, engine_kwargs={...}, concurrency=4,
                                            sampling_params={"max_tokens": 64})
    processor = build_llm_processor(config, preprocess=lambda row: {"prompt": row["question"]},
                                    postprocess=lambda row: {"answer": row["generated_text"], **row})
    results = processor(dataset)  # a ray.data.Dataset

A row (after `preprocess`) holds `prompt` (text), `prompt_token_ids`, or `messages` (a chat,
rendered with the tokenizer's template), and optionally its own `sampling_params` (a dict of
`SamplingParams` fields; else the config's). Unlike a per-block processor, the whole dataset is
planned as one batch across `concurrency` replicas (forkserve/scaleout), so each shared prefix is
computed once in the cluster; that needs every prompt at once: the rows are gathered on the
driver (prompts, not results, bound the memory). Result rows keep every input column and add
`generated_text`, `generated_tokens`, `num_input_tokens`, `num_generated_tokens`,
`num_cached_tokens` and `finish_reason` (of the first sample when n > 1).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import ray

from forkserve.sampling_params import SamplingParams

Row = dict[str, Any]


@dataclass
class ForkserveEngineProcessorConfig:
    """Ray Data's vLLMEngineProcessorConfig's names where they apply: `concurrency` is the number
    of engine replicas (forkserve's data_parallel_size)."""

    model_source: str
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    concurrency: int = 1
    sampling_params: dict[str, Any] = field(default_factory=dict)


class Processor:
    """`processor(dataset)` -> a dataset of results (see the module's docstring)."""

    def __init__(self, config: ForkserveEngineProcessorConfig, preprocess: Callable[[Row], Row] | None,
                 postprocess: Callable[[Row], Row] | None) -> None:
        self.config, self.preprocess, self.postprocess = config, preprocess, postprocess

    def __call__(self, dataset: "ray.data.Dataset") -> "ray.data.Dataset":
        from forkserve.api import LLM

        rows = (dataset.map(self.preprocess) if self.preprocess is not None else dataset).take_all()
        config = self.config
        llm = LLM(config.model_source, data_parallel_size=config.concurrency, **config.engine_kwargs)
        try:
            prompts = [_prompt_of(row, i, llm) for i, row in enumerate(rows)]
            params = [_params_of(row, i, config.sampling_params) for i, row in enumerate(rows)]
            outputs = llm.generate(prompts, params, use_tqdm=False)
        finally:
            if llm.data_parallel is not None:
                llm.data_parallel.replicas.shutdown()
        results = []
        for row, output in zip(rows, outputs):
            first = output.outputs[0]
            results.append({**row, "generated_text": first.text, "generated_tokens": list(first.token_ids),
                            "num_input_tokens": len(output.prompt_token_ids),
                            "num_generated_tokens": len(first.token_ids),
                            "num_cached_tokens": output.num_cached_tokens, "finish_reason": first.finish_reason})
        result = ray.data.from_items(results)
        return result.map(self.postprocess) if self.postprocess is not None else result


def build_llm_processor(config: ForkserveEngineProcessorConfig, preprocess: Callable[[Row], Row] | None = None,
                        postprocess: Callable[[Row], Row] | None = None) -> Processor:
    """Ray Data's `build_llm_processor` shape over forkserve's whole-dataset plan."""
    return Processor(config, preprocess, postprocess)


def _prompt_of(row: Row, index: int, llm: Any) -> Any:
    if "messages" in row:
        from forkserve.chat import render_chat

        tokenizer = llm.get_tokenizer()
        text = render_chat(tokenizer, list(row["messages"]), f"row {index}")
        return {"prompt_token_ids": tokenizer(text, add_special_tokens=False).input_ids, "prompt": text}
    if "prompt_token_ids" in row:
        return {"prompt_token_ids": [int(t) for t in row["prompt_token_ids"]]}
    if "prompt" in row:
        return row["prompt"]
    raise ValueError(f"row {index}: needs a 'prompt', 'prompt_token_ids' or 'messages' column "
                     f"(has {', '.join(sorted(row)) or 'none'}): return one from preprocess")


def _params_of(row: Row, index: int, defaults: dict[str, Any]) -> SamplingParams:
    values = {**defaults, **(row.get("sampling_params") or {})}
    try:
        return SamplingParams(**values)
    except TypeError as err:
        raise ValueError(f"row {index}: bad sampling_params {values!r}: {err}") from None
