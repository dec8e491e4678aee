"""Continuous batching: which sequences compute how many tokens in the next step.

Running sequences go first (a decode token, or the next prefill chunk), then waiting ones in the
planner's order, under the token budget (max_num_batched_tokens), max_num_seqs and KV memory:
with `reserve_output_kv` a sequence is admitted only while the pool (free plus evictable pages)
also holds what every running sequence and it still need to reach max_tokens, so admitted work
runs to the end without preemption (memory-centric batching); when nothing runs, the head is
admitted regardless so that work always moves. The planner gates admission on shared prefixes
(see planner.py).

Finished sequences of tree and beam search are *held*: they keep their KV so that forks from
them start from it; forks may also wait for admission with KV. Such parked KV is the first thing
given up when pages run out. Next, a pinned shared prefix that no live sequence is on gives way,
but only when there is nothing left to preempt, or nothing runs and the head of the queue cannot
be admitted: pins never deadlock a small pool, and otherwise outlast LRU. Last, the newest
running sequence is preempted: its KV is released (full pages stay in the tree as cache) and it
is recomputed later from its tokens, so nothing is lost and its output does not change.

Fair sharing (`fair`, set by the server, where requests arrive over time; a planned batch keeps
the planner's order): the step's rows go round-robin between requests, so one request with
many sequences (n=1024) takes one row in turn like any other, and within a request its
sequences take turns fewest-tokens-first. A request with nothing running is admitted past the
max_num_seqs seats (which then bound the step's rows, not the running set) while fewer than
max_num_seqs requests run; its output-KV reservation check counts each request's need only up
to an equal share of the pool (its own too), so a huge request's reservation (n=1024, long
max_tokens) cannot lock the others out, nor theirs it. When pages run out, preemption takes from
the back of the round-robin order: the tail of the request with the most sequences.
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass

from forkserve.config import MIN_SHARED_PREFIX_LEN
from forkserve.engine.planner import BatchPlanner
from forkserve.engine.sequence import Sequence, SequenceStatus
from forkserve.engine.tree import PrefixTree


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """True when this step computes the sequence's last known token, so a new one is drawn."""
        return self.seq.num_computed_tokens + self.num_new_tokens == len(self.seq.token_ids)


class Scheduler:
    def __init__(self, tree: PrefixTree, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 enable_chunked_prefill: bool = True, reserve_output_kv: bool = True,
                 min_shared_prefix_len: int = MIN_SHARED_PREFIX_LEN) -> None:
        self.tree = tree
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.reserve_output_kv = reserve_output_kv
        self.max_model_len = max_model_len
        self.planner = BatchPlanner(tree, max_model_len, min_shared_prefix_len)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.held: dict[Sequence, None] = {}  # finished sequences keeping their KV, oldest first
        self.fair = False  # share each step's rows between requests (see the module's docstring)
        self.num_preemptions = 0
        self.num_steps = 0

    def add(self, seq: Sequence) -> None:
        self.add_batch([seq])

    def add_running(self, seq: Sequence) -> None:
        """A fork of a running sequence that has its KV: it runs from the next step on, beside its parent."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def add_batch(self, seqs: list[Sequence]) -> None:
        """Queue sequences submitted together, in the planner's order."""
        for seq in seqs:
            seq.arrival_step = self.num_steps
        self.waiting.extend(self.planner.plan(seqs))

    def prioritize_cached(self) -> None:
        """Reorder the waiting queue by cached-prefix match, with ageing (for arrivals over time)."""
        self.waiting = deque(self.planner.cache_order(self.waiting, self.num_steps))

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.planner.num_parked)

    def schedule(self) -> list[ScheduledSeq]:
        self.num_steps += 1
        if self.fair and len(self.running) > 1:
            self.running = _round_robin(self.running)
        budget = self.max_num_batched_tokens
        batch: list[ScheduledSeq] = []
        preempted = False
        i = 0
        page_size = self.tree.page_size
        # Forks can leave more than max_num_seqs running; the rest wait for a later step.
        while i < len(self.running) and budget > 0 and len(batch) < self.max_num_seqs:
            seq = self.running[i]
            if seq.final_in_flight:  # its last token is being drawn: nothing left to compute
                i += 1
                continue
            n = min(len(seq.token_ids) - seq.num_computed_tokens, budget)
            end = seq.num_computed_tokens + n
            # Most decode steps fit in the pages a sequence holds: only past them is a reservation made.
            while end > seq.kv.capacity(page_size) and not self._reserve(seq, end):
                if self.running[-1] is seq and self.planner.drop_idle_pin():
                    continue  # nothing else left to preempt: a pinned prefix nobody is on gives way
                # Preempt from the back: those were admitted last and are not scheduled yet.
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                batch.append(ScheduledSeq(seq, n))
                budget -= n
                i += 1
        if not preempted:
            self._admit(batch, budget)
        return batch

    def after_step(self, batch: list[ScheduledSeq]) -> None:
        """The step's KV is computed and published: let the planner pin prefixes and wake sequences."""
        self._requeue(self.planner.after_step(item.seq for item in batch))

    def _reserve_to_admit(self, seq: Sequence, num_tokens: int) -> bool:
        """Pages for an admission; when nothing runs, idle pinned prefixes give way (work must move)."""
        while not self._reserve(seq, num_tokens):
            if self.running or not self.planner.drop_idle_pin():
                return False
        return True

    def _pages_to_finish(self, seq: Sequence) -> int:
        """Pages seq still needs to reach max_tokens (none reserved ahead when max_tokens is None)."""
        max_tokens = seq.request.params.max_tokens
        if max_tokens is None:
            return 0
        # The last token's KV is never computed: it is sampled, then the sequence ends.
        page = self.tree.page_size
        final = min(seq.num_prompt_tokens + max_tokens, self.max_model_len) - 1
        held = len(seq.kv.path_pages) + len(seq.kv.own_pages)
        # Samples it forks into at its first draw share its prompt's full pages; each needs a copy
        # of the partial last page and its own output pages.
        forks = len(seq.request.pending_forks(seq)) * (-(-(final - seq.num_prompt_tokens) // page) + 1)
        return max(0, -(-final // page) - held) + forks

    def _admit(self, batch: list[ScheduledSeq], budget: int) -> None:
        if self.fair:
            budget = self._admit_unserved(batch, budget)
        committed: int | None = None  # pages the running sequences may still need, counted when first needed
        # Members parked on a prefix being computed hold seats: they run as soon as it is published.
        # So a new group starts only where its members fit beside them, and whole groups run together
        # (each decode step then reads fewer shared prefixes, each for more sequences).
        while self.waiting and budget > 0 and \
                len(self.running) + (self.planner.num_parked if self.running else 0) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.kv is None and not self.planner.gate(seq):
                self.waiting.popleft()  # parked until the prefix it shares is published
                continue
            if committed is None and self.reserve_output_kv and self.running:
                committed = sum(self._pages_to_finish(s) for s in self.running)
            n = self._start(seq, batch, budget, committed)
            if n is None:
                return
            if committed is not None:
                committed += self._pages_to_finish(seq)
            budget -= n

    def _admit_unserved(self, batch: list[ScheduledSeq], budget: int) -> int:
        """Fair sharing: admit waiting sequences of requests with nothing running, past the seats
        (while fewer than max_num_seqs requests run); returns the budget left."""
        served = {seq.request for seq in self.running}
        for seq in list(self.waiting):
            if budget <= 0 or len(served) >= self.max_num_seqs:
                break
            if seq.request in served:
                continue
            if seq.kv is None and not self.planner.gate(seq):
                self.waiting.remove(seq)  # parked until the prefix it shares is published
                continue
            committed, share = self._fair_shares() if self.reserve_output_kv and self.running else (None, None)
            n = self._start(seq, batch, budget, committed, share)
            if n is None:
                break  # no room for its share yet: it stays first in line
            served.add(seq.request)
            budget -= n
        return budget

    def _fair_shares(self) -> tuple[int, int]:
        """(pages the running requests may still need, each counted up to an equal share of the
        pool; that share, for one more request)."""
        need: dict[object, int] = {}
        for running in self.running:
            need[running.request] = need.get(running.request, 0) + self._pages_to_finish(running)
        share = self.tree.pool.num_pages // (len(need) + 1)
        return sum(min(pages, share) for pages in need.values()), share

    def _start(self, seq: Sequence, batch: list[ScheduledSeq], budget: int, committed: int | None,
               share: int | None = None) -> int | None:
        """Move seq from waiting to running for up to `budget` tokens this step, if it fits (with
        `committed`, the pages the running sequences may still need, reserved beside its own, or
        beside at most `share` of them); the tokens scheduled, or None (it stays waiting, holding
        nothing)."""
        if seq.kv is None:
            # At least one token is always computed: its logits are needed to sample. Prompt
            # logprobs need every prompt position's logits, so such a prompt skips the cache (as in vLLM).
            seq.kv = self.tree.acquire(seq.token_ids[:-1] if not seq.request.wants_prompt_logprobs else [])
            seq.num_computed_tokens = seq.kv.prefix_len
            if seq.request.num_cached_tokens is None:
                seq.request.num_cached_tokens = seq.kv.num_cached_tokens
        remaining = len(seq.token_ids) - seq.num_computed_tokens
        n = min(remaining, budget)
        fits = n == remaining or self.enable_chunked_prefill
        if fits and committed is not None:
            room = self.tree.num_free_pages + self.tree.num_evictable_pages
            own = self._pages_to_finish(seq)
            fits = committed + (own if share is None else min(own, share)) <= room
        if not fits or not self._reserve_to_admit(seq, seq.num_computed_tokens + n):
            self.tree.release(seq.kv)
            seq.kv = None
            seq.num_computed_tokens = 0
            return None
        if self.waiting[0] is seq:
            self.waiting.popleft()
        else:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        self.planner.admitted(seq)
        batch.append(ScheduledSeq(seq, n))
        return n

    def _requeue(self, seqs: list[Sequence]) -> None:
        """Put woken sequences at the front of the waiting queue, keeping their order."""
        self.waiting.extendleft(reversed(seqs))

    def _preempt(self, seq: Sequence) -> None:
        """Give back the sequence's pages; its computed full pages stay in the tree as cache."""
        self.tree.release(seq.kv, seq.token_ids[:seq.num_computed_tokens])
        seq.kv = None
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._requeue(self.planner.released(seq, leaves=False))
        self.waiting.appendleft(seq)

    def _reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Pages for num_tokens of seq, giving up parked KV while that helps."""
        while not self.tree.reserve(seq.kv, num_tokens):
            if not self.drop_parked(keep=seq):
                return False
        return True

    def drop_parked(self, keep: Sequence | None = None) -> bool:
        """Release one parked KV (but keep's) to the cache; False if there was none.

        Parked KV belongs to sequences that are not running: held ones (oldest first), then
        forks waiting for admission (newest first). Giving it up costs a recompute later,
        never a failure, so it goes before any running sequence is preempted.
        """
        for seq in itertools.chain(self.held, reversed(self.waiting)):
            if seq is not keep and seq.kv is not None:
                self.tree.release(seq.kv, seq.token_ids[:seq.num_computed_tokens])
                seq.kv = None
                seq.num_computed_tokens = 0
                return True
        return False

    def finish(self, seq: Sequence, hold: bool = False) -> None:
        """End a sequence: release its KV (full pages stay as cache), or hold it for forks."""
        self._remove(seq)
        if hold:
            self.held[seq] = None
        elif seq.kv is not None:
            self.tree.release(seq.kv, seq.token_ids[:seq.num_computed_tokens])
            seq.kv = None
        seq.status = SequenceStatus.FINISHED
        self._requeue(self.planner.released(seq, leaves=True))

    def resume(self, seq: Sequence) -> None:
        """Queue a held sequence to compute its remaining tokens (with its KV, if still held)."""
        self.held.pop(seq, None)
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def abort(self, seq: Sequence, forget: bool = False) -> None:
        """Drop a sequence wherever it is, freeing its pages at once.

        With forget, tree pages that nobody else holds go back to the pool too instead of
        staying as cache (a pruned search branch will not be asked for again).
        """
        self._remove(seq)
        self.held.pop(seq, None)
        if seq.kv is not None:
            self.tree.release(seq.kv, forget=forget)
            seq.kv = None
        seq.status = SequenceStatus.FINISHED
        self._requeue(self.planner.released(seq, leaves=True))

    def _remove(self, seq: Sequence) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)


def _round_robin(running: list[Sequence]) -> list[Sequence]:
    """Running sequences in turns between requests: each request's first, then each one's second...
    (requests in the order they first appear); within a request, fewest tokens first, so that its
    sequences take turns."""
    order: dict[object, list[Sequence]] = {}
    for seq in running:
        order.setdefault(seq.request, []).append(seq)
    ranked = []
    for position, seqs in enumerate(order.values()):
        seqs.sort(key=lambda s: (len(s.token_ids), s.index))
        ranked += [(rank, position, seq) for rank, seq in enumerate(seqs)]
    ranked.sort(key=lambda item: (item[0], item[1]))
    return [seq for _, _, seq in ranked]
