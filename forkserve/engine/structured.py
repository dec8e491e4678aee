"""Structured outputs in the core: requests wait out their grammar's compile, each sequence keeps
its grammar position, and each step's token mask is built here and handed to the worker as a
plain host bitmask (`TokenBitmask`), which its sampler applies before any other stage.

With async scheduling a step's mask is filled while the GPU runs its forward (the worker calls
`launched_bitmask` back once the forward is queued); a sequence whose newest token the previous
step draws takes that token early (`GrammarState.accept_early`).
"""
from __future__ import annotations

import itertools
import logging
from concurrent.futures import FIRST_COMPLETED, wait
from typing import Any, Callable, Iterable

from forkserve.engine.sequence import Request, Sequence, SequenceStatus
from forkserve.structured.grammars import Grammars
from forkserve.structured.matcher import GrammarState
from forkserve.structured.params import StructuredOutputsParams
from forkserve.worker.plan import DrawRequest, TokenBitmask
from forkserve.worker.worker import LaunchedStep

logger = logging.getLogger(__name__)


class StructuredOutputs:
    """One engine's grammars (made at the first constrained request) and its requests still compiling."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Iterable[int], pin_bitmask: bool) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._stop_token_ids = stop_token_ids
        self._pin_bitmask = pin_bitmask
        self._grammars: Grammars | None = None
        self.compiling: list[Request] = []  # constrained requests whose grammar is still compiling, in order

    @property
    def grammars(self) -> Grammars:
        """The structured-output grammars (xgrammar over the tokenizer's vocabulary, padded to the model's)."""
        if self._grammars is None:
            if self._tokenizer is None:
                raise ValueError("invalid StructuredOutputsParams: structured outputs need a tokenizer "
                                 "(skip_tokenizer_init is set)")
            try:
                self._grammars = Grammars(self._tokenizer, self._vocab_size, self._stop_token_ids,
                                          self._pin_bitmask)
            except ImportError as err:
                raise ValueError(f"invalid StructuredOutputsParams: {err}") from None
        return self._grammars

    def check(self, spec: StructuredOutputsParams) -> None:
        """Parse a constraint (a ValueError naming what is wrong)."""
        self.grammars.check(spec)

    def route(self, requests: list[Request]) -> list[Request]:
        """Start the constrained requests' compiles; those compiling wait here, the rest are returned."""
        ready = []
        for request in requests:
            spec = request.params.structured_outputs
            if spec is not None:
                request.grammar = self.grammars.submit(spec)
                if not request.grammar.done():
                    self.compiling.append(request)
                    continue
            ready.append(request)
        return ready

    @staticmethod
    def start(requests: list[Request]) -> None:
        """Each constrained request's first sequence at the start of its grammar (before it is queued)."""
        for request in requests:
            if request.grammar is not None:
                request.seqs[0].grammar = GrammarState.start(request.grammar)

    def compiled(self, idle: bool) -> tuple[list[Request], list[Request]]:
        """The waiting requests whose grammars compiled (to queue) and those whose compile failed
        (ended with finish_reason "abort", their error logged). When `idle` (nothing else can
        run), wait for the first compile rather than spin."""
        if idle:
            wait([request.grammar for request in self.compiling], return_when=FIRST_COMPLETED)
        done = [request for request in self.compiling if request.grammar.done()]
        if not done:
            return [], []
        self.compiling = [request for request in self.compiling if not request.grammar.done()]
        failed = [request for request in done if request.grammar.exception() is not None]
        for request in failed:
            logger.error("request %s: its grammar failed to compile: %s", request.request_id,
                         request.grammar.exception())
            _drop_uncompiled(request)
        return [request for request in done if request.grammar.exception() is None], failed

    def abort(self, request: Request) -> bool:
        """End a request still waiting for its grammar; False when it is not waiting here."""
        if request not in self.compiling:
            return False
        self.compiling.remove(request)
        _drop_uncompiled(request)
        return True

    def child_grammar(self, parent: Sequence, request: Request) -> GrammarState | None:
        """A fork continues its parent's grammar position when it keeps the parent's constraint
        (samples, and tree-search forks with the same structured_outputs); a fork under another
        constraint starts that one afresh (compiled now if needed)."""
        spec = request.params.structured_outputs
        if spec is None:
            return None
        if parent.grammar is not None and parent.request.params.structured_outputs == spec:
            return parent.grammar.fork()
        if request.grammar is None:
            self.grammars.check(spec)
            request.grammar = self.grammars.submit(spec)
        return GrammarState.start(request.grammar)

    def launched_bitmask_source(self, samplers: list[Sequence], previous: LaunchedStep | None
                                ) -> Callable[[], TokenBitmask | None] | None:
        """What a step queued ahead (async scheduling) calls for its token mask once its forward is
        queued (None: no sampler is constrained)."""
        if self._grammars is None or all(seq.grammar is None for seq in samplers):
            return None
        return lambda: self.launched_bitmask(samplers, previous)

    def launched_bitmask(self, samplers: list[Sequence], previous: LaunchedStep | None) -> TokenBitmask | None:
        """The token mask of a step queued ahead, one row per sequence, filled while the GPU runs
        its forward: a constrained sequence whose newest token the previous step draws waits for
        that step's tokens (done before this forward is) and takes its token early. Rows whose
        grammar is complete (their token will be dropped) draw freely."""
        constrained = [(row, seq) for row, seq in enumerate(samplers) if seq.grammar is not None]
        if previous is not None and any(seq.num_pending for _, seq in constrained):
            tokens = previous.result().token_ids
            for _, seq in constrained:
                if seq.num_pending:
                    seq.grammar.accept_early(tokens[seq.pending_row])
        rows = [row for row, seq in constrained if seq.grammar.open]
        if not rows:
            return None
        words = self.grammars.bitmask(len(samplers))
        self.grammars.fill_bitmask([samplers[row].grammar for row in rows], words, rows)
        return TokenBitmask(words, rows)

    def token_bitmask(self, samplers: list[Sequence], draws: list[DrawRequest]) -> TokenBitmask | None:
        """The allowed tokens of a synchronous step's constrained draw rows (None, and no work,
        without any); a sequence that forks here gives each of its draw rows its own mask."""
        constrained = [i for i, seq in enumerate(samplers) if seq.grammar is not None and draws[i].rows]
        if not constrained:
            return None
        first_row = list(itertools.accumulate((len(d.rows) for d in draws), initial=0))
        words = self.grammars.bitmask(first_row[-1])
        self.grammars.fill_bitmask([samplers[i].grammar for i in constrained], words,
                                   [first_row[i] for i in constrained])
        rows = []
        for i in constrained:
            start, stop = first_row[i], first_row[i + 1]
            words[start + 1:stop] = words[start]
            rows.extend(range(start, stop))
        return TokenBitmask(words, rows)


def _drop_uncompiled(request: Request) -> None:
    """End a request that never reached the scheduler (its grammar did not compile, or it was aborted)."""
    seq = request.seqs[0]
    seq.status, seq.finish_reason = SequenceStatus.FINISHED, "abort"
