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

CHUNK = 8192  # vocabulary slice per program: rows x slices programs keep every SM busy
BLOCK = 1024


@triton.jit(do_not_specialize=["seed"])  # a new seed every step must not mean a new compile
def _sample_chunk_kernel(logits_ptr, row_stride, inv_temperature_ptr, seed, max_ptr, sum_ptr, score_ptr, index_ptr,
                         VOCAB: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """One (row, vocabulary slice): its max logit, sum of exp(logit - max), best Gumbel score and token."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    num_chunks = tl.num_programs(1)
    base = logits_ptr + row.to(tl.int64) * row_stride
    inv_t = tl.load(inv_temperature_ptr + row)
    running_max = float("-inf")
    running_sum = 0.0
    best_score = float("-inf")
    best_index = 0
    for block in range(CHUNK // BLOCK):
        cols = chunk * CHUNK + block * BLOCK + tl.arange(0, BLOCK)
        mask = cols < VOCAB
        x = tl.load(base + cols, mask=mask, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        # A slice past the vocabulary end keeps max -inf; exp(-inf - -inf) would be NaN.
        scale = tl.where(new_max == float("-inf"), 0.0, tl.exp(running_max - new_max))
        running_sum = running_sum * scale + tl.sum(tl.where(mask, tl.exp(x - new_max), 0.0), axis=0)
        running_max = new_max
        u = tl.rand(seed, row * VOCAB + cols)
        gumbel = -tl.log(-tl.log(u))
        score = tl.where(mask, tl.where(inv_t > 0, x * inv_t + gumbel, x), float("-inf"))
        block_best = tl.max(score, axis=0)
        block_index = tl.argmax(score, axis=0) + chunk * CHUNK + block * BLOCK
        better = block_best > best_score
        best_index = tl.where(better, block_index, best_index)
        best_score = tl.where(better, block_best, best_score)
    out = row * num_chunks + chunk
    tl.store(max_ptr + out, running_max)
    tl.store(sum_ptr + out, running_sum)
    tl.store(score_ptr + out, best_score)
    tl.store(index_ptr + out, best_index.to(tl.int64))


def sample(logits: torch.Tensor, temperatures: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token per row, its raw log-softmax) for [rows, vocab] logits; temperature 0 means greedy."""
    assert logits.stride(-1) == 1, "logits rows must be contiguous"
    rows, vocab = logits.shape
    chunks = triton.cdiv(vocab, CHUNK)
    inv_temperature = torch.where(temperatures > 0, 1.0 / temperatures.clamp(min=1e-6), 0.0).float()
    maxes, sums, scores = (torch.empty(rows, chunks, dtype=torch.float32, device=logits.device) for _ in range(3))
    indices = torch.empty(rows, chunks, dtype=torch.long, device=logits.device)
    if rows:
        _sample_chunk_kernel[(rows, chunks)](logits, logits.stride(0), inv_temperature, seed, maxes, sums, scores,
                                             indices, VOCAB=vocab, CHUNK=CHUNK, BLOCK=BLOCK)
    # Merge the slices: the best score wins (first slice on ties, as argmax), log-sum-exps combine.
    tokens = indices.gather(1, scores.argmax(dim=1, keepdim=True)).squeeze(1)
    top = maxes.amax(dim=1, keepdim=True)
    log_normaliser = top.squeeze(1) + torch.log((sums * torch.exp(maxes - top)).sum(dim=1))
    chosen = logits.gather(1, tokens[:, None]).squeeze(1).float()
    return tokens, chosen - log_normaliser
