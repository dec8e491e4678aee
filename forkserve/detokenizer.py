"""Incremental detokenisation: each new token decoded once, in a short window, never the whole text again.

Decoding the tokens one at a time does not give the text of decoding them together (a byte-level
token may hold half of a UTF-8 character; a tokenizer may drop or merge spaces at the edges). So
each update decodes a window: the tokens of the previous update's text plus the new ones, and the
text it adds beyond what the previous tokens alone decode to is the new text. A window whose text
ends in an unfinished character (U+FFFD) waits for the next token.
"""
from __future__ import annotations

from typing import Any, Sequence

INCOMPLETE = "\ufffd"


class IncrementalDetokenizer:
    """The text of a growing token list (a sequence's output), kept up to date token by token."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.text = ""
        self.num_tokens = 0  # tokens taken so far
        self._window: list[int] = []  # the last emitted tokens, then those not yet emitted
        self._emitted = 0  # tokens of _window whose text is in self.text

    def update(self, token_ids: Sequence[int], start: int, end: int) -> str:
        """Take token_ids[start + num_tokens : end] (the output continues at `start`); return the new text."""
        first = start + self.num_tokens
        if first >= end:
            return ""
        self._window.extend(token_ids[first:end])
        self.num_tokens = end - start
        decode = self.tokenizer.decode
        before = decode(self._window[:self._emitted], skip_special_tokens=self.skip_special_tokens) \
            if self._emitted else ""
        after = decode(self._window, skip_special_tokens=self.skip_special_tokens)
        if len(after) <= len(before) or after.endswith(INCOMPLETE):
            return ""  # nothing printable yet: wait for more tokens
        new = after[len(before):]
        self._window = self._window[self._emitted:]
        self._emitted = len(self._window)
        self.text += new
        return new
