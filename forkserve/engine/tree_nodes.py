"""The prefix tree's records: a node (a page-aligned token run and where its pages are) and a
live sequence's view of its KV (its path's pages plus the pages it owns alone)."""
from __future__ import annotations

from array import array

from forkserve.engine.locations import Location, Tier


def common_prefix_len(a: list[int], b: list[int], step: int) -> int:
    """Length of the common prefix of a and b: equal runs found by slice comparisons (in C) of
    doubling length from one page, then halving, then token by token. Planning compares every
    sorted neighbour pair of a batch, and matching walks every prompt along the tree: millions
    of tokens for long shared prompts."""
    n = min(len(a), len(b))
    i, width = 0, step
    while width >= 1:
        if i + width <= n and a[i:i + width] == b[i:i + width]:
            i += width
            width *= 2
        else:
            width //= 2
    return i


class TreeNode:
    __slots__ = ("parent", "children", "tokens", "loc", "ref_count", "pin_count", "last_access", "end")

    def __init__(self, parent: TreeNode | None, tokens: list[int], pages: list[int], end: int, clock: int) -> None:
        self.parent = parent
        self.children: dict[tuple[int, ...], TreeNode] = {}
        self.tokens = tokens  # len(tokens) == len(loc.ids) * page_size
        self.loc = Location(Tier.GPU, pages)
        self.ref_count = 0
        self.pin_count = 0
        self.last_access = clock
        self.end = end  # tokens from the root to the end of this node

    @property
    def pages(self) -> list[int]:
        """The node's GPU page ids (none while its pages are in another tier)."""
        return self.loc.ids if self.loc.tier is Tier.GPU else []

    @property
    def evictable(self) -> bool:
        return self.ref_count == 0 and self.pin_count == 0

    def path(self) -> list[TreeNode]:
        """Nodes from the root's child down to this node (empty for the root)."""
        nodes = []
        node: TreeNode | None = self
        while node is not None and node.parent is not None:
            nodes.append(node)
            node = node.parent
        return nodes[::-1]

    def __repr__(self) -> str:
        return f"TreeNode(end={self.end}, pages={len(self.pages)}, ref={self.ref_count}, pin={self.pin_count})"


class SeqKV:
    """One sequence's KV: a locked path in the tree plus the pages only it holds."""

    __slots__ = ("node", "own_pages", "num_cached_tokens", "_path_pages", "_table", "_released")

    def __init__(self, node: TreeNode, path_pages: list[int], num_cached_tokens: int) -> None:
        self.node = node
        self.own_pages: list[int] = []
        self.num_cached_tokens = num_cached_tokens
        self._path_pages = path_pages  # pages of root..node; splits never reorder them
        self._table: array | None = None  # cached page_table(); the tree resets it when pages move
        self._released = False

    @property
    def prefix_len(self) -> int:
        return self.node.end

    @property
    def path_pages(self) -> list[int]:
        return self._path_pages

    def page_table(self) -> array:
        """All of the sequence's pages in order, as a C int array (the step builder concatenates
        thousands of these per step, so it is cached and must not be modified by callers)."""
        self._check_live()
        if self._table is None:
            self._table = array("i", self._path_pages)
            self._table.extend(self.own_pages)
        return self._table

    def _add_own_pages(self, pages: list[int]) -> None:
        self.own_pages.extend(pages)
        if self._table is not None:
            self._table.extend(pages)

    def capacity(self, page_size: int) -> int:
        return self.node.end + len(self.own_pages) * page_size

    @property
    def released(self) -> bool:
        return self._released

    def _check_live(self) -> None:
        if self._released:
            raise RuntimeError("this sequence's KV was already released")
