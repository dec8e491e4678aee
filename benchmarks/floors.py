"""Each workload's floor on one GPU: its GEMM FLOPs at the measured matrix rate plus the KV bytes
its decode steps must read at the measured copy rate (shared prefixes read once per step, as
cascade attention reads them), plus causal prefill attention at the matrix rate.

    python -m benchmarks.floors ../shared/bench/llama-3.1-8b [--kv-bytes 1] [--tflops 790] [--tbps 4.8]

Weights read per decode step are left out (at 1,024 rows the GEMMs are compute-bound), so these are
lower bounds; the numbers are H200 rates measured by scripts/attention_probe.py (gemm) and a copy.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.workloads import WORKLOADS, build


def model_shape(path: str) -> dict[str, int]:
    config = json.loads((Path(path) / "config.json" if Path(path).is_dir() else Path(path)).read_text())
    heads = config["num_attention_heads"]
    return dict(hidden=config["hidden_size"], inter=config["intermediate_size"], layers=config["num_hidden_layers"],
                heads=heads, kv_heads=config.get("num_key_value_heads", heads), vocab=config["vocab_size"],
                head_dim=config.get("head_dim") or config["hidden_size"] // heads)


def sharing(name: str, prompt_len: int) -> int:
    """Tokens of a request's prompt that other running requests share (read once per step per group)."""
    return {"sharedprefix": 2000, "samples": prompt_len, "extraction": 1500}.get(name, 0)


def floor(name: str, shape: dict[str, int], kv_bytes: int, tflops: float, tbps: float) -> dict[str, float]:
    w = build(name)
    h, layers, d = shape["hidden"], shape["layers"], shape["head_dim"]
    linear = 2 * layers * (h * d * (shape["heads"] + 2 * shape["kv_heads"]) + shape["heads"] * d * h
                           + 3 * h * shape["inter"])  # FLOPs per token: q/k/v, o, gate/up/down
    lm_head = 2 * h * shape["vocab"]
    kv_per_token = 2 * layers * shape["kv_heads"] * d * kv_bytes
    outputs = sum(r.max_tokens * r.n for r in w.requests)
    computed_prompt = 0  # prompt tokens the forward computes: a shared prefix once per group (prefix caching)
    attention = 0.0  # causal prefill: QK^T and PV, 4 x heads x d FLOPs per (query, key) pair, half the square
    kv_read = 0.0
    groups: set[tuple[int, ...]] = set()
    for r in w.requests:
        p, shared = len(r.prompt_token_ids), sharing(name, len(r.prompt_token_ids))
        key = tuple(r.prompt_token_ids[:16])
        first_of_group = key not in groups
        groups.add(key)
        computed = p if first_of_group else p - shared
        computed_prompt += computed
        attention += 4 * shape["heads"] * d * layers * computed * p / 2
        # every decode step reads each sample's own context, and a shared prefix once per group
        kv_read += r.n * sum(p - shared + t for t in range(r.max_tokens)) * kv_per_token
        if shared and first_of_group:
            kv_read += shared * r.max_tokens * kv_per_token
    gemm = (computed_prompt + outputs) * linear + (outputs + len(w.requests)) * lm_head
    seconds = dict(gemm_s=gemm / (tflops * 1e12), prefill_attention_s=attention / (tflops * 1e12),
                   kv_s=kv_read / (tbps * 1e12))
    return dict(workload=name, tflop=gemm / 1e12, kv_gb=kv_read / 1e9, **seconds, floor_s=sum(seconds.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_config", help="a config.json or its directory")
    parser.add_argument("--kv-bytes", type=int, default=2, help="bytes per KV element: 2 (bf16) or 1 (fp8)")
    parser.add_argument("--tflops", type=float, default=790.0, help="measured bf16 matrix rate, TFLOP/s")
    parser.add_argument("--tbps", type=float, default=4.8, help="measured copy rate, TB/s")
    parser.add_argument("--workloads", default=",".join(n for n in WORKLOADS if n != "extractionfree"))
    args = parser.parse_args()
    shape = model_shape(args.model_config)
    print(f"{'workload':<14}{'GEMM TFLOP':>11}{'KV GB':>9}{'GEMM s':>8}{'prefill attn s':>15}{'KV s':>7}{'floor s':>9}")
    for name in args.workloads.split(","):
        row = floor(name, shape, args.kv_bytes, args.tflops, args.tbps)
        print(f"{name:<14}{row['tflop']:>11.0f}{row['kv_gb']:>9.0f}{row['gemm_s']:>8.2f}"
              f"{row['prefill_attention_s']:>15.2f}{row['kv_s']:>7.2f}{row['floor_s']:>9.2f}")


if __name__ == "__main__":
    main()
