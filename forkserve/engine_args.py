"""Engine flags of the command line, spelled as vLLM spells them (shared by every command)."""
from __future__ import annotations

import argparse


def add_engine_args(parser: argparse.ArgumentParser, model_required: bool = True) -> None:
    """Engine flags, spelled as vLLM spells them (vLLM's flags forkserve cannot honour yet are
    taken and refused with what to do instead, by the engine's settings)."""
    parser.add_argument("--model", required=model_required,
                        help="checkpoint directory (config.json, *.safetensors, tokenizer)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
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
    parser.add_argument("--max-logprobs", type=int, default=20,
                        help="largest logprobs / prompt_logprobs a request may ask for (-1: the whole vocabulary)")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--generation-config", default="auto",
                        help="'auto': sampling defaults from the model's generation_config.json; 'vllm': vLLM's "
                             "defaults; or a directory holding a generation_config.json")
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, help="ranks that split the model (one process and GPU each)")
    parser.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                        help="engines (replicas) on Ray that share the batch, planned by its prefix tree "
                             "(generate and run-batch; needs forkserve[ray])")
    parser.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1, help="1 (more GPUs: not yet)")
    parser.add_argument("--kv-cache-dtype", default="auto", help="auto (the model's dtype), fp8 or fp8_e4m3 (e4m3 pages: twice the tokens)")
    parser.add_argument("--quantization", "-q", default=None, help="not supported yet")
    parser.add_argument("--trust-remote-code", action="store_true", help="refused: no remote code is ever run")
    parser.add_argument("--revision", default=None, help="accepted: a local directory is its own revision")
    parser.add_argument("--download-dir", default=None, help="accepted: nothing is downloaded")
    parser.add_argument("--kv-offloading-size", type=float, default=0,
                        help="GiB of host memory for KV pages evicted from the GPU pool (0: no host tier)")
    parser.add_argument("--swap-space", type=float, default=4, help="accepted and unused, as in vLLM v1")
    parser.add_argument("--disable-log-stats", action="store_true", help="accepted (no periodic stats logging)")


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
                block_size=args.block_size, num_gpu_blocks_override=args.num_gpu_blocks_override,
                gpu_memory_utilization=args.gpu_memory_utilization, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens,
                enable_prefix_caching=args.enable_prefix_caching, load_format=args.load_format, seed=args.seed,
                max_n=args.max_n, tokenizer=args.tokenizer, max_logprobs=args.max_logprobs,
                enforce_eager=args.enforce_eager, generation_config=args.generation_config,
                tensor_parallel_size=args.tensor_parallel_size, pipeline_parallel_size=args.pipeline_parallel_size,
                kv_cache_dtype=args.kv_cache_dtype, quantization=args.quantization,
                trust_remote_code=args.trust_remote_code, revision=args.revision, download_dir=args.download_dir,
                swap_space=args.swap_space, disable_log_stats=args.disable_log_stats,
                kv_offloading_size=args.kv_offloading_size)
