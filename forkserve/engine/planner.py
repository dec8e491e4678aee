"""Which waiting sequence runs next: whole-batch prefix planning (BatchLLM) and cache-aware order.

A batch is planned before anything of it runs. Sorting its prompts lays them out in depth-first
order of their prefix trie, and the longest common prefixes of neighbours give the trie's shared
nodes (LCP intervals). Every shared node at least `min_shared_len` tokens long (page-aligned, so
it is exactly what the prefix tree can share) becomes a `SharedPrefix`:

- its first member to be admitted is its leader and computes it; a member that comes to
  admission while the leader has not yet published the prefix's pages is parked (kept out of
  the waiting queue) and put back at the front once they are, so the prefix is prefilled once
  rather than by every member admitted in the same step;
- once published, the prefix is pinned until every member has finished prefill, so LRU
  eviction cannot push it out while members still need it;
- a pin nobody is using (no live sequence on its path) gives way when the pool cannot
  otherwise make room, before anything is preempted, so pins can never deadlock a small pool.

Members of a shared prefix are contiguous in the plan; inside one, members with the largest
decode/prefill ratio go first so their decode tokens mix with the later members' prefill chunks.
Top-level items keep the batch's order, so a batch with no sharing runs first come, first served.

Requests arriving one at a time (the server) are ordered by `cache_order` instead.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable

from forkserve.config import MIN_SHARED_PREFIX_LEN
from forkserve.engine.sequence import Sequence
from forkserve.engine.tree import PrefixTree, TreeNode, common_prefix_len

logger = logging.getLogger(__name__)

# A waiting sequence passed over for better cache matches this many steps goes first (no starvation).
MAX_WAIT_STEPS = 256

Interval = tuple[int, int, int]  # (shared length, first, last) over a batch sorted by tokens


@dataclass(eq=False)
class SharedPrefix:
    """A page-aligned prefix shared by two or more sequences of one planned batch."""

    source: list[int]  # one member's prompt; the prefix is source[:length]
    length: int
    rank: int  # plan position of its first member: the latest-ranked idle pin gives way first
    members_left: int  # members that have not finished prefill
    leader: Sequence | None = None  # the member computing it, until its pages are published
    node: TreeNode | None = None  # the pinned tree node, once published
    parked: list[Sequence] = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        return self.source[:self.length]


class BatchPlanner:
    """Plans batches and gates admission on shared prefixes; the scheduler asks it at each step."""

    def __init__(self, tree: PrefixTree, max_model_len: int, min_shared_len: int = MIN_SHARED_PREFIX_LEN,
                 max_wait_steps: int = MAX_WAIT_STEPS) -> None:
        self.tree = tree
        self.max_model_len = max_model_len
        self.min_shared_len = max(min_shared_len, tree.page_size)
        self.max_wait_steps = max_wait_steps
        self._paths: dict[Sequence, list[SharedPrefix]] = {}  # until prefill ends; outermost first
        self._rank: dict[Sequence, int] = {}  # plan position of each sequence in _paths
        self._leading: dict[Sequence, list[SharedPrefix]] = {}
        self._pinned: list[SharedPrefix] = []
        self._next_rank = 0
        self.num_parked = 0
        self.unique_prompt_tokens = 0  # size of each planned batch's prompt trie, summed
        self.pins_dropped = 0

    # ------------------------------------------------------------------------------ planning
    def plan(self, seqs: list[Sequence]) -> list[Sequence]:
        """The batch in the order to admit it; registers its shared prefixes."""
        ps = self.tree.page_size
        by_tokens = sorted(seqs, key=lambda s: s.token_ids)
        exact = [0] + [common_prefix_len(a.token_ids, b.token_ids, ps) for a, b in zip(by_tokens, by_tokens[1:])]
        self.unique_prompt_tokens += sum(len(s.token_ids) for s in seqs) - sum(exact)
        if len(seqs) < 2 or not self.tree.enable_caching:
            return list(seqs)
        # What a sequence can take from the tree is a page-aligned run of its prompt minus the
        # last token (one token is always computed, for its logits).
        shared = [0] + [min(n, len(a.token_ids) - 1, len(b.token_ids) - 1) // ps * ps
                        for n, a, b in zip(exact[1:], by_tokens, by_tokens[1:])]
        intervals, chains = _shared_chains(shared, self.min_shared_len)
        if not intervals:
            return list(seqs)
        ratio = [self._decode_prefill_ratio(s, chain[-1][0] if chain else 0) for s, chain in zip(by_tokens, chains)]
        score = {iv: max(ratio[iv[1]:iv[2] + 1]) for iv in intervals}
        first_in_batch = {id(s): i for i, s in enumerate(seqs)}
        top_first: dict[Interval, int] = {}  # a top-level group's place is its first member's
        for i, chain in enumerate(chains):
            if chain:
                top_first[chain[0]] = min(top_first.get(chain[0], len(seqs)), first_in_batch[id(by_tokens[i])])

        def key(i: int) -> tuple:
            chain = chains[i]
            if not chain:
                return (first_in_batch[id(by_tokens[i])],)
            return ((top_first[chain[0]],) + tuple((-score[iv], iv[1]) for iv in chain[1:])
                    + ((-ratio[i], i),))

        order = sorted(range(len(by_tokens)), key=key)
        prefixes: dict[Interval, SharedPrefix] = {}
        for position, i in enumerate(order):
            seq = by_tokens[i]
            if not chains[i]:
                continue
            self._rank[seq] = self._next_rank + position
            path = []
            for iv in chains[i]:
                if iv not in prefixes:
                    prefixes[iv] = SharedPrefix(seq.token_ids, iv[0], self._next_rank + position, iv[2] - iv[1] + 1)
                path.append(prefixes[iv])
            self._paths[seq] = path
        self._next_rank += len(order)
        logger.info("planned %d sequences: %d shared prefixes of %d tokens in all",
                    len(seqs), len(prefixes), sum(p.length for p in prefixes.values()))
        return [by_tokens[i] for i in order]

    def _decode_prefill_ratio(self, seq: Sequence, shared_len: int) -> float:
        max_tokens = seq.request.params.max_tokens
        decode = max_tokens if max_tokens is not None else self.max_model_len - len(seq.token_ids)
        return decode / max(1, len(seq.token_ids) - shared_len)

    # ------------------------------------------------------------------------------ gating
    def gate(self, seq: Sequence) -> bool:
        """May seq be admitted now? If a prefix it shares is being computed by another, it is parked."""
        for prefix in self._paths.get(seq, ()):
            if prefix.leader is not None and prefix.leader is not seq:
                prefix.parked.append(seq)
                self.num_parked += 1
                return False
        return True

    def admitted(self, seq: Sequence) -> None:
        """seq got its KV: pin its shared prefixes that are cached, lead the computing of the rest."""
        for prefix in self._paths.get(seq, ()):
            if prefix.node is None and prefix.leader is None:
                if seq.kv.prefix_len >= prefix.length and self._pin(prefix):
                    continue
                prefix.leader = seq
                self._leading.setdefault(seq, []).append(prefix)

    def after_step(self, seqs: Iterable[Sequence]) -> list[Sequence]:
        """Pin prefixes whose leaders published them, retire members done with prefill.

        Returns the parked sequences to put back at the front of the waiting queue, in plan order.
        """
        woken: list[Sequence] = []
        for seq in seqs:
            leading = self._leading.get(seq)
            if leading:
                for prefix in [p for p in leading if seq.num_computed_tokens >= p.length]:
                    leading.remove(prefix)
                    prefix.leader = None
                    if not self._pin(prefix):
                        logger.debug("shared prefix of %d tokens was not in the tree after its prefill", prefix.length)
                    woken += self._unpark(prefix)
                if not leading:
                    del self._leading[seq]
            if seq.num_computed_tokens >= seq.num_prompt_tokens and seq in self._paths:
                self._retire(seq)
        return self._in_plan_order(woken)

    def released(self, seq: Sequence, leaves: bool) -> list[Sequence]:
        """seq gave its KV back (preempted, or it `leaves`: finished or aborted).

        Prefixes it was computing go back to no leader; their parked members are returned to
        be put at the front of the waiting queue (one of them leads next).
        """
        woken: list[Sequence] = []
        for prefix in self._leading.pop(seq, ()):
            prefix.leader = None
            woken += self._unpark(prefix)
        if leaves and seq in self._paths:
            for prefix in self._paths[seq]:
                if seq in prefix.parked:
                    prefix.parked.remove(seq)
                    self.num_parked -= 1
            self._retire(seq)
        return self._in_plan_order(woken)

    def drop_idle_pin(self) -> bool:
        """Unpin the latest-planned prefix that no live sequence is on, so eviction can take it.

        The caller is out of pages; its members recompute (or find) the prefix later.
        """
        idle = [p for p in self._pinned if p.node.ref_count == 0]
        if not idle:
            return False
        prefix = max(idle, key=lambda p: p.rank)
        self._unpin(prefix)
        self.pins_dropped += 1
        logger.info("out of KV pages: unpinned an idle shared prefix of %d tokens (%d members still to run)",
                    prefix.length, prefix.members_left)
        return True

    def _pin(self, prefix: SharedPrefix) -> bool:
        prefix.node = self.tree.pin_prefix(prefix.tokens)
        if prefix.node is not None:
            self._pinned.append(prefix)
        return prefix.node is not None

    def _unpin(self, prefix: SharedPrefix) -> None:
        self.tree.unpin(prefix.node)
        self._pinned.remove(prefix)
        prefix.node = None

    def _unpark(self, prefix: SharedPrefix) -> list[Sequence]:
        woken, prefix.parked = prefix.parked, []
        self.num_parked -= len(woken)
        return woken

    def _retire(self, seq: Sequence) -> None:
        """seq no longer needs its shared prefixes; the last member to go unpins each."""
        del self._rank[seq]
        for prefix in self._paths.pop(seq):
            prefix.members_left -= 1
            if prefix.members_left == 0 and prefix.node is not None:
                self._unpin(prefix)

    def _in_plan_order(self, seqs: list[Sequence]) -> list[Sequence]:
        return sorted(seqs, key=self._rank.__getitem__) if len(seqs) > 1 else seqs

    # ------------------------------------------------------------------------------ arrivals
    def cache_order(self, waiting: Iterable[Sequence], step: int) -> list[Sequence]:
        """Arrivals over time: longest cached prefix first, ties first come first served.

        A sequence that was preempted, or has waited max_wait_steps steps, goes ahead of all
        others (oldest first), so a request with no cache match is never starved.
        """
        def key(seq: Sequence) -> tuple[int, int, int]:
            if seq.num_preemptions or step - seq.arrival_step >= self.max_wait_steps:
                return (0, seq.arrival_step, seq.seq_id)
            return (1, -self.tree.match_len(seq.token_ids[:-1]), seq.seq_id)

        return sorted(waiting, key=key)


def _shared_chains(lcp: list[int], min_len: int) -> tuple[list[Interval], list[list[Interval]]]:
    """The shared prefixes at least min_len long, and for each sorted key those it lies in, outermost first."""
    intervals = sorted((iv for iv in _lcp_intervals(lcp) if iv[0] >= min_len), key=lambda iv: iv[0])
    chains: list[list[Interval]] = [[] for _ in lcp]
    for iv in intervals:  # shorter (outer) intervals first, so each chain runs outside in
        for i in range(iv[1], iv[2] + 1):
            chains[i].append(iv)
    return intervals, chains


def _lcp_intervals(lcp: list[int]) -> list[Interval]:
    """(length, first, last) of every LCP interval of sorted keys, where lcp[i] is that of keys i-1, i.

    An interval is a maximal run of keys sharing a prefix of `length` tokens: a node of their trie.
    """
    out = []
    stack = [(0, 0)]  # (length, first)
    for i in range(1, len(lcp) + 1):
        cur = lcp[i] if i < len(lcp) else 0
        first = i - 1
        while cur < stack[-1][0]:
            length, first = stack.pop()
            out.append((length, first, i - 1))
        if cur > stack[-1][0]:
            stack.append((cur, first))
    return out
