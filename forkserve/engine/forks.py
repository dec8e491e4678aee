"""Forks: one logits row, several continuations.

A sequence that forks draws all its children's first tokens from its own logits row (so a
prompt is prefilled once however many samples it has), then the children take copies of its KV
through the prefix tree: full pages are shared, only a partly filled last page is copied.

`ForkingSampler` wraps the `Sampler` the runner calls. Instead of one `SamplingRow` per
sequence that samples this step it takes one `DrawRequest`: several seeded rows (a fork), one
row (an ordinary draw), or a beam probe (the best `top_k` tokens by raw log-probability).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Sequence as Seq

import torch

from forkserve.engine.scheduler import Scheduler
from forkserve.engine.sequence import Sequence
from forkserve.sampler import Sampler, SamplerOutput, SamplingRow, TokenBitmask


@dataclass
class DrawRequest:
    """What one sequence wants from its logits row this step."""

    rows: list[SamplingRow] = field(default_factory=list)  # one seeded draw per continuation
    top_k: int = 0  # beam probe: the k best (token, logprob) of the raw log-softmax instead


@dataclass
class StepDraws:
    sampled: SamplerOutput | None  # the draws of every request's rows, flattened in order
    first_row: list[int]  # per request, the index of its first draw in `sampled`
    top: list[list[tuple[int, float]] | None]  # per request, its probe's candidates (best first)


class ForkingSampler:
    """Draws several continuations from one logits row, or a beam probe's top-k.

    Forks multiply the rows to sample (64 prompts forking into 32 samples each is 2,048 rows
    of vocabulary size), so rows are sampled at most `max_rows` at a time to keep the
    sampler's memory at what an ordinary step of max_num_seqs sequences needs.
    """

    def __init__(self, sampler: Sampler, max_rows: int) -> None:
        self.sampler = sampler
        self.max_rows = max_rows

    def __call__(self, logits: torch.Tensor, requests: Seq[DrawRequest], bitmask: TokenBitmask | None = None
                 ) -> StepDraws:
        """`bitmask` has one row per draw row (the requests' rows flattened in order)."""
        counts = [len(r.rows) for r in requests]
        first_row, total = [], 0
        for count in counts:
            first_row.append(total)
            total += count
        sampled = None
        if total:
            rows = [row for r in requests for row in r.rows]
            if all(c == 1 for c in counts) and total <= self.max_rows:
                sampled = self.sampler(logits, rows, bitmask)
            else:
                index = torch.repeat_interleave(torch.arange(len(requests), device=logits.device),
                                                torch.tensor(counts, device=logits.device))
                parts = [self.sampler(logits[index[a:a + self.max_rows]], rows[a:a + self.max_rows],
                                      None if bitmask is None else bitmask.slice(a, a + self.max_rows))
                         for a in range(0, total, self.max_rows)]
                sampled = SamplerOutput(*([x for part in parts for x in getattr(part, f.name)]
                                          for f in fields(SamplerOutput)))
        return StepDraws(sampled, first_row, self._top(logits, requests))

    @staticmethod
    def _top(logits: torch.Tensor, requests: Seq[DrawRequest]) -> list[list[tuple[int, float]] | None]:
        probes = [i for i, r in enumerate(requests) if r.top_k]
        top: list[list[tuple[int, float]] | None] = [None] * len(requests)
        if not probes:
            return top
        k = max(requests[i].top_k for i in probes)
        logprobs = torch.log_softmax(logits[torch.tensor(probes, device=logits.device)].float(), dim=-1)
        values, ids = torch.topk(logprobs, min(k, logprobs.shape[-1]), dim=-1)
        for row, i in enumerate(probes):
            want = requests[i].top_k
            top[i] = list(zip(ids[row, :want].tolist(), values[row, :want].tolist()))
        return top


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
