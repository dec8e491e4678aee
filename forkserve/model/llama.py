"""The decoder every family shares (Llama 2/3, Mistral, Qwen2, Qwen3, Qwen3-MoE, Mixtral) over
flat, varlen token batches; the family table (forkserve/model/config.py) says what differs.

q/k/v and gate/up are fused into one matmul each (fewer, larger GEMMs on a GPU). A layer's MLP
is dense or a sparse mixture of experts (forkserve/model/moe.py). Attention and the KV cache are
not the model's business: each layer hands its q/k/v to a callback. Under tensor parallelism
each rank builds its shard of every layer (forkserve/model/parallel.py) and sums or gathers
through its group; with one rank no collective runs.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from forkserve.model.config import ModelConfig
from forkserve.model.layers import RMSNorm, RotaryEmbedding, silu_and_mul
from forkserve.model.moe import SparseMoE
from forkserve.model.parallel import Collectives, Shard

MLP_CHUNK_TOKENS = 4096

# attention(layer_index, q[T, Hq, D], k[T, Hkv, D], v[T, Hkv, D]) -> [T, Hq, D]
AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _linear(n_in: int, n_out: int, bias: bool, dtype: torch.dtype, device: torch.device | str) -> nn.Linear:
    layer = nn.Linear(n_in, n_out, bias=bias, dtype=dtype, device=device)
    layer.requires_grad_(False)
    return layer


class DenseMLP(nn.Module):
    """down(silu(gate) * up)."""

    def __init__(self, hidden_size: int, intermediate_size: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__()
        self.gate_up_proj = _linear(hidden_size, 2 * intermediate_size, False, dtype, device)
        self.down_proj = _linear(intermediate_size, hidden_size, False, dtype, device)

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        act = silu_and_mul(self.gate_up_proj(x))
        return self.down_proj(act) if out is None else torch.mm(act, self.down_proj.weight.t(), out=out)


class DecoderLayer(nn.Module):
    def __init__(self, index: int, config: ModelConfig, dtype: torch.dtype, device: torch.device | str,
                 shard: Shard, tp: Collectives | None = None) -> None:
        super().__init__()
        c = config
        self.index, self.tp = index, tp
        self.num_heads, self.num_kv_heads, self.head_dim = shard.num_heads, shard.num_kv_heads, c.head_dim
        self.q_size, self.kv_size = self.num_heads * c.head_dim, self.num_kv_heads * c.head_dim
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype, device)
        self.qkv_proj = _linear(c.hidden_size, self.q_size + 2 * self.kv_size, c.qkv_bias, dtype, device)
        self.o_proj = _linear(self.q_size, c.hidden_size, False, dtype, device)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype, device) if c.qk_norm else None
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype, device) if c.qk_norm else None
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype, device)
        if index in c.moe_layers:
            self.mlp: DenseMLP | SparseMoE = SparseMoE(c.hidden_size, shard.intermediate(c.moe_intermediate_size)[1],
                                                       c.num_experts, c.num_experts_per_tok, c.norm_topk_prob,
                                                       dtype, device)
        else:
            self.mlp = DenseMLP(c.hidden_size, shard.intermediate(c.intermediate_size)[1], dtype, device)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                rotary: RotaryEmbedding, attention: AttentionFn) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's output, the residual stream before it is added): each residual add is
        deferred into the next norm so the two run as one kernel on the GPU."""
        tokens = hidden.shape[0]
        if residual is None:
            residual, normed = hidden, self.input_layernorm(hidden)
        else:
            normed, residual = self.input_layernorm.add_and_norm(hidden, residual)
        qkv = self.qkv_proj(normed)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary(positions, q, k)
        attn = attention(self.index, q, k, v).reshape(tokens, self.q_size)
        normed, residual = self.post_attention_layernorm.add_and_norm(self._summed(self.o_proj(attn)), residual)
        return self._summed(self._mlp(normed)), residual

    def _summed(self, partial: torch.Tensor) -> torch.Tensor:
        """A row-parallel layer's output: the sum of every rank's partial one."""
        return partial if self.tp is None else self.tp.all_reduce(partial)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP, at most MLP_CHUNK_TOKENS tokens at a time: on the 8B shape a 16K-token step's
        gate/up activations would take 1.3 GiB at once (a MoE block's, top-k times its width),
        memory the KV pool's sizing must leave free (worker/memory.py); GEMMs of 4K rows run at
        the same rate."""
        if x.shape[0] <= MLP_CHUNK_TOKENS:
            return self.mlp(x)
        out = torch.empty_like(x)
        for start in range(0, x.shape[0], MLP_CHUNK_TOKENS):
            rows = slice(start, start + MLP_CHUNK_TOKENS)
            self.mlp(x[rows], out=out[rows])
        return out


class LlamaForCausalLM(nn.Module):
    """The decoder; with `tp`, this rank's shard of it (`shard` is then the rank's part)."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device | str,
                 tp: Collectives | None = None) -> None:
        super().__init__()
        self.config, self.tp = config, tp
        c = config
        self.shard = Shard(c, tp.rank, tp.size) if tp is not None else Shard(c)
        self.embed_tokens = nn.Embedding(self.shard.vocab_rows, c.hidden_size, dtype=dtype, device=device)
        self.embed_tokens.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(i, c, dtype, device, self.shard, tp) for i in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype, device)
        self.rotary = RotaryEmbedding(c.head_dim, c.max_position_embeddings, c.rope_theta, c.rope_scaling, device)
        if c.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = _linear(c.hidden_size, self.shard.vocab_rows, False, dtype, device)

    @torch.inference_mode()
    def compile_kernels(self) -> None:
        """Compile the JIT kernels whose configuration varies per step (the MoE blocks') at start-up."""
        for layer in self.layers:
            if isinstance(layer.mlp, SparseMoE):
                layer.mlp.compile_kernels()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attention: AttentionFn) -> torch.Tensor:
        hidden, residual = self._embed(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, positions, self.rotary, attention)
        return self.norm.add_and_norm(hidden, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits in the model's dtype, as HF's lm_head gives them; samplers upcast what they need
        (the GPU sampler reads them once as they are: no [rows, vocab] fp32 copy per step)."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = nn.functional.linear(hidden, weight)
        if self.tp is None:
            return logits
        logits = self.tp.all_gather_columns(logits)
        vocab = self.config.vocab_size
        return logits if logits.shape[1] == vocab else logits[:, :vocab].contiguous()  # the last rank's padding

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings; with tensor parallelism each rank looks up the ids in its rows (zeros
        for the others) and the sum over ranks is the embedding."""
        if self.tp is None:
            return self.embed_tokens(input_ids)
        local = input_ids - self.shard.first_vocab_row
        mine = (local >= 0) & (local < self.shard.vocab_rows)
        hidden = self.embed_tokens(torch.where(mine, local, 0)).masked_fill_(~mine.unsqueeze(-1), 0)
        return self.tp.all_reduce(hidden)
