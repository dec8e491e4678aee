"""Command line: `forkserve make-tiny-model / generate / bench / run-batch / serve` (also `python -m forkserve`)."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

logger = logging.getLogger("forkserve")


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
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, help="1 (more GPUs: not yet)")
    parser.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1, help="1 (more GPUs: not yet)")
    parser.add_argument("--kv-cache-dtype", default="auto", help="auto (the model's dtype; fp8: not yet)")
    parser.add_argument("--quantization", "-q", default=None, help="not supported yet")
    parser.add_argument("--trust-remote-code", action="store_true", help="refused: no remote code is ever run")
    parser.add_argument("--revision", default=None, help="accepted: a local directory is its own revision")
    parser.add_argument("--download-dir", default=None, help="accepted: nothing is downloaded")
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
                swap_space=args.swap_space, disable_log_stats=args.disable_log_stats)


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from forkserve.model.tiny import make_tiny_model

    path = make_tiny_model(args.dir, family=args.family, seed=args.seed)
    print(f"wrote a tiny {args.family} checkpoint to {path}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from forkserve import LLM, SamplingParams

    if args.input:
        prompts = [line.rstrip("\n") for line in Path(args.input).read_text().splitlines() if line.strip()]
    else:
        prompts = list(args.prompt)
    if not prompts:
        print("error: no prompts: give --prompt TEXT (repeatable) or --input FILE", file=sys.stderr)
        return 2
    llm = LLM(args.model, **engine_kwargs(args))
    params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.sample_seed, stop=args.stop,
                            logprobs=args.logprobs)
    start = time.perf_counter()
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    else:
        outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    for prompt, output in zip(prompts, outputs):
        for completion in output.outputs:
            print(f"--- {prompt!r} (cached prompt tokens: {output.num_cached_tokens}, "
                  f"finish: {completion.finish_reason})")
            print(completion.text)
            if completion.logprobs is not None:
                for token, entry in zip(completion.token_ids, completion.logprobs):
                    print("  " + "  ".join(f"{lp.decoded_token!r}: {lp.logprob:.3f}" + (" *" if t == token else "")
                                           for t, lp in entry.items()))
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    cached = sum(o.num_cached_tokens for o in outputs)
    generated = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    print(f"\n{len(outputs)} requests, {prompt_tokens} prompt tokens ({cached} from the prefix cache), "
          f"{generated} generated tokens in {elapsed:.2f} s")
    return 0


def _tiny_family(value: str) -> str:
    """Checked when make-tiny-model is parsed: its module imports torch, which --help must not wait for."""
    from forkserve.model.tiny import FAMILIES

    if value not in FAMILIES:
        raise argparse.ArgumentTypeError(f"unknown family {value!r}: choose one of {', '.join(FAMILIES)}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forkserve", description=__doc__)
    parser.add_argument("--log-level", default=None, help="default: WARNING (INFO for run-batch and serve)")
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser("make-tiny-model", help="write a small random checkpoint with a real tokenizer")
    tiny.add_argument("dir")
    tiny.add_argument("--family", default="llama", type=_tiny_family, help="llama, qwen2, qwen3 or mistral")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=cmd_make_tiny_model)

    gen = sub.add_parser("generate", help="generate for a batch of prompts")
    add_engine_args(gen)
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    source.add_argument("--input", help="a text file with one prompt per line")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--n", type=int, default=1)
    gen.add_argument("--sample-seed", type=int, default=None, help="per-request sampling seed")
    gen.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    gen.add_argument("--logprobs", type=int, default=None, help="print the top-k logprobs of each generated token")
    gen.set_defaults(func=cmd_generate)

    from forkserve.bench.run import add_bench_args, cmd_bench

    bench = sub.add_parser("bench", help="time the shared workloads on forkserve and vLLM (random weights)")
    add_bench_args(bench)
    bench.set_defaults(func=cmd_bench)

    from forkserve.entrypoints.commands import add_run_batch_args, add_serve_args, cmd_run_batch, cmd_serve

    batch = sub.add_parser("run-batch", help="run an OpenAI Batch API file (.jsonl), resumably")
    add_run_batch_args(batch)
    batch.set_defaults(func=cmd_run_batch)

    serve = sub.add_parser("serve", help="serve an OpenAI-compatible API (completions, chat, streaming)")
    add_serve_args(serve)
    serve.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = args.log_level or getattr(args, "default_log_level", "WARNING")
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
