"""`ModelConfig`: the fields of a Hugging Face config.json that the Llama-family decoder needs."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
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
        eos = d.get("eos_token_id")
        use_sliding = d.get("use_sliding_window", arch == "MistralForCausalLM")
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
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(d.get("attention_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            sliding_window=sliding_window,
            torch_dtype=d.get("torch_dtype") or d.get("dtype"),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        )
