"""`SamplingParams`: vLLM's names and defaults, validated when built."""
from __future__ import annotations

import dataclasses
import enum
import functools
import math
import reprlib
from dataclasses import dataclass
from typing import Any

from forkserve.structured.params import StructuredOutputsParams

_GREEDY_TEMPERATURE = 1e-5  # below this vLLM samples greedily
ALL_LOGPROBS = -1  # logprobs / prompt_logprobs: the whole vocabulary (vLLM's -1)


class RequestOutputKind(enum.Enum):
    """vLLM's output kinds. `LLM.generate` returns each request's final output whatever the kind
    (as vLLM's `LLM` does); the server streams deltas of its own."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2

# What the sampler's tensors hold: integers go into int64 tensors, floats into float32 ones.
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
FLOAT32_MAX = 3.4028234663852886e38
# Beyond these a repetition penalty only drives a seen token's logit to 0 or to overflow.
REPETITION_PENALTY_RANGE = (1e-6, 1e6)

_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxlist, _SHOWN.maxtuple, _SHOWN.maxdict = 3, 8, 8, 8
_SHOWN.maxstring, _SHOWN.maxlong, _SHOWN.maxother = 80, 40, 80


def shown(value: Any) -> str:
    """A bounded repr for error messages: a poison value may be huge or deeply nested."""
    try:
        return _SHOWN.repr(value)
    except ValueError:  # an int past Python's str conversion limit (4,300 digits)
        return f"<an integer of {value.bit_length()} bits>" if isinstance(value, int) else f"<{type(value).__name__}>"


def _fail(name: str, why: str, value: Any) -> ValueError:
    return ValueError(f"invalid SamplingParams: {name} {why}, got {shown(value)}")


def is_valid_text(text: str) -> bool:
    """A str that is valid Unicode: no lone surrogates (JSON's \\ud800 escapes), which UTF-8 cannot encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    """How to sample, with vLLM's names and defaults.

    n > 1 (and best_of): the prompt is prefilled once; at its first draw the request forks into
    its samples, which share the prompt's KV pages. With a seed s, sample i draws from seed
    s + i, so it produces exactly the tokens of a separate request with n=1 and seed s + i (and
    a request's tokens do not depend on what shares its batch). best_of > n draws best_of
    samples (seeds s .. s + best_of - 1) and returns the n of highest cumulative logprob, best
    first, re-indexed 0..n-1. The engine caps n and best_of at its `max_n` setting.

    structured_outputs (a `StructuredOutputsParams`) constrains the output to a JSON schema,
    regex, choice or grammar; each sample keeps its own position in the grammar.
    """

    n: int = 1
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputsParams | None = None
    spaces_between_special_tokens: bool = True
    detokenize: bool = True  # False: token ids only (text stays empty; stop strings need it)
    logit_bias: dict[int, float] | None = None  # added to the token's logit before sampling
    allowed_token_ids: list[int] | None = None  # only these may be drawn
    bad_words: list[str] | None = None  # never generated (each word's tokens, with and without a leading space)
    truncate_prompt_tokens: int | None = None  # keep the prompt's last k tokens (-1: max_model_len)
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    extra_args: dict[str, Any] | None = None  # carried for the caller, unread by the engine (as in vLLM)

    def __init__(self, **kwargs: Any) -> None:
        defaults = _field_defaults()
        if not kwargs.keys() <= defaults.keys():
            unknown = sorted(kwargs.keys() - defaults.keys())
            raise ValueError(f"invalid SamplingParams: unknown field(s) {', '.join(unknown)}")
        self.__dict__.update(defaults)
        self.__dict__.update(kwargs)
        self._validate()

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "SamplingParams":
        if not isinstance(values, dict):
            raise ValueError(f"invalid SamplingParams: expected a dict, got {type(values).__name__}")
        return cls(**values)

    def replace(self, **changes: Any) -> "SamplingParams":
        """A copy with some fields changed, validated again."""
        values = {name: getattr(self, name) for name in _field_defaults()}
        values.update(changes)
        return SamplingParams(**values)

    clone = replace

    def check(self, label: str) -> None:
        """Validate again, naming the request: fields may have been set since construction."""
        try:
            self._validate()
        except ValueError as err:
            raise ValueError(f"{label}: {err}") from None

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_TEMPERATURE

    def _validate(self) -> None:
        # Types are read from __dict__ with exact-type fast paths: a batch builds and checks one
        # of these per request (thousands) before its first step, while the GPU waits.
        values = self.__dict__
        for name in _FLOAT_FIELDS:
            value = values[name]
            if type(value) is not float:
                if not _is_number(value):
                    raise _fail(name, "must be a number", value)
                try:
                    value = values[name] = float(value)
                except OverflowError:
                    raise _fail(name, "must be a finite number", value) from None
            if not (math.isfinite(value) and -FLOAT32_MAX <= value <= FLOAT32_MAX):
                raise _fail(name, "must be a finite number", value)
        for name in _INT_FIELDS:
            if type(values[name]) is not int and not _is_int(values[name]):
                raise _fail(name, "must be an integer", values[name])
            if not INT64_MIN <= values[name] <= INT64_MAX:
                raise _fail(name, "must fit in 64 bits", values[name])
        for name in _OPTIONAL_INT_FIELDS:
            value = values[name]
            if value is not None and type(value) is not int and not _is_int(value):
                raise _fail(name, "must be an integer or None", value)
            if value is not None and not INT64_MIN <= value <= INT64_MAX:
                raise _fail(name, "must fit in 64 bits (a signed 64-bit integer)", value)
        for name in _BOOL_FIELDS:
            if type(values[name]) is not bool:
                raise _fail(name, "must be true or false", values[name])
        if self.n < 1:
            raise _fail("n", "must be at least 1", self.n)
        if self.best_of is not None and self.best_of < self.n:
            raise _fail("best_of", f"must be at least n ({self.n})", self.best_of)
        if self.temperature < 0:
            raise _fail("temperature", "must be non-negative", self.temperature)
        if not 0.0 < self.top_p <= 1.0:
            raise _fail("top_p", "must be in (0, 1]", self.top_p)
        if self.top_k < -1:
            raise _fail("top_k", "must be -1 or 0 (disabled) or at least 1", self.top_k)
        if not 0.0 <= self.min_p <= 1.0:
            raise _fail("min_p", "must be in [0, 1]", self.min_p)
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise _fail(name, "must be in [-2, 2]", getattr(self, name))
        low, high = REPETITION_PENALTY_RANGE
        if not low <= self.repetition_penalty <= high:
            raise _fail("repetition_penalty", f"must be in [{low:g}, {high:g}]", self.repetition_penalty)
        if self.max_tokens is not None and self.max_tokens < 1:
            raise _fail("max_tokens", "must be at least 1", self.max_tokens)
        if self.min_tokens < 0:
            raise _fail("min_tokens", "must be non-negative", self.min_tokens)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise _fail("min_tokens", f"must not exceed max_tokens ({self.max_tokens})", self.min_tokens)
        if values["structured_outputs"] is not None and not isinstance(values["structured_outputs"],
                                                                       StructuredOutputsParams):
            raise _fail("structured_outputs", "must be a StructuredOutputsParams", values["structured_outputs"])
        for name in ("logprobs", "prompt_logprobs"):  # the upper bound is the engine's max_logprobs
            if getattr(self, name) is not None and getattr(self, name) < ALL_LOGPROBS:
                raise _fail(name, "must be -1 (the whole vocabulary) or non-negative", getattr(self, name))
        self.stop = self._stop_list(self.stop)
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if not isinstance(self.stop_token_ids, (list, tuple)) or \
                not all(_is_int(t) and 0 <= t <= INT64_MAX for t in self.stop_token_ids):
            raise _fail("stop_token_ids", "must be a list of non-negative token ids", self.stop_token_ids)
        self.stop_token_ids = list(self.stop_token_ids)
        self._validate_token_controls()
        if self.truncate_prompt_tokens is not None and not (
                _is_int(self.truncate_prompt_tokens) and (self.truncate_prompt_tokens >= 1 or
                                                          self.truncate_prompt_tokens == -1)):
            raise _fail("truncate_prompt_tokens", "must be -1 or a positive integer", self.truncate_prompt_tokens)
        if not isinstance(self.output_kind, RequestOutputKind):
            raise _fail("output_kind", "must be a RequestOutputKind", self.output_kind)
        if self.extra_args is not None and not isinstance(self.extra_args, dict):
            raise _fail("extra_args", "must be a dict or None", self.extra_args)
        if not self.detokenize and self.stop:
            raise _fail("stop", "needs detokenize=True (stop strings are matched in the text)", self.stop)

    def _validate_token_controls(self) -> None:
        """logit_bias, allowed_token_ids and bad_words: shapes here, token ids against the
        vocabulary in `Engine.check_params` (the vocabulary is the model's)."""
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise _fail("logit_bias", "must be a dict of token id -> bias", self.logit_bias)
            bias = {}
            for token, value in self.logit_bias.items():
                try:  # JSON objects key by strings: "50256" means token 50256, as in OpenAI's API
                    token_id = int(token) if isinstance(token, str) else token
                except ValueError:
                    raise _fail("logit_bias", "keys must be token ids", token) from None
                if not _is_int(token_id) or not _is_number(value):
                    raise _fail("logit_bias", "must map token ids to numbers", {token: value})
                bias[token_id] = float(value)
            self.logit_bias = bias or None
        if self.allowed_token_ids is not None:
            ids = self.allowed_token_ids
            if not isinstance(ids, (list, tuple)) or not ids or not all(_is_int(t) for t in ids):
                raise _fail("allowed_token_ids", "must be a non-empty list of token ids", ids)
            self.allowed_token_ids = list(ids)
        if self.bad_words is not None:
            words = self.bad_words
            if not isinstance(words, (list, tuple)) or not all(isinstance(w, str) and w.strip() for w in words):
                raise _fail("bad_words", "must be a list of non-blank strings", words)
            self.bad_words = list(words) or None

    @property
    def controls_tokens(self) -> bool:
        """Does it bias, restrict or ban tokens (the sampler's masked step)?"""
        return self.logit_bias is not None or self.allowed_token_ids is not None or self.bad_words is not None

    @staticmethod
    def _stop_list(stop: Any) -> list[str]:
        if stop is None:
            return []
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
            raise _fail("stop", "must be a string or a list of strings", stop)
        if any(s == "" for s in stops):
            raise _fail("stop", "must not contain an empty string", stop)
        if not all(is_valid_text(s) for s in stops):
            raise _fail("stop", "must be valid Unicode (no lone surrogates)", stop)
        return list(stops)


_FLOAT_FIELDS = ("presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p", "min_p")
_INT_FIELDS = ("n", "top_k", "min_tokens")
_OPTIONAL_INT_FIELDS = ("best_of", "seed", "max_tokens", "logprobs", "prompt_logprobs")
_BOOL_FIELDS = ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output", "spaces_between_special_tokens",
                "detokenize")


@functools.cache
def _field_defaults() -> dict[str, Any]:
    """SamplingParams' constructor fields and their defaults (all immutable), read once."""
    return {f.name: f.default for f in dataclasses.fields(SamplingParams) if f.init}


@dataclass
class BeamSearchParams:
    """vLLM's `BeamSearchParams`, plus HF's `early_stopping`.

    The search is HF transformers' beam search (`num_beams = beam_width`): each step keeps the
    best `max(2, 1 + #eos) * beam_width` continuations of all beams by summed log-probability;
    one of the best `beam_width` that ends in EOS (or reaches max_tokens) becomes a finished
    hypothesis scored `sum_logprobs / generated_len ** length_penalty` (generated_len counts the
    EOS); the rest continue. `early_stopping`: True stops once beam_width hypotheses are
    finished; False (HF's default) stops when the best running beam, scored at its current
    length, cannot beat the worst finished one; "never" stops only at max_tokens (with a
    positive length_penalty the bound uses max_tokens). Scores are the model's raw
    log-probabilities, as in vLLM and in HF without sampling, so `temperature` is accepted for
    compatibility and does not change the result.
    """

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    early_stopping: bool | str = False

    def __post_init__(self) -> None:
        for name in ("beam_width", "max_tokens"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"invalid BeamSearchParams: {name} must be an integer of at least 1, got {value!r}")
        for name in ("temperature", "length_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or abs(value) > FLOAT32_MAX:
                raise ValueError(f"invalid BeamSearchParams: {name} must be a finite number, got {shown(value)}")
        if self.temperature < 0:
            raise ValueError(f"invalid BeamSearchParams: temperature must be non-negative, got {self.temperature!r}")
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"invalid BeamSearchParams: {name} must be true or false, got {getattr(self, name)!r}")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"invalid BeamSearchParams: early_stopping must be True, False or 'never', "
                             f"got {self.early_stopping!r}")
