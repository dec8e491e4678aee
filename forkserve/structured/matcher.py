"""Per-sequence grammar state: an xgrammar matcher that has accepted the sequence's output so far.

Forks (samples, tree-search children) take `fork()` copies, so each continues from the
parent's position on its own. `Grammars.fill_bitmask` reads these states to build a step's mask.
"""
from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from forkserve.structured.grammars import import_xgrammar


class GrammarState:
    """Where one sequence stands in its grammar."""

    __slots__ = ("matcher",)

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher

    @classmethod
    def start(cls, compiled: Future) -> "GrammarState":
        """A fresh state at the start of the grammar (waits for the compile if it is still running)."""
        return cls(import_xgrammar().GrammarMatcher(compiled.result()))

    def fork(self) -> "GrammarState":
        """An independent copy at the same position: a sample or search fork continues from here."""
        return GrammarState(self.matcher.fork())

    def accept(self, token: int) -> bool:
        """Advance by a sampled token; False if the grammar did not allow it (the mask was wrong)."""
        return self.matcher.accept_token(token)

    @property
    def terminated(self) -> bool:
        """The grammar is complete and its stop token accepted: nothing may follow."""
        return self.matcher.is_terminated()
