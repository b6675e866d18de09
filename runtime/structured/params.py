"""StructuredOutputsParams: what a request constrains its output to (no torch, no grammar engine here).

Field names follow vLLM's `StructuredOutputsParams` (`json`, `regex`, `choice`, `grammar`,
`json_object`), so `extra_body={"structured_outputs": {...}}` requests move over unchanged.
Exactly one constraint per request. `key()` is the grammar cache key: equal constraints
(a schema given as a dict or as its JSON text, keys in any order) share one compiled grammar.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


class StructuredOutputsParams(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, use_attribute_docstrings=True
    )

    json_schema: dict[str, Any] | str | bool | None = Field(None, alias="json")
    """`json`: a JSON schema (object or its JSON text) the output must be an instance of."""
    json_object: bool | None = None
    """Any JSON object (OpenAI's response_format {"type": "json_object"})."""
    regex: str | None = None
    """A regular expression the whole output must match."""
    choice: list[str] | None = Field(None, min_length=1)
    """The output is exactly one of these strings."""
    grammar: str | None = None
    """An EBNF grammar (GBNF / xgrammar dialect, start rule `root`)."""
    disable_any_whitespace: bool = False
    """JSON constraints: no free whitespace between tokens (compact JSON); by default any is allowed."""
    start_after_token_ids: tuple[int, ...] | None = None
    """Leave the output free until these tokens appeared in it (the end of a reasoning block),
    then constrain what follows. Set by the server's reasoning parser, not by clients."""

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                "structured_outputs needs exactly one of json, json_object, regex, choice, grammar"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if isinstance(self.json_schema, str):
            try:
                parsed = json.loads(self.json_schema)
            except ValueError as e:
                raise ValueError(f"json: the schema is not valid JSON: {e}") from None
            if not isinstance(parsed, (dict, bool)):
                raise ValueError("json: a JSON schema must be an object")
        if self.json_schema is True:  # JSON Schema `true` accepts any JSON value; treat like json_object
            object.__setattr__(self, "json_schema", None)
            object.__setattr__(self, "json_object", True)
        return self

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    def spec_text(self) -> str:
        """The constraint as text (what the size limit counts)."""
        kind = self.kind
        if kind == "json_schema":
            return (
                self.json_schema
                if isinstance(self.json_schema, str)
                else json.dumps(self.json_schema, sort_keys=True)
            )
        if kind == "json_object":
            return ""
        if kind == "choice":
            return json.dumps(self.choice)
        return getattr(self, kind)

    def key(self) -> tuple[str, str, bool]:
        kind = self.kind
        ws = self.disable_any_whitespace and kind in ("json_schema", "json_object")
        if kind == "json_schema" and isinstance(self.json_schema, str):
            return kind, json.dumps(json.loads(self.json_schema), sort_keys=True), ws
        return kind, self.spec_text(), ws
