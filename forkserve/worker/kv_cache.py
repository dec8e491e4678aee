"""The KV tensors of one device: every layer's K and V pages, indexed by the core's page ids."""
from __future__ import annotations

import numpy as np
import torch

from forkserve.kernels import FP8_MAX
from forkserve.transfer import to_device



class KVCache:
    """K and V for every layer: [num_layers, num_pages, page_size, num_kv_heads, head_dim] each.

    An fp8 cache (kv_cache_dtype='fp8') stores K / k_scale and V / v_scale as float8_e4m3fn, read
    back times the scale: per-tensor scales, 1.0 without calibrated ones (vLLM's default).

    One tensor per K and V (not one per layer) so that copy-on-write of a page is one indexed
    copy over all layers, and a layer's view is the NHD paged layout attention kernels take.
    One extra page past num_pages, `scratch_page`, belongs to no pool: padded rows of a
    CUDA-graph batch write to and read from it.
    """

    def __init__(self, num_pages: int, page_size: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (num_layers, num_pages + 1, page_size, num_kv_heads, head_dim)
        self.num_pages = num_pages
        self.page_size = page_size
        self.scratch_page = num_pages
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.k_scale = 1.0
        self.v_scale = 1.0

    @property
    def quantized(self) -> bool:
        """Pages stored in fp8 (scaled), read back through k_scale / v_scale."""
        return self.k.dtype == torch.float8_e4m3fn

    def quantize(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        """New K or V rows in the pages' dtype (fp8: divided by the scale and saturated)."""
        if not self.quantized:
            return x.to(self.k.dtype)
        return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(self.k.dtype)

    def dequantize(self, rows: torch.Tensor, scale: float) -> torch.Tensor:
        """Stored rows as fp32 values (fp8: times the scale)."""
        return rows.float() * scale if self.quantized else rows.float()

    @staticmethod
    def bytes_per_page(num_layers: int, num_kv_heads: int, head_dim: int, page_size: int, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * page_size * num_kv_heads * head_dim * element

    def copy_pages(self, copies: np.ndarray) -> None:
        """Run a step's page copies ([N, 2] int32 rows of source, destination: forks' partly filled
        last pages), in order, before the step writes any KV: one pinned, non-blocking index copy
        per run of copies in which none reads or rewrites a page an earlier one of the run wrote
        (nearly always one run)."""
        pairs, start = copies.tolist(), 0
        while start < len(pairs):
            written: set[int] = set()
            end = start
            while end < len(pairs) and pairs[end][0] not in written and pairs[end][1] not in written:
                written.add(pairs[end][1])
                end += 1
            index = to_device(np.ascontiguousarray(copies[start:end].T, dtype=np.int64), self.k.device)
            for pages in (self.k, self.v):
                raw = pages.view(torch.uint8) if self.quantized else pages  # fp8 has few indexing kernels
                raw[:, index[1]] = raw[:, index[0]]
            start = end
