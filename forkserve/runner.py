"""Turns a scheduled step into tensors, runs the model over the paged KV cache, and samples."""
from __future__ import annotations

from array import array

import numpy as np
import torch

from forkserve.attention.base import AttentionBackend, AttentionMetadata
from forkserve.cuda_graphs import DecodeGraphs
from forkserve.engine.pages import KVCache
from forkserve.engine.scheduler import ScheduledSeq
from forkserve.model.llama import LlamaForCausalLM
from forkserve.sampler import Sampler, SamplerOutput, SamplingRow


def build_metadata(batch: list[ScheduledSeq], page_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Flat input ids and positions of the step's new tokens, plus where their KV lives.

    The only per-sequence Python work is slicing C arrays; everything per token is numpy, and
    ids, positions and slots reach the device in one copy.
    """
    num_seqs = len(batch)
    input_ids: list[int] = []
    kv_indices = array("i")
    kv_indptr = np.zeros(num_seqs + 1, dtype=np.int32)
    starts = np.empty(num_seqs, dtype=np.int64)
    new_tokens = np.empty(num_seqs, dtype=np.int64)
    for b, item in enumerate(batch):
        seq, start = item.seq, item.seq.num_computed_tokens
        end = start + item.num_new_tokens
        input_ids.extend(seq.token_ids[start:end])
        kv_indices.extend(seq.kv.page_table()[:-(-end // page_size)])
        kv_indptr[b + 1] = len(kv_indices)
        starts[b], new_tokens[b] = start, item.num_new_tokens
    query_start = np.zeros(num_seqs + 1, dtype=np.int32)
    np.cumsum(new_tokens, out=query_start[1:])
    context_lens = starts + new_tokens
    pages = np.frombuffer(kv_indices, dtype=np.int32)
    row_of_token = np.repeat(np.arange(num_seqs), new_tokens)
    positions = np.arange(len(input_ids)) - query_start[:-1][row_of_token] + starts[row_of_token]
    slots = pages[kv_indptr[:-1][row_of_token] + positions // page_size].astype(np.int64) * page_size \
        + positions % page_size
    on_device = torch.from_numpy(np.stack([np.asarray(input_ids, dtype=np.int64), positions, slots])).to(device)
    meta = AttentionMetadata(
        query_start=torch.from_numpy(query_start),
        kv_indptr=torch.from_numpy(kv_indptr),
        kv_indices=torch.from_numpy(pages),
        kv_last_page_len=torch.from_numpy(((context_lens - 1) % page_size + 1).astype(np.int32)),
        context_lens=context_lens.tolist(),
        slot_mapping=on_device[2],
        page_size=page_size,
    )
    return on_device[0], on_device[1], meta


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
