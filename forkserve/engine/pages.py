"""The page pool (which page ids are free) and the KV tensors those ids index."""
from __future__ import annotations

from typing import Iterable

import torch


class OutOfPages(RuntimeError):
    """Raised when more pages are asked for than the pool (after eviction) can give."""


class PagePool:
    """A free list of fixed-size page ids; knows nothing about tensors or owners."""

    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"a page pool needs num_pages >= 1 and page_size >= 1, got {num_pages}, {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first
        self._is_free = [True] * num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfPages(f"asked for {n} pages, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._is_free[p] = False
        return pages

    def free(self, pages: Iterable[int]) -> None:
        for p in pages:
            if not 0 <= p < self.num_pages:
                raise ValueError(f"page {p} is outside the pool [0, {self.num_pages})")
            if self._is_free[p]:
                raise ValueError(f"page {p} is freed twice")
            self._is_free[p] = True
            self._free.append(p)

    def is_free(self, page: int) -> bool:
        return self._is_free[page]


class KVCache:
    """K and V for every layer: [num_layers, num_pages, page_size, num_kv_heads, head_dim] each.

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

    @staticmethod
    def bytes_per_page(num_layers: int, num_kv_heads: int, head_dim: int, page_size: int, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * page_size * num_kv_heads * head_dim * element

    def copy_pages(self, src: list[int], dst: list[int]) -> None:
        src_t = torch.tensor(src, dtype=torch.long, device=self.k.device)
        dst_t = torch.tensor(dst, dtype=torch.long, device=self.k.device)
        self.k[:, dst_t] = self.k[:, src_t]
        self.v[:, dst_t] = self.v[:, src_t]
