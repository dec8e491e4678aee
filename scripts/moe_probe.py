"""The MoE block's time per decode step against the expert weights it must read (GPU).

For each decode batch size, one layer's SparseMoE (router GEMM, routing kernel, sort, both
grouped GEMMs, sum over k) on dummy weights is captured in a CUDA graph, as decode steps run,
and replayed; the bytes it must read are those of the experts its tokens chose (3 x I x H each).
The graph runs LAYERS blocks of their own weights in turn, so no layer's experts are still in L2
when it runs again (as in a real step, where the other layers come between).
Run: python scripts/moe_probe.py [CONFIG_DIR] (default .shared/qwen3-30b-a3b).
"""
from __future__ import annotations

import sys

import torch

from forkserve.model.config import ModelConfig
from forkserve.model.moe import SparseMoE

BATCHES = (1, 8, 32, 64, 128, 256, 512, 1024)
REPLAYS = 20
LAYERS = 4


def main(config_dir: str) -> None:
    c = ModelConfig.from_dir(config_dir)
    if not c.moe_layers:
        sys.exit(f"{config_dir} is a dense model: give a mixture of experts' config (MODEL_SHAPE=qwen3-30b-a3b)")
    device, dtype = torch.device("cuda"), torch.bfloat16
    blocks = [SparseMoE(c.hidden_size, c.moe_intermediate_size, c.num_experts, c.num_experts_per_tok,
                        c.norm_topk_prob, dtype, device) for _ in range(LAYERS)]
    for block in blocks:
        for param in block.parameters():
            param.normal_(0.0, 0.02)
    expert_bytes = 3 * c.moe_intermediate_size * c.hidden_size * dtype.itemsize
    layers = len(c.moe_layers)
    print(f"{config_dir}: {c.num_experts} experts of {expert_bytes / 2**20:.1f} MiB, top {c.num_experts_per_tok}, "
          f"{layers} sparse layers")
    print(f"{'batch':>6} {'experts hit':>11} {'MiB read':>9} {'us/layer':>9} {'GB/s':>7} {'ms/step':>8}")
    for batch in BATCHES:
        x = torch.randn(batch, c.hidden_size, device=device, dtype=dtype)
        with torch.inference_mode():
            blocks[0](x)  # kernels compiled before capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for block in blocks:
                    block(x)
            hit = sum(torch.topk(torch.nn.functional.linear(x, block.gate).float(), c.num_experts_per_tok,
                                 dim=-1).indices.unique().numel() for block in blocks) / LAYERS
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        graph.replay()
        start.record()
        for _ in range(REPLAYS):
            graph.replay()
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1000 / REPLAYS / LAYERS
        read = hit * expert_bytes
        print(f"{batch:>6} {hit:>11.1f} {read / 2**20:>9.1f} {seconds * 1e6:>9.1f} {read / seconds / 1e9:>7.0f} "
              f"{seconds * layers * 1e3:>8.2f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".shared/qwen3-30b-a3b")
