"""Loads a checkpoint directory into `LlamaForCausalLM`: safetensors only, never pickles.

A MoE family's per-expert tensors are copied into the layer's stacked expert weights here, once.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open

from forkserve.model.config import ModelConfig
from forkserve.model.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

# HF name (inside a layer) -> (our fused parameter, shard index within it)
_FUSED = {
    "self_attn.q_proj": ("qkv_proj", 0), "self_attn.k_proj": ("qkv_proj", 1), "self_attn.v_proj": ("qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0), "mlp.up_proj": ("mlp.gate_up_proj", 1),
}
_RENAMED = {"self_attn.o_proj": "o_proj", "mlp.down_proj": "mlp.down_proj", "self_attn.q_norm": "q_norm",
            "self_attn.k_norm": "k_norm"}


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint (sharded via the index file, or a single file)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (model_dir / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists missing shard(s): {', '.join(missing)}")
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted(p.name for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickled:
        raise ValueError(f"{model_dir} holds only pickled weights ({', '.join(pickled)}): forkserve refuses "
                         "pickles and needs *.safetensors")
    raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")


def _destination(model: LlamaForCausalLM, params: dict[str, torch.Tensor], name: str) -> torch.Tensor | None:
    """The view of our parameter that a HF tensor fills (a row slice for fused q/k/v and gate/up)."""
    if name == "model.embed_tokens.weight":
        return params["embed_tokens.weight"]
    if name == "model.norm.weight":
        return params["norm.weight"]
    if name == "lm_head.weight":
        return params["lm_head.weight"] if model.lm_head is not None else None
    parts = name.split(".")
    if parts[:2] != ["model", "layers"] or len(parts) < 5:
        return None
    prefix, inner, kind = f"layers.{parts[2]}.", ".".join(parts[3:-1]), parts[-1]
    moe = model.config.family.moe
    sparse = moe is not None and parts[2].isdigit() and int(parts[2]) in model.config.moe_layers
    if sparse and inner.startswith(moe.block + "."):
        return _expert_destination(model.config, params, prefix, inner.removeprefix(moe.block + "."), kind)
    if inner in _FUSED:
        fused, shard = _FUSED[inner]
        rows = _shard_rows(model.config, fused)
        start = sum(rows[:shard])
        return params[f"{prefix}{fused}.{kind}"][start:start + rows[shard]]
    if inner in _RENAMED:
        return params[f"{prefix}{_RENAMED[inner]}.{kind}"]
    if inner in ("input_layernorm", "post_attention_layernorm"):
        return params[f"{prefix}{inner}.{kind}"]
    return None


def _expert_destination(config: ModelConfig, params: dict[str, torch.Tensor], prefix: str, inner: str,
                        kind: str) -> torch.Tensor | None:
    """The view of a sparse layer's router or stacked experts that a HF tensor fills
    (`inner`: 'gate' or 'experts.{e}.{projection}', below the family's block name)."""
    if kind != "weight":
        return None
    if inner == "gate":
        return params[prefix + "mlp.gate"]
    parts = inner.split(".")
    gate, up, down = config.family.moe.expert_weights
    if len(parts) != 3 or parts[0] != "experts" or not parts[1].isdigit() or int(parts[1]) >= config.num_experts:
        return None
    expert, size = int(parts[1]), config.moe_intermediate_size
    if parts[2] == down:
        return params[prefix + "mlp.w2"][expert]
    if parts[2] in (gate, up):
        start = 0 if parts[2] == gate else size
        return params[prefix + "mlp.w13"][expert, start:start + size]
    return None


def _shard_rows(config: ModelConfig, fused: str) -> list[int]:
    if fused == "qkv_proj":
        kv = config.num_kv_heads * config.head_dim
        return [config.num_heads * config.head_dim, kv, kv]
    return [config.intermediate_size, config.intermediate_size]


@torch.no_grad()
def load_model(model_dir: str | Path, dtype: torch.dtype, device: torch.device | str,
               load_format: str = "auto") -> tuple[LlamaForCausalLM, ModelConfig]:
    """Build the model on `device` and fill it from safetensors (or randomly for load_format='dummy')."""
    model_dir = Path(model_dir)
    config = ModelConfig.from_dir(model_dir)
    model = LlamaForCausalLM(config, dtype, device).eval()
    if load_format == "dummy":
        _init_dummy(model)
        return model, config
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for path in checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                dest = _destination(model, params, name)
                if dest is None:
                    if "rotary_emb" not in name:
                        logger.warning("ignoring unexpected tensor %s in %s", name, path.name)
                    continue
                value = f.get_tensor(name)
                if tuple(dest.shape) != tuple(value.shape):
                    raise ValueError(f"tensor {name} in {path.name} has shape {tuple(value.shape)}, "
                                     f"expected {tuple(dest.shape)}")
                dest.copy_(value.to(dtype))
                loaded.add(name)
    missing = sorted(set(expected_weight_names(config)) - loaded)
    if missing:
        raise ValueError(f"checkpoint {model_dir} is missing tensor(s): {', '.join(missing[:8])}"
                         + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    return model, config


def expected_weight_names(config: ModelConfig) -> list[str]:
    """The HF tensor names a checkpoint of this config must hold."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        names += [p + n + ".weight" for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                             "self_attn.o_proj", "input_layernorm", "post_attention_layernorm")]
        if i in config.moe_layers:
            moe = config.family.moe
            names.append(f"{p}{moe.block}.gate.weight")
            names += [f"{p}{moe.block}.experts.{e}.{n}.weight" for e in range(config.num_experts)
                      for n in moe.expert_weights]
        else:
            names += [p + n + ".weight" for n in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
        if config.qkv_bias:
            names += [p + f"self_attn.{n}_proj.bias" for n in "qkv"]
        if config.qk_norm:
            names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
    return names


def _init_dummy(model: LlamaForCausalLM) -> None:
    """Random weights made where the model lives (seconds for 8B on a GPU, nothing on disk)."""
    generator = torch.Generator(device=model.embed_tokens.weight.device).manual_seed(0)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.normal_(0.0, 0.02, generator=generator)
