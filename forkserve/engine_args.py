"""Engine flags of the command line, spelled as vLLM spells them (shared by every command)."""
from __future__ import annotations

import argparse


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Engine flags, spelled as vLLM spells them."""
    parser.add_argument("--model", required=True, help="checkpoint directory (config.json, *.safetensors, tokenizer)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV page")
    parser.add_argument("--num-gpu-blocks-override", type=int, default=None, help="KV pool size in pages")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-n", type=int, default=1024, help="largest n / best_of a request may ask for")


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
                block_size=args.block_size, num_gpu_blocks_override=args.num_gpu_blocks_override,
                gpu_memory_utilization=args.gpu_memory_utilization, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens,
                enable_prefix_caching=args.enable_prefix_caching, load_format=args.load_format, seed=args.seed,
                max_n=args.max_n)
