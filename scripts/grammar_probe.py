"""Grammar libraries on the bench's extraction schema: xgrammar against llguidance on this CPU.

Compile time, then the mask fill per token along a random valid object (one row), then 256
rows at once inside a maxLength string (each library's threaded batch filler, 2 threads), over
the tiny tokenizer padded to Llama-3.1's 128,256 tokens. Needs xgrammar and llguidance:
    python scripts/grammar_probe.py
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from benchmarks.tokenizer import write_padded_tokenizer
from benchmarks.workloads import EXTRACTION_SCHEMA

VOCAB = 128256
ROWS = 256


def walk(fill: Callable[[torch.Tensor], None], accept: Callable[[int], bool], done: Callable[[], bool],
         bitmask: torch.Tensor, steps: int = 400) -> tuple[int, float, float]:
    """Tokens walked, median and max fill time (ms): each step fills row 0 and accepts a random allowed token."""
    rng = np.random.default_rng(0)
    times: list[float] = []
    while len(times) < steps and not done():
        start = time.perf_counter()
        fill(bitmask)
        times.append(time.perf_counter() - start)
        allowed = np.nonzero(np.unpackbits(bitmask[0].numpy().view(np.uint8), bitorder="little")[:VOCAB])[0]
        assert accept(int(rng.choice(allowed)))
    return len(times), 1000 * float(np.median(times)), 1000 * max(times)


def main() -> None:
    model_dir = Path(tempfile.mkdtemp())
    (model_dir / "config.json").write_text(json.dumps({"vocab_size": VOCAB, "eos_token_id": [128001, 128008, 128009]}))
    write_padded_tokenizer(model_dir)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    schema = json.dumps(EXTRACTION_SCHEMA)

    import xgrammar as xgr

    start = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=VOCAB)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    grammar = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False).compile_json_schema(
        schema, any_whitespace=False)
    compile_s = time.perf_counter() - start
    matcher = xgr.GrammarMatcher(grammar)
    bitmask = xgr.allocate_token_bitmask(ROWS, VOCAB)
    steps, median, worst = walk(lambda b: matcher.fill_next_token_bitmask(b, 0), matcher.accept_token,
                                matcher.is_terminated, bitmask)
    matchers = [xgr.GrammarMatcher(grammar) for _ in range(ROWS)]
    for m in matchers:
        m.accept_string('{"title": "ab')
    start = time.perf_counter()
    xgr.BatchGrammarMatcher(2).batch_fill_next_token_bitmask(matchers, bitmask)
    batch = time.perf_counter() - start
    print(f"xgrammar: tokenizer set-up {setup:.2f} s, compile {1000 * compile_s:.1f} ms, walk of {steps} tokens: "
          f"fill median {median:.3f} ms, max {worst:.3f} ms; {ROWS} rows in a string {1000 * batch:.2f} ms")

    import llguidance
    import llguidance.hf
    import llguidance.torch as llg_torch

    start = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=VOCAB)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    spec = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    matcher = llguidance.LLMatcher(lltok, spec)
    compile_s = time.perf_counter() - start
    assert not matcher.is_error(), matcher.get_error()
    bitmask = llg_torch.allocate_token_bitmask(ROWS, VOCAB)
    steps, median, worst = walk(lambda b: llg_torch.fill_next_token_bitmask(matcher, b, 0), matcher.consume_token,
                                matcher.is_stopped, bitmask)
    matchers = [llguidance.LLMatcher(lltok, spec) for _ in range(ROWS)]
    prefix = tokenizer.encode('{"title":"ab', add_special_tokens=False)  # its compact JSON has no spaces
    for m in matchers:
        m.consume_tokens(prefix)
    start = time.perf_counter()
    llg_torch.fill_next_token_bitmask_par(llguidance.LLExecutor(2), [(m, i) for i, m in enumerate(matchers)], bitmask)
    batch = time.perf_counter() - start
    print(f"llguidance: tokenizer set-up {setup:.2f} s, matcher (compiles lazily) {1000 * compile_s:.1f} ms, walk of "
          f"{steps} tokens: fill median {median:.3f} ms, max {worst:.3f} ms; {ROWS} rows in a string {1000 * batch:.2f} ms")


if __name__ == "__main__":
    main()
