"""Property test of the tiers' accounting: random starts, finishes and evictions over a small GPU
pool and a small host pool keep every page and slot in exactly one place, and the transfers the
tree queues, replayed on a model of the KV (page -> the tokens it holds), leave every cached node
holding its own tokens wherever it is."""
from __future__ import annotations

from hypothesis import given, settings, strategies as st

from forkserve.engine.locations import Tier, Transfers
from forkserve.engine.pages import PagePool
from forkserve.engine.tree import PrefixTree
from forkserve.worker.plan import TransferKind

PS = 2

op = st.one_of(st.tuples(st.just("start"), st.lists(st.integers(0, 2), min_size=3, max_size=14)),
               st.tuples(st.just("finish"), st.integers(0, 7)),
               st.tuples(st.just("evict"), st.integers(1, 6)))


def replay(transfers: Transfers, gpu: dict, host: dict) -> None:
    for t in transfers.take():
        src, dst = t.src.tolist(), t.dst.tolist()
        if t.kind is TransferKind.OFFLOAD:
            values = [gpu[p] for p in src]
            host.update(zip(dst, values))
        elif t.kind is TransferKind.LOAD:
            values = [host[s] for s in src]
            gpu.update(zip(dst, values))
        elif t.kind is TransferKind.COPY:
            values = [gpu.get(p) for p in src]
            gpu.update(zip(dst, values))


@settings(max_examples=150, deadline=None)
@given(st.lists(op, max_size=40))
def test_random_tier_moves_keep_pages_in_one_place_with_their_tokens(ops) -> None:
    transfers = Transfers()
    tree = PrefixTree(PagePool(12, PS), transfers.copy, True, PagePool(6, PS), transfers)
    gpu: dict[int, tuple] = {}
    host: dict[int, tuple] = {}
    live: list[tuple[object, list[int]]] = []
    for kind, arg in ops:
        if kind == "start":
            tokens = arg
            kv = tree.acquire(tokens[:-1])
            if not tree.reserve(kv, len(tokens)):
                tree.release(kv)
                replay(transfers, gpu, host)
                continue
            replay(transfers, gpu, host)  # the step's transfers, then the step writes its new tokens
            table = list(kv.page_table())
            for i in range(kv.num_cached_tokens // PS):
                assert gpu[table[i]] == tuple(tokens[i * PS:(i + 1) * PS]), "a cached page lost its tokens"
            for i in range(kv.num_cached_tokens // PS, len(table)):
                gpu[table[i]] = tuple(tokens[i * PS:(i + 1) * PS])
            live.append((kv, tokens))
        elif kind == "finish" and live:
            kv, tokens = live.pop(arg % len(live))
            tree.release(kv, tokens)
        elif kind == "evict":
            tree.evict(arg)
            replay(transfers, gpu, host)
        tree.check_invariants([kv for kv, _ in live])
        for node in tree.iter_nodes():
            start = node.end - len(node.tokens)
            path = [t for n in node.path() for t in n.tokens]
            held = gpu if node.loc.tier is Tier.GPU else host
            if node.loc.tier is Tier.GPU and transfers:
                continue  # loads still queued: the next step brings the pages
            for i, page in enumerate(node.loc.ids):
                assert held[page] == tuple(path[start + i * PS:start + (i + 1) * PS]), f"{node} holds other tokens"
