"""Attention kernels alone, on the shapes the engine's decode steps have (one layer, bf16,
32 q / 8 kv heads, dim 128, pages of 16 tokens): how fast each FlashInfer choice reads KV.

Own pages: the tensor-core decode (what the engine uses) and the CUDA-core decode, both bound
to CUDA-graph buffers. Shared level: the ragged prefill kernel (fa3 and fa2) over 16 groups of
64 queries sharing 125 pages, eager with 16 requests and CUDA-graph bound with 1,024 requests
(16 groups, then empty ones, as `DecodeGraphs` pads a level). Run on the GPU machine:
    python scripts/attention_probe.py
"""
from __future__ import annotations

from typing import Callable

import flashinfer
import torch

DEVICE, DTYPE = torch.device("cuda"), torch.bfloat16
HQ, HKV, DIM, PAGE = 32, 8, 128, 16
WORKSPACE = torch.zeros(768 << 20, dtype=torch.uint8, device=DEVICE)


def ms_per_call(fn: Callable[[], object], iterations: int = 40) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iterations):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iterations


def kv_cache(num_pages: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (num_pages + 1, PAGE, HKV, DIM)
    return torch.randn(shape, device=DEVICE, dtype=DTYPE), torch.randn(shape, device=DEVICE, dtype=DTYPE)


def own_pages(name: str, rows: int, low: int, high: int) -> None:
    """Decode over `rows` private tails of low..high pages each."""
    pages = torch.randint(low, high + 1, (rows,), dtype=torch.int32)
    total = int(pages.sum())
    cache = kv_cache(total)
    indptr = torch.cat([torch.zeros(1, dtype=torch.int32), pages.cumsum(0).to(torch.int32)])
    indices = torch.randperm(total, dtype=torch.int32)
    last = torch.randint(1, PAGE + 1, (rows,), dtype=torch.int32)
    q = torch.randn(rows, HQ, DIM, device=DEVICE, dtype=DTYPE)
    gigabytes = total * PAGE * HKV * DIM * 2 * 2 / 1e9
    for tensor_cores in (True, False):
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            WORKSPACE, "NHD", use_cuda_graph=True, use_tensor_cores=tensor_cores,
            paged_kv_indptr_buffer=indptr.to(DEVICE), paged_kv_indices_buffer=indices.to(DEVICE),
            paged_kv_last_page_len_buffer=last.to(DEVICE))
        wrapper.plan(indptr, indices.to(DEVICE), last, HQ, HKV, DIM, PAGE, q_data_type=DTYPE, kv_data_type=DTYPE)
        ms = ms_per_call(lambda: wrapper.run(q, cache, return_lse=True))
        print(f"{name}: {rows} rows, {total} pages, decode tensor_cores={tensor_cores}: {ms:.3f} ms "
              f"({gigabytes / ms:.2f} TB/s)", flush=True)


def shared_level(groups: int = 16, per_group: int = 64, shared: int = 125) -> None:
    rows = groups * per_group
    cache = kv_cache(groups * shared)
    q = torch.randn(rows, HQ, DIM, device=DEVICE, dtype=DTYPE)
    qo = torch.arange(0, rows + 1, per_group, dtype=torch.int32)
    kv_indptr = torch.arange(0, groups * shared + 1, shared, dtype=torch.int32)
    indices = torch.arange(groups * shared, dtype=torch.int32)
    last = torch.full((groups,), PAGE, dtype=torch.int32)
    extra = rows - groups  # graph-bound: padded to one request per row, the rest empty
    padded = (torch.cat([qo, torch.full((extra,), rows, dtype=torch.int32)]),
              torch.cat([kv_indptr, kv_indptr[-1] + torch.arange(1, extra + 1, dtype=torch.int32)]),
              torch.cat([indices, torch.full((extra,), groups * shared, dtype=torch.int32)]),
              torch.cat([last, torch.ones(extra, dtype=torch.int32)]))
    for backend in ("fa3", "fa2"):
        eager = flashinfer.BatchPrefillWithPagedKVCacheWrapper(WORKSPACE, "NHD", backend=backend)
        eager.plan(qo, kv_indptr, indices, last, HQ, HKV, DIM, PAGE, causal=False, q_data_type=DTYPE,
                   kv_data_type=DTYPE)
        graph = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            WORKSPACE, "NHD", use_cuda_graph=True, backend=backend, qo_indptr_buf=padded[0].to(DEVICE),
            paged_kv_indptr_buf=padded[1].to(DEVICE), paged_kv_indices_buf=torch.zeros_like(padded[2], device=DEVICE),
            paged_kv_last_page_len_buf=padded[3].to(DEVICE))
        graph.plan(padded[0], padded[1], padded[2].to(DEVICE), padded[3], HQ, HKV, DIM, PAGE, causal=False,
                   q_data_type=DTYPE, kv_data_type=DTYPE)
        for label, wrapper in (("eager", eager), ("graph-bound", graph)):
            ms = ms_per_call(lambda: wrapper.run(q, cache, return_lse=True))
            print(f"shared level {backend} {label}: {groups} groups x {per_group} queries x {shared} pages: "
                  f"{ms:.3f} ms", flush=True)


if __name__ == "__main__":
    own_pages("sharedprefix own tails", 1024, 8, 14)
    own_pages("samples own tails", 704, 1, 33)
    own_pages("nosharing", 140, 7, 130)
    shared_level()
