"""Loads a checkpoint directory into `LlamaForCausalLM`: safetensors only, never pickles.

A MoE family's per-expert tensors are copied into the layer's stacked expert weights here, once.
A tensor-parallel rank reads only its slices of each tensor (safetensors' lazy slices), the
split forkserve/model/parallel.py describes.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from forkserve.model.config import ModelConfig
from forkserve.model.llama import LlamaForCausalLM
from forkserve.model.parallel import Collectives, Shard

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


@dataclass(frozen=True)
class Part:
    """The part of a HF tensor one rank reads: `length` entries from `first` along `dim`, of a
    tensor whose whole length there is `total` (checked against the file)."""

    dim: int
    first: int
    length: int
    total: int

    def index(self) -> tuple[slice, ...]:
        return (slice(None),) * self.dim + (slice(self.first, self.first + self.length),)

    def whole_shape(self, part_shape: tuple[int, ...]) -> tuple[int, ...]:
        return part_shape[:self.dim] + (self.total,) + part_shape[self.dim + 1:]


Source = Part | None
ALL: Source = None  # the whole tensor (replicated, or one rank)


def _destination(model: LlamaForCausalLM, params: dict[str, torch.Tensor], name: str
                 ) -> tuple[torch.Tensor, Source] | None:
    """The view of our parameter that a HF tensor fills (a row slice for fused q/k/v and gate/up),
    and the part of the HF tensor this rank reads."""
    shard, config = model.shard, model.config
    vocab = Part(0, shard.first_vocab_row, shard.real_vocab_rows, config.vocab_size)
    if name == "model.embed_tokens.weight":
        return params["embed_tokens.weight"][:shard.real_vocab_rows], vocab
    if name == "model.norm.weight":
        return params["norm.weight"], ALL
    if name == "lm_head.weight":
        return (params["lm_head.weight"][:shard.real_vocab_rows], vocab) if model.lm_head is not None else None
    parts = name.split(".")
    if parts[:2] != ["model", "layers"] or len(parts) < 5:
        return None
    prefix, inner, kind = f"layers.{parts[2]}.", ".".join(parts[3:-1]), parts[-1]
    moe = model.config.family.moe
    sparse = moe is not None and parts[2].isdigit() and int(parts[2]) in model.config.moe_layers
    if sparse and inner.startswith(moe.block + "."):
        return _expert_destination(model.config, shard, params, prefix, inner.removeprefix(moe.block + "."), kind)
    if inner in _FUSED:
        fused, part = _FUSED[inner]
        rows = _rank_rows(config, shard, fused)
        start = sum(r.length for r in rows[:part])
        return params[f"{prefix}{fused}.{kind}"][start:start + rows[part].length], rows[part]
    if inner in _RENAMED:
        return params[f"{prefix}{_RENAMED[inner]}.{kind}"], _row_parallel_columns(config, shard, inner)
    if inner in ("input_layernorm", "post_attention_layernorm"):
        return params[f"{prefix}{inner}.{kind}"], ALL
    return None


def _row_parallel_columns(config: ModelConfig, shard: Shard, inner: str) -> Source:
    """o_proj and down_proj take this rank's columns of their input; the q/k norms are replicated."""
    d = config.head_dim
    if inner == "self_attn.o_proj":
        return Part(1, shard.first_head * d, shard.num_heads * d, config.num_heads * d)
    if inner == "mlp.down_proj":
        return Part(1, *shard.intermediate(config.intermediate_size), config.intermediate_size)
    return ALL


def _expert_destination(config: ModelConfig, shard: Shard, params: dict[str, torch.Tensor], prefix: str,
                        inner: str, kind: str) -> tuple[torch.Tensor, Source] | None:
    """The view of a sparse layer's router or stacked experts that a HF tensor fills
    (`inner`: 'gate' or 'experts.{e}.{projection}', below the family's block name), and this
    rank's part of it (each expert is split like a dense MLP)."""
    if kind != "weight":
        return None
    if inner == "gate":
        return params[prefix + "mlp.gate"], ALL
    parts = inner.split(".")
    gate, up, down = config.family.moe.expert_weights
    if len(parts) != 3 or parts[0] != "experts" or not parts[1].isdigit() or int(parts[1]) >= config.num_experts:
        return None
    expert, total = int(parts[1]), config.moe_intermediate_size
    first, width = shard.intermediate(total)
    if parts[2] == down:
        return params[prefix + "mlp.w2"][expert], Part(1, first, width, total)
    if parts[2] in (gate, up):
        start = 0 if parts[2] == gate else width
        return params[prefix + "mlp.w13"][expert, start:start + width], Part(0, first, width, total)
    return None


def _rank_rows(config: ModelConfig, shard: Shard, fused: str) -> list[Part]:
    """This rank's rows of each HF tensor fused into a column-parallel weight (q, k, v or gate, up)."""
    if fused == "qkv_proj":
        d = config.head_dim
        kv = Part(0, shard.first_kv_head * d, shard.num_kv_heads * d, config.num_kv_heads * d)
        return [Part(0, shard.first_head * d, shard.num_heads * d, config.num_heads * d), kv, kv]
    return [Part(0, *shard.intermediate(config.intermediate_size), config.intermediate_size)] * 2


@torch.no_grad()
def load_model(model_dir: str | Path, dtype: torch.dtype, device: torch.device | str,
               load_format: str = "auto", tp: Collectives | None = None) -> tuple[LlamaForCausalLM, ModelConfig]:
    """Build the model (with `tp`, this rank's shard of it) on `device` and fill it from
    safetensors (or randomly for load_format='dummy')."""
    model_dir = Path(model_dir)
    config = ModelConfig.from_dir(model_dir)
    model = LlamaForCausalLM(config, dtype, device, tp).eval()
    if load_format == "dummy":
        _init_dummy(model)
        return model, config
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for path in checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                found = _destination(model, params, name)
                if found is None:
                    if "rotary_emb" not in name:
                        logger.warning("ignoring unexpected tensor %s in %s", name, path.name)
                    continue
                dest, source = found
                if source is ALL:
                    value = f.get_tensor(name)
                else:
                    lazy = f.get_slice(name)
                    shape, expected = tuple(lazy.get_shape()), source.whole_shape(tuple(dest.shape))
                    if shape != expected:
                        raise ValueError(f"tensor {name} in {path.name} has shape {shape}, expected {expected}")
                    value = lazy[source.index()]
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
