"""Logits to tokens: token masks, penalties, token controls (logit_bias, allowed_token_ids,
bad_words), temperature, min-p, top-k, top-p, seeded draws, logprobs.

A `TokenBitmask` (structured outputs) masks its rows' disallowed tokens to -inf first, on the
logits' device for the whole step in one call, so every later stage (and the logprobs) sees
only the allowed tokens, as in vLLM.

Draws use the exponential race, ``argmax(probs / E)`` with ``E = -log(U)``. For a seeded row,
U is a counter-based hash of (seed, step, token id), so a seeded request draws the same tokens
whatever else shares its batch and whichever row it lands on. On the GPU, a step whose rows are
all plain (temperature only, unseeded, no logprobs) is drawn by Triton kernels that read the
logits once and invert the CDF (forkserve/kernels/sampling.py) instead; unseeded rows that only
add top-k / top-p are drawn by FlashInfer's sort-free kernels (forkserve/kernels/truncated_sampling.py)
unless `flashinfer_sampling` is off, and the rest of such a step by the general path.

Top-k applies first, then top-p over the mass of the tokens top-k kept (vLLM's order).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch

from forkserve.kernels import gpu_kernels
from forkserve.sampling_params import ALL_LOGPROBS, SamplingParams
from forkserve.transfer import to_device


@dataclass
class SamplingRow:
    """What the sampler needs to know about one sequence that draws a token this step."""

    params: SamplingParams
    seed: int | None  # None: use the sampler's own generator
    token_ids: Sequence[int]  # prompt then output so far (not copied: only penalties read it)
    num_prompt_tokens: int
    blocked_token_ids: Sequence[int] = ()  # masked this step (e.g. EOS before min_tokens)
    bad_words_token_ids: Sequence[Sequence[int]] = ()  # token sequences the output must not contain

    def banned_token_ids(self) -> list[int]:
        """Tokens masked at this draw: the blocked ones, and each bad word's last token where the
        output so far ends with the rest of that word (vLLM's rule, over output tokens only)."""
        banned = list(self.blocked_token_ids)
        if self.bad_words_token_ids:
            output = self.output_token_ids
            for word in self.bad_words_token_ids:
                prefix = len(word) - 1
                if prefix == 0 or (len(output) >= prefix and list(output[len(output) - prefix:]) == list(word[:-1])):
                    banned.append(word[-1])
        return banned

    @property
    def step(self) -> int:
        """Index of the token being drawn (output tokens so far)."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> Sequence[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> Sequence[int]:
        return self.token_ids[self.num_prompt_tokens:]


@dataclass
class TokenBitmask:
    """Allowed tokens of a step's constrained rows: bit t of `words[row]` (32 tokens a word, int32,
    on the host, pinned when the logits are on a GPU) set when token t may be drawn. Only `rows`
    are read; the others draw freely."""

    words: torch.Tensor  # [rows of the step, ceil(vocab / 32)]
    rows: list[int]

    def slice(self, start: int, stop: int) -> TokenBitmask | None:
        """The part for draw rows [start, stop), renumbered from 0 (None if none of them is constrained)."""
        rows = [row - start for row in self.rows if start <= row < stop]
        return TokenBitmask(self.words[start:stop], rows) if rows else None

    def apply(self, logits: torch.Tensor) -> None:
        """Set the disallowed logits of the constrained rows to -inf, in place, on logits' device
        (xgrammar's kernel: Triton / CUDA on a GPU, torch on the CPU)."""
        from xgrammar import apply_token_bitmask_inplace

        words = self.words if logits.device.type == "cpu" else self.words.to(logits.device, non_blocking=True)
        apply_token_bitmask_inplace(logits, words, vocab_size=logits.shape[-1], indices=self.rows)


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float]  # raw log-softmax at the drawn token (vLLM's default logprobs mode)
    ranks: list[int]  # 1-based rank of the drawn token among the raw logits
    top_logprobs: list[list[tuple[int, float]] | None]  # top-k (token, logprob) where asked for


@dataclass
class Draws:
    """A step's draws as tensors, on the device until `to_host` (the step's one sync point).

    `copy_to_host` starts the device-to-host copy without waiting, so the host can launch the
    next step first and collect these tokens while it runs.
    """

    tokens: torch.Tensor
    logprobs: torch.Tensor  # raw log-softmax at each drawn token
    wanted: list[int | None]  # per row, how many top logprobs it asked for (None: none at all)
    ranks: torch.Tensor | None = None  # only when some row asked for logprobs
    top_ids: torch.Tensor | None = None
    top_values: torch.Tensor | None = None
    ready: torch.cuda.Event | None = None  # set by copy_to_host: when the host copies are complete

    def copy_to_host(self) -> Draws:
        """Pinned host copies, queued behind the work that computes them."""
        if self.tokens.device.type != "cuda":
            return self
        host = {name: None if t is None else torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                for name, t in self._tensors().items()}
        ready = torch.cuda.Event()
        ready.record()
        return Draws(wanted=self.wanted, ready=ready, **host)

    def merged(self, other_rows: list[int], tokens: torch.Tensor, logprobs: torch.Tensor, own_rows: list[int],
               num_rows: int) -> Draws:
        """These draws (of rows `own_rows` of a step) with plain draws of the step's `other_rows`
        (no logprobs asked: rank 0, no top logprobs), in the step's row order."""
        device = self.tokens.device
        own, other = to_device(own_rows, device, torch.long), to_device(other_rows, device, torch.long)

        def spread(mine: torch.Tensor | None, theirs: torch.Tensor | None) -> torch.Tensor | None:
            if mine is None:
                return None
            out = torch.zeros((num_rows, *mine.shape[1:]), dtype=mine.dtype, device=device)
            out[own] = mine
            if theirs is not None:
                out[other] = theirs.to(mine.dtype)
            return out

        wanted: list[int | None] = [None] * num_rows
        for row, want in zip(own_rows, self.wanted):
            wanted[row] = want
        return Draws(spread(self.tokens, tokens), spread(self.logprobs, logprobs), wanted, spread(self.ranks, None),
                     spread(self.top_ids, None), spread(self.top_values, None))

    def _tensors(self) -> dict[str, torch.Tensor | None]:
        return dict(tokens=self.tokens, logprobs=self.logprobs, ranks=self.ranks, top_ids=self.top_ids,
                    top_values=self.top_values)

    def to_host(self) -> SamplerOutput:
        if self.ready is not None:
            self.ready.synchronize()
        token_list, logprob_list = self.tokens.tolist(), self.logprobs.tolist()
        if self.ranks is None:
            return SamplerOutput(token_list, logprob_list, [0] * len(token_list), [None] * len(token_list))
        top_ids = self.top_ids.tolist() if self.top_ids is not None else None
        top_values = self.top_values.tolist() if self.top_values is not None else None
        top_logprobs: list[list[tuple[int, float]] | None] = []
        for i, want in enumerate(self.wanted):
            if want is None:
                top_logprobs.append(None)
            else:
                top_logprobs.append(list(zip(top_ids[i][:want], top_values[i][:want])) if want else [])
        return SamplerOutput(token_list, logprob_list, self.ranks.tolist(), top_logprobs)


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)
_GOLDEN = _signed(0x9E3779B97F4A7C15)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser: int64 multiplication wraps, which is what the hash wants."""
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def seeded_uniform(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[N, V] floats strictly inside (0, 1), a pure function of (seed, step, token id)."""
    row = _mix64(_mix64(seeds.long() * _GOLDEN + 1) + steps.long())
    token = torch.arange(vocab_size, device=seeds.device, dtype=torch.long) * _GOLDEN
    bits = _shift_right(_mix64(row[:, None] ^ token[None, :]), 40)  # top 24 bits
    return (bits.float() + 0.5) * (1.0 / (1 << 24))


def _pad(rows: list[Sequence[int]], fill: int, device: torch.device) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    return to_device([list(r) + [fill] * (width - len(r)) for r in rows], device, torch.long).reshape(len(rows), width)


def _is_plain(row: SamplingRow) -> bool:
    """Temperature (or greedy) only, unseeded, no logprobs: what the GPU sampling kernels draw."""
    p = row.params
    return row.seed is None and not row.blocked_token_ids and p.logprobs is None and p.top_k <= 0 \
        and p.top_p >= 1.0 and p.min_p <= 0.0 and p.repetition_penalty == 1.0 \
        and not p.frequency_penalty and not p.presence_penalty and not p.controls_tokens


def _is_truncated(row: SamplingRow) -> bool:
    """Unseeded, no logprobs, nothing but temperature, top-k and top-p: what FlashInfer's kernels draw."""
    p = row.params
    return row.seed is None and not row.blocked_token_ids and p.logprobs is None and p.min_p <= 0.0 \
        and p.repetition_penalty == 1.0 and not p.frequency_penalty and not p.presence_penalty \
        and not p.controls_tokens


# Rows the general path draws at once: its [rows, vocab] temporaries (fp32 copies, the top-p
# sort and its int64 order, penalty counts, seeded hashes) stay a few hundred MB however many
# rows a step samples, so the KV pool's sizing (worker/memory.py) need not leave gigabytes for them.
# Below 128 rows torch.sort (CUDA) sorts all rows as one array keyed by row, with scratch that
# grows with the rows; at 128 or more it switches method. Chunks below 128 rows keep one method,
# so a full chunk is the general path's worst case, which the sizing's profile step runs.
GENERAL_PATH_ROWS = 64


def _apply_token_controls(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """logit_bias added and tokens outside allowed_token_ids masked, in place, on the rows that
    ask (one scatter each over those rows only). Logprobs stay those of the raw logits, as in vLLM."""
    bias = [(i, token, value) for i, r in enumerate(rows) if r.params.logit_bias
            for token, value in r.params.logit_bias.items()]
    if bias:
        index = to_device([(i, token) for i, token, _ in bias], logits.device, torch.long)
        values = to_device([value for _, _, value in bias], logits.device, torch.float32)
        logits.index_put_((index[:, 0], index[:, 1]), values.to(logits.dtype), accumulate=True)
    restricted = [i for i, r in enumerate(rows) if r.params.allowed_token_ids is not None]
    if restricted:
        allowed = _pad([rows[i].params.allowed_token_ids for i in restricted], logits.shape[1], logits.device)
        keep = torch.zeros(len(restricted), logits.shape[1] + 1, dtype=torch.bool, device=logits.device)
        keep = keep.scatter_(1, allowed, True)[:, :-1]
        index = to_device(restricted, logits.device, torch.long)
        logits[index] = logits[index].masked_fill(~keep, float("-inf"))
    return logits


class Sampler:
    """`flashinfer_sampling`: unseeded top-k / top-p rows go through FlashInfer's kernels on a GPU
    (off: the general path's sort, kept selectable to measure the two)."""

    def __init__(self, seed: int | None = 0, device: torch.device | str = "cpu", flashinfer_sampling: bool = True
                 ) -> None:
        self.device = torch.device(device)
        self.flashinfer_sampling = flashinfer_sampling
        self.generator = torch.Generator(device=self.device)
        if seed is not None:
            self.generator.manual_seed(seed)
        self._philox = random.Random(seed)  # seeds of the GPU kernel's draws, chosen without a device sync

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow],
                 bitmask: TokenBitmask | None = None) -> SamplerOutput:
        return self.draw(logits, rows, bitmask).to_host()

    def draw(self, logits: torch.Tensor, rows: Sequence[SamplingRow], bitmask: TokenBitmask | None = None) -> Draws:
        """The step's draws as device tensors; nothing here waits for the GPU. `bitmask` is applied
        to `logits` in place."""
        if bitmask is not None:
            bitmask.apply(logits)
        kernels = gpu_kernels("sampling", logits)
        if kernels is not None and all(_is_plain(r) for r in rows):
            temperatures = to_device([0.0 if r.params.greedy else r.params.temperature for r in rows],
                                     logits.device, torch.float32)
            tokens, chosen = kernels.sample(logits, temperatures, self._philox.getrandbits(31))
            return Draws(tokens, chosen, [None] * len(rows))
        truncated = gpu_kernels("truncated_sampling", logits) if self.flashinfer_sampling else None
        fast = [i for i, r in enumerate(rows) if _is_truncated(r)] if truncated is not None else []
        if not fast:
            return self._draw_rows(logits, rows)
        vocab = logits.shape[-1]
        fast_rows = [rows[i] for i in fast]
        tokens, chosen = truncated.sample(
            logits if len(fast) == len(rows) else logits[to_device(fast, logits.device, torch.long)],
            to_device([0.0 if r.params.greedy else r.params.temperature for r in fast_rows], logits.device,
                      torch.float32),
            to_device([r.params.top_k if 0 < r.params.top_k < vocab else vocab for r in fast_rows], logits.device,
                      torch.int32),
            to_device([r.params.top_p for r in fast_rows], logits.device, torch.float32), self.generator)
        if len(fast) == len(rows):
            return Draws(tokens, chosen, [None] * len(rows))
        rest = [i for i, r in enumerate(rows) if not _is_truncated(r)]
        general = self._draw_rows(logits[to_device(rest, logits.device, torch.long)], [rows[i] for i in rest])
        return general.merged(fast, tokens, chosen, rest, len(rows))

    def _draw_rows(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> Draws:
        """The general path, GENERAL_PATH_ROWS rows at a time."""
        vocab = logits.shape[-1]
        wanted = [vocab if r.params.logprobs == ALL_LOGPROBS else r.params.logprobs for r in rows]
        k = max((w if w is not None else -1) for w in wanted)
        parts = [self._draw_general(logits[i:i + GENERAL_PATH_ROWS], rows[i:i + GENERAL_PATH_ROWS], k)
                 for i in range(0, len(rows), GENERAL_PATH_ROWS)]
        tokens, chosen, ranks, top_ids, top_values = (
            None if column[0] is None else column[0] if len(column) == 1 else torch.cat(column)
            for column in zip(*parts))
        return Draws(tokens, chosen, wanted, ranks, top_ids, top_values)

    def _draw_general(self, logits: torch.Tensor, rows: Sequence[SamplingRow], k: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None,
                                 torch.Tensor | None]:
        """Tokens, their logprobs, and (k >= 0) their ranks and the k best logprobs, of up to
        GENERAL_PATH_ROWS rows."""
        logits = logits.float()
        log_normaliser = torch.logsumexp(logits, dim=-1)
        raw_logits = logits
        logits = self._apply_penalties(logits, rows)
        if any(r.params.controls_tokens for r in rows):
            logits = _apply_token_controls(logits.clone() if logits is raw_logits else logits, rows)
        blocked = [(i, t) for i, r in enumerate(rows) for t in r.banned_token_ids()]
        if blocked:
            index = to_device(blocked, logits.device, torch.long)
            logits = logits.clone() if logits is raw_logits else logits
            logits[index[:, 0], index[:, 1]] = float("-inf")
        greedy = [r.params.greedy for r in rows]
        if all(greedy):
            tokens = logits.argmax(dim=-1)
        else:
            tokens = self._draw(logits, rows)
            if any(greedy):
                tokens = torch.where(to_device(greedy, logits.device), logits.argmax(dim=-1), tokens)
        chosen = raw_logits.gather(1, tokens[:, None]).squeeze(1) - log_normaliser
        if k < 0:  # nobody asked for logprobs: skip the ranks and top-k passes over the vocabulary
            return tokens, chosen, None, None, None
        ranks = (raw_logits > raw_logits.gather(1, tokens[:, None])).sum(dim=-1) + 1
        if not k:
            return tokens, chosen, ranks, None, None
        top = torch.topk(raw_logits, k, dim=-1)
        return tokens, chosen, ranks, top.indices, top.values - log_normaliser[:, None]

    def _apply_penalties(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """vLLM's penalties: repetition over prompt and output, frequency and presence over output."""
        params = [r.params for r in rows]
        use_rep = any(p.repetition_penalty != 1.0 for p in params)
        use_out = any(p.frequency_penalty or p.presence_penalty for p in params)
        if not (use_rep or use_out):
            return logits
        n, vocab = logits.shape
        dev = logits.device
        outputs = _pad([r.output_token_ids for r in rows], vocab, dev)
        counts = torch.zeros(n, vocab + 1, device=dev).scatter_add_(1, outputs, torch.ones_like(outputs, dtype=torch.float))[:, :vocab]
        if use_rep:
            prompts = _pad([r.prompt_token_ids for r in rows], vocab, dev)
            seen = torch.zeros(n, vocab + 1, dtype=torch.bool, device=dev).scatter_(1, prompts, True)[:, :vocab] | (counts > 0)
            rep = to_device([p.repetition_penalty for p in params], dev)[:, None]
            logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
        if use_out:
            freq = to_device([p.frequency_penalty for p in params], dev)[:, None]
            pres = to_device([p.presence_penalty for p in params], dev)[:, None]
            logits = logits - freq * counts - pres * (counts > 0).float()
        return logits

    def _draw(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Random draws for every row (greedy rows are overridden by the caller)."""
        n, vocab = logits.shape
        dev = logits.device
        params = [r.params for r in rows]
        temperature = to_device([p.temperature if not p.greedy else 1.0 for p in params], dev)
        probs = torch.softmax(logits / temperature[:, None], dim=-1)
        if any(p.min_p > 0 for p in params):
            min_p = to_device([p.min_p for p in params], dev)[:, None]
            probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
        if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
            probs = self._top_k_top_p(probs, params)
        return (probs / self._exponential(rows, vocab, dev)).argmax(dim=-1)

    @staticmethod
    def _top_k_top_p(probs: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        vocab = probs.shape[1]
        dev = probs.device
        top_k = to_device([p.top_k if p.top_k > 0 else vocab for p in params], dev)[:, None]
        top_p = to_device([p.top_p for p in params], dev)[:, None]
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        position = torch.arange(vocab, device=dev)[None, :]
        outside_k = position >= top_k
        kept = sorted_probs.masked_fill(outside_k, 0.0)
        before = kept.cumsum(dim=-1) - kept  # top-k mass strictly ahead of each token
        drop = outside_k | (before >= top_p * kept.sum(dim=-1, keepdim=True))
        drop[:, 0] = False  # always keep the most likely token
        return torch.zeros_like(probs).scatter_(1, order, sorted_probs.masked_fill(drop, 0.0))

    def _exponential(self, rows: Sequence[SamplingRow], vocab: int, dev: torch.device) -> torch.Tensor:
        seeded = [i for i, r in enumerate(rows) if r.seed is not None]
        if not seeded:
            # Clamped: a zero would make a zero-probability token's ratio 0/0 = NaN, which argmax picks.
            return torch.empty(len(rows), vocab, device=dev).exponential_(generator=self.generator).clamp_(min=1e-20)
        uniform = torch.empty(len(rows), vocab, device=dev)
        unseeded = [i for i, r in enumerate(rows) if r.seed is None]
        seeds = to_device([rows[i].seed % (1 << 63) for i in seeded], dev)
        steps = to_device([rows[i].step for i in seeded], dev)
        uniform[seeded] = seeded_uniform(seeds, steps, vocab)
        if unseeded:
            uniform[unseeded] = torch.rand(len(unseeded), vocab, device=dev, generator=self.generator).clamp_(min=1e-20)
        return -torch.log(uniform)
