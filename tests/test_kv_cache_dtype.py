"""kv_cache_dtype='fp8' (vLLM's e4m3 cache with per-tensor scales) on the CPU reference path:
pages stored as float8_e4m3fn and dequantized as read, twice the tokens of a bf16 pool (four
times fp32's) in the same bytes, and outputs that stay close to the full-precision cache's."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from cpu_llm import cpu_llm
from forkserve import SamplingParams
from forkserve.worker.kv_cache import KVCache


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory) -> str:
    return str(tiny_model_factory("llama"))


def test_fp8_pool_holds_twice_the_tokens_of_bf16(model_dir: str) -> None:
    """Same bytes, fp8 pages: 2x the pages of a bf16 cache, 4x fp32's (the CPU's dtype here)."""
    shape = (4, 2, 64, 16)  # layers, kv heads, head dim, page size
    assert KVCache.bytes_per_page(*shape, torch.bfloat16) == 2 * KVCache.bytes_per_page(*shape, torch.float8_e4m3fn)
    budget = 8 << 20
    full, fp8 = (cpu_llm(model_dir, num_gpu_blocks_override=None, kv_cache_memory_bytes=budget, kv_cache_dtype=dtype)
                 for dtype in ("auto", "fp8_e4m3"))
    assert fp8.engine.worker.kv_cache.k.dtype == torch.float8_e4m3fn
    assert fp8.engine.worker.num_pages // 4 == full.engine.worker.num_pages  # (floor of bytes / page size)


def test_fp8_stores_saturate_and_page_copies_move_bytes() -> None:
    """Values past e4m3's range saturate at 448 (not NaN), values are divided by the scale as
    stored and multiplied back as read, and a fork's page copy copies fp8 pages exactly."""
    cache = KVCache(4, 2, 1, 1, 2, torch.float8_e4m3fn, "cpu")
    cache.k_scale = 2.0
    stored = cache.quantize(torch.tensor([1000.0, -3.0, 0.5]), cache.k_scale)
    assert cache.dequantize(stored, cache.k_scale).tolist() == [896.0, -3.0, 0.5]
    cache.k[0, 1] = cache.quantize(torch.full((2, 1, 2), 5.0), 1.0)
    cache.copy_pages(np.array([[1, 3]], dtype=np.int32))
    assert cache.k[0, 3].float().eq(5.0).all() and cache.v[0, 3].float().eq(0.0).all()


def test_fp8_prompt_logprobs_stay_close_to_the_full_precision_cache(model_dir: str) -> None:
    """Teacher-forced (prompt logprobs over a prompt of several pages and chunks): the fp8 cache's
    log-probabilities differ from the fp32 cache's, but by little; greedy continuations agree
    at first. The bounds are about 2x what this tiny model shows (mean 0.066, max 0.31 nats:
    e4m3 keeps 3 mantissa bits, and with scale 1.0 the tiny model's small K / V values lose more
    as subnormals); a broken cache misses them by nats."""
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 200) for _ in range(n)] for n in (37, 90)]
    asks = SamplingParams(temperature=0.0, max_tokens=6, prompt_logprobs=0, ignore_eos=True)
    runs = [cpu_llm(model_dir, kv_cache_dtype=dtype, max_num_batched_tokens=64).generate(
            [{"prompt_token_ids": p} for p in prompts], asks, use_tqdm=False) for dtype in ("auto", "fp8")]
    gaps = [abs(a[token].logprob - b[token].logprob)
            for full, fp8, prompt in zip(*runs, prompts)
            for a, b, token in zip(full.prompt_logprobs[1:], fp8.prompt_logprobs[1:], prompt[1:])]
    assert 0 < sum(gaps) / len(gaps) < 0.15 and max(gaps) < 0.6, (sum(gaps) / len(gaps), max(gaps))
    assert [o.outputs[0].token_ids[:2] for o in runs[0]] == [o.outputs[0].token_ids[:2] for o in runs[1]]


def test_fp8_cascade_levels_read_the_same_pages_as_plain_attention(model_dir: str) -> None:
    """Shared-prefix levels over fp8 pages (the reference emulates what the GPU's level kernel
    reads) give the tokens plain attention over the same fp8 pages gives."""
    rng = random.Random(1)
    shared = [rng.randrange(3, 200) for _ in range(70)]
    prompts = [{"prompt_token_ids": shared + [rng.randrange(3, 200) for _ in range(rng.randint(2, 9))]}
               for _ in range(6)]
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    outputs = [[o.outputs[0].token_ids for o in cpu_llm(model_dir, kv_cache_dtype="fp8", disable_cascade_attn=off,
                                                         min_shared_prefix_len=16).generate(prompts, greedy,
                                                                                             use_tqdm=False)]
               for off in (False, True)]
    assert outputs[0] == outputs[1]
