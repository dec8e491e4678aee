"""End-of-batch summary: what a batch computed against what it had to, from two `Engine.stats()`."""
from __future__ import annotations

# Reported as they stand at the end rather than as differences.
LEVELS = ("peak_pages_in_use", "pages_in_use", "kv_pages")


def batch_summary(before: dict[str, int | float], after: dict[str, int | float]) -> dict[str, int | float]:
    """Counters over the batch, plus `prefix_reuse`: the share of prompt tokens not computed.

    prefix_reuse can go below 0 when preemption recomputes more than the prefix tree saved.
    """
    out = {k: v if k in LEVELS else v - before.get(k, 0) for k, v in after.items()}
    prompt = out.get("prompt_tokens", 0)
    out["prefix_reuse"] = round(1 - out.get("prefill_tokens_computed", 0) / prompt, 4) if prompt else 0.0
    return out


def describe(summary: dict[str, int | float]) -> str:
    s = summary
    unique = s["unique_prompt_tokens"]
    ratio = f" ({s['prefill_tokens_computed'] / unique:.3f}x unique)" if unique else ""
    return (f"batch summary: {s['prompt_tokens']} prompt tokens, {unique} unique, "
            f"{s['prefill_tokens_computed']} prefill tokens computed{ratio}, prefix reuse {s['prefix_reuse']:.1%}, "
            f"peak {s['peak_pages_in_use']} of {s['kv_pages']} KV pages, {s['preemptions']} preemptions, "
            f"{s['pins_dropped']} pinned prefixes dropped")
