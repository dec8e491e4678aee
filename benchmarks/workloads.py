"""The benchmark workloads, built exactly as ../shared/bench/workloads.py builds them.

Same random generator, same calls in the same order, so the request lists are identical (a
test checks this whenever ../shared is present).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

VOCAB = 32000  # token ids drawn below this: valid for Llama and Qwen vocabularies


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    max_tokens: int
    n: int = 1


@dataclass(frozen=True)
class Workload:
    name: str
    requests: list[BenchRequest]
    temperature: float
    schema: dict[str, Any] | None = None  # every request's output must match this JSON schema (structured outputs)
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k (vLLM's default)

    @property
    def sampling(self) -> dict[str, float | int]:
        """The SamplingParams keywords every request of the batch shares (same names in both engines)."""
        return dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.prompt_token_ids) for r in self.requests)

    @property
    def output_tokens(self) -> int:
        return sum(r.max_tokens * r.n for r in self.requests)


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(100, VOCAB) for _ in range(n)]


def shared_prefix(seed: int = 0, groups: int = 32, per_group: int = 64, prefix_len: int = 2000,
                  suffix_len: int = 100, out_len: int = 128) -> list[BenchRequest]:
    """Offline batch (BatchLLM): groups of requests share a long prefix; order shuffled."""
    rng = random.Random(seed)
    reqs = []
    for _ in range(groups):
        prefix = _ids(rng, prefix_len)
        for _ in range(per_group):
            reqs.append(BenchRequest(prefix + _ids(rng, suffix_len), out_len))
    rng.shuffle(reqs)
    return reqs


def parallel_samples(seed: int = 1, prompts: int = 64, n: int = 32, prompt_len: int = 1000,
                     out_len: int = 512) -> list[BenchRequest]:
    """Test-time scaling: n samples per prompt."""
    rng = random.Random(seed)
    return [BenchRequest(_ids(rng, prompt_len), out_len, n) for _ in range(prompts)]


def no_sharing(seed: int = 2, num: int = 256, lo: int = 100, hi: int = 1024) -> list[BenchRequest]:
    """nano-vllm's bench: random prompts of 100-1024 tokens, outputs of 100-1024 tokens."""
    rng = random.Random(seed)
    return [BenchRequest(_ids(rng, rng.randint(lo, hi)), rng.randint(lo, hi)) for _ in range(num)]


EXTRACTION_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "category": {"type": "string", "enum": ["news", "science", "sports", "finance", "other"]},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
        "sentiment": {"type": "string", "enum": ["positive", "neutral", "negative"]},
        "summary": {"type": "string", "maxLength": 80},
        "keywords": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 4},
    },
    "required": ["title", "category", "year", "sentiment", "summary", "keywords"],
    "additionalProperties": False,
}


def extraction(seed: int = 4, num: int = 2048, instruction_len: int = 1500, doc_len: int = 600,
               out_len: int = 256) -> list[BenchRequest]:
    """Structured extraction: one shared instruction, a document each, a JSON object out (EXTRACTION_SCHEMA)."""
    rng = random.Random(seed)
    instruction = _ids(rng, instruction_len)
    reqs = [BenchRequest(instruction + _ids(rng, doc_len), out_len) for _ in range(num)]
    rng.shuffle(reqs)
    return reqs


def chat(seed: int = 5, num: int = 1024, lo_in: int = 100, hi_in: int = 3000, lo_out: int = 20,
         hi_out: int = 800) -> list[BenchRequest]:
    """A chat-like batch without designed sharing (run with CHAT_SAMPLING: the top-p/top-k path)."""
    rng = random.Random(seed)
    return [BenchRequest(_ids(rng, rng.randint(lo_in, hi_in)), rng.randint(lo_out, hi_out)) for _ in range(num)]


CHAT_SAMPLING = dict(temperature=0.7, top_p=0.95, top_k=40)


def build(name: str, scale: int = 1, seed: int | None = None) -> Workload:
    """A workload by name; scale > 1 shrinks counts and lengths for smoke tests on CPU. A seed
    other than the workload's own draws other tokens (the bench's warm-up must not share a
    prefix with the timed batch)."""
    seeded = {} if seed is None else {"seed": seed}
    if name == "nosharing":
        reqs = no_sharing(num=256 // scale, lo=max(1, 100 // scale), hi=max(2, 1024 // scale), **seeded)
        return Workload(name, reqs, 0.6)
    if name == "sharedprefix":
        reqs = shared_prefix(groups=max(1, 32 // scale), per_group=max(1, 64 // scale),
                             prefix_len=2000 // scale, suffix_len=max(1, 100 // scale), out_len=max(1, 128 // scale),
                             **seeded)
        return Workload(name, reqs, 0.6)
    if name == "samples":
        reqs = parallel_samples(prompts=max(1, 64 // scale), n=max(1, 32 // scale), prompt_len=1000 // scale,
                                out_len=max(1, 512 // scale), **seeded)
        return Workload(name, reqs, 0.8)
    if name in ("extraction", "extractionfree"):
        # extractionfree: the same prompts without the schema, each running to max_tokens (the cost
        # of the constraint is the difference in time per output token).
        reqs = extraction(num=max(1, 2048 // scale), instruction_len=1500 // scale, doc_len=max(1, 600 // scale),
                          **seeded)
        return Workload(name, reqs, 0.6, EXTRACTION_SCHEMA if name == "extraction" else None)
    if name == "chat":
        reqs = chat(num=max(1, 1024 // scale), lo_in=max(1, 100 // scale), hi_in=max(2, 3000 // scale),
                    lo_out=max(1, 20 // scale), hi_out=max(2, 800 // scale), **seeded)
        return Workload(name, reqs, **CHAT_SAMPLING)
    raise ValueError(f"unknown workload {name!r}: choose from {', '.join(WORKLOADS)}")


WORKLOADS = ("nosharing", "sharedprefix", "samples", "chat", "extraction", "extractionfree")
