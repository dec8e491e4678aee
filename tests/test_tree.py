"""The prefix tree of KV pages and the page pool: unit tests and a stateful property test.

The property test keeps its own model of what each page holds (the tokens whose KV was
"written" into it), so it checks not only the page bookkeeping but that every page a sequence
reads — cached, shared, split or copied — holds exactly that sequence's tokens.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from forkserve.engine.page_keys import page_keys
from forkserve.engine.pages import OutOfPages, PagePool
from forkserve.engine.tree import PrefixTree, SeqKV, TreeNode


# ----------------------------------------------------------------------------------- helpers
class CopyRecorder:
    """A copy_pages callback that records its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[int], list[int]]] = []

    def __call__(self, src: list[int], dst: list[int]) -> None:
        self.calls.append((list(src), list(dst)))


def make_tree(num_pages: int = 16, page_size: int = 4, caching: bool = True) -> tuple[PrefixTree, CopyRecorder]:
    copies = CopyRecorder()
    return PrefixTree(PagePool(num_pages, page_size), copy_pages=copies, enable_caching=caching), copies


def add(tree: PrefixTree, tokens: list[int]) -> SeqKV:
    """A sequence for tokens that has pages for all of them (what the scheduler does before a prefill)."""
    seq = tree.acquire(tokens)
    assert tree.reserve(seq, len(tokens))
    return seq


def cache(tree: PrefixTree, tokens: list[int]) -> None:
    """Compute tokens as a sequence and finish it, leaving its full pages cached."""
    seq = add(tree, tokens)
    tree.release(seq, tokens)


def accounted(tree: PrefixTree, live: list[SeqKV]) -> int:
    return tree.pool.num_free + tree.num_cached_pages + sum(len(s.own_pages) for s in live)


# ----------------------------------------------------------------------------------- PagePool
def test_pool_allocates_distinct_pages_and_double_free_raises() -> None:
    pool = PagePool(6, 4)
    pages = pool.allocate(4)
    assert len(set(pages)) == 4 and all(0 <= p < 6 for p in pages)
    assert pool.num_free == 2 and not any(pool.is_free(p) for p in pages)
    pool.free(pages[:2])
    assert pool.num_free == 4 and pool.is_free(pages[0])
    with pytest.raises(ValueError, match="twice"):
        pool.free([pages[0]])
    with pytest.raises(ValueError):
        pool.free([6])
    with pytest.raises(OutOfPages):
        pool.allocate(5)
    assert pool.num_free == 4  # a refused allocation takes nothing
    with pytest.raises(ValueError):
        PagePool(0, 4)


def test_pool_free_of_never_allocated_page_raises() -> None:
    pool = PagePool(3, 2)
    with pytest.raises(ValueError, match="twice"):
        pool.free([1])


# ----------------------------------------------------------------------------------- PrefixTree units
def test_acquire_on_empty_tree() -> None:
    tree, _ = make_tree()
    tokens = list(range(10))
    seq = tree.acquire(tokens)
    assert seq.num_cached_tokens == 0 and seq.prefix_len == 0
    assert seq.node is tree.root and list(seq.page_table()) == []
    assert tree.match_len(tokens) == 0
    assert tree.reserve(seq, len(tokens))
    assert len(seq.own_pages) == 3 and seq.capacity(4) == 12
    assert tree.num_free_pages == 13
    tree.check_invariants([seq])


def test_publish_then_acquire_shares_page_aligned_prefix() -> None:
    tree, _ = make_tree()
    a_tokens = list(range(10))  # 2 full pages + 2 tokens
    a = add(tree, a_tokens)
    a_pages = list(a.page_table())
    tree.publish(a, a_tokens)
    assert a.prefix_len == 8 and a.path_pages == a_pages[:2] and a.own_pages == a_pages[2:]
    assert list(a.page_table()) == a_pages  # publishing moves ownership, not KV
    tree.check_invariants([a])

    b_tokens = list(range(9)) + [99, 98, 97]  # shares tokens 0..8: 2 full pages
    assert tree.match_len(b_tokens) == 8
    b = tree.acquire(b_tokens)
    assert b.num_cached_tokens == 8 == b.prefix_len
    assert b.path_pages == a_pages[:2]
    assert tree.reserve(b, len(b_tokens))
    assert list(b.page_table())[:2] == a_pages[:2]
    assert not set(b.own_pages) & set(a_pages)
    # Both sequences hold the shared node: nothing of it is evictable.
    assert tree.num_evictable_pages == 0 and tree.evict(100) == 0
    tree.check_invariants([a, b])
    assert accounted(tree, [a, b]) == 16


def test_match_shorter_than_a_page_is_not_shared() -> None:
    tree, _ = make_tree()
    cache(tree, [1, 2, 3, 4, 5, 6, 7, 8])
    assert tree.match_len([1, 2, 3]) == 0  # less than a page
    assert tree.match_len([1, 2, 3, 9, 5, 6, 7, 8]) == 0  # differs inside the first page
    assert tree.match_len([1, 2, 3, 4, 5, 6, 7]) == 4
    assert tree.match_len([1, 2, 3, 4, 5, 6, 7, 8, 9]) == 8


def test_split_when_diverging_inside_a_node() -> None:
    tree, _ = make_tree(num_pages=24, page_size=2)
    a_tokens = [1, 2, 3, 4, 5, 6, 7, 8]  # one node of 4 pages
    a = add(tree, a_tokens)
    a_pages = list(a.page_table())
    tree.publish(a, a_tokens)
    assert len(list(tree.iter_nodes())) == 1
    node_a = a.node

    b_tokens = [1, 2, 3, 4, 0, 0, 9, 9]  # diverges at the third page
    b = tree.acquire(b_tokens)
    assert b.num_cached_tokens == 4
    assert b.path_pages == a_pages[:2]
    nodes = list(tree.iter_nodes())
    assert len(nodes) == 2  # split into head (2 pages) + a's tail (2 pages)
    head = b.node
    assert head.pages == a_pages[:2] and head.end == 4 and head.tokens == [1, 2, 3, 4]
    assert node_a.parent is head and node_a.pages == a_pages[2:] and node_a.tokens == [5, 6, 7, 8]
    assert a.node is node_a and a.path_pages == a_pages  # a's page table is untouched by the split
    assert head.ref_count == 2 and node_a.ref_count == 1
    tree.check_invariants([a, b])

    assert tree.reserve(b, len(b_tokens))
    b_pages = list(b.page_table())
    tree.publish(b, b_tokens)
    assert list(b.page_table()) == b_pages and b.prefix_len == 8
    assert b.node.parent is head and b.node.tokens == [0, 0, 9, 9]
    assert tree.match_len(a_tokens) == 8 and tree.match_len(b_tokens) == 8
    tree.check_invariants([a, b])
    # A third sequence diverging inside a's tail splits again; every path keeps its pages.
    c = tree.acquire([1, 2, 3, 4, 5, 6, 0, 0])
    assert c.num_cached_tokens == 6 and c.path_pages == a_pages[:3]
    assert a.path_pages == a_pages and tree._path_pages(a.node) == a_pages
    assert b.path_pages == b_pages and tree._path_pages(b.node) == b_pages
    tree.check_invariants([a, b, c])


def test_publish_of_a_duplicate_run_uses_the_trees_pages() -> None:
    tree, _ = make_tree(num_pages=12, page_size=2)
    tokens = [5, 6, 7, 8, 9]
    a = add(tree, tokens)
    b = add(tree, tokens)  # acquired before a published: computes its own copy
    assert b.num_cached_tokens == 0
    tree.publish(a, tokens)
    free_before = tree.num_free_pages
    b_own_before = list(b.own_pages)
    tree.publish(b, tokens)
    assert b.path_pages == a.path_pages  # b now reads the tree's pages
    assert tree.num_free_pages == free_before + 2  # its two duplicate full pages went back
    assert b.own_pages == b_own_before[2:]
    tree.check_invariants([a, b])


def test_evict_frees_least_recently_used_unreferenced_leaves_only() -> None:
    tree, _ = make_tree(num_pages=16, page_size=2)
    old, mid, new = [1, 1, 1, 1], [2, 2, 2, 2], [3, 3, 3, 3]
    for tokens in (old, mid, new):
        cache(tree, tokens)
    held = add(tree, [4, 4, 4, 4, 4])
    tree.publish(held, [4, 4, 4, 4, 4])
    # Touch `old` again so that `mid` is now the least recently used.
    cache(tree, old)
    assert tree.num_evictable_pages == 6
    freed = tree.evict(1)
    assert freed == 2  # whole leaves go
    assert tree.match_len(mid) == 0 and tree.match_len(old) == 4 and tree.match_len(new) == 4
    freed = tree.evict(2)
    assert freed == 2 and tree.match_len(new) == 0 and tree.match_len(old) == 4
    assert tree.evict(100) == 2 and tree.match_len(old) == 0
    assert tree.match_len([4, 4, 4, 4, 4]) == 4  # referenced: never evicted
    assert tree.evict(100) == 0
    tree.check_invariants([held])
    assert accounted(tree, [held]) == 16


def test_evict_frees_a_parent_after_its_children() -> None:
    tree, _ = make_tree(num_pages=16, page_size=2)
    cache(tree, [1, 2, 3, 4, 5, 6])
    cache(tree, [1, 2, 3, 4, 7, 8])  # splits: [1 2 3 4] -> {[5 6], [7 8]}
    assert len(list(tree.iter_nodes())) == 3
    assert tree.num_cached_pages == 4 == tree.num_evictable_pages
    assert tree.evict(4) == 4
    assert list(tree.iter_nodes()) == [] and tree.num_free_pages == 16
    tree.check_invariants([])


def test_pinned_node_is_never_evicted_and_unpin_releases_it() -> None:
    tree, _ = make_tree(num_pages=16, page_size=2)
    cache(tree, [1, 2, 3, 4])
    cache(tree, [5, 6, 7, 8])
    pinned = next(n for n in tree.iter_nodes() if n.tokens[0] == 1)
    pages = list(pinned.pages)
    tree.pin(pinned)
    assert tree.num_evictable_pages == 2
    assert tree.evict(100) == 2
    assert pinned.parent is tree.root and all(not tree.pool.is_free(p) for p in pages)
    # A reserve that could only succeed by evicting the pinned pages fails and evicts nothing.
    s = tree.acquire([9, 9])
    assert not tree.reserve(s, 2 * 15)
    assert pinned.pages == pages and tree.num_free_pages == 14
    tree.unpin(pinned)
    assert tree.reserve(s, 2 * 15)
    assert pinned.parent is None and all(p in s.own_pages for p in pages)
    tree.check_invariants([s])


def test_pin_of_a_deep_node_holds_its_ancestors() -> None:
    tree, _ = make_tree(num_pages=16, page_size=2)
    cache(tree, [1, 2, 3, 4, 5, 6])
    cache(tree, [1, 2, 3, 4, 7, 8])
    leaf = next(n for n in tree.iter_nodes() if n.tokens == [5, 6])
    tree.pin(leaf)
    assert tree.evict(100) == 1  # only the other leaf (one page)
    assert tree.match_len([1, 2, 3, 4, 5, 6]) == 6
    assert leaf.parent.pin_count == 1
    tree.check_invariants([])


def test_unpin_of_unpinned_node_raises() -> None:
    tree, _ = make_tree()
    cache(tree, [1, 2, 3, 4])
    node = next(tree.iter_nodes())
    with pytest.raises(ValueError, match="not pinned"):
        tree.unpin(node)
    tree.pin(node)
    tree.unpin(node)
    with pytest.raises(ValueError, match="not pinned"):
        tree.unpin(node)
    assert node.pin_count == 0
    tree.check_invariants([])


def test_reserve_returns_false_and_evicts_nothing_when_impossible() -> None:
    tree, _ = make_tree(num_pages=8, page_size=2)
    cache(tree, [1, 1, 1, 1])  # 2 evictable pages
    held = add(tree, [2, 2, 2, 2])  # 2 pages held
    seq = tree.acquire([3])
    nodes_before = [(n.tokens, n.pages) for n in tree.iter_nodes()]
    assert tree.num_free_pages == 4 and tree.num_evictable_pages == 2
    assert not tree.reserve(seq, 2 * 7)  # needs 7 > 4 free + 2 evictable
    assert [(n.tokens, n.pages) for n in tree.iter_nodes()] == nodes_before
    assert tree.num_free_pages == 4 and seq.own_pages == []
    assert tree.reserve(seq, 2 * 6)  # exactly possible: evicts the cached pages
    assert tree.match_len([1, 1, 1, 1]) == 0 and tree.num_free_pages == 0
    assert tree.reserve(seq, 2 * 6)  # already has them: a no-op
    tree.check_invariants([held, seq])


def test_fork_with_partial_last_page_copies_it_per_child() -> None:
    tree, copies = make_tree(num_pages=16, page_size=4)
    tokens = list(range(10))  # 2 full pages + a partial one
    parent = add(tree, tokens)
    parent_pages = list(parent.page_table())
    free_before = tree.num_free_pages
    children = tree.fork(parent, tokens, 3)
    assert len(children) == 3
    assert tree.num_free_pages == free_before - 3
    assert parent.prefix_len == 8 and parent.path_pages == parent_pages[:2]
    assert parent.own_pages == parent_pages[2:]
    last = [c.own_pages for c in children]
    assert all(len(pages) == 1 for pages in last)
    last_pages = [p[0] for p in last]
    assert len(set(last_pages) | {parent_pages[2]}) == 4  # each child its own last page
    assert copies.calls == [([parent_pages[2]] * 3, last_pages)]
    for child in children:
        assert child.path_pages == parent_pages[:2] and child.prefix_len == 8
        assert list(child.page_table()) == parent_pages[:2] + child.own_pages
    assert parent.node.ref_count == 4
    tree.check_invariants([parent, *children])
    for child in children:
        tree.release(child, tokens)
    tree.release(parent, tokens)
    assert tree.num_free_pages + tree.num_evictable_pages == 16
    tree.check_invariants([])


def test_fork_page_aligned_copies_nothing() -> None:
    tree, copies = make_tree(num_pages=8, page_size=4)
    tokens = list(range(8))
    parent = add(tree, tokens)
    children = tree.fork(parent, tokens, 2)
    assert copies.calls == [] and all(c.own_pages == [] for c in children)
    assert all(c.path_pages == parent.path_pages for c in children)
    tree.check_invariants([parent, *children])


def test_fork_without_room_raises_and_changes_nothing() -> None:
    tree, copies = make_tree(num_pages=4, page_size=2)
    tokens = [1, 2, 3]
    parent = add(tree, tokens)  # 2 pages, 2 free
    with pytest.raises(OutOfPages):
        tree.fork(parent, tokens, 3)
    assert copies.calls == [] and tree.num_free_pages == 2 and parent.prefix_len == 0
    tree.check_invariants([parent])
    no_copy = PrefixTree(PagePool(4, 2))
    seq = add(no_copy, tokens)
    with pytest.raises(RuntimeError, match="copy_pages"):
        no_copy.fork(seq, tokens, 1)


def test_release_without_caching_returns_every_page() -> None:
    tree, _ = make_tree(num_pages=16, page_size=2, caching=False)
    tokens = [1, 2, 3, 4, 5]
    cache(tree, tokens)
    assert tree.num_free_pages == 16 and list(tree.iter_nodes()) == []
    assert tree.match_len(tokens) == 0
    parent = add(tree, tokens)
    assert parent.num_cached_tokens == 0
    children = tree.fork(parent, tokens, 2)  # fork puts the full pages in the tree even so
    assert tree.num_cached_pages == 2
    other = tree.acquire(tokens)
    assert other.num_cached_tokens == 0  # ... but nobody else matches them
    tree.release(other)
    pinned = parent.node
    tree.pin(pinned)
    for seq in (parent, *children):
        tree.release(seq, tokens)
    assert tree.num_cached_pages == 2  # the pin holds them
    tree.unpin(pinned)
    assert tree.num_free_pages == 16 and list(tree.iter_nodes()) == []
    tree.check_invariants([])


def test_released_sequence_refuses_use() -> None:
    tree, _ = make_tree()
    seq = add(tree, [1, 2, 3])
    tree.release(seq)
    assert seq.released
    with pytest.raises(RuntimeError):
        seq.page_table()
    with pytest.raises(RuntimeError):
        tree.reserve(seq, 8)
    with pytest.raises(RuntimeError):
        tree.release(seq)
    assert tree.num_free_pages == 16


def test_page_table_cache_follows_reserve_and_publish() -> None:
    tree, _ = make_tree(num_pages=16, page_size=2)
    seq = tree.acquire([1, 2, 3])
    assert tree.reserve(seq, 3)
    first = list(seq.page_table())
    assert tree.reserve(seq, 7)
    assert list(seq.page_table()) == seq.path_pages + seq.own_pages and list(seq.page_table())[:2] == first
    other = add(tree, [1, 2, 3, 4])
    tree.publish(other, [1, 2, 3, 4])
    tree.publish(seq, [1, 2, 3, 4, 5])  # duplicates of other's pages: seq switches to the tree's
    assert list(seq.page_table()) == other.path_pages + seq.own_pages
    tree.check_invariants([seq, other])


# ----------------------------------------------------------------------------------- property test
TOKENS = st.lists(st.integers(0, 1), min_size=1, max_size=14)


class Live:
    """A live sequence as the model sees it: its tokens and how many have computed KV."""

    def __init__(self, kv: SeqKV, tokens: list[int], computed: int) -> None:
        self.kv = kv
        self.tokens = tokens
        self.computed = computed


class TreeMachine(RuleBasedStateMachine):
    @initialize(page_size=st.integers(2, 4), num_pages=st.integers(8, 40), caching=st.booleans())
    def setup(self, page_size: int, num_pages: int, caching: bool) -> None:
        self.ps = page_size
        self.num_pages = num_pages
        self.caching = caching
        self.content: dict[int, list[int | None]] = {}  # page -> the tokens written into it
        self.tree = PrefixTree(PagePool(num_pages, page_size), copy_pages=self._copy, enable_caching=caching)
        self.seqs: list[Live] = []
        self.pins: list[tuple[TreeNode, list[int]]] = []  # a pinned node and its path pages when pinned

    # ------------------------------------------------------------------ model helpers
    def _copy(self, src: list[int], dst: list[int]) -> None:
        for s, d in zip(src, dst):
            assert not self.tree.pool.is_free(s) and not self.tree.pool.is_free(d)
            self.content[d] = list(self.content.get(s, [None] * self.ps))

    def _live(self) -> list[SeqKV]:
        return [s.kv for s in self.seqs]

    def _protected(self) -> set[int]:
        pages = {p for s in self.seqs for p in s.kv.page_table()}
        return pages | {p for _, path in self.pins for p in path}

    def _pick(self, data: st.DataObject) -> Live:
        return data.draw(st.sampled_from(self.seqs), label="seq")

    def _written(self, s: Live) -> list[int | None]:
        table = list(s.kv.page_table())
        return [self.content.get(table[i // self.ps], [None] * self.ps)[i % self.ps] for i in range(s.computed)]

    def _tree_paths(self) -> list[list[int]]:
        paths = []
        for node in self.tree.iter_nodes():
            paths.append([t for n in node.path() for t in n.tokens])
        return paths

    def _oracle_match(self, tokens: list[int]) -> int:
        """Longest page-aligned prefix of tokens that some root path holds, by brute force."""
        if not self.caching:
            return 0
        best = 0
        for path in self._tree_paths():
            pages = 0
            while (pages + 1) * self.ps <= min(len(path), len(tokens)) and \
                    path[pages * self.ps:(pages + 1) * self.ps] == tokens[pages * self.ps:(pages + 1) * self.ps]:
                pages += 1
            best = max(best, pages * self.ps)
        return best

    def _draw_tokens(self, data: st.DataObject) -> list[int]:
        """Fresh tokens, or a known sequence's / cached path's prefix plus a suffix (so prefixes collide)."""
        known = [s.tokens for s in self.seqs] + self._tree_paths()
        suffix = data.draw(st.lists(st.integers(0, 1), max_size=6), label="suffix")
        if known and data.draw(st.booleans(), label="reuse"):
            base = data.draw(st.sampled_from(known), label="base")
            cut = data.draw(st.integers(0, len(base)), label="cut")
            tokens = base[:cut] + suffix
        else:
            tokens = data.draw(TOKENS, label="tokens")
        return tokens or [0]

    # ------------------------------------------------------------------ rules
    @precondition(lambda self: len(self.seqs) < 8)
    @rule(data=st.data())
    def acquire(self, data: st.DataObject) -> None:
        self._acquire(self._draw_tokens(data))

    @precondition(lambda self: len(self.seqs) < 8)
    @rule(data=st.data(), finish=st.booleans())
    def prefill(self, data: st.DataObject, finish: bool) -> None:
        """What the scheduler does for a new request: acquire, reserve, compute, publish (and maybe finish)."""
        s = self._acquire(self._draw_tokens(data))
        kv = s.kv
        need = -(-len(s.tokens) // self.ps) - len(kv.path_pages)
        possible = need <= self.tree.num_free_pages + self.tree.num_evictable_pages
        ok = self.tree.reserve(kv, len(s.tokens))
        assert ok == possible
        if not ok:
            return
        for page in kv.own_pages:
            self.content[page] = [None] * self.ps
        self._compute(s)
        self._publish(s)
        if finish:
            self._release(s, True)

    def _acquire(self, tokens: list[int]) -> Live:
        expected = self._oracle_match(tokens)
        assert self.tree.match_len(tokens) == expected
        protected, free = self._protected(), self.tree.num_free_pages
        kv = self.tree.acquire(tokens)
        assert kv.num_cached_tokens == expected == kv.prefix_len
        assert len(kv.path_pages) * self.ps == expected and kv.own_pages == []
        assert self.tree.num_free_pages == free  # matching allocates nothing
        s = Live(kv, list(tokens), expected)
        self.seqs.append(s)
        assert self._written(s) == tokens[:expected], "cached pages do not hold the prompt's tokens"
        assert protected <= self._protected()
        return s

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), extra=st.integers(0, 6))
    def reserve(self, data: st.DataObject, extra: int) -> None:
        s = self._pick(data)
        target = data.draw(st.integers(0, len(s.tokens) + extra), label="num_tokens")
        kv = s.kv
        need = -(-target // self.ps) - len(kv.path_pages) - len(kv.own_pages)
        possible = need <= self.tree.num_free_pages + self.tree.num_evictable_pages
        before_table = list(kv.page_table())
        nodes_before = [(id(n), list(n.pages)) for n in self.tree.iter_nodes()]
        free_before = self.tree.num_free_pages
        ok = self.tree.reserve(kv, target)
        assert ok == possible
        if ok:
            assert kv.capacity(self.ps) >= target
            assert list(kv.page_table())[:len(before_table)] == before_table
            new = list(kv.page_table())[len(before_table):]
            assert len(new) == max(need, 0)
            for page in new:
                self.content[page] = [None] * self.ps  # fresh pages hold nothing yet
        else:
            assert list(kv.page_table()) == before_table
            assert [(id(n), list(n.pages)) for n in self.tree.iter_nodes()] == nodes_before, "evicted on failure"
            assert self.tree.num_free_pages == free_before

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def compute(self, data: st.DataObject) -> None:
        """Write the KV of the sequence's next tokens, as far as its pages reach."""
        self._compute(self._pick(data))

    def _compute(self, s: Live) -> None:
        kv = s.kv
        upto = min(len(s.tokens), kv.capacity(self.ps))
        assert kv.prefix_len <= s.computed, "computed tokens would be written into shared pages"
        table = list(kv.page_table())
        for pos in range(s.computed, upto):
            page = table[pos // self.ps]
            assert page in kv.own_pages, "writing into a page the sequence does not own"
            self.content.setdefault(page, [None] * self.ps)[pos % self.ps] = s.tokens[pos]
        s.computed = max(s.computed, upto)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), new=TOKENS)
    def extend(self, data: st.DataObject, new: list[int]) -> None:
        """The sequence generates more tokens (their KV is not computed yet)."""
        s = self._pick(data)
        s.tokens = s.tokens + new[:4]

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def publish(self, data: st.DataObject) -> None:
        self._publish(self._pick(data))

    def _publish(self, s: Live) -> None:
        kv = s.kv
        old_path, old_own = list(kv.path_pages), list(kv.own_pages)
        others = {id(o): list(o.kv.page_table()) for o in self.seqs if o is not s}
        pins = self._protected() - set(old_own) - set(old_path)
        self.tree.publish(kv, s.tokens[:s.computed])
        full = s.computed // self.ps * self.ps
        assert kv.prefix_len == max(full, len(old_path) * self.ps)
        assert kv.path_pages[:len(old_path)] == old_path
        published = len(kv.path_pages) - len(old_path)
        assert kv.own_pages == old_own[published:]
        for page in set(old_own[:published]) - set(kv.path_pages):  # duplicates went back to the pool
            assert self.tree.pool.is_free(page)
        assert {id(o): list(o.kv.page_table()) for o in self.seqs if o is not s} == others
        assert not any(self.tree.pool.is_free(p) for p in pins)
        if self.caching:
            assert self.tree.match_len(s.tokens[:s.computed]) >= full

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), with_tokens=st.booleans())
    def release(self, data: st.DataObject, with_tokens: bool) -> None:
        self._release(self._pick(data), with_tokens)

    def _release(self, s: Live, with_tokens: bool) -> None:
        self.seqs.remove(s)
        still = self._protected()
        computed = s.tokens[:s.computed]
        self.tree.release(s.kv, computed if with_tokens else None)
        assert s.kv.released
        assert not any(self.tree.pool.is_free(p) for p in still)
        if self.caching and with_tokens:
            assert self.tree.match_len(computed) >= s.computed // self.ps * self.ps

    @precondition(lambda self: self.seqs and len(self.seqs) < 8)
    @rule(data=st.data(), k=st.integers(1, 3))
    def fork(self, data: st.DataObject, k: int) -> None:
        s = self._pick(data)
        kv = s.kv
        if kv.capacity(self.ps) < s.computed or s.computed == 0:
            return
        tokens = s.tokens[:s.computed]
        partial = s.computed % self.ps != 0
        room = self.tree.num_free_pages + self.tree.num_evictable_pages
        protected = self._protected()
        if partial and k > room:
            with pytest.raises(OutOfPages):
                self.tree.fork(kv, tokens, k)
            return
        own_before = set(kv.page_table())  # fork publishes: a page the tree already holds goes back to the pool
        children = self.tree.fork(kv, tokens, k)
        assert len(children) == k
        assert not any(self.tree.pool.is_free(p) for p in protected - own_before)
        assert not any(self.tree.pool.is_free(p) for p in kv.page_table())
        own_last = set()
        for child in children:
            assert child.path_pages == kv.path_pages
            assert len(child.own_pages) == (1 if partial else 0)
            own_last |= set(child.own_pages)
            c = Live(child, list(tokens), s.computed)
            assert self._written(c) == tokens, "a forked child does not see its parent's KV"
            self.seqs.append(c)
        assert len(own_last) == (k if partial else 0) and not own_last & set(kv.page_table())
        assert self._written(s) == tokens

    @precondition(lambda self: any(True for _ in self.tree.iter_nodes()))
    @rule(data=st.data())
    def pin(self, data: st.DataObject) -> None:
        node = data.draw(st.sampled_from(list(self.tree.iter_nodes())), label="node")
        self.tree.pin(node)
        self.pins.append((node, self.tree._path_pages(node)))

    @precondition(lambda self: self.pins)
    @rule(data=st.data())
    def unpin(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.pins) - 1), label="pin")
        node, _ = self.pins.pop(i)
        still = self._protected()
        self.tree.unpin(node)
        assert not any(self.tree.pool.is_free(p) for p in still)

    @rule(n=st.integers(0, 12))
    def evict(self, n: int) -> None:
        protected = self._protected()
        evictable, free = self.tree.num_evictable_pages, self.tree.num_free_pages
        freed = self.tree.evict(n)
        assert self.tree.num_free_pages == free + freed
        assert freed >= min(n, evictable)  # every unheld subtree can go, leaves first
        assert not any(self.tree.pool.is_free(p) for p in protected)

    @rule(tokens=TOKENS)
    def match(self, tokens: list[int]) -> None:
        assert self.tree.match_len(tokens) == self._oracle_match(tokens)

    # ------------------------------------------------------------------ invariants
    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "tree"):
            return
        tree = self.tree
        tree.check_invariants(self._live())
        assert accounted(tree, self._live()) == self.num_pages
        assert tree.num_free_pages + tree.num_cached_pages + sum(len(s.kv.own_pages) for s in self.seqs) \
            == self.num_pages
        for node in tree.iter_nodes():
            assert node.ref_count >= 0 and node.pin_count >= 0
            # every cached page holds exactly its node's tokens
            for i, page in enumerate(node.pages):
                assert self.content.get(page) == node.tokens[i * self.ps:(i + 1) * self.ps], \
                    f"page {page} of {node} holds {self.content.get(page)}"
            if not self.caching:
                assert not node.evictable, "without caching an unheld node must be freed at once"
        for page in self._protected():
            assert not tree.pool.is_free(page), f"page {page} of a live sequence or pin is free"
        for node, path in self.pins:
            assert node.pin_count >= 1 and (node.parent is not None)
            assert tree._path_pages(node) == path, "a pinned node's pages moved"
        for s in self.seqs:
            assert s.kv.prefix_len <= s.computed <= len(s.tokens)
            assert s.computed <= s.kv.capacity(self.ps)
            assert self._written(s) == s.tokens[:s.computed], "a sequence's pages lost its KV"
            if self.caching:
                assert tree.match_len(s.tokens[:s.kv.prefix_len]) == s.kv.prefix_len


TreeMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])
TestTreeMachine = TreeMachine.TestCase


# ----------------------------------------------------------------------------------- content keys
def test_page_keys_chain_the_prefix_and_survive_splits_and_processes() -> None:
    """A page's key depends on every token up to its end (equal keys: equal prefixes), is the same
    whichever node holds the page after splits, and is the same in another Python process."""
    import subprocess
    import sys

    tree, _ = make_tree(num_pages=32, page_size=2)
    a = [1, 2, 3, 4, 5, 6, 7, 8]
    cache(tree, a)
    (node,) = tree.root.children.values()
    whole = tree.page_keys(node)
    assert len(whole) == 4 and len(set(whole)) == 4
    assert whole == page_keys(a, 2)
    cache(tree, [1, 2, 3, 4, 9, 9])  # splits the node after two pages
    head = tree.root.children[(1, 2)]
    assert tree.page_keys(head) + tree.page_keys(head.children[(5, 6)]) == whole
    assert page_keys([1, 2, 3, 4, 9, 9], 2)[:2] == whole[:2] and page_keys([1, 2, 3, 4, 9, 9], 2)[2] != whole[2]
    assert page_keys([9, 2, 3, 4], 2)[1] != whole[1], "a page's key depends on the pages before it"
    script = "from forkserve.engine.page_keys import page_keys; print(page_keys([1, 2, 3, 4, 5, 6, 7, 8], 2)[3].hex())"
    other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.strip()
    assert other == whole[3].hex()
