"""Engine settings, named as vLLM names them so that users can carry their flags over."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}

# Host memory given to the KV pool on CPU when no size is set (vLLM's CPU backend uses a fixed
# space too, VLLM_CPU_KVCACHE_SPACE); a GPU pool is sized from free device memory instead.
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30

# Below this a shared prefix saves too little compute to be worth making its members wait a step
# (engine/planner.py).
MIN_SHARED_PREFIX_LEN = 64


def resolve_dtype(dtype: str | torch.dtype, config_dtype: str | None, device: torch.device) -> torch.dtype:
    """'auto' means the checkpoint's dtype on a GPU and float32 on CPU (CPU half math is slow)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        return _DTYPES.get(str(config_dtype), torch.bfloat16)
    if dtype not in _DTYPES:
        raise ValueError(f"invalid dtype {dtype!r}: expected 'auto' or one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


# vLLM's kv_cache_dtype names for an e4m3 cache (per-tensor scales; 1.0 without calibration, as vLLM does)
FP8_KV_CACHE_DTYPES = ("fp8", "fp8_e4m3")


def resolve_kv_cache_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The KV pages' dtype: the model's ('auto') or float8_e4m3fn (vLLM's 'fp8' / 'fp8_e4m3')."""
    return torch.float8_e4m3fn if kv_cache_dtype in FP8_KV_CACHE_DTYPES else model_dtype


def resolve_device(device: str | torch.device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class EngineConfig:
    """Everything the engine needs besides the model weights."""

    model: str
    tokenizer: str | None = None
    skip_tokenizer_init: bool = False
    dtype: str | torch.dtype = "auto"
    device: str = "auto"
    seed: int | None = 0
    load_format: str = "auto"
    max_model_len: int | None = None
    # KV cache
    block_size: int = 16
    num_gpu_blocks_override: int | None = None
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None
    enable_prefix_caching: bool = True
    # scheduler
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    enable_chunked_prefill: bool = True
    # admit a sequence only while the pool also holds its and the running ones' KV up to max_tokens
    # (no preemption, so no recompute); False is vLLM's optimistic admission
    reserve_output_kv: bool = True
    min_shared_prefix_len: int = MIN_SHARED_PREFIX_LEN  # shorter shared prefixes are not planned as groups
    max_logprobs: int = 20
    max_n: int = 1024  # cap on n, best_of, beam_width and tree-search fork widths (each is a sequence)
    attention_backend: str = "auto"  # auto: flashinfer on CUDA, reference elsewhere
    enforce_eager: bool = False  # no CUDA graphs
    # shared-prefix (cascade) attention: sharing among a step's sequences read once per group
    disable_cascade_attn: bool = False
    # forkserve's GPU tunables, kept selectable so that one run can measure each against the other:
    # unseeded top-k / top-p rows drawn by FlashInfer's sort-free kernels (False: the general path's sort)
    flashinfer_sampling: bool = True
    # FlashInfer's backend for the paged prefill kernels: "auto" (fa3 on Hopper where the dtypes
    # allow it; an fp8 KV cache takes fa2), "fa2" or "fa3"
    prefill_backend: str = "auto"
    # queue step k+1 before reading step k's tokens, so host work overlaps the GPU (vLLM's
    # --async-scheduling); a step whose draws feed a host decision (the first draw of n > 1, which
    # forks; penalties; beam and tree search) still waits for the previous step's tokens
    async_scheduling: bool = True
    # vLLM's settings that forkserve takes with vLLM's meaning, or refuses with what to do instead
    tokenizer_mode: str = "auto"
    trust_remote_code: bool = False
    revision: str | None = None  # hub revisions: a local directory is its own revision
    tokenizer_revision: str | None = None
    download_dir: str | None = None  # where the hub would download to: nothing is downloaded
    tensor_parallel_size: int = 1  # ranks that split every layer (one process and device each)
    pipeline_parallel_size: int = 1
    quantization: str | None = None
    kv_cache_dtype: str = "auto"
    swap_space: float = 4  # GiB of CPU swap for preempted KV in vLLM v0; unused by vLLM v1 too
    cpu_offload_gb: float = 0
    kv_offloading_size: float = 0  # GiB of host memory for KV pages evicted from the GPU pool (vLLM's name)
    disable_log_stats: bool = True
    # "auto": sampling defaults from the checkpoint's generation_config.json; "vllm": vLLM's own
    # defaults; or a directory holding a generation_config.json
    generation_config: str = "auto"
    enable_lora: bool = False

    def __post_init__(self) -> None:
        self._check_vllm_settings()
        positive = ("block_size", "max_num_seqs", "max_num_batched_tokens", "min_shared_prefix_len", "max_n")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"invalid engine setting: {name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("num_gpu_blocks_override", "max_model_len", "kv_cache_memory_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"invalid engine setting: {name} must be a positive integer, got {value!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"invalid engine setting: gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.attention_backend not in ("auto", "flashinfer", "reference"):
            raise ValueError(f"invalid engine setting: attention_backend must be 'auto', 'flashinfer' or 'reference', "
                             f"got {self.attention_backend!r}")
        if self.prefill_backend not in ("auto", "fa2", "fa3"):
            raise ValueError(f"invalid engine setting: prefill_backend must be 'auto', 'fa2' or 'fa3', "
                             f"got {self.prefill_backend!r}")
        if self.load_format not in ("auto", "safetensors", "dummy"):
            raise ValueError(f"invalid engine setting: load_format must be 'auto', 'safetensors' or 'dummy', got {self.load_format!r}")

    @property
    def page_size(self) -> int:
        """Tokens per KV page: vLLM's block_size, by the name the engine uses for it."""
        return self.block_size
    def _check_vllm_settings(self) -> None:
        """vLLM settings forkserve cannot honour yet fail here, saying what to do instead."""
        if self.trust_remote_code:
            raise ValueError("trust_remote_code=True is refused: forkserve never runs a checkpoint's own code; it "
                             "runs Llama, Mistral, Qwen2 and Qwen3 checkpoints with its own model code, without it")
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"invalid engine setting: {name} must be a positive integer, got {value!r}")
        if self.pipeline_parallel_size > 1:
            raise ValueError(f"pipeline_parallel_size={self.pipeline_parallel_size} is not supported yet: "
                             "split the model with tensor_parallel_size instead")
        if self.quantization is not None:
            raise ValueError(f"quantization={self.quantization!r} is not supported yet: give an unquantized "
                             "(float16 / bfloat16 / float32) checkpoint")
        if self.kv_cache_dtype not in ("auto", *FP8_KV_CACHE_DTYPES):
            if str(self.kv_cache_dtype).startswith("fp8"):
                raise ValueError(f"kv_cache_dtype={self.kv_cache_dtype!r} is not supported yet: use 'fp8' "
                                 "(e4m3, as 'fp8_e4m3') or 'auto'")
            raise ValueError(f"invalid engine setting: kv_cache_dtype must be 'auto', 'fp8' or 'fp8_e4m3', "
                             f"got {self.kv_cache_dtype!r}")
        if self.tokenizer_mode not in ("auto", "hf", "slow"):
            raise ValueError(f"tokenizer_mode={self.tokenizer_mode!r} is not supported: use 'auto' (the "
                             "checkpoint's Hugging Face tokenizer)")
        if self.cpu_offload_gb:
            raise ValueError("cpu_offload_gb is not supported yet: the weights stay on the device; use 0")
        if self.enable_lora:
            raise ValueError("enable_lora=True is not supported yet: merge the adapter into the weights first")
        value = self.kv_offloading_size
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"invalid engine setting: kv_offloading_size must be a non-negative number of GiB, "
                             f"got {value!r}")
        if not isinstance(self.swap_space, (int, float)) or self.swap_space < 0:
            raise ValueError(f"invalid engine setting: swap_space must be a non-negative number, got {self.swap_space!r}")

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: object) -> "EngineConfig":
        """Build from LLM(...) keyword arguments, naming any unknown one."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"unknown engine argument(s): {', '.join(unknown)}")
        return cls(model=model, **kwargs)  # type: ignore[arg-type]
