"""One-pass sampling for plain rows: temperature (or greedy) draws straight from the logits.

The torch sampler makes about ten passes over a [rows, vocab] fp32 copy of the logits (softmax,
exponential noise, division, argmax, log-sum-exp, ...): at 256 rows of a 128K vocabulary that
is over a millisecond per decode step. Here each row is read once, in the model's dtype: an
online log-sum-exp for the drawn token's logprob and a Gumbel-max draw,
``argmax(logits / T + G)`` with ``G = -log(-log U)``, which picks token i with probability
softmax(logits / T)_i, the same law as the torch sampler's exponential race. Greedy rows
(T = 0) take the plain argmax. U comes from Triton's Philox generator keyed by (seed, row,
token), so it is only for rows without a per-request seed (those use the sampler's hash).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096


@triton.jit
def _sample_kernel(logits_ptr, row_stride, inv_temperature_ptr, seed, token_ptr, logprob_ptr,
                   VOCAB: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * row_stride
    inv_t = tl.load(inv_temperature_ptr + row)
    running_max = float("-inf")
    running_sum = 0.0
    best_score = float("-inf")
    best_index = 0
    for block in range(tl.cdiv(VOCAB, BLOCK)):
        start = block * BLOCK
        cols = start + tl.arange(0, BLOCK)
        mask = cols < VOCAB
        x = tl.load(base + cols, mask=mask, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        running_max = new_max
        u = tl.rand(seed, row * VOCAB + cols)
        gumbel = -tl.log(-tl.log(u))
        score = tl.where(mask, tl.where(inv_t > 0, x * inv_t + gumbel, x), float("-inf"))
        block_best = tl.max(score, axis=0)
        block_index = tl.argmax(score, axis=0) + start
        better = block_best > best_score
        best_index = tl.where(better, block_index, best_index)
        best_score = tl.where(better, block_best, best_score)
    chosen = tl.load(base + best_index).to(tl.float32)
    tl.store(token_ptr + row, best_index.to(tl.int64))
    tl.store(logprob_ptr + row, chosen - running_max - tl.log(running_sum))


def sample(logits: torch.Tensor, temperatures: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token per row, its raw log-softmax) for [rows, vocab] logits; temperature 0 means greedy."""
    assert logits.stride(-1) == 1, "logits rows must be contiguous"
    rows, vocab = logits.shape
    inv_temperature = torch.where(temperatures > 0, 1.0 / temperatures.clamp(min=1e-6), 0.0).float()
    tokens = torch.empty(rows, dtype=torch.long, device=logits.device)
    logprobs = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        _sample_kernel[(rows,)](logits, logits.stride(0), inv_temperature, seed, tokens, logprobs,
                                VOCAB=vocab, BLOCK=BLOCK)
    return tokens, logprobs
