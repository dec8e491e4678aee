"""The prefix tree: the single owner of every KV page.

Each page id is, at every moment, in exactly one of: the pool's free list, one tree node's
`pages`, or one live `SeqKV.own_pages`. Nodes hold page-aligned token runs. A node's
`ref_count` is the number of live sequences whose path passes through it (cumulative up to the
root, as SGLang's lock_ref), so it also says how many running sequences share that prefix;
`pin_count` works the same way for pins. Unreferenced, unpinned leaves are evicted LRU-first.

The tree is the prefix index; where a node's pages are is its `Location` (engine/locations.py),
and page copies it asks for are transfers the next step plan carries to the worker.
"""
from __future__ import annotations

import heapq
import itertools
from typing import Callable, Iterable, Iterator, Sequence

from forkserve.engine.locations import Location, Tier, Transfers
from forkserve.engine.page_keys import page_keys
from forkserve.engine.pages import OutOfPages, PagePool
from forkserve.engine.tree_nodes import SeqKV, TreeNode, common_prefix_len
from forkserve.worker.plan import TransferKind

CopyPages = Callable[[list[int], list[int]], None]
EVICTION_BATCH = 64  # an eviction frees at least this fraction (1/64) of the pool


class PrefixTree:
    def __init__(self, pool: PagePool, copy_pages: CopyPages | None = None, enable_caching: bool = True,
                 host: PagePool | None = None, transfers: Transfers | None = None) -> None:
        """With `host` (the host tier's slots) evicted nodes move there through `transfers` instead
        of being dropped, and a match that reaches them brings them back to GPU pages."""
        self.pool = pool
        self.host = host if host is not None and host.num_pages else None
        self.transfers = transfers
        if self.host is not None and transfers is None:
            raise ValueError("a host tier needs the transfers queue that moves its pages")
        self.host_hit_tokens = 0  # prompt tokens matched in the host tier and loaded back
        self.page_size = pool.page_size
        self.copy_pages = copy_pages
        self.enable_caching = enable_caching
        self._clock = itertools.count(1)
        self.root = TreeNode(None, [], [], 0, 0)
        self._evictable_pages = 0

    # --------------------------------------------------------------------------- accounting
    @property
    def num_free_pages(self) -> int:
        return self.pool.num_free

    @property
    def num_evictable_pages(self) -> int:
        return self._evictable_pages

    @property
    def num_cached_pages(self) -> int:
        return sum(len(n.pages) for n in self.iter_nodes())

    def iter_nodes(self) -> Iterator[TreeNode]:
        """Every node but the root, parents before children."""
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def _adjust(self, node: TreeNode, ref: int, pin: int) -> None:
        """Add to ref/pin counts along node's path, keeping the evictable-page count exact."""
        now = next(self._clock)
        n: TreeNode | None = node
        while n is not None:
            was = n.evictable
            n.ref_count += ref
            n.pin_count += pin
            if n.ref_count < 0 or n.pin_count < 0:
                raise RuntimeError(f"negative count on {n}")
            if was != n.evictable:
                self._evictable_pages += len(n.pages) if n.evictable else -len(n.pages)
            n.last_access = now
            n = n.parent

    # --------------------------------------------------------------------------- matching
    def _key(self, tokens: Sequence[int], start: int = 0) -> tuple[int, ...]:
        return tuple(tokens[start:start + self.page_size])

    def _matching_pages(self, node: TreeNode, tokens: Sequence[int], pos: int) -> int:
        """How many of node's pages equal tokens[pos:] (at least the first, which the caller matched)."""
        equal = common_prefix_len(node.tokens, list(tokens[pos:pos + len(node.tokens)]), self.page_size)
        return max(1, equal // self.page_size)

    def _split(self, node: TreeNode, k: int) -> TreeNode:
        """Cut node after its first k pages; the new upper node is returned, `node` keeps the rest.

        The lower part keeps its identity, so sequences locked on it stay valid, and the page
        order along every path is unchanged.
        """
        ps = self.page_size
        head = TreeNode(node.parent, node.tokens[:k * ps], [], node.end - (len(node.loc.ids) - k) * ps,
                        node.last_access)
        head.loc = node.loc.split(k)
        head.ref_count, head.pin_count = node.ref_count, node.pin_count
        node.parent.children[self._key(head.tokens)] = head
        node.tokens = node.tokens[k * ps:]
        node.parent = head
        head.children[self._key(node.tokens)] = node
        return head

    def _walk(self, tokens: Sequence[int], split: bool) -> tuple[TreeNode, int]:
        """Deepest node whose path equals a page-aligned prefix of tokens, and that prefix's length."""
        node, pos, ps = self.root, 0, self.page_size
        while pos + ps <= len(tokens):
            child = node.children.get(self._key(tokens, pos))
            if child is None:
                break
            k = self._matching_pages(child, tokens, pos)
            if k < len(child.loc.ids):
                if split:
                    node, pos = self._split(child, k), pos + k * ps
                else:
                    pos += k * ps
                break
            node, pos = child, pos + len(child.loc.ids) * ps
        return node, pos

    def match_len(self, tokens: Sequence[int]) -> int:
        """Leading tokens already cached (page-aligned); changes nothing."""
        return self._walk(tokens, split=False)[1] if self.enable_caching else 0

    def _path_pages(self, node: TreeNode) -> list[int]:
        return [p for n in node.path() for p in n.pages]

    # --------------------------------------------------------------------------- sequences
    def acquire(self, tokens: Sequence[int]) -> SeqKV:
        """A new sequence's KV, starting from the longest cached page-aligned prefix of tokens."""
        node, matched = self._walk(tokens, split=True) if self.enable_caching else (self.root, 0)
        self._adjust(node, 1, 0)
        if node.loc.tier is Tier.HOST:
            node, matched = self._load_from_host(node)
        return SeqKV(node, self._path_pages(node), matched)

    def _load_from_host(self, node: TreeNode) -> tuple[TreeNode, int]:
        """Bring the host-tier nodes at the end of node's (locked) path back to GPU pages; when
        the pool has no room for them, the match ends above them (the lock moves there)."""
        path = node.path()
        moving = [n for n in path if n.loc.tier is Tier.HOST]  # a suffix of the path
        need = sum(len(n.loc.ids) for n in moving)
        if self._make_room(need):
            for n in moving:
                pages = self.pool.allocate(len(n.loc.ids))
                self.transfers.add(TransferKind.LOAD, n.loc.ids, pages)
                self.host.free(n.loc.ids)
                n.loc = Location(Tier.GPU, pages)
            self.host_hit_tokens += need * self.page_size
            return node, node.end
        top = moving[0].parent
        self._adjust(node, -1, 0)
        self._adjust(top, 1, 0)
        return top, top.end

    def reserve(self, seq: SeqKV, num_tokens: int) -> bool:
        """Give seq pages for num_tokens tokens in all, evicting cache if needed; False if impossible."""
        seq._check_live()
        need = -(-num_tokens // self.page_size) - len(seq.path_pages) - len(seq.own_pages)
        if need <= 0:
            return True
        if not self._make_room(need):
            return False
        seq._add_own_pages(self.pool.allocate(need))
        return True

    def _make_room(self, num_pages: int) -> bool:
        """Free enough cached pages that num_pages can be allocated; evicts nothing if impossible.

        An eviction scans every node, and a full pool of cache would otherwise pay that scan
        for each page a decode step fills: so it frees at least 1/EVICTION_BATCH of the pool
        (least recently used first) while it is at it.
        """
        if num_pages > self.pool.num_free + self._evictable_pages:
            return False
        if num_pages > self.pool.num_free:
            batch = min(self.pool.num_pages // EVICTION_BATCH, self._evictable_pages)
            self.evict(max(num_pages - self.pool.num_free, batch))
        return True

    def publish(self, seq: SeqKV, tokens: Sequence[int]) -> None:
        """Move seq's full, computed own pages into the tree, sharing any identical run already there.

        `tokens` are the sequence's tokens whose KV is computed. Where the tree already holds the
        same run, the tree's pages are used and the sequence's duplicates go back to the pool.
        """
        seq._check_live()
        ps = self.page_size
        full = len(tokens) // ps * ps
        start = seq.prefix_len
        if full <= start:
            return
        run = list(tokens[start:full])
        num_new = len(run) // ps
        mine = seq.own_pages[:num_new]
        node, pos, added = seq.node, 0, []
        while pos < len(run):
            child = node.children.get(self._key(run, pos))
            if child is None:
                child = TreeNode(node, run[pos:], mine[pos // ps:], node.end + len(run) - pos, next(self._clock))
                node.children[self._key(run, pos)] = child
                self._evictable_pages += len(child.pages)  # unreferenced until the lock below
                added += child.pages
                node, pos = child, len(run)
                break
            k = self._matching_pages(child, run, pos)
            if k < len(child.loc.ids):
                child = self._split(child, k)
            if child.loc.tier is Tier.HOST:  # the sequence computed it again: its pages replace the host copy
                self.host.free(child.loc.ids)
                child.loc = Location(Tier.GPU, mine[pos // ps:pos // ps + k])
                self._evictable_pages += k if child.evictable else 0
            else:
                self.pool.free(mine[pos // ps:pos // ps + k])
            added += child.pages
            node, pos = child, pos + k * ps
        self._adjust(node, 1, 0)
        self._adjust(seq.node, -1, 0)
        seq.node = node
        seq.own_pages = seq.own_pages[num_new:]
        seq._path_pages = seq._path_pages + added
        seq._table = None

    def release(self, seq: SeqKV, tokens: Sequence[int] | None = None, forget: bool = False) -> None:
        """End a sequence: keep its computed full pages as cache (if caching), free the rest.

        With forget, the nodes at the end of its path that nobody else holds are freed too, so a
        pruned branch's pages go back to the pool at once rather than waiting for eviction.
        """
        seq._check_live()
        if self.enable_caching and tokens is not None:
            self.publish(seq, tokens)
        self.pool.free(seq.own_pages)
        seq.own_pages = []
        seq._table = None
        self._adjust(seq.node, -1, 0)
        seq._released = True
        if forget or not self.enable_caching:
            self._drop_unused(seq.node)

    def fork(self, seq: SeqKV, tokens: Sequence[int], k: int) -> list[SeqKV]:
        """k sequences sharing seq's KV: full pages through the tree, the partial last page copied."""
        seq._check_live()
        partial = len(tokens) % self.page_size != 0
        if partial and self.copy_pages is None:
            raise RuntimeError("forking a partly filled page needs a copy_pages callback")
        if not self._make_room(k if partial else 0):
            raise OutOfPages(f"forking {k} sequences needs {k} pages for their partial last pages")
        self.publish(seq, tokens)
        children = []
        for _ in range(k):
            self._adjust(seq.node, 1, 0)
            children.append(SeqKV(seq.node, list(seq.path_pages), seq.num_cached_tokens))
        if partial:
            copies = self.pool.allocate(k)
            self.copy_pages([seq.own_pages[0]] * k, copies)
            for child, page in zip(children, copies):
                child._add_own_pages([page])
        return children

    # --------------------------------------------------------------------------- pins, eviction
    def pin(self, node: TreeNode) -> None:
        """Keep node and its ancestors resident until unpinned."""
        self._adjust(node, 0, 1)

    def pin_prefix(self, tokens: Sequence[int]) -> TreeNode | None:
        """Pin the node that ends exactly at len(tokens) (page-aligned) if all of tokens is cached.

        Returns the pinned node (split out if the run ended inside one), or None when the
        prefix is not wholly cached; then nothing changes.
        """
        if len(tokens) % self.page_size or not tokens:
            raise ValueError(f"pin_prefix needs a non-empty multiple of page_size={self.page_size} tokens, "
                             f"got {len(tokens)}")
        if not self.enable_caching or self.match_len(tokens) < len(tokens):
            return None
        node, _ = self._walk(tokens, split=True)
        if node.loc.tier is not Tier.GPU:
            return None
        self.pin(node)
        return node

    def unpin(self, node: TreeNode) -> None:
        if node.pin_count < 1:
            raise ValueError(f"unpin of a node that is not pinned: {node}")
        self._adjust(node, 0, -1)
        if not self.enable_caching:
            self._drop_unused(node)

    def _remove_leaf(self, node: TreeNode) -> None:
        if node.loc.tier is Tier.GPU:
            self.pool.free(node.pages)
            self._evictable_pages -= len(node.pages)
        else:
            self.host.free(node.loc.ids)
        del node.parent.children[self._key(node.tokens)]
        node.parent = None

    def _drop_unused(self, node: TreeNode) -> None:
        """Without caching, a node nobody holds is freed at once, leaf upwards."""
        while node.parent is not None and node.evictable and not node.children:
            parent = node.parent
            self._remove_leaf(node)
            node = parent

    def page_keys(self, node: TreeNode) -> list[bytes]:
        """Content keys of node's pages (page_keys.py), computed on demand from its path's tokens:
        what a host or disk tier, or another replica, names these pages by."""
        tokens = [t for n in node.path() for t in n.tokens]
        return page_keys(tokens, self.page_size)[len(tokens) // self.page_size - len(node.loc.ids):]

    @staticmethod
    def _gpu_leaf(node: TreeNode) -> bool:
        """On the GPU with no child there (its children, if any, are in the host tier)."""
        return node.loc.tier is Tier.GPU and all(c.loc.tier is not Tier.GPU for c in node.children.values())

    def evict(self, num_pages: int, spill: bool = True) -> int:
        """Free at least num_pages GPU pages from least recently used unheld leaves (fewer if not
        possible): to the host tier when there is one (and spill), else dropped with what hangs below."""
        heap = [(n.last_access, id(n), n) for n in self.iter_nodes() if n.evictable and self._gpu_leaf(n)]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < num_pages:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            freed += len(node.pages)
            if spill and self.host is not None and self._host_room(len(node.loc.ids)):
                self._spill(node)
            else:
                self._drop_subtree(node)
            if parent.parent is not None and parent.evictable and self._gpu_leaf(parent):
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        return freed

    def _spill(self, node: TreeNode) -> None:
        """An unheld GPU node's pages to host slots (an OFFLOAD transfer); its GPU pages are freed."""
        slots = self.host.allocate(len(node.loc.ids))
        self.transfers.add(TransferKind.OFFLOAD, node.loc.ids, slots)
        self.pool.free(node.loc.ids)
        self._evictable_pages -= len(node.loc.ids)
        node.loc = Location(Tier.HOST, slots)

    def _drop_subtree(self, node: TreeNode) -> None:
        """Remove an unheld node and everything below it (host-tier nodes), leaves first."""
        for child in list(node.children.values()):
            self._drop_subtree(child)
        self._remove_leaf(node)

    def _host_room(self, num_slots: int) -> bool:
        """Make num_slots host slots free by dropping least recently used host leaves (at least
        1/EVICTION_BATCH of the host pool at a time, as on the GPU); False if impossible."""
        if num_slots > self.host.num_pages:
            return False
        if self.host.num_free >= num_slots:
            return True
        heap = [(n.last_access, id(n), n) for n in self.iter_nodes()
                if n.loc.tier is Tier.HOST and n.evictable and not n.children]
        heapq.heapify(heap)
        target = max(num_slots - self.host.num_free, self.host.num_pages // EVICTION_BATCH)
        freed = 0
        while heap and freed < target:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            freed += len(node.loc.ids)
            self._remove_leaf(node)
            if parent.loc.tier is Tier.HOST and parent.evictable and not parent.children:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        return self.host.num_free >= num_slots

    def clear_cache(self) -> None:
        """Drop every cached page nobody holds, in every tier (nothing is written anywhere)."""
        self.evict(self._evictable_pages, spill=False)
        if self.host is not None:
            self._host_room(self.host.num_pages)

    # --------------------------------------------------------------------------- checking
    def check_invariants(self, live: Iterable[SeqKV] | None = None) -> None:
        """Assert page ownership, counts and structure are exact (tests call this a lot).

        With `live` (every SeqKV not yet released), ref counts are checked exactly too.
        """
        ps = self.page_size
        owner: dict[int, str] = {}

        def own(page: int, who: str) -> None:
            assert page not in owner, f"page {page} held by both {owner[page]} and {who}"
            owner[page] = who

        for page in range(self.pool.num_pages):
            if self.pool.is_free(page):
                own(page, "free list")
        refs: dict[int, int] = {}
        for seq in live or ():
            assert not seq.released
            for page in seq.own_pages:
                own(page, "a sequence")
            assert seq.path_pages == self._path_pages(seq.node), "stale path pages"
            for node in seq.node.path():
                refs[id(node)] = refs.get(id(node), 0) + 1
        evictable = 0
        slots: set[int] = set()
        for node in self.iter_nodes():
            for page in node.pages:
                own(page, repr(node))
            if node.loc.tier is Tier.HOST:
                assert node.evictable and all(c.loc.tier is Tier.HOST for c in node.children.values()), \
                    f"held host node or GPU node below host node {node}"
                assert not slots & set(node.loc.ids) and len(set(node.loc.ids)) == len(node.loc.ids), "slot twice"
                assert not any(self.host.is_free(s) for s in node.loc.ids), "a node holds a free host slot"
                slots.update(node.loc.ids)
            assert len(node.tokens) == len(node.loc.ids) * ps and node.loc.ids, f"unaligned or empty {node}"
            assert node.parent.children[self._key(node.tokens)] is node, "child key mismatch"
            assert node.end == node.parent.end + len(node.tokens), "wrong end offset"
            assert node.ref_count >= 0 and node.pin_count >= 0
            if live is not None:
                assert node.ref_count == refs.get(id(node), 0), f"ref count of {node} != {refs.get(id(node), 0)}"
            assert node.ref_count >= sum(c.ref_count for c in node.children.values())
            assert node.pin_count >= sum(c.pin_count for c in node.children.values())
            evictable += len(node.pages) if node.evictable else 0
        assert len(owner) == self.pool.num_pages, "pages lost"
        if self.host is not None:
            assert len(slots) + self.host.num_free == self.host.num_pages, "host slots lost"
        assert evictable == self._evictable_pages, f"evictable count {self._evictable_pages} != {evictable}"
