"""The data-parallel partitioner at scale, without GPUs: `python -m benchmarks.partition_sim`.

A synthetic batch: `--requests` prompts, each one of `--prefixes` shared prefixes (group sizes
Zipf-skewed, prefix lengths log-normal) followed by its own suffix, with a decode estimate per
request. Prompts of that shape form a trie whose DFS layout is known without materialising a
million token lists: a group's members follow each other and share its prefix. The partitioner
(forkserve/scaleout/partition.py) cuts it for `--replicas` replicas; it is compared with two
assignments that ignore prefixes, on the input in arrival (shuffled) order:

- round-robin: request i to replica i mod N;
- Ray Data-style blocks: contiguous blocks of `--block-size` rows, each to the replica with the
  least work so far (the free one).

For each: partition time, imbalance (max / mean estimated cost per replica, a replica computing
each prefix it sees once), and prefix tokens computed more than once, as a share of the batch's
unique prompt tokens.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from forkserve.scaleout.partition import PrefixLayout, partition


def synthetic_batch(num_requests: int, num_prefixes: int, seed: int, zipf: float = 1.1):
    """(prefix id, prefix length, suffix length, decode tokens) per request, in arrival order."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, num_prefixes + 1) ** zipf
    sizes = rng.multinomial(num_requests - num_prefixes, weights / weights.sum()) + 1  # every prefix used
    prefix_len = np.clip(rng.lognormal(np.log(1000), 0.8, num_prefixes), 64, 16000).astype(np.int64)
    prefix_of = rng.permutation(np.repeat(np.arange(num_prefixes), sizes))
    suffix_len = rng.integers(16, 512, num_requests)
    decode = rng.integers(16, 512, num_requests)
    return prefix_of, prefix_len, suffix_len, decode


def layout_of(prefix_of: np.ndarray, prefix_len: np.ndarray, suffix_len: np.ndarray) -> PrefixLayout:
    """The trie's DFS layout of prompts `prefix + own suffix`: grouped by prefix, each member after
    the first sharing the whole prefix with its neighbour."""
    order = np.argsort(prefix_of, kind="stable")
    grouped = prefix_of[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = grouped[1:] != grouped[:-1]
    shared = np.where(first, 0, prefix_len[grouped])
    return PrefixLayout(order, shared, prefix_len[grouped] + suffix_len[order])


def assignment_costs(replica_of: np.ndarray, prefix_of: np.ndarray, prefix_len: np.ndarray,
                     suffix_len: np.ndarray, decode: np.ndarray, num_replicas: int) -> tuple[np.ndarray, int]:
    """Per-replica cost of a prefix-blind assignment (each replica computes every prefix it sees
    once), and the prefix tokens computed more than once in the cluster."""
    loads = np.bincount(replica_of, suffix_len + decode, minlength=num_replicas).astype(np.float64)
    pairs = np.unique(replica_of.astype(np.int64) * len(prefix_len) + prefix_of)
    seen_replica, seen_prefix = pairs // len(prefix_len), pairs % len(prefix_len)
    loads += np.bincount(seen_replica, prefix_len[seen_prefix], minlength=num_replicas)
    duplicated = int(prefix_len[seen_prefix].sum() - prefix_len.sum())
    return loads, duplicated


def round_robin(num_requests: int, num_replicas: int, block_size: int, request_cost: np.ndarray) -> np.ndarray:
    """Request i to replica i mod N."""
    return np.arange(num_requests) % num_replicas


def blocks_to_free_replica(num_requests: int, num_replicas: int, block_size: int,
                           request_cost: np.ndarray) -> np.ndarray:
    """Blocks in input order, each to the replica with the least work so far."""
    starts = np.arange(0, num_requests, block_size)
    block_cost = np.add.reduceat(request_cost, starts)
    loads = np.zeros(num_replicas)
    replica_of_block = np.empty(len(starts), dtype=np.int64)
    for b, c in enumerate(block_cost):
        r = int(np.argmin(loads))
        replica_of_block[b] = r
        loads[r] += c
    return np.repeat(replica_of_block, np.diff(np.append(starts, num_requests)))


Row = tuple[str, float, float, int]  # assignment, partition seconds, imbalance, duplicated prefix tokens


def compare(num_requests: int, num_prefixes: int, num_replicas: int, block_size: int, seed: int) -> tuple[list[Row], int]:
    """The three assignments' rows, and the batch's unique prompt tokens."""
    prefix_of, prefix_len, suffix_len, decode = synthetic_batch(num_requests, num_prefixes, seed)
    unique = int(prefix_len.sum() + suffix_len.sum())
    sizes = np.bincount(prefix_of)
    print(f"{num_requests:,} requests, {num_prefixes:,} prefixes (largest group {sizes.max():,} requests, "
          f"{sizes.max() / num_requests:.1%} of the batch), {num_replicas} replicas, "
          f"{unique:,} unique prompt tokens, {int(decode.sum()):,} decode tokens")
    start = time.perf_counter()
    planned = partition(layout_of(prefix_of, prefix_len, suffix_len), decode, num_replicas, keep_requests=False)
    rows = [("forkserve partitioner (prefix trie)", time.perf_counter() - start, planned.imbalance,
             planned.duplicated_tokens)]
    own_cost = (suffix_len + decode + prefix_len[prefix_of]).astype(np.float64)
    for name, assign in (("round-robin", round_robin),
                         (f"Ray Data-style blocks of {block_size}", blocks_to_free_replica)):
        start = time.perf_counter()
        replica_of = assign(num_requests, num_replicas, block_size, own_cost)
        elapsed = time.perf_counter() - start
        loads, duplicated = assignment_costs(replica_of, prefix_of, prefix_len, suffix_len, decode, num_replicas)
        rows.append((name, elapsed, float(loads.max() / loads.mean()), duplicated))
    return rows, unique


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--prefixes", type=int, default=20_000)
    parser.add_argument("--replicas", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=128, help="rows per block of the Ray Data-style baseline")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows, unique = compare(args.requests, args.prefixes, args.replicas, args.block_size, args.seed)
    print("| assignment | partition time (s) | imbalance (max/mean) | prefix tokens computed more than once |")
    print("|---|---:|---:|---:|")
    for name, seconds, imbalance, duplicated in rows:
        print(f"| {name} | {seconds:.2f} | {imbalance:.3f} | {duplicated:,} ({duplicated / unique:.2%}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
