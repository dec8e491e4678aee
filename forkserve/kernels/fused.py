"""Triton kernels that fuse the decoder's small elementwise steps on the GPU.

Unfused, a decode layer launches about forty tiny kernels (RMSNorm alone is seven), which at
decode batch sizes costs more than the math. Each kernel here replaces one of those chains and
rounds to the model dtype exactly where HF transformers does, so the GPU path stays
token-for-token comparable with the pure-torch reference in forkserve/model/layers.py (the CPU
path and the oracle these kernels are tested against).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from forkserve.kernels import FP8_MAX

_FP8_MAX = tl.constexpr(FP8_MAX)


@triton.jit
def _add_rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, row_size, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < row_size
    offset = row.to(tl.int64) * row_size + cols
    x = tl.load(x_ptr + offset, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(residual_ptr + offset, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(residual_ptr + offset, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / row_size + eps)
    normed = (xf * rstd).to(x.dtype).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offset, (normed * weight).to(x.dtype), mask=mask)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual); the sum is written into `residual` in place."""
    x = x.contiguous()
    out = torch.empty_like(x)
    row_size = x.shape[-1]
    rows = x.numel() // row_size
    if residual is not None:
        assert residual.is_contiguous() and residual.shape == x.shape
    _add_rms_norm_kernel[(rows,)](x, residual if residual is not None else x, weight, out, row_size, eps,
                                  HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(row_size))
    return out, (residual if residual is not None else x)


@triton.jit
def _silu_and_mul_kernel(gate_up_ptr, out_ptr, size, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < size
    gate = tl.load(gate_up_ptr + row * 2 * size + cols, mask=mask, other=0.0)
    up = tl.load(gate_up_ptr + row * 2 * size + size + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    tl.store(out_ptr + row * size + cols, (act * up.to(tl.float32)).to(gate.dtype), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] along the last dimension."""
    gate_up = gate_up.contiguous()
    size = gate_up.shape[-1] // 2
    rows = gate_up.numel() // (2 * size)
    out = torch.empty(*gate_up.shape[:-1], size, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_and_mul_kernel[(rows, triton.cdiv(size, block))](gate_up, out, size, BLOCK=block)
    return out


@triton.jit
def _rotate_heads(src, dst, cols, heads, c, s, HALF: tl.constexpr):
    """Rotate-half RoPE of [heads, HALF] pairs at src into dst, rounding as HF does (see rope_qk)."""
    x1 = tl.load(src + cols, mask=heads)
    x2 = tl.load(src + HALF + cols, mask=heads)
    a1 = x1.to(tl.float32)
    a2 = x2.to(tl.float32)
    out1 = (a1 * c).to(x1.dtype).to(tl.float32) + (-a2 * s).to(x1.dtype).to(tl.float32)
    out2 = (a2 * c).to(x1.dtype).to(tl.float32) + (a1 * s).to(x1.dtype).to(tl.float32)
    tl.store(dst + cols, out1.to(x1.dtype), mask=heads)
    tl.store(dst + HALF + cols, out2.to(x1.dtype), mask=heads)


@triton.jit
def _rope_qk_kernel(q_ptr, k_ptr, q_out_ptr, positions_ptr, cos_ptr, sin_ptr, q_token_stride, q_head_stride,
                    k_token_stride, k_head_stride, cache_stride, Q_HEADS: tl.constexpr, K_HEADS: tl.constexpr,
                    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, HALF: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token)
    half = tl.arange(0, HALF)[None, :]
    # HF casts cos/sin to the activations' dtype and rounds each product and the sum.
    dtype = q_ptr.dtype.element_ty
    c = tl.load(cos_ptr + pos * cache_stride + half).to(dtype).to(tl.float32)
    s = tl.load(sin_ptr + pos * cache_stride + half).to(dtype).to(tl.float32)
    q_heads = tl.arange(0, BLOCK_Q)[:, None]
    _rotate_heads(q_ptr + token * q_token_stride + q_heads * q_head_stride,
                  q_out_ptr + token * Q_HEADS * 2 * HALF + q_heads * 2 * HALF, half, q_heads < Q_HEADS, c, s, HALF)
    k_heads = tl.arange(0, BLOCK_K)[:, None]
    k = k_ptr + token * k_token_stride + k_heads * k_head_stride
    _rotate_heads(k, k, half, k_heads < K_HEADS, c, s, HALF)


def rope_qk(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE of q: [T, Hq, D] and k: [T, Hkv, D] (any token/head strides, unit stride inside a head)
    in one launch: q rotated into a new contiguous tensor (what the attention kernels take), k in
    place (it may be a view into the fused qkv output, which the KV store reads)."""
    tokens, q_heads, head_dim = q.shape
    k_heads = k.shape[1]
    assert q.stride(2) == 1 and k.stride(2) == 1 and cos.stride(1) == 1 and head_dim % 2 == 0
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if tokens:
        _rope_qk_kernel[(tokens,)](q, k, q_out, positions, cos, sin, q.stride(0), q.stride(1), k.stride(0),
                                   k.stride(1), cos.stride(0), Q_HEADS=q_heads, K_HEADS=k_heads,
                                   BLOCK_Q=triton.next_power_of_2(q_heads), BLOCK_K=triton.next_power_of_2(k_heads),
                                   HALF=head_dim // 2)
    return q_out, k


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slots_ptr, k_token_stride, k_head_stride,
                     v_token_stride, v_head_stride, inv_k_scale, inv_v_scale, HEAD_DIM: tl.constexpr,
                     BLOCK_HEADS: tl.constexpr, NUM_HEADS: tl.constexpr, FP8: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + token)
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    dims = tl.arange(0, HEAD_DIM)[None, :]
    mask = heads < NUM_HEADS
    dst = slot * NUM_HEADS * HEAD_DIM + heads * HEAD_DIM + dims
    k = tl.load(k_ptr + token * k_token_stride + heads * k_head_stride + dims, mask=mask)
    v = tl.load(v_ptr + token * v_token_stride + heads * v_head_stride + dims, mask=mask)
    if FP8:  # scaled and saturated, as KVCache.quantize
        k = tl.clamp(k.to(tl.float32) * inv_k_scale, -_FP8_MAX, _FP8_MAX)
        v = tl.clamp(v.to(tl.float32) * inv_v_scale, -_FP8_MAX, _FP8_MAX)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Scatter k/v: [T, H, D] (unit stride inside a head) into one layer's [pages, page_size, H, D]
    cache; an fp8 cache stores k / k_scale and v / v_scale, saturated."""
    tokens, heads, head_dim = k.shape
    assert k.stride(2) == 1 and v.stride(2) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    if tokens:
        _store_kv_kernel[(tokens,)](k, v, k_cache, v_cache, slots, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                                    1.0 / k_scale, 1.0 / v_scale, HEAD_DIM=head_dim,
                                    BLOCK_HEADS=triton.next_power_of_2(heads), NUM_HEADS=heads,
                                    FP8=k_cache.dtype == torch.float8_e4m3fn)
