"""Command line: `forkserve make-tiny-model / generate / bench / run-batch / serve` (also `python -m forkserve`)."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from forkserve.engine_args import add_engine_args, engine_kwargs

logger = logging.getLogger("forkserve")


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
    llm = LLM(args.model, data_parallel_size=args.data_parallel_size, **engine_kwargs(args))
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


def cmd_bench(args: argparse.Namespace) -> int:
    """`benchmarks/` sits beside the package in a source checkout and is not shipped with it."""
    try:
        from benchmarks.run import main as bench_main
    except ImportError:
        print("error: forkserve bench runs from a source checkout, in the folder holding benchmarks/ "
              "(python -m forkserve bench ... or python -m benchmarks.run ...)", file=sys.stderr)
        return 2
    return bench_main(args.bench_args)


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

    bench = sub.add_parser("bench", add_help=False,
                           help="time the shared workloads on forkserve and vLLM (from a source checkout: benchmarks/)")
    bench.set_defaults(bench_args=[])  # every argument after `bench` is the bench's own (see main)
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
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        args.bench_args = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    level = args.log_level or getattr(args, "default_log_level", "WARNING")
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
