"""Forks on the sampler's side: one logits row, several continuations.

`ForkingSampler` wraps the `Sampler`. Instead of one `SamplingRow` per sequence that samples
this step it takes one `DrawRequest` per logits row: several seeded rows (a fork), one row (an
ordinary draw), or a beam probe (the best `top_k` tokens by raw log-probability).
"""
from __future__ import annotations

from dataclasses import fields
from typing import Sequence as Seq

import torch

from forkserve.sampler import Sampler, SamplerOutput, TokenBitmask
from forkserve.worker.plan import DrawRequest, StepResult


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
                 ) -> StepResult:
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
        return StepResult(sampled, first_row, self._top(logits, requests))

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
