"""Shared-prefix (cascade) attention equals plain attention, and generation is unchanged by it."""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from hypothesis import given, settings, strategies as st

from attention_steps import plan_from_paths, shared_prefix_step, step_metadata
from cpu_llm import cpu_llm
from forkserve import SamplingParams
from forkserve.worker.attention.base import AttentionMetadata
from forkserve.worker.attention.cascade import LEVEL_TILE_TOKENS, CascadePlan, CascadePlanner
from forkserve.worker.attention.reference import ReferenceBackend
from forkserve.engine.pages import PagePool
from forkserve.engine.sharing import BatchSharing, CascadeRule, path_order
from forkserve.engine.tree import PrefixTree
from forkserve.worker.kv_cache import KVCache

PAGE = 4
NUM_PAGES = 1024
SCRATCH = NUM_PAGES  # KVCache(NUM_PAGES, ...).scratch_page


def plan_for(meta: AttentionMetadata, paths, rule: CascadeRule) -> CascadePlan | None:
    return plan_from_paths(paths, meta.kv_indptr.numpy(), meta.kv_indices.numpy(), meta.query_start.numpy(),
                        meta.page_size, SCRATCH, torch.device("cpu"), rule)


def group_requests(plan: CascadePlan) -> list[list[tuple[range, list[int]]]]:
    """Per level, (token range, pages) of each request that is a group's (not a filler)."""
    levels = []
    for level in plan.levels:
        qo, kv_ptr, pages, member = (level.qo_indptr.tolist(), level.kv_indptr.tolist(), level.kv_indices.tolist(),
                                     level.member.tolist())
        assert qo[0] == 0 and qo[-1] == len(member), "a level's requests tile the whole batch"
        requests = []
        for r in range(level.num_requests):
            tokens = range(qo[r], qo[r + 1])
            assert len(tokens) > 0 and len({member[t] for t in tokens}) == 1, "a request is all group or all filler"
            if member[tokens[0]]:
                requests.append((tokens, pages[kv_ptr[r]:kv_ptr[r + 1]]))
            else:
                assert pages[kv_ptr[r]:kv_ptr[r + 1]] == [SCRATCH]
        levels.append(requests)
    return levels


def assert_each_page_read_once(meta: AttentionMetadata, plan: CascadePlan) -> None:
    """Every sequence reads its page table exactly once, in order: its groups' pages level by level, then its own."""
    starts, indptr, indices = meta.query_start.tolist(), meta.kv_indptr.tolist(), meta.kv_indices.tolist()
    own_ptr, own = plan.own_indptr.tolist(), plan.own_indices.tolist()
    levels = group_requests(plan)
    for b in range(meta.num_seqs):
        tokens = set(range(starts[b], starts[b + 1]))
        read = []
        for requests in levels:
            for request_tokens, pages in requests:
                if tokens & set(request_tokens):
                    assert tokens <= set(request_tokens), f"sequence {b}'s queries split across requests"
                    read += pages
        read += own[own_ptr[b]:own_ptr[b + 1]]
        assert read == indices[indptr[b]:indptr[b + 1]], f"sequence {b} reads {read}"


def assert_work_lists_the_groups(plan: CascadePlan, num_tokens: int) -> None:
    """The GPU kernel's work items are the levels' groups: each group's tokens, level by level in
    their next slot, over the group's pages, in items of at most LEVEL_TILE_TOKENS tokens."""
    expected: list[list[list[int]]] = [[] for _ in range(num_tokens)]
    for requests in group_requests(plan):
        for tokens, pages in requests:
            for t in tokens:
                expected[t].append(pages)
    got: list[dict[int, list[int]]] = [{} for _ in range(num_tokens)]
    pages = plan.work.pages.tolist()
    for first, count, first_page, num_pages, slot in plan.work.work.tolist():
        assert 1 <= count <= LEVEL_TILE_TOKENS
        for t in range(first, first + count):
            assert slot not in got[t], f"token {t} gets two partials in slot {slot}"
            got[t][slot] = pages[first_page:first_page + num_pages]
    assert plan.work.counts.tolist() == [len(e) for e in expected]
    assert [[g[s] for s in sorted(g)] for g in got] == expected


RULES = [CascadeRule(1, 1, max_levels=4), CascadeRule(8, 1, max_levels=4), CascadeRule(1, 64, max_levels=4),
         CascadeRule(16, 48, max_levels=2), CascadeRule(1, 1, max_levels=1)]


@settings(max_examples=80, deadline=None)
@given(depth=st.integers(1, 4), fanout=st.integers(1, 3), copies=st.integers(1, 4), decode=st.booleans(),
       rule=st.sampled_from(RULES), sort=st.booleans(), mixed=st.booleans(), seed=st.integers(0, 1 << 16))
def test_cascade_equals_plain_attention(depth: int, fanout: int, copies: int, decode: bool, rule: CascadeRule,
                                        sort: bool, mixed: bool, seed: int) -> None:
    """Random trees 1-4 deep: fp32 cascade output equals plain attention to 1e-5, each page read
    once; with the batch in path order, each group is one request (two at most when its decoding
    members come first, as in a step that also prefills)."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    cpu = torch.device("cpu")
    meta, paths = shared_prefix_step(rng, depth, fanout, copies, max_run_pages=5, max_tail=9, decode=decode,
                                     page_size=PAGE, num_pages=NUM_PAGES, device=cpu, sort=sort, mixed=mixed)
    plan = plan_for(meta, paths, rule)
    shared = any(len([p for p in paths if node in p]) > 1 for path in paths for node in path)
    if rule.min_segment_tokens_saved == rule.min_level_tokens_saved == 1:
        assert (plan is not None) == shared, "all sharing is worth a level under a (1, 1) rule"
    if plan is None:
        return
    assert 1 <= len(plan.levels) <= rule.max_levels
    assert_each_page_read_once(meta, plan)
    assert_work_lists_the_groups(plan, meta.num_tokens)
    assert plan.pages_read < plan.pages_listed
    if sort:
        for requests in group_requests(plan):
            page_lists = [tuple(pages) for _, pages in requests]
            most = 2 if mixed and not decode else 1
            assert all(page_lists.count(pages) <= most for pages in page_lists), "a group split into several requests"
    cache = KVCache(NUM_PAGES, PAGE, 1, 2, 8, torch.float32, cpu)
    cache.k.normal_()
    cache.v.normal_()
    q, k, v = torch.randn(meta.num_tokens, 4, 8), torch.randn(meta.num_tokens, 2, 8), torch.randn(meta.num_tokens, 2, 8)
    plain = ReferenceBackend().forward(0, q, k, v, cache, meta)
    cascaded = ReferenceBackend().forward(0, q, k, v, cache, dataclasses.replace(meta, cascade=plan))
    assert ((cascaded - plain).norm() / plain.norm()).item() < 1e-5


def nested_step() -> tuple[AttentionMetadata, list]:
    """system prompt (1 page) -> 2 documents (6 pages) -> 2 questions each (3 pages) -> 3 samples each."""
    system, docs = [1] * PAGE, [[2 + d] * 6 * PAGE for d in range(2)]
    prompts = [system + doc + [10 + d * 2 + q] * 3 * PAGE for d, doc in enumerate(docs) for q in range(2)]
    tree = PrefixTree(PagePool(256, PAGE))
    kvs = []
    for prompt in prompts:
        for _ in range(3):
            kv = tree.acquire(prompt)
            assert tree.reserve(kv, len(prompt) + 2)
            tree.publish(kv, prompt)
            kvs.append(kv)
    meta = step_metadata([list(kv.page_table()) for kv in kvs], [len(p) + 2 for p in prompts for _ in range(3)],
                         [1] * 12, PAGE, torch.device("cpu"))
    return meta, [kv.node.path() for kv in kvs]


def level_shapes(plan: CascadePlan) -> list[list[int]]:
    """Pages of each group request, level by level."""
    return [[len(pages) for _, pages in requests] for requests in group_requests(plan)]


def test_levels_nest_like_the_tree() -> None:
    meta, paths = nested_step()
    plan = plan_for(meta, paths, CascadeRule(1, 1, max_levels=4))
    assert plan is not None and level_shapes(plan) == [[1], [6, 6], [3, 3, 3, 3]]
    assert_each_page_read_once(meta, plan)


def test_runs_too_short_for_a_pass_fold_into_the_level_below() -> None:
    # The system prompt saves 11 x 4 tokens and each question 2 x 12: both under 100, so the
    # system prompt's page joins each document's pass and the questions join the own tails.
    meta, paths = nested_step()
    plan = plan_for(meta, paths, CascadeRule(100, 1, max_levels=4))
    assert plan is not None and level_shapes(plan) == [[7, 7]]
    assert_each_page_read_once(meta, plan)
    # With two levels at most, the two depths that save most stay: documents (240) and questions (96).
    plan = plan_for(meta, paths, CascadeRule(1, 1, max_levels=2))
    assert plan is not None and level_shapes(plan) == [[7, 7], [3, 3, 3, 3]]
    assert_each_page_read_once(meta, plan)


def plan_arrays(plan: CascadePlan) -> list[list[int]]:
    arrays = [plan.own_indptr.tolist(), plan.own_indices.tolist(), [plan.pages_read, plan.pages_listed],
              plan.work.work.tolist(), plan.work.pages.tolist(), plan.work.counts.tolist()]
    for level in plan.levels:
        arrays += [t.tolist() for t in (level.qo_indptr, level.kv_indptr, level.kv_indices, level.kv_last_page_len,
                                        level.member)]
    return arrays


def test_planner_reuses_what_the_nodes_determine_and_replans_when_they_change() -> None:
    """Decode steps that only grow own pages reuse the levels; a new node in the batch re-plans.
    Each plan equals plan_from_paths' for the same step."""
    rule, cpu = CascadeRule(1, 1, max_levels=4), torch.device("cpu")
    tree = PrefixTree(PagePool(512, PAGE))
    system, docs = [1] * 2 * PAGE, [[2 + d] * 3 * PAGE for d in range(2)]
    kvs, lens = [], []
    for d in range(2):
        for _ in range(3):
            kv = tree.acquire(system + docs[d])
            assert tree.reserve(kv, len(system + docs[d]) + 1)
            tree.publish(kv, system + docs[d])
            kvs.append(kv)
            lens.append(len(system + docs[d]) + 1)
    sharing, planner = BatchSharing(rule, PAGE), CascadePlanner()

    def step() -> tuple[CascadePlan, CascadePlan]:
        meta = step_metadata([list(kv.page_table()) for kv in kvs], lens, [1] * len(kvs), PAGE, cpu)
        args = (meta.kv_indptr.numpy(), meta.kv_indices.numpy(), meta.query_start.numpy(), PAGE, SCRATCH, cpu)
        nodes = [kv.node for kv in kvs]
        assert sharing.order(nodes) == path_order([node.path() for node in nodes])
        return planner.plan(*sharing.sharing(nodes), *args), plan_from_paths([node.path() for node in nodes], *args,
                                                                             rule)

    first, expected = step()
    assert first is not None and plan_arrays(first) == plan_arrays(expected)
    for _ in range(2 * PAGE):  # decode steps: each sequence's own tail grows, over page boundaries
        lens = [n + 1 for n in lens]
        for kv, n in zip(kvs, lens):
            assert tree.reserve(kv, n)
        plan, expected = step()
        assert plan_arrays(plan) == plan_arrays(expected)
        assert all(a is b for a, b in zip(plan.levels, first.levels)), "levels re-planned for unchanged nodes"
    # A new sequence on a third document: the batch's nodes change, so the plan is made afresh.
    kv = tree.acquire(system + [9] * 3 * PAGE)
    assert tree.reserve(kv, len(system) + 3 * PAGE + 1)
    tree.publish(kv, system + [9] * 3 * PAGE)
    kvs.append(kv)
    lens.append(len(system) + 3 * PAGE + 1)
    plan, expected = step()
    assert plan_arrays(plan) == plan_arrays(expected)
    assert plan.levels[0] is not first.levels[0]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_generation_unchanged_with_cascade(tiny_model_factory, family: str) -> None:
    """Shared system prompt + n samples: the same tokens with cascade attention on (forced) and off."""
    model = str(tiny_model_factory(family))
    rng = random.Random(5)
    system = [rng.randrange(3, 200) for _ in range(41)]
    prompts = [{"prompt_token_ids": system + [rng.randrange(3, 200) for _ in range(rng.randint(1, 12))]}
               for _ in range(6)]
    params = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)] * 3 + \
             [SamplingParams(temperature=0.9, seed=i, n=3, max_tokens=12, ignore_eos=True) for i in range(3)]
    outputs, stats = {}, {}
    for cascade in (False, True):
        llm = cpu_llm(model, disable_cascade_attn=not cascade, max_num_batched_tokens=64)
        if cascade:
            llm.engine.steps.sharing.rule = CascadeRule(1, 1)  # the tiny prompts are far below the real rule
        outputs[cascade] = [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params, use_tqdm=False)]
        stats[cascade] = llm.engine.stats()
    assert outputs[True] == outputs[False]
    assert stats[False]["cascade_steps"] == 0
    assert stats[True]["cascade_steps"] > 0
    assert stats[True]["kv_pages_read"] < stats[True]["kv_pages_listed"]
