"""`forkserve bench` (or `python -m benchmarks.run`): run each engine in a child process, then print a
table, JSON and a chart."""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.workloads import build

logger = logging.getLogger("forkserve.bench")
REPO = Path(__file__).resolve().parents[1]  # the children import benchmarks/ from here


def model_dir_from_config(path: str, into: Path) -> Path:
    """A directory holding only the given config.json: dummy weights need nothing else."""
    config = Path(path)
    if config.is_dir():
        config = config / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"no config.json at {path}")
    into.mkdir(parents=True, exist_ok=True)
    shutil.copy(config, into / "config.json")
    return into


def needs_tokenizer(workloads: str) -> bool:
    """Workloads with a schema need a tokenizer (their grammar masks token ids)."""
    return any(build(name, 64).schema is not None for name in workloads.split(","))


def engine_env(engine: str) -> dict[str, str]:
    """The child's environment: vLLM's child also sees FORKSERVE_VLLM_PATH (an unpacked vLLM that
    must stay out of forkserve's own process, where its pinned packages could clash)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    extra = os.environ.get("FORKSERVE_VLLM_PATH") if engine == "vllm" else None
    env["PYTHONPATH"] = os.pathsep.join(p for p in (extra, str(REPO), env.get("PYTHONPATH")) if p)
    return env


def run_engine(engine: str, model_dir: Path, workloads: str, scale: int, engine_args: dict) -> list[dict]:
    """Run one engine's worker, echoing its output, and collect its RESULT lines."""
    cmd = [sys.executable, "-m", "benchmarks.worker", engine, str(model_dir), workloads, str(scale),
           json.dumps(engine_args)]
    env = engine_env(engine)
    results = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        for line in proc.stdout:
            print(f"[{engine}] {line}", end="", flush=True)
            if line.startswith("RESULT "):
                results.append(json.loads(line[len("RESULT "):]))
    if proc.returncode != 0:
        logger.error("%s worker exited with %d", engine, proc.returncode)
    return results


def vllm_available() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True, env=engine_env("vllm"))
    return probe.returncode == 0


def table(results: list[dict]) -> str:
    vllm = {r["workload"]: r["seconds"] for r in results if r["engine"] == "vllm"}
    lines = [f"{'workload':<14}{'engine':<11}{'seconds':>9}{'output tok/s':>14}{'total tok/s':>13}{'vs vLLM':>9}"]
    for r in results:
        ratio = f"{vllm[r['workload']] / r['seconds']:.2f}x" if r["workload"] in vllm else "-"
        lines.append(f"{r['workload']:<14}{r['engine']:<11}{r['seconds']:>9.2f}{r['output_tok_s']:>14,.0f}"
                     f"{r['total_tok_s']:>13,.0f}{ratio:>9}")
    return "\n".join(lines)


def chart(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in results))
    engines = list(dict.fromkeys(r["engine"] for r in results))
    seconds = {(r["workload"], r["engine"]): r["seconds"] for r in results}
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(engines)
    for i, engine in enumerate(engines):
        xs = [w + i * width for w in range(len(workloads))]
        ys = [seconds.get((w, engine), 0) for w in workloads]
        bars = ax.bar(xs, ys, width, label=engine)
        if engine != "vllm":
            for bar, w in zip(bars, workloads):
                if (w, "vllm") in seconds and seconds[(w, engine)]:
                    ax.annotate(f"{seconds[(w, 'vllm')] / seconds[(w, engine)]:.2f}x", (bar.get_x() + width / 2,
                                bar.get_height()), ha="center", va="bottom", fontsize=9)
    ax.set_xticks([w + width * (len(engines) - 1) / 2 for w in range(len(workloads))], workloads)
    ax.set_ylabel("seconds (lower is better)")
    ax.set_title("forkserve vs vLLM, same GPU, same run")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def device_info() -> dict:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return dict(device=gpu, torch=torch.__version__, date=datetime.date.today().isoformat())


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-config", required=True, help="a config.json (or its directory); weights are random")
    parser.add_argument("--workloads", default="nosharing,sharedprefix,samples,chat",
                        help="comma-separated; extraction (JSON schema) and extractionfree (its prompts, no "
                             "schema) run with the tiny tokenizer padded to the model's vocabulary: run them "
                             "apart from the others, which run without a tokenizer")
    parser.add_argument("--engine", default="both", choices=["forkserve", "vllm", "both"])
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--scale", type=int, default=1, help="shrink the workloads by this factor (smoke tests)")
    parser.add_argument("--engine-args", default="{}", help="JSON of extra forkserve LLM(...) arguments; kv_cache_dtype goes to vLLM too")


def cmd_bench(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    engines = ["forkserve", "vllm"] if args.engine == "both" else [args.engine]
    if "vllm" in engines and not vllm_available():
        print("vLLM is not importable here: running forkserve only", flush=True)
        engines.remove("vllm")
    results: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = model_dir_from_config(args.model_config, Path(tmp) / "model")
        if needs_tokenizer(args.workloads):
            from benchmarks.tokenizer import write_padded_tokenizer  # imports torch: not for --help

            write_padded_tokenizer(model_dir)
        for engine in engines:
            results += run_engine(engine, model_dir, args.workloads, args.scale, json.loads(args.engine_args))
    report = dict(device_info(), command=" ".join(sys.argv), results=results)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    print(table(results))
    if results:
        chart(results, out / "results.png")
    return 0 if results else 1


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="forkserve bench", description=__doc__)
    add_bench_args(parser)
    return cmd_bench(parser.parse_args(argv))


if __name__ == "__main__":
    logging.basicConfig(level="WARNING", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main(sys.argv[1:]))
