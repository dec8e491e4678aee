"""The sparse MLP block of mixture-of-experts families (Qwen3-MoE, Mixtral): a router picks each
token's top-k experts; the block's output is their outputs weighted by the router.

Expert weights are stacked when the model is built (w13: [E, 2I, H] gate rows then up rows,
w2: [E, H, I]), so a step never gathers per-expert tensors. On a CUDA device with Triton the
fused kernels of forkserve/kernels/moe.py route and run the experts (graph-capturable: fixed
shapes, no host sync); elsewhere the pure-torch reference below runs, rounding as HF does.
"""
from __future__ import annotations

import torch
from torch import nn

from forkserve.kernels import gpu_kernels


def route(router_logits: torch.Tensor, top_k: int, renormalise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] fp32, expert ids [T, k] int32): softmax over experts in fp32, the top k,
    renormalised to sum 1 if `renormalise` (HF's routers, Qwen3-MoE and Mixtral alike).

    The top k are chosen by logit, ties to the lower expert id, exactly as the routing kernel
    chooses: softmax keeps the order, but two softmax implementations round differently and can
    round distinct logits to equal probabilities, and torch.topk breaks ties as it likes."""
    logits = router_logits.float()
    experts = torch.sort(logits, dim=-1, descending=True, stable=True).indices[..., :top_k]
    weights = torch.softmax(logits, dim=-1).gather(-1, experts)
    if renormalise:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts.to(torch.int32)


def reference_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                  experts: torch.Tensor) -> torch.Tensor:
    """sum over k of weights[t, k] * down(silu(gate) * up)(x[t]) of expert experts[t, k], looping
    over the experts that received tokens. Each expert's output is rounded to x's dtype after its
    weighting, and the sum runs in fp32 (in fp32 this is HF's arithmetic)."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    intermediate = w2.shape[2]
    flat = experts.flatten().long()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        entries = order[start:start + count]
        start += count
        tokens = entries // experts.shape[1]
        gate_up = nn.functional.linear(x[tokens], w13[expert])
        act = nn.functional.silu(gate_up[:, :intermediate]) * gate_up[:, intermediate:]
        y = nn.functional.linear(act, w2[expert])
        out.index_add_(0, tokens, (y.float() * weights.flatten()[entries, None]).to(x.dtype).float())
    return out.to(x.dtype)


class SparseMoE(nn.Module):
    """Router and stacked experts of one layer."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, renormalise: bool,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.top_k, self.renormalise = top_k, renormalise
        self.gate = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=dtype, device=device),
                                 requires_grad=False)
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size, dtype=dtype,
                                            device=device), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, dtype=dtype, device=device),
                               requires_grad=False)

    def compile_kernels(self) -> None:
        """Compile every configuration of the fused kernels now (where they apply), so that no
        step waits on a JIT compile."""
        kernels = gpu_kernels("moe", self.w13)
        if kernels is not None:
            kernels.warm_up(self.w13, self.w2, self.top_k, self.renormalise)

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The block's output for tokens x: [T, H], written into `out` when given."""
        router_logits = nn.functional.linear(x, self.gate)
        kernels = gpu_kernels("moe", x)
        if kernels is not None:
            weights, experts = kernels.route(router_logits, self.top_k, self.renormalise)
            return kernels.fused_moe(x, self.w13, self.w2, weights, experts, out)
        weights, experts = route(router_logits, self.top_k, self.renormalise)
        result = reference_moe(x, self.w13, self.w2, weights, experts)
        return result if out is None else out.copy_(result)
