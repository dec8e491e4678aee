"""Forks' KV: children share their parent's full pages and copy its partly filled last page.

A sequence that forks draws all its children's first tokens from its own logits row (the
worker's `ForkingSampler`), so a prompt is prefilled once however many samples it has; then the
children take its KV through the prefix tree. The copies of the last page are page-copy
operations in the next step's plan, which the worker runs before that step's KV writes.
"""
from __future__ import annotations

from typing import Iterator

from forkserve.engine.scheduler import Scheduler
from forkserve.engine.sequence import Request, Sequence


def new_children(parent: Sequence, k: int, request: Request | None, seq_ids: Iterator[int]) -> list[Sequence]:
    """k sequences continuing parent's tokens, added to parent's request (more samples or beams,
    carrying its logprobs) or to `request`, whose prompt is parent's tokens (a tree-search step)."""
    same = request is None or request is parent.request
    request = parent.request if request is None else request
    children = []
    for _ in range(k):
        index = len(request.seqs)
        child = Sequence(next(seq_ids), request, index, list(parent.token_ids),
                         parent.num_prompt_tokens if same else len(parent.token_ids), request.sample_seed(index))
        if same:
            child.cumulative_logprob = parent.cumulative_logprob
            child.logprobs = None if parent.logprobs is None else list(parent.logprobs)
        elif request.params.logprobs is not None:
            child.logprobs = []
        request.seqs.append(child)
        children.append(child)
    return children


def fork_kv(scheduler: Scheduler, parent: Sequence, children: list[Sequence]) -> None:
    """Give each child a copy of parent's computed KV, as far as the pool allows.

    Children share the parent's full pages through the tree; each gets its own copy of a partly
    filled last page. Parked KV is dropped to make room for those copies; a child that still
    does not fit gets no KV and is recomputed from its tokens when admitted (the shared full
    pages are then found in the tree). Nothing here fails for lack of pages.
    """
    tree = scheduler.tree
    tokens = parent.token_ids[:parent.num_computed_tokens]
    partial = len(tokens) % tree.page_size != 0
    fit = 0
    if parent.kv is not None:
        fit = len(children)
        if partial:
            while tree.num_free_pages + tree.num_evictable_pages < fit and scheduler.drop_parked(keep=parent):
                pass
            fit = min(fit, tree.num_free_pages + tree.num_evictable_pages)
    kvs = tree.fork(parent.kv, tokens, fit) if fit else []
    for i, child in enumerate(children):
        if i < fit:
            child.kv, child.num_computed_tokens = kvs[i], parent.num_computed_tokens
        else:
            child.kv, child.num_computed_tokens = None, 0
