"""`StructuredOutputsParams`: vLLM's names for what a request's output must match."""
from __future__ import annotations

import json as json_module
from dataclasses import dataclass, field, fields
from typing import Any

CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object")


def _fail(name: str, why: str, value: Any) -> ValueError:
    return ValueError(f"invalid StructuredOutputsParams: {name} {why}, got {value!r}")


@dataclass
class StructuredOutputsParams:
    """Exactly one constraint: `json` (a JSON schema, as a dict or its text), `regex`, `choice`
    (the output is one of these strings), `grammar` (EBNF / GBNF text) or `json_object` (any
    JSON object). `disable_any_whitespace` (vLLM's name) allows no free whitespace between JSON
    tokens, so a random or weak model cannot run out its tokens on spaces and newlines."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    _key: tuple[str, str, bool] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        given = [name for name in CONSTRAINTS if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError("invalid StructuredOutputsParams: exactly one of json, regex, choice, grammar or "
                             f"json_object must be set, got {', '.join(given) if given else 'none'}")
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise _fail("json", "must be a JSON schema (a dict or its JSON text)", self.json)
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise _fail(name, "must be a non-empty string", value)
        if self.choice is not None and (not isinstance(self.choice, (list, tuple)) or not self.choice
                                        or not all(isinstance(c, str) and c for c in self.choice)):
            raise _fail("choice", "must be a non-empty list of non-empty strings", self.choice)
        if self.json_object is not None and self.json_object is not True:
            raise _fail("json_object", "must be true when set", self.json_object)
        if not isinstance(self.disable_any_whitespace, bool):
            raise _fail("disable_any_whitespace", "must be true or false", self.disable_any_whitespace)

    @classmethod
    def from_dict(cls, values: Any) -> "StructuredOutputsParams":
        """From a request body's `structured_outputs` object; unknown keys are errors."""
        if not isinstance(values, dict):
            raise ValueError(f"invalid StructuredOutputsParams: expected an object, got {type(values).__name__}")
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"invalid StructuredOutputsParams: unknown field(s) {', '.join(unknown)}")
        return cls(**values)

    @property
    def kind(self) -> str:
        """The one constraint that is set (its field name)."""
        return next(name for name in CONSTRAINTS if getattr(self, name) not in (None, False))

    @property
    def key(self) -> tuple[str, str, bool]:
        """(kind, text, any whitespace): what a compiled grammar is cached by. Computed once per
        object, so a batch that shares one params object pays for one schema serialisation."""
        if self._key is None:
            kind = self.kind
            if kind == "json":
                try:
                    text = self.json if isinstance(self.json, str) else json_module.dumps(self.json)
                except (TypeError, ValueError) as err:
                    raise _fail("json", f"is not JSON-serialisable ({err})", self.json) from None
            elif kind == "choice":
                text = json_module.dumps(list(self.choice))
            elif kind == "json_object":
                text = ""
            else:
                text = getattr(self, kind)
            self._key = (kind, text, not self.disable_any_whitespace)
        return self._key
