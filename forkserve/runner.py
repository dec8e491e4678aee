"""Turns a scheduled step into tensors, runs the model over the paged KV cache, and samples."""
from __future__ import annotations

import torch

from forkserve.attention.base import AttentionBackend, AttentionMetadata
from forkserve.cuda_graphs import DecodeGraphs
from forkserve.engine.pages import KVCache
from forkserve.engine.scheduler import ScheduledSeq
from forkserve.model.llama import LlamaForCausalLM
from forkserve.sampler import Sampler, SamplerOutput, SamplingRow


def build_metadata(batch: list[ScheduledSeq], page_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Flat input ids and positions of the step's new tokens, plus where their KV lives."""
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    query_start = [0]
    context_lens: list[int] = []
    kv_indptr = [0]
    kv_indices: list[int] = []
    for item in batch:
        seq, start = item.seq, item.seq.num_computed_tokens
        end = start + item.num_new_tokens
        table = seq.kv.page_table()
        input_ids.extend(seq.token_ids[start:end])
        positions.extend(range(start, end))
        slots.extend(table[p // page_size] * page_size + p % page_size for p in range(start, end))
        query_start.append(query_start[-1] + item.num_new_tokens)
        context_lens.append(end)
        kv_indices.extend(table[:-(-end // page_size)])
        kv_indptr.append(len(kv_indices))
    meta = AttentionMetadata(
        query_start=torch.tensor(query_start, dtype=torch.int32),
        kv_indptr=torch.tensor(kv_indptr, dtype=torch.int32),
        kv_indices=torch.tensor(kv_indices, dtype=torch.int32),
        kv_last_page_len=torch.tensor([(n - 1) % page_size + 1 for n in context_lens], dtype=torch.int32),
        context_lens=context_lens,
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        page_size=page_size,
    )
    ids = torch.tensor(input_ids, dtype=torch.long, device=device)
    pos = torch.tensor(positions, dtype=torch.long, device=device)
    return ids, pos, meta


class ModelRunner:
    """Owns the model, the KV tensors and the attention backend for one device."""

    def __init__(self, model: LlamaForCausalLM, kv_cache: KVCache, backend: AttentionBackend,
                 sampler: Sampler, device: torch.device, graphs: DecodeGraphs | None = None) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.backend = backend
        self.sampler = sampler
        self.device = device
        self.graphs = graphs

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSeq], rows: list[SamplingRow]) -> SamplerOutput | None:
        """Run one step; `rows` describe, in batch order, the sequences that sample this step."""
        input_ids, positions, meta = build_metadata(batch, self.kv_cache.page_size, self.device)
        if self.graphs is not None and self.graphs.can_run(meta):
            hidden = self.graphs.run(input_ids, positions, meta)
        else:
            self.backend.prepare(meta, self.kv_cache)

            def attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                return self.backend.forward(layer, q, k, v, self.kv_cache, meta)

            hidden = self.model(input_ids, positions, attention)
        if not rows:
            return None
        query_ends = meta.query_start.tolist()[1:]
        last = [query_ends[b] - 1 for b, item in enumerate(batch) if item.samples]
        logits = self.model.compute_logits(hidden[torch.tensor(last, device=self.device)])
        return self.sampler(logits, rows)
