"""Attention kernels and GEMMs alone, on the shapes the engine's decode steps have (one layer,
bf16, 32 q / 8 kv heads, dim 128, pages of 16 tokens), timed as CUDA-graph replays.

own: FlashInfer's tensor-core decode (with and without split-KV) and CUDA-core decode over rows
of own pages, bound to CUDA-graph buffers, with the KV pages laid out token-major (NHD, as the
engine's) and head-major (HND). level: FlashInfer's ragged prefill kernel (fa3, fa2)
over 16 groups of 64 queries sharing 125 pages, eager and graph-bound. triton: the graph-bound
FA3 level + merge_state against forkserve's Triton level + merge kernels. sweep: the Triton level
kernel's tuning, split pages and 64-token tiles. spread: the CUDA-core decode with the tails'
pages packed or scattered over a pool's worth of pages. sampler: the sampling kernel at decode batch sizes. gemm: a
layer's four GEMMs by row count; curve: the same at every decode graph size. Run on the GPU machine:
    python scripts/attention_probe.py [own,spread,level,triton,sweep,tile,sampler,gemm,curve]
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import flashinfer
import torch

from forkserve.kernels import LEVEL_TILE_TOKENS
from forkserve.kernels import shared_level as sl

DEVICE, DTYPE = torch.device("cuda"), torch.bfloat16
HQ, HKV, DIM, PAGE = 32, 8, 128, 16
WORKSPACE = torch.zeros(768 << 20, dtype=torch.uint8, device=DEVICE)


def ms_per_call(fn: Callable[[], object], iterations: int = 40) -> float:
    """GPU milliseconds per call: `iterations` calls captured in one CUDA graph, so Python's
    launch overhead (tens of microseconds for a Triton or FlashInfer call) is not counted."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iterations):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iterations


def kv_cache(num_pages: int, layout: str = "NHD") -> tuple[torch.Tensor, torch.Tensor]:
    shape = (num_pages + 1, PAGE, HKV, DIM) if layout == "NHD" else (num_pages + 1, HKV, PAGE, DIM)
    return torch.randn(shape, device=DEVICE, dtype=DTYPE), torch.randn(shape, device=DEVICE, dtype=DTYPE)


class Tails(NamedTuple):
    """`rows` private tails of random lengths: their page-table CSR, last-page lengths and queries."""
    indptr: torch.Tensor
    last: torch.Tensor
    q: torch.Tensor
    total_pages: int

    @classmethod
    def random(cls, rows: int, low: int, high: int) -> "Tails":
        pages = torch.randint(low, high + 1, (rows,), dtype=torch.int32)
        indptr = torch.cat([torch.zeros(1, dtype=torch.int32), pages.cumsum(0).to(torch.int32)])
        return cls(indptr, torch.randint(1, PAGE + 1, (rows,), dtype=torch.int32),
                   torch.randn(rows, HQ, DIM, device=DEVICE, dtype=DTYPE), int(pages.sum()))

    @property
    def gigabytes(self) -> float:
        return self.total_pages * PAGE * HKV * DIM * 2 * 2 / 1e9


def decode_ms(tails: Tails, indices: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor], layout: str = "NHD",
              tensor_cores: bool = False, split_kv: bool = True) -> float:
    """FlashInfer's decode kernel over the tails, pages `indices`, bound to CUDA-graph buffers."""
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        WORKSPACE, layout, use_cuda_graph=True, use_tensor_cores=tensor_cores,
        paged_kv_indptr_buffer=tails.indptr.to(DEVICE), paged_kv_indices_buffer=indices.to(DEVICE),
        paged_kv_last_page_len_buffer=tails.last.to(DEVICE))
    wrapper.plan(tails.indptr, indices.to(DEVICE), tails.last, HQ, HKV, DIM, PAGE, q_data_type=DTYPE,
                 kv_data_type=DTYPE, **({} if split_kv else {"disable_split_kv": True}))
    return ms_per_call(lambda: wrapper.run(tails.q, cache, return_lse=True))


def own_pages(name: str, rows: int, low: int, high: int) -> None:
    """Decode over `rows` private tails of low..high pages each."""
    tails = Tails.random(rows, low, high)
    total = tails.total_pages
    indices = torch.randperm(total, dtype=torch.int32)
    for layout, tensor_cores, no_split in ((layout, *kernel) for layout in ("NHD", "HND")
                                           for kernel in ((True, False), (True, True), (False, False))):
        ms = decode_ms(tails, indices, kv_cache(total, layout), layout, tensor_cores, split_kv=not no_split)
        print(f"{name}: {rows} rows, {total} pages, {layout} decode tensor_cores={tensor_cores} "
              f"split-kv={not no_split}: "
              f"{ms:.3f} ms ({tails.gigabytes / ms:.2f} TB/s)", flush=True)


def own_pages_spread(name: str, rows: int, low: int, high: int, pool_pages: int) -> None:
    """The CUDA-core decode (the engine's kernel for short tails) over the same tails with their pages
    packed into a region of their own size, or scattered over a pool's worth of pages (the engine's
    KV tensor per layer), each row's pages in random or ascending order."""
    tails = Tails.random(rows, low, high)
    total, indptr = tails.total_pages, tails.indptr
    cache = kv_cache(pool_pages)
    spread = torch.randperm(pool_pages, dtype=torch.int32)[:total]
    layouts = {"packed": torch.randperm(total, dtype=torch.int32), "spread": spread,
               "spread, ascending per row": torch.cat([spread[indptr[r]:indptr[r + 1]].sort().values
                                                       for r in range(rows)]),
               "spread, rows in page order": spread.sort().values}
    for label, indices in layouts.items():
        ms = decode_ms(tails, indices, cache)
        print(f"{name}: {rows} rows, {total} pages {label} in a pool of {pool_pages}: CUDA-core decode "
              f"{ms:.3f} ms ({tails.gigabytes / ms:.2f} TB/s)", flush=True)


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


def level_work(groups: int, per_group: int, shared: int, splits: int = 1,
               tile: int = LEVEL_TILE_TOKENS) -> torch.Tensor:
    """Work items of the Triton level kernel, cut as `cascade.level_work` cuts them: each group's
    queries in tiles of `tile` tokens over the group's pages, partials in slot 0; with
    splits > 1, each tile's pages cut into that many items, partials in slots 0 .. splits - 1."""
    bounds = [shared * p // splits for p in range(splits + 1)]
    items = [(g * per_group + first, min(tile, per_group - first), g * shared + bounds[p],
              bounds[p + 1] - bounds[p], p)
             for g in range(groups) for first in range(0, per_group, tile) for p in range(splits)]
    return torch.tensor(items, dtype=torch.int32, device=DEVICE)


def shared_level_triton(groups: int, per_group: int, shared: int) -> None:
    """FlashInfer's FA3 level (graph-bound) + merge_state against the Triton level + merge kernels."""
    rows = groups * per_group
    cache = kv_cache(groups * shared)
    q = torch.randn(rows, HQ, DIM, device=DEVICE, dtype=DTYPE)
    own = torch.randn(rows, HQ, DIM, device=DEVICE, dtype=DTYPE)
    own_lse = torch.randn(rows, HQ, device=DEVICE) + 8
    qo = torch.arange(0, rows + 1, per_group, dtype=torch.int32)
    kv_indptr = torch.arange(0, groups * shared + 1, shared, dtype=torch.int32)
    pages = torch.randperm(groups * shared, dtype=torch.int32)
    last = torch.full((groups,), PAGE, dtype=torch.int32)
    extra = rows - groups
    padded = (torch.cat([qo, torch.full((extra,), rows, dtype=torch.int32)]),
              torch.cat([kv_indptr, kv_indptr[-1] + torch.arange(1, extra + 1, dtype=torch.int32)]),
              torch.cat([pages, torch.full((extra,), groups * shared, dtype=torch.int32)]),
              torch.cat([last, torch.ones(extra, dtype=torch.int32)]))
    graph = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
        WORKSPACE, "NHD", use_cuda_graph=True, backend="fa3", qo_indptr_buf=padded[0].to(DEVICE),
        paged_kv_indptr_buf=padded[1].to(DEVICE), paged_kv_indices_buf=torch.zeros_like(padded[2], device=DEVICE),
        paged_kv_last_page_len_buf=padded[3].to(DEVICE))
    graph.plan(padded[0], padded[1], padded[2].to(DEVICE), padded[3], HQ, HKV, DIM, PAGE, causal=False,
               q_data_type=DTYPE, kv_data_type=DTYPE)
    member = torch.ones(rows, dtype=torch.bool, device=DEVICE)
    work = level_work(groups, per_group, shared)
    num_items = torch.tensor([work.shape[0]], dtype=torch.int32, device=DEVICE)
    pages_dev = pages.to(DEVICE)
    partial_out = torch.empty(1, rows, HQ, DIM, device=DEVICE)
    partial_lse = torch.empty(1, rows, HQ, device=DEVICE)
    counts = torch.ones(rows, dtype=torch.int32, device=DEVICE)
    out, lse = own.clone(), own_lse.clone()

    def fa3_level() -> tuple[torch.Tensor, torch.Tensor]:
        return graph.run(q, cache, return_lse=True)

    def triton_level() -> None:
        sl.shared_level_attention(q, *cache, work, num_items, pages_dev, partial_out, partial_lse)

    part, part_lse = fa3_level()
    flashinfer.merge_state_in_place(out, lse, part, part_lse, mask=member)
    expected = out.clone()
    out.copy_(own)
    lse.copy_(own_lse)
    triton_level()
    sl.merge_partials_(out, lse, partial_out, partial_lse, counts)
    error = (out.float() - expected.float()).abs().max().item()
    timings = {"fa3 level": ms_per_call(fa3_level),
               "merge_state": ms_per_call(lambda: flashinfer.merge_state_in_place(out, lse, part, part_lse,
                                                                                   mask=member)),
               "triton level": ms_per_call(triton_level),
               "triton merge": ms_per_call(lambda: sl.merge_partials_(out, lse, partial_out, partial_lse, counts))}
    print(f"level {groups} groups x {per_group} queries x {shared} pages: "
          + ", ".join(f"{name} {ms:.3f} ms" for name, ms in timings.items())
          + f"; max |triton - fa3| {error:.4f}", flush=True)


def level_sweep(groups: int, per_group: int, shared: int, splits_tried: tuple[int, ...] = (1, 2, 3, 4),
                stages_tried: tuple[int, ...] = (2, 3, 4)) -> None:
    """The Triton level kernel + merge over tuning choices: keys per block, warps, pipeline stages,
    query tiles of 32 or 64 tokens, and each group's pages split across `splits` items (each a
    partial of its own, merged after)."""
    rows = groups * per_group
    cache = kv_cache(groups * shared)
    q = torch.randn(rows, HQ, DIM, device=DEVICE, dtype=DTYPE)
    own = torch.randn(rows, HQ, DIM, device=DEVICE, dtype=DTYPE)
    own_lse = torch.randn(rows, HQ, device=DEVICE) + 8
    pages = torch.randperm(groups * shared, dtype=torch.int32, device=DEVICE)
    out, lse = own.clone(), own_lse.clone()
    reference = None
    results = []
    shapes = [(splits, tile) for splits in splits_tried for tile in (LEVEL_TILE_TOKENS, 2 * LEVEL_TILE_TOKENS)
              if tile == LEVEL_TILE_TOKENS or (splits == 1 and per_group >= tile)]
    for splits, tile in shapes:
        work = level_work(groups, per_group, shared, splits, tile)
        num_items = torch.tensor([work.shape[0]], dtype=torch.int32, device=DEVICE)
        partial_out = torch.empty(splits, rows, HQ, DIM, device=DEVICE)
        partial_lse = torch.empty(splits, rows, HQ, device=DEVICE)
        counts = torch.full((rows,), splits, dtype=torch.int32, device=DEVICE)
        for block_n in (32, 64, 128):
            for warps in (4, 8):
                for stages in stages_tried:
                    config = dict(block_n=block_n, num_warps=warps, num_stages=stages, tile_tokens=tile)

                    def level_and_merge() -> None:
                        sl.shared_level_attention(q, *cache, work, num_items, pages, partial_out, partial_lse,
                                                  **config)
                        sl.merge_partials_(out, lse, partial_out, partial_lse, counts)

                    try:
                        out.copy_(own)
                        lse.copy_(own_lse)
                        level_and_merge()
                    except Exception as error:  # e.g. out of shared memory for this tile
                        print(f"sweep {groups}x{per_group}x{shared} splits={splits} {config}: {type(error).__name__}")
                        continue
                    if reference is None:
                        reference = out.clone()
                    error = (out.float() - reference.float()).abs().max().item()
                    ms = ms_per_call(level_and_merge)
                    results.append((ms, splits, config, error))
    results.sort(key=lambda r: r[0])
    for ms, splits, config, error in results[:8]:
        print(f"sweep {groups} groups x {per_group} x {shared} pages: splits={splits} {config}: {ms:.4f} ms "
              f"(max diff {error:.4f})", flush=True)
    default = next(r for r in results if r[1] == 1 and r[2] == dict(block_n=64, num_warps=4, num_stages=2,
                                                                     tile_tokens=LEVEL_TILE_TOKENS))
    print(f"sweep {groups} groups x {per_group} x {shared} pages: current choice {default[0]:.4f} ms", flush=True)


def sampler_rows() -> None:
    """The sampling kernels (forkserve/kernels/sampling.py) at nosharing's, samples' and sharedprefix's
    decode batches, Llama 3's vocabulary, against reading the logits once."""
    from forkserve.kernels import sampling

    vocab = 128256
    for rows in (140, 683, 1024):
        logits = torch.randn(rows, vocab, device=DEVICE, dtype=DTYPE) * 3
        timings = {f"T={t}": ms_per_call(lambda: sampling.sample(logits, torch.full((rows,), t, device=DEVICE), 7))
                   for t in (1.0, 0.7, 0.0)}
        timings["read once (amax)"] = ms_per_call(lambda: logits.amax(dim=1))
        print(f"sampler {rows} rows: " + ", ".join(f"{name} {ms:.4f} ms" for name, ms in timings.items()), flush=True)


LAYER_GEMMS = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}  # (in, out)


def layer_gemm_ms(rows: int, weights: dict[str, torch.Tensor], iterations: int) -> float:
    """One layer's four GEMMs at `rows` rows, each timed alone as graph replays."""
    x = {name: torch.randn(rows, w.shape[1], device=DEVICE, dtype=DTYPE) for name, w in weights.items()}
    return sum(ms_per_call(lambda: torch.nn.functional.linear(x[name], w), iterations) for name, w in weights.items())


def layer_weights() -> dict[str, torch.Tensor]:
    return {name: torch.randn(n, k, device=DEVICE, dtype=DTYPE) for name, (k, n) in LAYER_GEMMS.items()}


def gemm_sizes() -> None:
    """cuBLAS at decode batch sizes: around nosharing's mean (140 rows), does padding pay; around
    samples' (683), how much a row costs against sharedprefix's (1,018)."""
    weights = layer_weights()
    gigabytes = sum(w.numel() * 2 for w in weights.values()) / 1e9
    for rows in (128, 140, 144, 160, 512, 640, 672, 683, 688, 704, 736, 768, 896, 1018, 1024):
        total = layer_gemm_ms(rows, weights, 50)
        print(f"gemm rows {rows}: one layer's four GEMMs {total * 1e3:.1f} us ({gigabytes / total:.2f} TB/s, "
              f"{total * 1e3 / rows:.3f} us per row)", flush=True)


def gemm_curve() -> None:
    """A layer's four GEMMs at every decode graph size: not monotone in rows (cuBLAS's choice)."""
    from forkserve.worker.cuda_graphs import graph_batch_sizes
    weights = layer_weights()
    line = [f"{rows}:{layer_gemm_ms(rows, weights, 20) * 1e3:.0f}" for rows in graph_batch_sizes(1024)]
    print("gemm curve (rows:us per layer) " + " ".join(line), flush=True)


if __name__ == "__main__":
    import sys
    parts = sys.argv[1].split(",") if len(sys.argv) > 1 else ["own", "level", "triton", "gemm"]
    if "own" in parts:
        own_pages("sharedprefix own tails", 1024, 8, 14)
        own_pages("samples own tails", 704, 1, 33)
        for low, high in ((12, 20), (18, 26), (24, 32), (30, 38), (40, 48)):
            own_pages(f"tails of {low}-{high} pages", 704, low, high)
        own_pages("nosharing", 140, 7, 130)
    if "spread" in parts:
        own_pages_spread("sharedprefix own tails", 1024, 8, 14, 25489)
        own_pages_spread("samples own tails", 704, 24, 32, 25489)
    if "level" in parts:
        shared_level()
    if "triton" in parts:
        for shape in ((16, 64, 125), (21, 32, 62), (32, 32, 125)):
            shared_level_triton(*shape)
    if "sweep" in parts:
        for shape in ((16, 64, 125), (21, 32, 62), (32, 32, 125), (24, 32, 62)):
            level_sweep(*shape)
    if "tile" in parts:  # the sweep's quick part: 64-token tiles against the current choice
        for shape in ((16, 64, 125), (21, 32, 62)):
            level_sweep(*shape, splits_tried=(1,), stages_tried=(2, 3))
    if "sampler" in parts:
        sampler_rows()
    if "gemm" in parts:
        gemm_sizes()
    if "curve" in parts:
        gemm_curve()
