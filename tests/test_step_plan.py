"""The step plan the core hands the worker is plain data: flat numpy arrays, numbers, strings and
dataclasses of them, all of it serialisable without pickle (what tensor-parallel ranks will receive)."""
from __future__ import annotations

import dataclasses
import enum
import json

import numpy as np
import torch

from cpu_llm import cpu_llm
from forkserve import SamplingParams
from forkserve.engine.sharing import CascadeRule
from forkserve.worker.kv_cache import KVCache
from forkserve.worker.plan import PLACEHOLDER, StepPlan


def plain(value: object, where: str) -> object:
    """value as JSON-able data (arrays as dtype, shape and hex bytes); raises on anything else,
    such as a sequence, a tree node or a tensor."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum):  # a settings value such as SamplingParams.output_kind
        return value.name
    if isinstance(value, dict):  # e.g. SamplingParams.logit_bias
        return {str(plain(k, f"{where} key")): plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, np.ndarray):
        assert value.dtype.kind in "iub", f"{where}: array of {value.dtype}"
        return [str(value.dtype), list(value.shape), value.tobytes().hex()]
    if isinstance(value, (list, tuple)):
        return [plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name), f"{where}.{f.name}") for f in dataclasses.fields(value)}
    raise AssertionError(f"{where}: {type(value).__name__} is not plain data")


def test_plans_are_plain_data_and_carry_forks_sharing_and_placeholders(tiny_model_factory) -> None:
    llm = cpu_llm(str(tiny_model_factory("llama")), max_num_batched_tokens=64)
    llm.engine.steps.sharing.rule = CascadeRule(1, 1)  # the tiny prompts are far below the real rule
    plans: list[StepPlan] = []
    worker = llm.engine.worker
    execute, launch = worker.execute, worker.launch
    worker.execute = lambda plan: plans.append(plan) or execute(plan)
    worker.launch = lambda plan, previous, bitmask=None: plans.append(plan) or launch(plan, previous, bitmask)
    system = list(range(10, 52))  # prompts of 45 tokens: forks copy a partly filled page
    prompts = [{"prompt_token_ids": system + [60 + i, 61 + i, 62]} for i in range(4)]
    params = [SamplingParams(temperature=0.8, seed=i, n=3, max_tokens=6, ignore_eos=True) for i in range(2)] + \
             [SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)] * 2
    llm.generate(prompts, params, use_tqdm=False)
    assert plans
    for i, plan in enumerate(plans):
        encoded = json.dumps(plain(plan, f"plan {i}"))
        assert json.loads(encoded)["input_ids"][0] == "int64"
        assert plan.query_start[-1] == len(plan.input_ids) and len(plan.kv_indptr) == plan.num_rows + 1
        assert all(plan.input_ids[t] == PLACEHOLDER for t, _ in plan.pending)
    assert any(plan.page_copies is not None for plan in plans), "forks of a partly filled page copied nothing"
    assert any(plan.sharing is not None for plan in plans), "no step carried the batch's sharing"
    assert any(plan.pending for plan in plans), "no launched step took a previous step's draw"


def test_page_copies_run_as_if_one_after_another() -> None:
    """A plan's page copies give what running them in order gives, also where one reads a page an
    earlier one wrote or two write the same page (a fork of a fork, a freed page reused)."""
    cache = KVCache(6, 2, 1, 1, 1, torch.float32, torch.device("cpu"))
    for page in range(6):
        cache.k[:, page], cache.v[:, page] = page, -page
    cache.copy_pages(np.array([[0, 1], [1, 2], [3, 1], [4, 5]], dtype=np.int32))
    assert cache.k[0, :6, 0, 0, 0].tolist() == [0, 3, 0, 3, 4, 4]
    assert cache.v[0, :6, 0, 0, 0].tolist() == [0, -3, 0, -3, -4, -4]
