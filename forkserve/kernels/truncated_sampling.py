"""Top-k / top-p draws on the GPU through FlashInfer's rejection-sampling kernels.

The sampler's general path sorts each row's whole vocabulary to find the top-p nucleus: at
1,024 rows of a 128K vocabulary that is 16 chunks of a segmented sort, a cumsum, a scatter and
an exponential race, about 10-20 ms per decode step on an H100-class GPU (the `chat` workload's
sampling). FlashInfer's kernels find the top-k / top-p set by pivots and rejection instead of a
sort: a few passes over each row, one thread block per row. Its random numbers come from one
Philox stream for the batch (the sampler's CUDA generator), so a draw depends on the row's
position in the batch: rows with a per-request seed keep the general path's hash.

Semantics are vLLM's: top-k first, then top-p over the top-k tokens' renormalised mass.
"""
from __future__ import annotations

import torch
from flashinfer.sampling import top_k_top_p_sampling_from_logits

# Rows per call. Each row costs about four fp32 copies of its logits (the fp32 logits, the
# log-sum-exp's temporary, FlashInfer's top-k-masked logits and probabilities): 128 rows stay
# below the general path's 64 rows (about eleven copies each), which the KV pool's sizing measures.
ROWS_PER_CALL = 128


def sample(logits: torch.Tensor, temperatures: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(token per row, its raw log-softmax) for [rows, vocab] logits; temperature 0 means greedy.
    top_k: int32 per row (the vocabulary size where off), top_p: float32 per row (1.0 where off)."""
    tokens, logprobs = [], []
    for start in range(0, logits.shape[0], ROWS_PER_CALL):
        stop = start + ROWS_PER_CALL
        chunk = logits[start:stop].float()
        log_normaliser = torch.logsumexp(chunk, dim=-1)
        greedy = chunk.argmax(dim=-1)
        temperature = temperatures[start:stop]
        chunk.div_(torch.where(temperature > 0, temperature, 1.0)[:, None])
        drawn = top_k_top_p_sampling_from_logits(chunk, top_k[start:stop], top_p[start:stop], deterministic=True,
                                                 generator=generator).long()
        drawn = torch.where(temperature > 0, drawn, greedy)
        tokens.append(drawn)
        logprobs.append(logits[start:stop].gather(1, drawn[:, None]).squeeze(1).float() - log_normaliser)
    return torch.cat(tokens), torch.cat(logprobs)
