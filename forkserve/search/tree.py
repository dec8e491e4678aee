"""Fork/join tree search from Python: nodes are held sequences, forks run as one batch.

`LLM.start(prompt)` makes a root; `node.fork(k, params, stop=...)` queues k continuations of the
node, each generating up to a stop (a step delimiter, EOS or max_tokens), and returns their
nodes at once. Nothing runs until a result is needed: reading a pending node's text (or
calling `LLM.advance`) steps the engine until it is done, and every fork queued by then, of
any node of any tree, runs in the same batches. A finished node keeps its KV (its full pages
shared with its siblings through the prefix tree), so forking it again starts from it;
`node.release()` gives its pages back at once. Under memory pressure held KV is dropped to the
cache first and recomputed when needed, so a search never fails for lack of pages.
"""
from __future__ import annotations

import itertools
from typing import Iterable

from forkserve.engine.engine import Engine, PromptInput
from forkserve.engine.sequence import Request, Sequence, SequenceStatus
from forkserve.sampling_params import SamplingParams


class TreeSearch:
    """The nodes of all trees on one engine, and the loop that runs their pending forks."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._ids = itertools.count()
        self._pending: set[Node] = set()

    def start(self, prompt: PromptInput, params: SamplingParams) -> Node:
        """A root node: the prompt, nothing generated yet; its KV is computed by its first fork."""
        request = self.engine.new_request(f"tree-{next(self._ids)}", prompt, params, hold=True)
        return Node(self, None, request, 0, len(prompt.token_ids))

    def fork(self, node: Node, k: int, params: SamplingParams) -> list[Node]:
        request = Request(f"tree-{next(self._ids)}", None, list(node.seq.token_ids), params, num_samples=k, hold=True)
        self.engine.fork(node.seq, 1, request)  # it forks into the other k - 1 at its first draw
        children = [Node(self, node, request, i, node.root_len) for i in range(k)]
        self._pending.update(children)
        return children

    def advance(self, nodes: Iterable[Node] | None = None) -> None:
        """Step the engine until the given nodes (default: every pending node) are generated."""
        targets = list(self._pending if nodes is None else nodes)
        self.engine.run_until(lambda: all(node.ready for node in targets), "tree search")
        self._pending.difference_update(targets)

    def release(self, node: Node, seq_index: int) -> None:
        request = node._request
        if seq_index == 0:
            # Its siblings are forked from it at its first draw: let that happen first.
            self.engine.run_until(lambda: len(request.seqs) == request.num_samples, "tree search")
        self.engine.release(request.seqs[seq_index])
        self._pending.discard(node)


class Node:
    """One step of a search tree: the tokens one fork generated, on top of its parent's."""

    def __init__(self, search: TreeSearch, parent: Node | None, request: Request, index: int, root_len: int) -> None:
        self.search = search
        self.parent = parent
        self.root_len = root_len  # length of the root prompt
        self._request = request
        self._index = index
        self._released = False

    # ------------------------------------------------------------------------ state
    @property
    def ready(self) -> bool:
        """Generated (or a root)."""
        seqs = self._request.seqs
        return self._index < len(seqs) and seqs[self._index].status is SequenceStatus.FINISHED

    @property
    def seq(self) -> Sequence:
        """This node's sequence, once generated (runs the pending forks if needed)."""
        if not self.ready:
            self.search.advance()
        return self._request.seqs[self._index]

    @property
    def released(self) -> bool:
        return self._released

    @property
    def index(self) -> int:
        """Its place among the k children of its fork: it samples from seed `params.seed + index`."""
        return self._index

    @property
    def depth(self) -> int:
        return 0 if self.parent is None else self.parent.depth + 1

    @property
    def params(self) -> SamplingParams:
        return self._request.params

    # ------------------------------------------------------------------------ results
    @property
    def token_ids(self) -> list[int]:
        """Every token generated from the root prompt down to this node."""
        return self.seq.token_ids[self.root_len:]

    @property
    def step_token_ids(self) -> list[int]:
        """The tokens this node's fork generated."""
        return self.seq.output_token_ids

    @property
    def text(self) -> str:
        """`token_ids` decoded (stop strings included: they are part of the tokens a fork continues)."""
        return self._decode(self.token_ids)

    @property
    def step_text(self) -> str:
        return self._decode(self.step_token_ids)

    @property
    def cumulative_logprob(self) -> float:
        """Summed log-probabilities of `token_ids` (raw, as vLLM reports them)."""
        own = self.seq.cumulative_logprob if self.parent is not None else 0.0
        return own + (self.parent.cumulative_logprob if self.parent is not None else 0.0)

    @property
    def finish_reason(self) -> str | None:
        """Why this node's fork stopped: "stop" (stop string, stop token or EOS) or "length"."""
        return self.seq.finish_reason

    @property
    def stop_reason(self) -> int | str | None:
        return self.seq.stop_reason

    @property
    def is_terminal(self) -> bool:
        """True when it cannot be continued: it ended with EOS or at max_model_len."""
        seq = self.seq
        if self.parent is None:
            return False
        eos = seq.finish_reason == "stop" and seq.stop_reason is None
        return eos or len(seq.token_ids) >= self.search.engine.max_model_len

    def _decode(self, tokens: list[int]) -> str:
        tokenizer = self.search.engine.tokenizer
        if tokenizer is None:
            return ""
        return tokenizer.decode(tokens, skip_special_tokens=self.params.skip_special_tokens)

    # ------------------------------------------------------------------------ actions
    def fork(self, k: int, params: SamplingParams | None = None, stop: str | list[str] | None = None) -> list[Node]:
        """k continuations of this node, each up to a stop; returned at once, generated lazily.

        params defaults to this node's; stop, when given, replaces params.stop. With a seed s,
        child i samples from seed s + i, as sample i of a request with n = k would.
        """
        engine = self.search.engine
        if self._released:
            raise ValueError("fork: this node was released; fork a node that is still held")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"fork: k must be an integer of at least 1, got {k!r}")
        engine.check_width(k, "k", "fork")
        params = self.params if params is None else engine.check_params(params, "fork")
        if stop is not None:
            params = params.replace(stop=stop)
        if self.is_terminal:
            raise ValueError("fork: this node ended with EOS or at max_model_len and cannot be continued")
        return self.search.fork(self, k, params)

    def release(self) -> None:
        """Free this node's pages now (a running fork is stopped). Its children keep theirs."""
        if not self._released:
            self.search.release(self, self._index)
            self._released = True

    def __repr__(self) -> str:
        state = "released" if self._released else "ready" if self.ready else "pending"
        return f"Node(depth={self.depth}, {state})"
