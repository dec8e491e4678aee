"""`ModelConfig`: the fields of a Hugging Face config.json that the shared decoder needs, and the
family table: what sets each supported architecture apart (everything else is shared)."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any



@dataclass(frozen=True)
class MoEFamily:
    """How a family's checkpoints name and configure their sparse MLP blocks."""

    block: str  # the block's name inside a layer: router at {block}.gate, experts at {block}.experts.{e}
    expert_weights: tuple[str, str, str]  # names of an expert's gate, up and down projections
    num_experts_keys: tuple[str, ...]  # config.json's count of experts, by the names it may have
    intermediate_key: str  # config.json's width of one expert
    always_renormalise: bool  # top-k weights renormalised to sum 1 (else config.json's norm_topk_prob says)
    layer_pattern: bool  # decoder_sparse_step and mlp_only_layers pick the sparse layers (else all are)


@dataclass(frozen=True)
class Family:
    """One architecture: its quirks over the shared decoder (forkserve/model/llama.py)."""

    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window_default: bool = False  # whether a sliding_window field applies without use_sliding_window
    moe: MoEFamily | None = None


FAMILIES = {
    "LlamaForCausalLM": Family(),
    "MistralForCausalLM": Family(sliding_window_default=True),
    "Qwen2ForCausalLM": Family(qkv_bias=True),
    "Qwen3ForCausalLM": Family(qk_norm=True),
    "Qwen3MoeForCausalLM": Family(qk_norm=True, moe=MoEFamily(
        "mlp", ("gate_proj", "up_proj", "down_proj"), ("num_experts", "num_local_experts"), "moe_intermediate_size",
        always_renormalise=False, layer_pattern=True)),
    "MixtralForCausalLM": Family(sliding_window_default=True, moe=MoEFamily(
        "block_sparse_moe", ("w1", "w3", "w2"), ("num_local_experts",), "intermediate_size",
        always_renormalise=True, layer_pattern=False)),
}
SUPPORTED_ARCHITECTURES = tuple(FAMILIES)
# rope type -> the keys its parameters must hold (forkserve/model/layers.py computes each as HF does)
ROPE_KEYS = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
}
SUPPORTED_ROPE_TYPES = tuple(ROPE_KEYS)

logger = logging.getLogger(__name__)


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    sliding_window: int | None
    torch_dtype: str | None
    bos_token_id: int | None
    eos_token_ids: list[int]
    # Mixture of experts (num_experts 0 for dense models): which layers' MLPs are sparse, and their routing.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    moe_layers: tuple[int, ...] = ()

    @property
    def family(self) -> Family:
        return FAMILIES[self.architecture]

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        config_path = Path(path) / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"no config.json in model directory {path}")
        return cls.from_dict(json.loads(config_path.read_text()))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        archs = d.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(f"unsupported architecture {archs or d.get('model_type')!r}: "
                             f"forkserve runs {', '.join(SUPPORTED_ARCHITECTURES)}")
        num_heads = d["num_attention_heads"]
        rope = d.get("rope_scaling") or d.get("rope_parameters")
        rope_theta = d.get("rope_theta") or (rope or {}).get("rope_theta") or 10000.0
        rope_type = (rope or {}).get("rope_type", (rope or {}).get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"unsupported rope scaling type {rope_type!r}: forkserve supports {SUPPORTED_ROPE_TYPES}")
        missing = [key for key in ROPE_KEYS[rope_type] if (rope or {}).get(key) is None]
        if missing:
            raise ValueError(f"rope scaling type {rope_type!r} needs {', '.join(missing)} in config.json")
        family = FAMILIES[arch]
        eos = d.get("eos_token_id")
        use_sliding = d.get("use_sliding_window", family.sliding_window_default)
        sliding_window = d.get("sliding_window") if use_sliding else None
        max_positions = d.get("max_position_embeddings", 4096)
        if sliding_window is not None and sliding_window < max_positions:
            # Attention here is over the whole context, which equals HF's windowed attention only
            # while a sequence fits in the window: serve at most that many tokens.
            logger.warning("sliding_window %d < max_position_embeddings %d: forkserve attends over the whole "
                           "context, so it serves at most %d tokens", sliding_window, max_positions, sliding_window)
            max_positions = sliding_window
        return cls(
            architecture=arch,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=d.get("num_key_value_heads") or num_heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // num_heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=dict(rope, rope_type=rope_type) if rope_type != "default" else None,
            max_position_embeddings=max_positions,
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            qkv_bias=family.qkv_bias or bool(d.get("attention_bias", False)),
            qk_norm=family.qk_norm,
            sliding_window=sliding_window,
            torch_dtype=d.get("torch_dtype") or d.get("dtype"),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
            **_moe_fields(family.moe, d),
        )


def _moe_fields(moe: MoEFamily | None, d: dict[str, Any]) -> dict[str, Any]:
    """The MoE fields of ModelConfig, read as HF transformers reads them (Qwen3-MoE's sparse
    layers: every decoder_sparse_step-th, counting from 1, except mlp_only_layers)."""
    if moe is None:
        return {}
    num_experts = next((d[key] for key in moe.num_experts_keys if key in d), None)
    if num_experts is None:
        raise ValueError(f"config.json names no number of experts ({' or '.join(moe.num_experts_keys)})")
    top_k = d["num_experts_per_tok"]
    if not 0 < top_k <= num_experts:
        raise ValueError(f"num_experts_per_tok {top_k} must be between 1 and the number of experts {num_experts}")
    layers = range(d["num_hidden_layers"])
    if moe.layer_pattern:
        step, dense = d.get("decoder_sparse_step", 1), set(d.get("mlp_only_layers") or ())
        if step < 1:
            raise ValueError(f"decoder_sparse_step {step} must be at least 1")
        layers = [i for i in layers if i not in dense and (i + 1) % step == 0]
    return dict(num_experts=num_experts, num_experts_per_tok=top_k,
                moe_intermediate_size=d[moe.intermediate_key],
                norm_topk_prob=moe.always_renormalise or bool(d.get("norm_topk_prob", False)),
                moe_layers=tuple(layers))
