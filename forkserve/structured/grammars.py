"""Constraints to compiled grammars: parsed up front, compiled off the step loop, cached.

Parsing a JSON schema, regex or EBNF text into an xgrammar `Grammar` takes well under a
millisecond and finds every error in it, so `Grammars.check` does that when a request is
validated: a bad constraint is a ValueError naming the field before anything runs. Compiling a
grammar against the vocabulary (each token's bytes tried against the grammar's states) takes
milliseconds to seconds, so it runs in a thread pool: `submit` returns a future, and the engine
keeps a request whose grammar is not compiled yet out of the scheduler while others run.
Both steps are cached by the constraint's (kind, text, whitespace) key.
"""
from __future__ import annotations

import json
import re
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch

from forkserve.structured.params import StructuredOutputsParams

if TYPE_CHECKING:
    from forkserve.structured.matcher import GrammarState

COMPILE_THREADS = 2  # grammars compiled at once; xgrammar also spreads one compile over its own threads
_NATIVE_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # xgrammar's "[time] file.cc:line: " before a message


def import_xgrammar() -> Any:
    """xgrammar, or an error that says how to install it."""
    try:
        import xgrammar
    except ImportError as err:
        raise ImportError("structured outputs need xgrammar: pip install 'forkserve[structured]' "
                          f"(or pip install xgrammar): {err}") from None
    return xgrammar


class Grammars:
    """One engine's grammar compiler: vocabulary, parse and compile caches, thread pool."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Iterable[int], pin_bitmask: bool = False
                 ) -> None:
        """`vocab_size` is the model's (its logits' width): token ids the tokenizer lacks are never
        allowed. `stop_token_ids` end a complete grammar (the engine's EOS ids). `pin_bitmask`:
        the step bitmask lives in pinned memory (its copy to a GPU does not wait for the stream)."""
        xgr = self._xgr = import_xgrammar()
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=sorted(stop_token_ids))
        self.vocab_size = vocab_size
        self._compiler = xgr.GrammarCompiler(info, max_threads=COMPILE_THREADS, cache_enabled=False)
        self._pool = ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="grammar-compile")
        self._parsed: dict[tuple[str, str, bool], Any] = {}
        self._compiled: dict[tuple[str, str, bool], Future] = {}
        self._filler = xgr.BatchGrammarMatcher()
        self._pin_bitmask = pin_bitmask
        self._bitmasks = [xgr.allocate_token_bitmask(0, vocab_size) for _ in range(2)]
        self._steps = 0

    def check(self, spec: StructuredOutputsParams) -> None:
        """Parse the constraint (cached); a ValueError naming its field if it is invalid."""
        key = spec.key
        if key in self._parsed:
            return
        kind, text, any_whitespace = key
        grammar = self._xgr.Grammar
        try:
            if kind == "json":
                parsed = grammar.from_json_schema(text, any_whitespace=any_whitespace)
            elif kind == "json_object":
                parsed = grammar.from_json_schema(json.dumps({"type": "object"}), any_whitespace=any_whitespace,
                                                  strict_mode=False)
            elif kind == "regex":
                parsed = grammar.from_regex(text)
            elif kind == "choice":
                parsed = grammar.from_ebnf("root ::= " + " | ".join(_ebnf_literal(c) for c in json.loads(text)))
            else:
                parsed = grammar.from_ebnf(text)
        except (RuntimeError, ValueError) as err:
            message = _NATIVE_PREFIX.sub("", str(err).strip()).splitlines()[0] if str(err).strip() else repr(err)
            raise ValueError(f"invalid StructuredOutputsParams: {kind} is not a valid "
                             f"{_WHAT[kind]}: {message}") from None
        self._parsed[key] = parsed

    def submit(self, spec: StructuredOutputsParams) -> Future:
        """The compiled grammar of a checked constraint, as a future (compiled once per key)."""
        key = spec.key
        future = self._compiled.get(key)
        if future is None:
            future = self._compiled[key] = self._pool.submit(self._compiler.compile_grammar, self._parsed[key])
        return future

    def bitmask(self, rows: int) -> torch.Tensor:
        """A [rows, ceil(vocab / 32)] int32 host bitmask (32 tokens a word) for one step. Two buffers
        serve alternate steps: a step's copy to the GPU may still be queued while the next step
        (queued ahead) fills its mask, and the engine has read that step's draws, so its copy has
        run, before the step after fills the same buffer again. Rows keep old masks: only the rows
        a step fills are read."""
        index = self._steps % 2
        self._steps += 1
        if self._bitmasks[index].shape[0] < rows:
            with torch.inference_mode(False):  # a step may ask inside the runner's inference mode; copies write it outside
                words = self._xgr.allocate_token_bitmask(max(rows, 2 * self._bitmasks[index].shape[0]),
                                                         self.vocab_size)
                self._bitmasks[index] = words.pin_memory() if self._pin_bitmask else words
        return self._bitmasks[index][:rows]

    def fill_bitmask(self, states: Sequence[GrammarState], bitmask: torch.Tensor, rows: list[int]) -> None:
        """Write states[i]'s allowed next tokens into bitmask row rows[i], the rows in xgrammar's
        native threads (the host work a constrained step adds)."""
        self._filler.batch_fill_next_token_bitmask([state.matcher for state in states], bitmask, rows)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _ebnf_literal(text: str) -> str:
    """An EBNF string literal matching exactly `text`."""
    return '"' + "".join(c if c.isprintable() and c not in '"\\' else f"\\u{ord(c):04x}" if ord(c) < 0x10000
                         else f"\\U{ord(c):08x}" for c in text) + '"'


_WHAT = {"json": "JSON schema", "json_object": "JSON object grammar", "regex": "regular expression",
         "choice": "list of choices", "grammar": "EBNF grammar"}
