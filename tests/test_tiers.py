"""The host tier: pages evicted from a GPU pool far too small for the batch move to host memory
and come back on a match; greedy outputs equal a run without tiers, token for token."""
from __future__ import annotations

from cpu_llm import PAGE, cpu_llm
from forkserve import SamplingParams

DOC = 48  # tokens per document: 12 pages of 4 tokens


def prompts(round_: int) -> list[dict]:
    docs = [[(7 * d + 3 * i) % 200 + 5 for i in range(DOC)] for d in range(6)]
    return [{"prompt_token_ids": doc + [210 + round_, 220 + q]} for doc in docs for q in range(2)]


def run(model: str, **settings) -> tuple[list[list[list[int]]], list[list[int]], dict]:
    llm = cpu_llm(model, num_gpu_blocks_override=40, max_model_len=128, max_num_seqs=4, max_num_batched_tokens=64,
                  **settings)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    tokens, cached = [], []
    for round_ in range(2):
        outs = llm.generate(prompts(round_), params, use_tqdm=False)
        tokens.append([list(o.outputs[0].token_ids) for o in outs])
        cached.append([o.num_cached_tokens for o in outs])
        llm.engine.tree.check_invariants()
    return tokens, cached, llm.engine.stats()


def test_host_tier_keeps_outputs_and_serves_the_second_round(tiny_model_factory) -> None:
    model = str(tiny_model_factory("llama"))
    plain_tokens, plain_cached, plain_stats = run(model)
    tier_tokens, tier_cached, stats = run(model, kv_offloading_size=0.001)  # 1 MiB: every document fits
    assert tier_tokens == plain_tokens
    assert stats["kv_transfer_pages_offload"] > 0 and stats["kv_transfer_pages_load"] > 0
    assert stats["prefix_host_hit_tokens"] > 0 and plain_stats["prefix_host_hit_tokens"] == 0
    # round 2: each document's pages come back from the host (40 GPU pages hold about three)
    assert all(c >= DOC // PAGE * PAGE for c in tier_cached[1]), tier_cached[1]
    assert sum(tier_cached[1]) > sum(plain_cached[1])
    assert stats["prefill_tokens_computed"] < plain_stats["prefill_tokens_computed"]
