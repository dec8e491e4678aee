"""The MoE block's time per decode step against the expert weights it must read (GPU).

For each decode batch size, one layer's SparseMoE (router GEMM, routing kernel, sort, both
grouped GEMMs, sum over k) on dummy weights is captured in a CUDA graph, as decode steps run,
and replayed; the bytes it must read are those of the experts its tokens chose (3 x I x H each).
The graph runs LAYERS blocks of their own weights in turn, so no layer's experts are still in L2
when it runs again (as in a real step, where the other layers come between).

--configs sweeps the grouped GEMMs' tiles in one run: each config is `default` (the kernels' own
choice) or comma-separated key=value items: m (rows per tile, both GEMMs and the sort), and n,
k, g, w, s (BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) for both GEMMs, or prefixed `up.`
or `down.` for one; unset keys keep the kernels' choice.
Run: python scripts/moe_probe.py [CONFIG_DIR] [--batches 1 64 1024]
     [--configs default m=64,up.n=128,down.n=128,s=4 m=128,w=8] (default dir .shared/qwen3-30b-a3b).
"""
from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from typing import Iterator

import torch

from forkserve.kernels import moe as kernels
from forkserve.model.config import ModelConfig
from forkserve.model.moe import SparseMoE

BATCHES = (1, 8, 32, 64, 128, 256, 512, 1024)
REPLAYS = 20
LAYERS = 4
TILE_KEYS = {"n": "BLOCK_N", "k": "BLOCK_K", "g": "GROUP_M", "w": "num_warps", "s": "num_stages"}

Overrides = tuple[int | None, dict[bool, dict[str, int]]]  # (rows per tile, {gate_up: tile overrides})


def parse_config(text: str) -> Overrides:
    block_m, tiles = None, {True: {}, False: {}}
    for item in ([] if text == "default" else text.split(",")):
        key, _, value = item.partition("=")
        gemm, _, name = key.rpartition(".")
        if not value.isdigit() or gemm not in ("", "up", "down") or name not in TILE_KEYS and (name, gemm) != ("m", ""):
            sys.exit(f"config item {item!r}: expected m=INT or [up.|down.]{{n,k,g,w,s}}=INT")
        if name == "m":
            block_m = int(value)
            continue
        for gate_up in (True, False) if not gemm else (gemm == "up",):
            tiles[gate_up][TILE_KEYS[name]] = int(value)
    return block_m, tiles


@contextmanager
def tiles_overridden(overrides: Overrides) -> Iterator[None]:
    """The kernels' tile choice with the config's keys replaced."""
    block_m, tiles = overrides
    pick_rows, pick_tiles = kernels._block_m, kernels._tiles
    if block_m is not None:
        kernels._block_m = lambda entries_per_expert: block_m
    kernels._tiles = lambda rows, n_out, k_in, gate_up: {**pick_tiles(rows, n_out, k_in, gate_up), **tiles[gate_up]}
    try:
        yield
    finally:
        kernels._block_m, kernels._tiles = pick_rows, pick_tiles


def main(config_dir: str, batches: list[int], configs: list[str]) -> None:
    c = ModelConfig.from_dir(config_dir)
    if not c.moe_layers:
        sys.exit(f"{config_dir} is a dense model: give a mixture of experts' config (MODEL_SHAPE=qwen3-30b-a3b)")
    overrides = [parse_config(text) for text in configs]
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
    print(f"{'config':>32} {'batch':>6} {'experts hit':>11} {'MiB read':>9} {'us/layer':>9} {'GB/s':>7} "
          f"{'ms/step':>8}")
    for text, override in zip(configs, overrides):
        for batch in batches:
            x = torch.randn(batch, c.hidden_size, device=device, dtype=dtype)
            with torch.inference_mode(), tiles_overridden(override):
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
            print(f"{text:>32} {batch:>6} {hit:>11.1f} {read / 2**20:>9.1f} {seconds * 1e6:>9.1f} "
                  f"{read / seconds / 1e9:>7.0f} {seconds * layers * 1e3:>8.2f}")
            del graph


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config_dir", nargs="?", default=".shared/qwen3-30b-a3b")
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--configs", nargs="+", default=["default"], help="tile configs to compare (see above)")
    args = parser.parse_args()
    main(args.config_dir, args.batches, args.configs)
