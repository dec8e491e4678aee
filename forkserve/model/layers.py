"""Building blocks of the Llama-family decoder: RMSNorm, rotary embedding, SiLU-and-mul.

Each is written in plain torch, rounding as HF transformers does (the CPU path and the oracle);
on a CUDA device with Triton, the fused kernels of forkserve/kernels/fused.py do the same math.
"""
from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import torch
from torch import nn

from forkserve.kernels import gpu_kernels


def fused_kernels_for(x: torch.Tensor) -> ModuleType | None:
    """The fused decoder kernels when `x` lives on a CUDA device and Triton is installed, else None."""
    return gpu_kernels("fused", x)


class RMSNorm(nn.Module):
    """As HF computes it: normalise in fp32, cast back, then scale."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype, device=device), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = fused_kernels_for(x)
        if fused is not None:
            return fused.add_rms_norm(x, None, self.weight, self.eps)[0]
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the residual stream's add fused with the next norm.

        On the GPU path `residual` is updated in place; callers use the returned tensors only.
        """
        fused = fused_kernels_for(x)
        if fused is not None:
            return fused.add_rms_norm(x, residual, self.weight, self.eps)
        total = x + residual
        return self.forward(total), total


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies, with 'linear', 'llama3', 'dynamic' and 'yarn' scaling as transformers
    defines them.

    'dynamic' (NTK) rescales only once a sequence outgrows max_position_embeddings, which
    max_model_len never exceeds, so below it the frequencies are the unscaled ones, as in HF.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif kind == "yarn":
        inv_freq = _yarn_inv_freq(head_dim, theta, scaling)
    return inv_freq


def _yarn_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any]) -> torch.Tensor:
    """YaRN: high frequencies kept, low ones interpolated by `factor`, a linear ramp between
    (computed in HF's order of operations, so the frequencies are bit-identical)."""
    old_len = scaling["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(scaling.get("beta_fast") or 32), correction_dim(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as HF: no division by zero
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    keep = 1 - ramp
    return 1.0 / (scaling["factor"] * pos_freqs) * (1 - keep) + 1.0 / pos_freqs * keep


def rope_attention_factor(scaling: dict[str, Any] | None) -> float:
    """What cos and sin are multiplied by: YaRN's attention temperature, 1 for the other kinds."""
    if (scaling or {}).get("rope_type") != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor = scaling["factor"]
    if scaling.get("mscale") and scaling.get("mscale_all_dim"):
        return mscale(factor, scaling["mscale"]) / mscale(factor, scaling["mscale_all_dim"])
    return mscale(factor)


class RotaryEmbedding(nn.Module):
    """Applies RoPE by position lookup in a cos/sin cache (HF's rotate-half convention)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None,
                 device: torch.device | str) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        factor = rope_attention_factor(scaling)
        self.register_buffer("cos", (emb.cos() * factor).to(device), persistent=False)
        self.register_buffer("sin", (emb.sin() * factor).to(device), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, Hq, D], k: [T, Hkv, D]; computed in fp32 and cast back as HF does.

        The GPU path rotates both in one kernel: q into a new contiguous tensor, k in place.
        """
        fused = fused_kernels_for(q)
        if fused is not None:
            return fused.rope_qk(q, k, positions, self.cos, self.sin)
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos.to(x.dtype) + rotated * sin.to(x.dtype))


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    fused = fused_kernels_for(gate_up)
    if fused is not None:
        return fused.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return nn.functional.silu(gate) * up
