"""Per-sequence grammar state: an xgrammar matcher that has accepted the sequence's output so far.

Forks (samples, tree-search children) take `fork()` copies, so each continues from the
parent's position on its own. `Grammars.fill_bitmask` reads these states to build a step's mask.

With async scheduling a step's mask is filled while the previous step's tokens are still
pending in the engine: the state then takes the newest token early (`accept_early`), and the
engine's own accounting of that token (`accept`) consumes the early result instead of
accepting it twice.
"""
from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from forkserve.structured.grammars import import_xgrammar


class GrammarState:
    """Where one sequence stands in its grammar."""

    __slots__ = ("matcher", "early", "rejected")

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher
        self.early = 0  # tokens accepted ahead of the engine's accounting (at most one)
        self.rejected = False  # an early token was refused: the engine ends the sequence when it gets there

    @classmethod
    def start(cls, compiled: Future) -> "GrammarState":
        """A fresh state at the start of the grammar (waits for the compile if it is still running)."""
        return cls(import_xgrammar().GrammarMatcher(compiled.result()))

    def fork(self) -> "GrammarState":
        """An independent copy at the same position: a sample or search fork continues from here
        (forks happen where the engine has accounted for every token, so nothing is early)."""
        assert not self.early, "a grammar state forked with a token accepted early"
        return GrammarState(self.matcher.fork())

    def accept(self, token: int) -> bool:
        """Advance by a sampled token; False if the grammar did not allow it (the mask was wrong)."""
        if self.early:
            self.early -= 1
            return not self.rejected
        return self.matcher.accept_token(token)

    def accept_early(self, token: int) -> None:
        """Take the newest token before the engine accounts for it (to fill the next step's mask)."""
        self.early += 1
        self.rejected = self.rejected or not self.matcher.accept_token(token)

    @property
    def open(self) -> bool:
        """More tokens may follow: neither terminated nor broken by a refused token."""
        return not self.rejected and not self.matcher.is_terminated()

    @property
    def terminated(self) -> bool:
        """The grammar is complete and its stop token accepted: nothing may follow."""
        return self.matcher.is_terminated()
