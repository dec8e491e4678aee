"""argparse wiring of `forkserve run-batch` and `forkserve serve` (fastapi is imported only by serve)."""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys

logger = logging.getLogger("forkserve")


def _add_common(parser: argparse.ArgumentParser, model_required: bool = True) -> None:
    from forkserve.engine_args import add_engine_args

    add_engine_args(parser, model_required)
    parser.add_argument("--served-model-name", action="append", default=None,
                        help="a name clients may give as 'model' (repeatable; default: the --model value)")
    parser.set_defaults(default_log_level="INFO")


def _served_names(args: argparse.Namespace) -> list[str]:
    return args.served_model_name or [args.model]


def _build_engine(args: argparse.Namespace):
    from forkserve.engine_args import engine_kwargs
    from forkserve.config import EngineConfig
    from forkserve.engine.engine import Engine

    return Engine(EngineConfig.from_kwargs(args.model, **engine_kwargs(args)))


def add_run_batch_args(parser: argparse.ArgumentParser) -> None:
    _add_common(parser)
    parser.add_argument("-i", "--input", required=True, help="OpenAI Batch API input file (.jsonl)")
    parser.add_argument("-o", "--output", required=True,
                        help="results file (.jsonl); an existing one is resumed: answered custom_ids are skipped")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--retry-failed", action="store_true",
                        help="run again the lines whose stored result in the output file is an error")


def cmd_run_batch(args: argparse.Namespace) -> int:
    """Exit status 1 when no line of the input has succeeded (this run or before), else 0."""
    from forkserve.entrypoints.batch_runner import BatchRunner, EngineKeepsFailing
    from forkserve.entrypoints.recovery import EngineUnrecoverable

    # Before the model loads: duplicate custom_ids, another runner on the output, an output
    # directory that is read-only or full are all refused here.
    with BatchRunner(args.input, args.output, retry_failed=args.retry_failed) as runner:
        failed_hint = (f"; {runner.failed_before} of them failed (rerun with --retry-failed to run those again)"
                       if runner.failed_before else "")
        if runner.retried:
            logger.info("run-batch: retrying %d failed requests", runner.retried)
        if runner.remaining == 0:
            runner.compact()
            logger.info("run-batch: all %d requests of %s are already answered in %s%s", len(runner.lines),
                        args.input, args.output, failed_hint)
        else:
            if runner.skipped or runner.rerun:
                logger.info("run-batch: resuming: %d of %d requests already answered in %s%s, %d changed since "
                            "and run again", runner.skipped, len(runner.lines), args.output, failed_hint,
                            runner.rerun)
            try:
                if args.data_parallel_size != 1:
                    _run_data_parallel(runner, args)
                else:
                    runner.run(_build_engine(args), _served_names(args), use_tqdm=not args.no_progress)
            except (EngineKeepsFailing, EngineUnrecoverable) as err:
                print(f"error: {err}", file=sys.stderr)
                return 1
        if runner.lines and not runner.any_succeeded():
            logger.error("run-batch: no request of %s succeeded: see the errors in %s, fix their cause, then rerun "
                         "with --retry-failed", args.input, args.output)
            return 1
    return 0


def _run_data_parallel(runner, args: argparse.Namespace) -> None:
    """The remaining lines on --data-parallel-size Ray replicas (forkserve/scaleout)."""
    from forkserve.api import LLM
    from forkserve.engine_args import engine_kwargs
    from forkserve.scaleout import replica_set

    replicas = replica_set(LLM, args.model, args.data_parallel_size, engine_kwargs(args))
    try:
        from forkserve.entrypoints.batch_data_parallel import run_batch_data_parallel

        run_batch_data_parallel(runner, replicas, _served_names(args), use_tqdm=not args.no_progress)
    finally:
        replicas.shutdown()


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    from forkserve.entrypoints import DEFAULT_MAX_REQUEST_BYTES, DEFAULT_MAX_WAITING

    parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                        help="checkpoint directory, as in `vllm serve MODEL` (or --model)")
    _add_common(parser, model_required=False)
    parser.add_argument("--chat-template", default=None,
                        help="a Jinja chat template, or a file holding one (default: the tokenizer's)")
    parser.add_argument("--response-role", default="assistant", help="the role of chat answers")
    parser.add_argument("--disable-log-requests", action="store_true", help="no access log line per request")
    parser.add_argument("--uvicorn-log-level", default=None,
                        choices=["critical", "error", "warning", "info", "debug", "trace"],
                        help="uvicorn's log level (default: the --log-level)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("FORKSERVE_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on every route but /health "
                             "(default: $FORKSERVE_API_KEY)")
    parser.add_argument("--max-waiting", type=int, default=DEFAULT_MAX_WAITING,
                        help="requests allowed to wait for the running batch; more get 429")
    parser.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                        help="largest request body accepted (413 past it)")


def _resolve_model(args: argparse.Namespace) -> None:
    """`forkserve serve MODEL` or `--model MODEL` (both: the same one)."""
    if args.model_tag is not None and args.model is not None and args.model_tag != args.model:
        raise ValueError(f"two models given: {args.model_tag!r} (positional) and --model {args.model!r}; give one")
    args.model = args.model or args.model_tag
    if args.model is None:
        raise ValueError("no model: give it as `forkserve serve MODEL` or with --model")


def cmd_serve(args: argparse.Namespace) -> int:
    _resolve_model(args)
    if args.data_parallel_size != 1:
        raise ValueError("serve runs one engine: --data-parallel-size is for generate and run-batch")
    try:
        from forkserve.entrypoints.engine_loop import EngineLoop
        from forkserve.entrypoints.server import serve
    except ImportError as err:
        print(f"error: serve needs the server extras ({err.name} is missing): pip install 'forkserve[server]'",
              file=sys.stderr)
        return 2
    if args.max_waiting < 1 or args.max_request_bytes < 1:
        raise ValueError("--max-waiting and --max-request-bytes must be positive")
    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("the API key is empty (--api-key or FORKSERVE_API_KEY): give a key, or unset it to "
                         "serve without one")
    if args.api_key is None and not _is_loopback(args.host):
        logger.warning("serving on %s without --api-key: anyone who can reach it can use it", args.host)
    from forkserve.chat import load_chat_template

    engine_loop = EngineLoop(_build_engine(args), rebuild=lambda: _build_engine(args))
    serve(engine_loop, _served_names(args), host=args.host, port=args.port,
          api_key=args.api_key, max_waiting=args.max_waiting, max_request_bytes=args.max_request_bytes,
          log_level=args.uvicorn_log_level or logging.getLevelName(logging.getLogger().level),
          chat_template=load_chat_template(args.chat_template), response_role=args.response_role,
          access_log=not args.disable_log_requests)
    if engine_loop.error is not None:
        print(f"error: {engine_loop.error}", file=sys.stderr)
        return 1
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
