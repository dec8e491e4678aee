"""Attention steps for kernel tests: metadata from page tables, and steps over random shared prefixes."""
from __future__ import annotations

import random

import torch

import numpy as np

from forkserve.worker.attention.base import AttentionMetadata
from forkserve.worker.attention.cascade import CascadePlan, plan_cascade
from forkserve.engine.pages import PagePool
from forkserve.engine.sharing import CascadeRule, find_sharing, path_order
from forkserve.engine.tree import PrefixTree, TreeNode


def step_metadata(page_tables: list[list[int]], context_lens: list[int], query_lens: list[int], page_size: int,
                  device: torch.device) -> AttentionMetadata:
    """Sequence b adds query_lens[b] tokens at the end of its context_lens[b], in pages page_tables[b]."""
    kv_indptr, slots, starts, indices = [0], [], [0], []
    for table, c, q in zip(page_tables, context_lens, query_lens):
        pages = table[:-(-c // page_size)]
        indices += pages
        kv_indptr.append(len(indices))
        slots += [pages[p // page_size] * page_size + p % page_size for p in range(c - q, c)]
        starts.append(starts[-1] + q)
    return AttentionMetadata(
        query_start=torch.tensor(starts, dtype=torch.int32), kv_indptr=torch.tensor(kv_indptr, dtype=torch.int32),
        kv_indices=torch.tensor(indices, dtype=torch.int32),
        kv_last_page_len=torch.tensor([(c - 1) % page_size + 1 for c in context_lens], dtype=torch.int32),
        context_lens=list(context_lens), slot_mapping=torch.tensor(slots, device=device), page_size=page_size)


def plan_from_paths(paths: list[list[TreeNode]], kv_indptr: np.ndarray, kv_indices: np.ndarray,
                    query_start: np.ndarray, page_size: int, scratch_page: int, device: torch.device,
                    rule: CascadeRule) -> CascadePlan | None:
    """A step's cascade plan from its rows' tree paths: the core's sharing, then the worker's levels."""
    sharing = find_sharing(paths, page_size, rule)
    if sharing is None:
        return None
    return plan_cascade(sharing, kv_indptr, kv_indices, query_start, page_size, scratch_page, device)


def shared_prefix_step(rng: random.Random, depth: int, fanout: int, copies: int, max_run_pages: int, max_tail: int,
                       decode: bool, page_size: int, num_pages: int, device: torch.device,
                       sort: bool = False, mixed: bool = False) -> tuple[AttentionMetadata, list[list[TreeNode]]]:
    """A step of sequences whose prompts form a random tree `depth` runs deep (system prompt ->
    document -> question ...), each node with 1..fanout children and each leaf run by 1..copies
    sequences (samples), every sequence with its own tail of 1..max_tail tokens, in random order
    or (sort) in the engine's order, by tree path. Mixed (with decode False): about half the
    sequences decode, and, as the engine orders a step that also prefills, come first.

    The prompts go through a real PrefixTree, so the returned paths are what the engine sees.
    """
    def grow(prefix: list[int], level: int) -> list[list[int]]:
        if level == depth:
            return [prefix] * rng.randint(1, copies)
        leaves = []
        for _ in range(rng.randint(1, fanout)):
            run = [rng.randrange(10_000) for _ in range(rng.randint(1, max_run_pages) * page_size)]
            leaves += grow(prefix + run, level + 1)
        return leaves

    tree = PrefixTree(PagePool(num_pages, page_size), copy_pages=lambda src, dst: None)
    prompts = grow([], 0)
    rng.shuffle(prompts)
    tables, context_lens, query_lens, kvs = [], [], [], []
    for prompt in prompts:
        kv = tree.acquire(prompt)
        kvs.append(kv)
        tail = rng.randint(1, max_tail)
        assert tree.reserve(kv, len(prompt) + tail), "the pool is too small for this step"
        tree.publish(kv, prompt)
        tables.append(list(kv.page_table()))
        context_lens.append(len(prompt) + tail)
        query_lens.append(1 if decode or (mixed and rng.random() < 0.5) else rng.randint(1, tail))
    # Paths read last: later sequences may have split nodes on earlier ones' paths.
    paths = [kv.node.path() for kv in kvs]
    order = path_order(paths) if sort else list(range(len(paths)))
    if mixed:
        order.sort(key=lambda i: query_lens[i] != 1)
    meta = step_metadata([tables[i] for i in order], [context_lens[i] for i in order], [query_lens[i] for i in order],
                         page_size, device)
    return meta, [paths[i] for i in order]
