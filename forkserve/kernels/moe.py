"""Fused mixture-of-experts in Triton: routing, sorting tokens by expert, and the experts' MLPs as
two grouped GEMMs over stacked weights (w13: [E, 2I, H], w2: [E, H, I]).

1. `route`: softmax over the router logits, top k by logit, renormalised (one program per token).
2. Align: the T*k (token, choice) entries are sorted by expert into `sorted_ids`, each expert's
   run padded to a multiple of BLOCK_M with the sentinel T*k, and each BLOCK_M-row block is
   labelled with its expert (count per entry block, one scan, place; stable order).
3. Gate-up GEMM over the blocks, SiLU-and-mul fused into its epilogue -> act [T*k, I].
4. Down GEMM, the router weight multiplied in its epilogue -> y [T*k, H]; the k rows of a token
   summed in fp32 (a torch sum, deterministic).

Experts that receive no tokens get no blocks, so their weights are never read; blocks past the
padded total exit at once. Every buffer is sized from T alone (the worst case: each expert's run
padded by BLOCK_M - 1) and nothing is read back to the host, so decode steps capture in CUDA
graphs. Rounding follows forkserve/model/moe.py's reference (the model dtype after each GEMM and
the activation, as HF rounds). The design follows the fused-MoE kernels of vLLM and SGLang.

Triton compiles a kernel once per specialisation: its constexprs, and for each int argument
whether it is 1 or a multiple of 16. The sizes that vary with T (entries, blocks) are therefore
`do_not_specialize`, so a kernel's configurations are only the tile rows `_block_m` picks
(TILE_ROWS), and `warm_up` compiles them all at start-up: a configuration first met by a step
held that prefill step on the H200 ~1.4 s in JIT compile.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _route_kernel(logits_ptr, weights_ptr, ids_ptr, num_experts, TOP_K: tl.constexpr, RENORMALISE: tl.constexpr,
                  BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    experts = tl.arange(0, BLOCK_E)
    available = experts < num_experts
    logits = tl.load(logits_ptr + token * num_experts + experts, mask=available, other=-float("inf")).to(tl.float32)
    probs = tl.exp(logits - tl.max(logits, axis=0))
    probs = probs / tl.sum(probs, axis=0)
    slots = tl.arange(0, BLOCK_K)
    chosen = tl.zeros([BLOCK_K], dtype=tl.float32)
    chosen_ids = tl.zeros([BLOCK_K], dtype=tl.int32)
    for k in tl.static_range(TOP_K):  # by logit, the largest first; ties to the lower expert id
        best = tl.max(tl.where(available, logits, -float("inf")), axis=0)
        index = tl.min(tl.where(available & (logits == best), experts, BLOCK_E), axis=0)
        index = tl.minimum(index, num_experts - 1)  # a NaN row must not name an expert past the last
        chosen = tl.where(slots == k, tl.sum(tl.where(experts == index, probs, 0.0), axis=0), chosen)
        chosen_ids = tl.where(slots == k, index, chosen_ids)
        available = available & (experts != index)
    if RENORMALISE:
        chosen = chosen / tl.sum(chosen, axis=0)
    tl.store(weights_ptr + token * TOP_K + slots, chosen, mask=slots < TOP_K)
    tl.store(ids_ptr + token * TOP_K + slots, chosen_ids, mask=slots < TOP_K)


def route(router_logits: torch.Tensor, top_k: int, renormalise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] fp32, expert ids [T, k] int32), as forkserve.model.moe.route computes them."""
    tokens, num_experts = router_logits.shape
    weights = torch.empty(tokens, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(tokens, top_k, dtype=torch.int32, device=router_logits.device)
    if tokens:
        _route_kernel[(tokens,)](router_logits.contiguous(), weights, ids, num_experts, TOP_K=top_k,
                                 RENORMALISE=renormalise, BLOCK_E=triton.next_power_of_2(num_experts),
                                 BLOCK_K=triton.next_power_of_2(top_k))
    return weights, ids


@triton.jit
def _one_hot(ids_ptr, block, num_entries, num_experts, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    """(entry indices, their experts, [BLOCK_N, BLOCK_E] one-hot int32) of one block of entries."""
    entries = block * BLOCK_N + tl.arange(0, BLOCK_N)
    ids = tl.load(ids_ptr + entries, mask=entries < num_entries, other=num_experts)
    return entries, ids, (ids[:, None] == tl.arange(0, BLOCK_E)[None, :]).to(tl.int32)


@triton.jit(do_not_specialize=["num_entries"])
def _count_kernel(ids_ptr, counts_ptr, num_entries, num_experts, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    block = tl.program_id(0)
    _, _, one_hot = _one_hot(ids_ptr, block, num_entries, num_experts, BLOCK_N, BLOCK_E)
    experts = tl.arange(0, BLOCK_E)
    tl.store(counts_ptr + block * num_experts + experts, tl.sum(one_hot, axis=0), mask=experts < num_experts)


@triton.jit(do_not_specialize=["num_blocks", "num_entries", "num_m_blocks"])
def _scan_kernel(counts_ptr, sorted_ids_ptr, block_experts_ptr, num_padded_ptr, num_blocks, num_experts,
                 num_entries, num_m_blocks, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, CHUNK: tl.constexpr):
    """One program: each expert's padded run, each entry block's start within it (written over
    its counts), the padding slots' sentinels, each m-block's expert and the padded total."""
    experts = tl.arange(0, BLOCK_E)
    valid_expert = experts < num_experts
    rows = tl.arange(0, CHUNK)
    totals = tl.zeros([BLOCK_E], dtype=tl.int32)
    for start in range(0, num_blocks, CHUNK):
        mask = ((start + rows) < num_blocks)[:, None] & valid_expert[None, :]
        totals += tl.sum(tl.load(counts_ptr + (start + rows)[:, None] * num_experts + experts[None, :], mask=mask,
                                 other=0), axis=0)
    padded = (totals + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    carry = starts
    for start in range(0, num_blocks, CHUNK):
        mask = ((start + rows) < num_blocks)[:, None] & valid_expert[None, :]
        pointers = counts_ptr + (start + rows)[:, None] * num_experts + experts[None, :]
        counts = tl.load(pointers, mask=mask, other=0)
        tl.store(pointers, tl.cumsum(counts, axis=0) - counts + carry[None, :], mask=mask)
        carry += tl.sum(counts, axis=0)
    pads = (starts + totals)[:, None] + tl.arange(0, BLOCK_M)[None, :]
    tl.store(sorted_ids_ptr + pads, tl.full(pads.shape, num_entries, tl.int32),
             mask=(pads < ends[:, None]) & valid_expert[:, None])
    for start in range(0, num_m_blocks, CHUNK):
        m_blocks = start + rows
        first_rows = m_blocks * BLOCK_M
        owner = tl.sum(((ends[None, :] <= first_rows[:, None]) & valid_expert[None, :]).to(tl.int32), axis=1)
        tl.store(block_experts_ptr + m_blocks, tl.minimum(owner, num_experts - 1), mask=m_blocks < num_m_blocks)
    tl.store(num_padded_ptr, tl.sum(padded, axis=0))


@triton.jit(do_not_specialize=["num_entries"])
def _place_kernel(ids_ptr, offsets_ptr, sorted_ids_ptr, num_entries, num_experts, BLOCK_N: tl.constexpr,
                  BLOCK_E: tl.constexpr):
    block = tl.program_id(0)
    entries, ids, one_hot = _one_hot(ids_ptr, block, num_entries, num_experts, BLOCK_N, BLOCK_E)
    valid = entries < num_entries
    rank = tl.sum(tl.cumsum(one_hot, axis=0) * one_hot, axis=1) - 1  # among this block's entries of its expert
    base = tl.load(offsets_ptr + block * num_experts + ids, mask=valid, other=0)
    tl.store(sorted_ids_ptr + base + rank, entries.to(tl.int32), mask=valid)


def align(experts: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted_ids, block_experts, num_padded) for expert ids [T, k] (int32): entries t*k+j sorted
    by expert (stable), each expert's run padded to a multiple of block_m with T*k; the expert of
    each block_m rows; the padded total (a one-element tensor, never read on the host)."""
    num_entries = experts.numel()
    block_e = triton.next_power_of_2(num_experts)
    block_n = max(16, min(256, 8192 // block_e))  # one-hot tiles of at most 8K elements
    num_blocks = triton.cdiv(num_entries, block_n)
    max_padded = num_entries + min(num_entries, num_experts) * (block_m - 1)
    num_m_blocks = triton.cdiv(max_padded, block_m)
    device = experts.device
    sorted_ids = torch.empty(max_padded, dtype=torch.int32, device=device)
    block_experts = torch.empty(num_m_blocks, dtype=torch.int32, device=device)
    num_padded = torch.empty(1, dtype=torch.int32, device=device)
    counts = torch.empty(num_blocks, num_experts, dtype=torch.int32, device=device)
    flat = experts.reshape(-1)
    _count_kernel[(num_blocks,)](flat, counts, num_entries, num_experts, BLOCK_N=block_n, BLOCK_E=block_e)
    _scan_kernel[(1,)](counts, sorted_ids, block_experts, num_padded, num_blocks, num_experts, num_entries,
                       num_m_blocks, BLOCK_M=block_m, BLOCK_E=block_e, CHUNK=max(1, min(64, 8192 // block_e)))
    _place_kernel[(num_blocks,)](flat, counts, sorted_ids, num_entries, num_experts, BLOCK_N=block_n,
                                 BLOCK_E=block_e)
    return sorted_ids, block_experts, num_padded


@triton.jit(do_not_specialize=["num_entries", "num_m_blocks"])
def _expert_gemm_kernel(a_ptr, w_ptr, out_ptr, sorted_ids_ptr, block_experts_ptr, num_padded_ptr, weights_ptr,
                        num_entries, n_out, k_in, stride_a, stride_we, stride_wn, stride_out, num_m_blocks,
                        TOP_K: tl.constexpr, GATE_UP: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of an expert's GEMM over its sorted rows.

    GATE_UP: A rows are tokens (entry // TOP_K), W holds gate rows then up rows (n_out each), and
    the tile stores silu(gate) * up. Else A rows are entries and the tile stores the product
    times the entry's router weight. Output rows are entries either way."""
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(n_out, BLOCK_N)
    group = pid // (GROUP_M * n_blocks)  # GROUP_M m-blocks share the sweep over n (L2 reuse of A)
    first_m = group * GROUP_M
    group_size = tl.minimum(num_m_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_blocks)) % group_size
    pid_n = (pid % (GROUP_M * n_blocks)) // group_size
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    entries = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = entries < num_entries
    if GATE_UP:
        a_rows = (entries // TOP_K).to(tl.int64)
    else:
        a_rows = entries.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    inner = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_a + inner[None, :]
    w_ptrs = w_ptr + expert * stride_we + cols[None, :].to(tl.int64) * stride_wn + inner[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, k_in, BLOCK_K):
        in_k = inner < k_in - k
        a = tl.load(a_ptrs, mask=valid[:, None] & in_k[None, :], other=0.0)
        w_mask = in_k[:, None] & (cols < n_out)[None, :]
        w = tl.load(w_ptrs, mask=w_mask, other=0.0)
        if IEEE:
            acc = tl.dot(a, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, w, acc)
        if GATE_UP:
            w_up = tl.load(w_ptrs + n_out * stride_wn, mask=w_mask, other=0.0)
            if IEEE:
                acc_up = tl.dot(a, w_up, acc_up, input_precision="ieee")
            else:
                acc_up = tl.dot(a, w_up, acc_up)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    dtype = out_ptr.dtype.element_ty
    if GATE_UP:
        gate = acc.to(dtype).to(tl.float32)
        result = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32) * acc_up.to(dtype).to(tl.float32)
    else:
        result = acc.to(dtype).to(tl.float32) * tl.load(weights_ptr + entries, mask=valid, other=0.0)[:, None]
    out_ptrs = out_ptr + entries[:, None].to(tl.int64) * stride_out + cols[None, :]
    tl.store(out_ptrs, result.to(dtype), mask=valid[:, None] & (cols < n_out)[None, :])


def _tiles(block_m: int, n_out: int, k_in: int, gate_up: bool) -> dict[str, int]:
    """Tile sizes, warps and pipeline stages for rows of block_m per tile: the gate-up GEMM keeps
    two accumulators, so its tiles are half as wide. (scripts/moe_probe.py --configs sweeps them.)"""
    block_n = 64 if block_m < 64 or gate_up else 128
    return dict(BLOCK_M=block_m, BLOCK_N=min(block_n, max(16, triton.next_power_of_2(n_out))),
                BLOCK_K=min(64, max(16, triton.next_power_of_2(k_in))), GROUP_M=1 if block_m < 64 else 8,
                num_warps=4 if block_m < 64 else 8, num_stages=3)


TILE_ROWS = (16, 32, 64)  # the rows per tile `_block_m` picks from


def _block_m(entries_per_expert: float) -> int:
    """Rows per tile by rows per expert: small tiles for decode (little padding per expert),
    larger ones when experts receive many rows (prefill)."""
    small, medium, large = TILE_ROWS
    return small if entries_per_expert <= 16 else medium if entries_per_expert <= 48 else large


def _expert_gemm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, sorted_ids: torch.Tensor,
                 block_experts: torch.Tensor, num_padded: torch.Tensor, weights: torch.Tensor, top_k: int,
                 gate_up: bool, block_m: int) -> None:
    n_out, k_in = w.shape[1] // (2 if gate_up else 1), w.shape[2]
    tiles = _tiles(block_m, n_out, k_in, gate_up)
    num_m_blocks = block_experts.numel()
    grid = (num_m_blocks * triton.cdiv(n_out, tiles["BLOCK_N"]),)
    _expert_gemm_kernel[grid](a, w, out, sorted_ids, block_experts, num_padded, weights, out.shape[0], n_out, k_in,
                              a.stride(0), w.stride(0), w.stride(1), out.stride(0), num_m_blocks, TOP_K=top_k,
                              GATE_UP=gate_up, IEEE=a.dtype == torch.float32, **tiles)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
              out: torch.Tensor | None = None, block_m: int | None = None) -> torch.Tensor:
    """sum over k of weights[t, k] * expert experts[t, k]'s down(silu(gate) * up)(x[t]), for
    x: [T, H], w13: [E, 2I, H], w2: [E, H, I], weights: [T, k] fp32, experts: [T, k] int32;
    written into `out` ([T, H], contiguous) when given; `block_m` overrides the tile rows that
    the rows per expert would pick (warm-up, tuning)."""
    tokens, top_k = experts.shape
    num_experts, intermediate = w13.shape[0], w2.shape[2]
    out = torch.empty_like(x) if out is None else out
    if tokens == 0:
        return out
    assert x.is_contiguous() and w13.is_contiguous() and w2.is_contiguous() and out.is_contiguous()
    block_m = block_m or _block_m(tokens * top_k / num_experts)
    sorted_ids, block_experts, num_padded = align(experts, num_experts, block_m)
    entries = tokens * top_k
    act = torch.empty(entries, intermediate, dtype=x.dtype, device=x.device)
    _expert_gemm(x, w13, act, sorted_ids, block_experts, num_padded, weights, top_k, True, block_m)
    y = torch.empty(entries, x.shape[1], dtype=x.dtype, device=x.device)
    _expert_gemm(act, w2, y, sorted_ids, block_experts, num_padded, weights.reshape(-1), top_k, False, block_m)
    return torch.sum(y.view(tokens, top_k, -1), dim=1, out=out)


def warm_up(w13: torch.Tensor, w2: torch.Tensor, top_k: int, renormalise: bool) -> None:
    """Route one token and run the fused MoE once per TILE_ROWS on these weights' shapes and
    dtype: with no per-step size specialised on, these are every compile a run can need."""
    num_experts, hidden = w13.shape[0], w13.shape[2]
    x = torch.zeros(1, hidden, dtype=w13.dtype, device=w13.device)
    weights, experts = route(torch.zeros(1, num_experts, dtype=w13.dtype, device=w13.device), top_k, renormalise)
    for block_m in TILE_ROWS:
        fused_moe(x, w13, w2, weights, experts, block_m=block_m)
