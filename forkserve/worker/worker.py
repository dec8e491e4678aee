"""The worker of one device: loads the model, sizes and owns the KV tensors, runs step plans.

The engine core talks to it through this class and worker/plan.py only: it asks how many pages
there are, hands over `StepPlan`s and reads back draws. Everything here (model, attention
backend, CUDA graphs, sampler kernels) is chosen from the engine settings once, at start-up.

With tensor_parallel_size N > 1 this is rank 0 of N: it starts ranks 1..N-1 (worker/rank.py,
each a `Worker` of its own rank), and each step it sends them the plan's forward part in one
message, runs its own shard of the forward with them, samples alone, and broadcasts the draws
that the next step's placeholders take. With N = 1 none of that exists: no process, no message.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import weakref
from typing import Callable, Iterator

import torch

from forkserve.worker.attention.base import AttentionBackend
from forkserve.worker.attention.cascade import CascadePlanner
from forkserve.worker.attention.flashinfer import FlashInferBackend
from forkserve.worker.attention.reference import ReferenceBackend
from forkserve.config import (DEFAULT_CPU_KV_CACHE_BYTES, EngineConfig, resolve_device, resolve_dtype,
                              resolve_kv_cache_dtype)
from forkserve.distributed import RankFailure, RankProcesses, TensorParallelGroup
from forkserve.model.config import ModelConfig
from forkserve.model.loader import load_model
from forkserve.model.parallel import check_tensor_parallel
from forkserve.sampler import Sampler, TokenBitmask
from forkserve.worker.cuda_graphs import DecodeGraphs, graph_batch_sizes
from forkserve.worker.forking_sampler import ForkingSampler
from forkserve.worker.kv_cache import KVCache
from forkserve.worker.memory import StepMemory, kv_pool_bytes, profile_step_memory
from forkserve.worker.plan import EXECUTE, LAUNCH, StepPlan, StepResult, decode_for_ranks, encode_for_ranks
from forkserve.worker.runner import LaunchedStep, ModelRunner
from forkserve.worker.transfers import KVTransfers

logger = logging.getLogger(__name__)


class Worker:
    """Model, KV tensors, attention backend, CUDA graphs and sampler of one device.

    max_levels is how many shared-prefix levels a step may carry (0: cascade attention off).
    `rank` and `store_port` are for ranks 1..N-1 of tensor parallelism (worker/rank.py).
    """

    def __init__(self, config: EngineConfig, max_levels: int, rank: int = 0, store_port: int | None = None) -> None:
        self.config = config
        self.model_config = ModelConfig.from_dir(config.model)
        size = config.tensor_parallel_size
        check_tensor_parallel(self.model_config, size)
        self.device = rank_device(config.device, rank, size)
        self.ranks: RankProcesses | None = None  # rank 0 of several: the others' processes
        self.tp: TensorParallelGroup | None = None
        if size > 1 and rank == 0:
            store = TensorParallelGroup.create_store(size)
            self.ranks = RankProcesses("forkserve.worker.rank", size, dict(
                config=config_settings(config), max_levels=max_levels, store_port=store.port))
            weakref.finalize(self, self.ranks.stop)
            with self._across_ranks():
                self._start(config, max_levels, TensorParallelGroup(0, size, store, self.device))
        elif size > 1:
            store = TensorParallelGroup.join_store(store_port, size)
            self._start(config, max_levels, TensorParallelGroup(rank, size, store, self.device))
        else:
            self._start(config, max_levels, None)

    def _start(self, config: EngineConfig, max_levels: int, tp: TensorParallelGroup | None) -> None:
        """Load the model (this rank's shard), size the KV pool, build the backend, graphs and runner."""
        self.tp = tp
        self.dtype = resolve_dtype(config.dtype, self.model_config.torch_dtype, self.device)
        self.kv_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, self.dtype)
        self.max_model_len = config.max_model_len or self.model_config.max_position_embeddings
        if self.max_model_len > self.model_config.max_position_embeddings:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's "
                             f"max_position_embeddings {self.model_config.max_position_embeddings}")
        self.model, _ = load_model(config.model, self.dtype, self.device, config.load_format, tp)
        self.model.compile_kernels()
        self.max_levels = max_levels
        self.step_memory: StepMemory | None = None  # the profile steps' peaks, where they sized the pool
        self.attention_backend = self._choose_backend()
        backend = self._make_backend()  # before the pool: its workspace is part of what the pool's sizing finds in use
        sampler = Sampler(config.seed, self.device, config.flashinfer_sampling)
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
        if self.ranks is None:
            return self.runner.execute(plan)
        with self._across_ranks():
            self.ranks.send(encode_for_ranks(plan, EXECUTE))
            return self.runner.execute(plan)

    def launch(self, plan: StepPlan, previous: LaunchedStep | None,
               bitmask: Callable[[], TokenBitmask | None] | None = None) -> LaunchedStep:
        """Queue a step of plain draws; its tokens reach the host through the handle's `result()`.
        `bitmask` (structured outputs) gives the step's token mask once its forward is queued
        (rank 0 alone samples, so the mask never leaves this process)."""
        if self.ranks is None:
            return self.runner.launch(plan, previous, bitmask)
        with self._across_ranks():
            self.ranks.send(encode_for_ranks(plan, LAUNCH))
            launched = self.runner.launch(plan, previous, bitmask)
            self.tp.broadcast(launched.tokens)  # the other ranks' next placeholders
            return launched

    def serve_rank(self, receive: Callable[[], bytes | None]) -> None:
        """Ranks 1..N-1: run each step's forward as rank 0 sends it, until rank 0 stops sending."""
        previous: torch.Tensor | None = None
        while (message := receive()) is not None:
            kind, plan = decode_for_ranks(message)
            self.runner.forward_only(plan, previous)
            if kind == LAUNCH:
                previous = self.tp.broadcast(torch.empty(len(plan.logits_rows), dtype=torch.long,
                                                         device=self.device))

    def check_alive(self) -> None:
        """Raise RankFailure if the other tensor-parallel ranks failed or were stopped."""
        if self.ranks is not None:
            self.ranks.check()

    def close(self) -> None:
        """Stop the other tensor-parallel ranks (nothing to do with one rank)."""
        if self.ranks is not None:
            self.ranks.stop()

    @contextlib.contextmanager
    def _across_ranks(self) -> Iterator[None]:
        """Work the ranks do together: any failure leaves them out of step, so they are stopped, and
        the error names the rank that died or failed where one did."""
        try:
            yield
        except RankFailure:
            raise
        except Exception as error:
            raise self.ranks.fail(error) from error

    def stats(self) -> dict[str, int]:
        """KV pages one layer's attention read, summed over steps, against what plain attention
        would have read, and the steps with shared-prefix levels."""
        runner = self.runner
        return dict(cascade_steps=runner.cascade_steps, kv_pages_read=runner.kv_pages_read,
                    kv_pages_listed=runner.kv_pages_listed, **self.transfers.stats())

    # ----------------------------------------------------------------------------- set-up
    def _make_kv_cache(self, sampler: Sampler) -> KVCache:
        mc, cfg = self.model_config, self.config
        page_bytes = KVCache.bytes_per_page(mc.num_layers, self.model.shard.num_kv_heads, mc.head_dim, cfg.page_size,
                                            self.kv_dtype)
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
        if self.tp is not None:
            num_pages = self.tp.min_int(num_pages)  # every rank's pool holds the same page ids
        return KVCache(num_pages, cfg.page_size, mc.num_layers, self.model.shard.num_kv_heads, mc.head_dim,
                       self.kv_dtype, self.device)

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
                                                                    self.max_levels, self.model.shard.num_heads,
                                                                    mc.head_dim)
        return kv_pool_bytes(self.device, cfg.gpu_memory_utilization, steps.eager_peak, graphs)

    def _choose_backend(self) -> str:
        """'auto' is FlashInfer where its kernels exist (CUDA, fp16/bf16, head_dim 64/128/256),
        else the pure-torch reference (e.g. fp32 checks on a GPU), said once in the log."""
        choice = self.config.attention_backend
        if choice != "auto":
            if choice == "flashinfer" and self.device.type != "cuda":
                raise ValueError(f"attention_backend={choice!r} needs a CUDA device, got {self.device}")
            return choice
        if self.device.type != "cuda":
            return "reference"
        head_dim = self.model_config.head_dim
        if self.dtype not in (torch.float16, torch.bfloat16) or head_dim not in (64, 128, 256):
            logger.info("attention: the reference backend (FlashInfer's kernels take fp16/bf16 and head_dim "
                        "64/128/256; this model runs %s with head_dim %d)", self.dtype, head_dim)
            return "reference"
        return "flashinfer"

    def _make_backend(self) -> AttentionBackend:
        """FlashInfer or the pure-torch reference, as `_choose_backend` decided."""
        if self.attention_backend == "reference":
            return ReferenceBackend()
        shard = self.model.shard
        return FlashInferBackend(shard.num_heads, shard.num_kv_heads, self.model_config.head_dim, self.dtype,
                                 self.device, self.max_levels, self.config.prefill_backend, self.kv_dtype)

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
        return not self.config.enforce_eager and self.attention_backend == "flashinfer"


def rank_device(device: str, rank: int, size: int) -> torch.device:
    """Rank r's device: cuda:r on GPUs (refused when there are fewer GPUs than ranks), else the CPU."""
    resolved = resolve_device(device)
    if size == 1 or resolved.type != "cuda":
        return resolved
    if device not in ("auto", "cuda"):
        raise ValueError(f"device={device!r} with tensor_parallel_size={size}: rank r runs on cuda:r, "
                         "so give device='cuda' or 'auto'")
    present = torch.cuda.device_count()
    if size > present:
        raise ValueError(f"tensor_parallel_size={size} needs {size} GPUs, but {present} are present")
    return torch.device("cuda", rank)


def config_settings(config: EngineConfig) -> dict[str, object]:
    """The engine settings as JSON-able values (the other ranks' command line)."""
    settings = dataclasses.asdict(config)
    if isinstance(config.dtype, torch.dtype):
        settings["dtype"] = str(config.dtype).removeprefix("torch.")
    return settings
