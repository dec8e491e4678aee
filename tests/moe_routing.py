"""Expert choices for the fused MoE kernels' tests (test_moe_kernel.py on CPU, test_gpu.py)."""
from __future__ import annotations

import torch


def routing_case(case: str, tokens: int, num_experts: int, top_k: int, generator: torch.Generator) -> torch.Tensor:
    """Expert ids [T, k] (distinct per token): random; k + 1 experts only; expert 3 in every token's choices."""
    if case == "random":
        return torch.stack([torch.randperm(num_experts, generator=generator)[:top_k] for _ in range(tokens)])
    if case == "few_experts_only":  # top_k + 1 experts share every token; the others receive none
        pool = list(range(1, num_experts, max(1, num_experts // (top_k + 1))))[:top_k + 1]
        return torch.tensor([[pool[(t + j) % len(pool)] for j in range(top_k)] for t in range(tokens)])
    others = torch.tensor([e for e in range(num_experts) if e != 3])
    picks = [others[torch.randperm(len(others), generator=generator)[:top_k - 1]] for _ in range(tokens)]
    return torch.stack([torch.cat([torch.tensor([3]), pick]) for pick in picks])
