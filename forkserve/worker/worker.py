"""The worker of one device: loads the model, sizes and owns the KV tensors, runs step plans.

The engine core talks to it through this class and worker/plan.py only: it asks how many pages
there are, hands over `StepPlan`s and reads back draws. Everything here (model, attention
backend, CUDA graphs, sampler kernels) is chosen from the engine settings once, at start-up.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

from forkserve.worker.attention.base import AttentionBackend
from forkserve.worker.attention.cascade import CascadePlanner
from forkserve.worker.attention.flashinfer import FlashInferBackend
from forkserve.worker.attention.reference import ReferenceBackend
from forkserve.config import DEFAULT_CPU_KV_CACHE_BYTES, EngineConfig, resolve_device, resolve_dtype
from forkserve.model.config import ModelConfig
from forkserve.model.loader import load_model
from forkserve.sampler import Sampler, TokenBitmask
from forkserve.worker.cuda_graphs import DecodeGraphs, graph_batch_sizes
from forkserve.worker.forking_sampler import ForkingSampler
from forkserve.worker.kv_cache import KVCache
from forkserve.worker.memory import StepMemory, kv_pool_bytes, profile_step_memory
from forkserve.worker.plan import StepPlan, StepResult
from forkserve.worker.runner import LaunchedStep, ModelRunner
from forkserve.worker.transfers import KVTransfers

logger = logging.getLogger(__name__)


class Worker:
    """Model, KV tensors, attention backend, CUDA graphs and sampler of one device.

    max_levels is how many shared-prefix levels a step may carry (0: cascade attention off).
    """

    def __init__(self, config: EngineConfig, max_levels: int) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.model_config = ModelConfig.from_dir(config.model)
        self.dtype = resolve_dtype(config.dtype, self.model_config.torch_dtype, self.device)
        self.max_model_len = config.max_model_len or self.model_config.max_position_embeddings
        if self.max_model_len > self.model_config.max_position_embeddings:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's "
                             f"max_position_embeddings {self.model_config.max_position_embeddings}")
        self.model, _ = load_model(config.model, self.dtype, self.device, config.load_format)
        self.model.compile_kernels()
        self.max_levels = max_levels
        self.step_memory: StepMemory | None = None  # the profile steps' peaks, where they sized the pool
        backend = self._make_backend()  # before the pool: its workspace is part of what the pool's sizing finds in use
        sampler = Sampler(config.seed, self.device)
        self.kv_cache = self._make_kv_cache(sampler)
        self.transfers = self._make_transfers()
        self.runner = ModelRunner(self.model, self.kv_cache, backend, ForkingSampler(sampler, config.max_num_seqs),
                                  self.device, self._make_graphs(backend), CascadePlanner() if max_levels else None,
                                  self._logits_sizes(), self.transfers)

    @property
    def num_pages(self) -> int:
        return self.kv_cache.num_pages

    @property
    def num_host_slots(self) -> int:
        """Pages the host tier holds (kv_offloading_size); 0 without one."""
        return self.transfers.num_host_slots

    def execute(self, plan: StepPlan) -> StepResult | None:
        """Run a step and wait for its draws (None when nothing samples)."""
        return self.runner.execute(plan)

    def launch(self, plan: StepPlan, previous: LaunchedStep | None,
               bitmask: Callable[[], TokenBitmask | None] | None = None) -> LaunchedStep:
        """Queue a step of plain draws; its tokens reach the host through the handle's `result()`.
        `bitmask` (structured outputs) gives the step's token mask once its forward is queued."""
        return self.runner.launch(plan, previous, bitmask)

    def stats(self) -> dict[str, int]:
        """KV pages one layer's attention read, summed over steps, against what plain attention
        would have read, and the steps with shared-prefix levels."""
        runner = self.runner
        return dict(cascade_steps=runner.cascade_steps, kv_pages_read=runner.kv_pages_read,
                    kv_pages_listed=runner.kv_pages_listed, **self.transfers.stats())

    # ----------------------------------------------------------------------------- set-up
    def _make_kv_cache(self, sampler: Sampler) -> KVCache:
        mc, cfg = self.model_config, self.config
        page_bytes = KVCache.bytes_per_page(mc.num_layers, mc.num_kv_heads, mc.head_dim, cfg.page_size, self.dtype)
        if cfg.num_gpu_blocks_override is not None:
            num_pages = cfg.num_gpu_blocks_override
        elif cfg.kv_cache_memory_bytes is not None:
            num_pages = cfg.kv_cache_memory_bytes // page_bytes
        elif self.device.type == "cuda":
            num_pages = self._pool_bytes_left(sampler) // page_bytes - 1  # less the scratch page
        else:
            num_pages = DEFAULT_CPU_KV_CACHE_BYTES // page_bytes
        if num_pages * cfg.page_size < self.max_model_len:
            raise ValueError(
                f"the KV pool ({num_pages} pages of {cfg.page_size} tokens) cannot hold one sequence of "
                f"max_model_len={self.max_model_len} tokens: lower max_model_len or give the pool more pages")
        return KVCache(num_pages, cfg.page_size, mc.num_layers, mc.num_kv_heads, mc.head_dim,
                       self.dtype, self.device)

    def _make_transfers(self) -> KVTransfers:
        """The transfers' runner, with the host tier's pool of kv_offloading_size GiB (pinned on CUDA)."""
        kv = self.kv_cache
        page_bytes = KVCache.bytes_per_page(kv.k.shape[0], kv.k.shape[3], kv.k.shape[4], kv.page_size, kv.k.dtype)
        slots = int(self.config.kv_offloading_size * (1 << 30)) // page_bytes
        if slots:
            logger.info("KV host tier: %d pages (%.2f GiB)", slots, slots * page_bytes / (1 << 30))
        return KVTransfers(kv, slots)

    def _pool_bytes_left(self, sampler: Sampler) -> int:
        """What gpu_memory_utilization leaves for the pool once the largest step's measured peak
        and the decode graphs' memory are set aside (worker/memory.py)."""
        mc, cfg = self.model_config, self.config
        steps = self.step_memory = profile_step_memory(self.model, sampler, cfg.max_num_batched_tokens,
                                                       cfg.max_num_seqs, cfg.max_logprobs, self.max_model_len,
                                                       self._max_pages_per_seq, self.device)
        graphs = 0
        if self._uses_graphs():
            graphs = steps.graph_peak + DecodeGraphs.reserved_bytes(cfg.max_num_seqs, self._max_pages_per_seq,
                                                                    self.max_levels, mc.num_heads, mc.head_dim)
        return kv_pool_bytes(self.device, cfg.gpu_memory_utilization, steps.eager_peak, graphs)

    def _make_backend(self) -> AttentionBackend:
        """FlashInfer on a GPU, the pure-torch reference elsewhere (or when asked for)."""
        choice = self.config.attention_backend
        if choice == "auto":
            choice = "flashinfer" if self.device.type == "cuda" else "reference"
        if choice == "reference":
            return ReferenceBackend()
        if self.device.type != "cuda":
            raise ValueError(f"attention_backend={choice!r} needs a CUDA device, got {self.device}")
        mc = self.model_config
        return FlashInferBackend(mc.num_heads, mc.num_kv_heads, mc.head_dim, self.dtype, self.device,
                                 self.max_levels)

    def _make_graphs(self, backend: AttentionBackend) -> DecodeGraphs | None:
        if not self._uses_graphs():
            return None
        assert isinstance(backend, FlashInferBackend)
        return DecodeGraphs(self.model, self.kv_cache, backend, self.config.max_num_seqs, self._max_pages_per_seq,
                            self.device, self.max_levels)

    def _logits_sizes(self) -> list[int] | None:
        """Row counts logits are computed for on a GPU (runner.py): the decode graphs' sizes, whose
        padded hidden states then serve as they are."""
        return graph_batch_sizes(self.config.max_num_seqs) if self.device.type == "cuda" else None

    @property
    def _max_pages_per_seq(self) -> int:
        return -(-self.max_model_len // self.config.page_size)

    def _uses_graphs(self) -> bool:
        """Decode steps replay CUDA graphs with FlashInfer on a GPU, unless enforce_eager."""
        return not self.config.enforce_eager and self.device.type == "cuda" and \
            self.config.attention_backend != "reference"
