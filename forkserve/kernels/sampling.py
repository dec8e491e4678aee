"""Sampling for plain rows on the GPU: temperature (or greedy) draws straight from the logits.

The torch sampler makes about ten passes over a [rows, vocab] fp32 copy of the logits (softmax,
exponential noise, division, argmax, log-sum-exp, ...): at 256 rows of a 128K vocabulary that
is over a millisecond per decode step. Here the logits are read once, in the model's dtype, by
one program per (row, vocabulary slice): the slice's max, its sum of exp(logit - max) (for the
drawn token's logprob) and of exp((logit - max) / T) (its probability mass at temperature T).
A second kernel, one program per row, draws by inverting the CDF: one uniform U per row picks
the slice whose cumulative mass first exceeds U x total, then the token inside that one slice,
so token i comes with probability softmax(logits / T)_i. Greedy rows (T = 0) take the argmax.

An earlier version drew a Gumbel-max score per token: a Philox draw and two logarithms for each
of the 128K logits made it compute-bound (0.75 ms per step at 1,024 rows on an H100, against
0.09 ms to read the logits). U comes from Triton's Philox keyed by (seed, row), so this kernel
is only for rows without a per-request seed (those use the sampler's hash).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 8192  # vocabulary slice per program: rows x slices programs keep every SM busy
BLOCK = 1024


@triton.jit
def _slice_stats_kernel(logits_ptr, row_stride, inv_temperature_ptr, max_ptr, sum_ptr, mass_ptr, argmax_ptr,
                        VOCAB: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """One (row, vocabulary slice): its max logit m, sum of exp(x - m), sum of exp((x - m) / T),
    and (greedy rows) the first index of its max."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    base = logits_ptr + row.to(tl.int64) * row_stride
    inv_t = tl.load(inv_temperature_ptr + row)
    running_max = float("-inf")
    running_sum = 0.0
    running_mass = 0.0
    best_index = 0
    for block in range(CHUNK // BLOCK):
        cols = chunk * CHUNK + block * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < VOCAB, other=float("-inf")).to(tl.float32)
        block_max = tl.max(x, axis=0)
        new_max = tl.maximum(running_max, block_max)
        # While everything so far is -inf (past the vocabulary's end), measure from 0: exp(-inf) = 0.
        reference = tl.where(new_max == float("-inf"), 0.0, new_max)
        shifted = x - reference
        exps = tl.exp(shifted)
        running_sum = running_sum * tl.exp(running_max - reference) + tl.sum(exps, axis=0)
        if inv_t == 1.0:
            running_mass = running_sum
        elif inv_t > 0:
            running_mass = (running_mass * tl.exp((running_max - reference) * inv_t)
                            + tl.sum(tl.exp(shifted * inv_t), axis=0))
        else:
            best_index = tl.where(block_max > running_max, tl.argmax(x, axis=0) + chunk * CHUNK + block * BLOCK,
                                  best_index)
        running_max = new_max
    out = row * tl.num_programs(1) + chunk
    tl.store(max_ptr + out, running_max)
    tl.store(sum_ptr + out, running_sum)
    tl.store(mass_ptr + out, running_mass)
    tl.store(argmax_ptr + out, best_index)


@triton.jit(do_not_specialize=["seed"])  # a new seed every step must not mean a new compile
def _draw_kernel(logits_ptr, row_stride, inv_temperature_ptr, seed, max_ptr, sum_ptr, mass_ptr, argmax_ptr,
                 token_ptr, logprob_ptr, VOCAB: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                 CHUNKS: tl.constexpr, CHUNKS_POW2: tl.constexpr):
    """One row: combine its slices' statistics, pick the slice and then the token by the inverse CDF."""
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * row_stride
    inv_t = tl.load(inv_temperature_ptr + row)
    slices = tl.arange(0, CHUNKS_POW2)
    valid = slices < CHUNKS
    maxes = tl.load(max_ptr + row * CHUNKS + slices, mask=valid, other=float("-inf"))
    top = tl.max(maxes, axis=0)
    sums = tl.load(sum_ptr + row * CHUNKS + slices, mask=valid, other=0.0)
    log_normaliser = top + tl.log(tl.sum(sums * tl.exp(maxes - top), axis=0))
    if inv_t > 0:
        mass = tl.load(mass_ptr + row * CHUNKS + slices, mask=valid, other=0.0) * tl.exp((maxes - top) * inv_t)
        cumulative = tl.cumsum(mass, axis=0)
        uniform = tl.max(tl.rand(seed, tl.zeros([CHUNKS_POW2], tl.int32) + row), axis=0)  # one draw per row
        target = uniform * tl.sum(mass, axis=0)
        # The first slice whose cumulative mass exceeds the target has mass > 0.
        chosen = tl.minimum(tl.sum((cumulative <= target).to(tl.int32), axis=0), CHUNKS - 1)
        remaining = target - tl.sum(tl.where(slices < chosen, mass, 0.0), axis=0)
        token = -1
        last_positive = chosen * CHUNK
        running = 0.0
        for block in range(CHUNK // BLOCK):
            cols = chosen * CHUNK + block * BLOCK + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < VOCAB, other=float("-inf")).to(tl.float32)
            weights = tl.exp((x - top) * inv_t)
            before = running + tl.cumsum(weights, axis=0) - weights  # mass of the tokens before each
            crossing = tl.min(tl.where((before + weights > remaining) & (weights > 0), cols, VOCAB), axis=0)
            token = tl.where((token < 0) & (crossing < VOCAB), crossing, token)
            last_positive = tl.maximum(last_positive, tl.max(tl.where(weights > 0, cols, 0), axis=0))
            running += tl.sum(weights, axis=0)
        # Rounding can leave the target just past the slice's recomputed mass: its last token then.
        token = tl.where(token < 0, last_positive, token)
    else:
        first = tl.min(tl.where(maxes == top, slices, CHUNKS_POW2), axis=0)
        token = tl.load(argmax_ptr + row * CHUNKS + first)
    chosen_logit = tl.load(base + token).to(tl.float32)
    tl.store(token_ptr + row, token.to(tl.int64))
    tl.store(logprob_ptr + row, chosen_logit - log_normaliser)


def sample(logits: torch.Tensor, temperatures: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token per row, its raw log-softmax) for [rows, vocab] logits; temperature 0 means greedy."""
    assert logits.stride(-1) == 1, "logits rows must be contiguous"
    rows, vocab = logits.shape
    chunks = triton.cdiv(vocab, CHUNK)
    device = logits.device
    inv_temperature = torch.where(temperatures > 0, 1.0 / temperatures.clamp(min=1e-6), 0.0).float()
    maxes, sums, masses = (torch.empty(rows, chunks, dtype=torch.float32, device=device) for _ in range(3))
    argmaxes = torch.empty(rows, chunks, dtype=torch.int32, device=device)
    tokens = torch.empty(rows, dtype=torch.long, device=device)
    logprobs = torch.empty(rows, dtype=torch.float32, device=device)
    if rows:
        _slice_stats_kernel[(rows, chunks)](logits, logits.stride(0), inv_temperature, maxes, sums, masses, argmaxes,
                                            VOCAB=vocab, CHUNK=CHUNK, BLOCK=BLOCK)
        _draw_kernel[(rows,)](logits, logits.stride(0), inv_temperature, seed, maxes, sums, masses, argmaxes, tokens,
                              logprobs, VOCAB=vocab, CHUNK=CHUNK, BLOCK=BLOCK, CHUNKS=chunks,
                              CHUNKS_POW2=triton.next_power_of_2(chunks))
    return tokens, logprobs
