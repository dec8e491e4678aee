"""The KV pool's size on a GPU, from measurement (vLLM's rule): gpu_memory_utilization of the
device, less what is already allocated (weights, attention workspace, CUDA context), less the
measured tensor peak of the largest step and what the decode CUDA graphs will hold.

The peak is measured, not estimated from the model's shapes: a formula has to err on the safe
side, and every gigabyte it over-reserves is 512 pages of 16 tokens (on the Llama-3.1-8B shape)
that a memory-bound batch, such as n-way sampling, runs without.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from forkserve.model.llama import LlamaForCausalLM
from forkserve.sampler import Sampler, SamplingRow
from forkserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepMemory:
    """Bytes the allocator's tensors rose by (above those alive before) over profile steps."""

    eager_peak: int  # the largest eager step: max_num_batched_tokens tokens, max_num_seqs rows sampled
    graph_peak: int  # a forward of max_num_seqs tokens: what the decode graphs' private pool holds


def _profile_attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attends to nothing, but allocates what the backend's most demanding step does: the query
    made contiguous, the output, a shared level's partial output and both their log-sum-exps."""
    q = q.contiguous()
    out, part = torch.empty_like(q), torch.empty_like(q)
    lse, part_lse = (torch.empty(q.shape[:2], dtype=torch.float32, device=q.device) for _ in range(2))
    del part, lse, part_lse
    return out


def _general_path_rows(num_rows: int, max_logprobs: int) -> list[SamplingRow]:
    """Rows that take every memory-hungry branch of the sampler's general path: penalties,
    min-p, top-k and top-p (a sort of the vocabulary), seeded draws, logprobs."""
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, min_p=0.05, repetition_penalty=1.1,
                            frequency_penalty=0.1, presence_penalty=0.1, logprobs=max_logprobs)
    return [SamplingRow(params, seed=row, token_ids=[1, 2], num_prompt_tokens=1) for row in range(num_rows)]


def _truncated_rows(num_rows: int) -> list[SamplingRow]:
    """Unseeded top-k / top-p rows: on a GPU FlashInfer's kernels draw them (sampler.py), with
    temporaries of their own."""
    params = SamplingParams(temperature=0.7, top_p=0.95, top_k=40)
    return [SamplingRow(params, seed=None, token_ids=[1, 2], num_prompt_tokens=1) for _ in range(num_rows)]


def _tensor_peak(run: Callable[[], object], device: torch.device) -> int:
    """How far the allocator's live tensors rose above their level before `run`."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


@torch.inference_mode()
def profile_step_memory(model: LlamaForCausalLM, sampler: Sampler, max_num_batched_tokens: int,
                        max_num_seqs: int, max_logprobs: int, max_model_len: int, max_pages_per_seq: int,
                        device: torch.device) -> StepMemory:
    """Run the profile steps on dummy inputs and measure their peaks; the blocks they leave in
    the allocator's cache are released, so the pool is allocated into free memory."""
    hidden_size, dtype = model.config.hidden_size, model.embed_tokens.weight.dtype

    def forward(num_tokens: int) -> torch.Tensor:
        input_ids = torch.zeros(num_tokens, dtype=torch.long, device=device)
        positions = torch.arange(num_tokens, device=device) % max_model_len
        return model(input_ids, positions, _profile_attention)

    def eager_step() -> None:
        # Stand-ins for a step's inputs, kept for the whole step: ids, positions, KV slots and
        # query offsets per token, and page tables (own pages and a level's) per sequence.
        inputs = (torch.empty(max_num_batched_tokens, 4, dtype=torch.long, device=device),
                  torch.empty(max_num_seqs, 2 * max_pages_per_seq, dtype=torch.int32, device=device))
        forward(max_num_batched_tokens)
        logits = model.compute_logits(torch.zeros(max_num_seqs, hidden_size, dtype=dtype, device=device))
        sampler.draw(logits, _general_path_rows(max_num_seqs, max_logprobs))
        sampler.draw(logits, _truncated_rows(max_num_seqs))
        del inputs

    steps = StepMemory(eager_peak=_tensor_peak(eager_step, device),
                       graph_peak=_tensor_peak(lambda: forward(max_num_seqs), device))
    torch.cuda.empty_cache()
    return steps


def kv_pool_bytes(device: torch.device, gpu_memory_utilization: float, eager_peak: int, graphs: int) -> int:
    """Bytes left for the KV pool: utilization x total, less what the device already has in use
    (by this process and others), the largest eager step's peak and what the graphs will hold."""
    free, total = torch.cuda.mem_get_info(device)
    in_use = total - free
    budget = int(total * gpu_memory_utilization) - in_use - eager_peak - graphs
    gib = 1 << 30
    if budget <= 0:
        raise ValueError(f"gpu_memory_utilization={gpu_memory_utilization} leaves no memory for the KV pool: of "
                         f"{total / gib:.2f} GiB, {in_use / gib:.2f} are in use, the largest step needs "
                         f"{eager_peak / gib:.2f} and the decode graphs {graphs / gib:.2f}; raise "
                         "gpu_memory_utilization, or lower max_num_batched_tokens or max_num_seqs")
    logger.info("KV pool: %.2f GiB = %.2f x %.2f GiB, less %.2f in use (%.2f of it PyTorch's), %.2f for the "
                "largest step, %.2f for the decode graphs", budget / gib, gpu_memory_utilization, total / gib,
                in_use / gib, torch.cuda.memory_reserved(device) / gib, eager_peak / gib, graphs / gib)
    return budget
