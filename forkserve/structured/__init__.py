"""Structured outputs: JSON schema, regex, choice and grammar constraints through xgrammar.

- `params.StructuredOutputsParams`: what a request asks for (vLLM's names), checked when built.
- `grammars.Grammars`: the constraints parsed up front (a bad one is a ValueError naming the
  field before the request runs), compiled against the tokenizer's vocabulary in a thread pool
  off the step loop, cached by (kind, text).
- `matcher.GrammarState`: one sequence's position in its grammar (accepted tokens, forks), and
  `fill_bitmask`, which fills the constrained rows of a step's token bitmask in xgrammar's
  native threads. The sampler applies the bitmask as a tensor and knows nothing of grammars.
"""
from forkserve.structured.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
