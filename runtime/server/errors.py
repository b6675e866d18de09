"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Handlers raise `APIError` (or one of its subclasses); the error middleware in
app.py turns it, aiohttp's HTTP exceptions and anything unexpected into a JSON
response with the right status. Unexpected exceptions become a bare 500 (the
middleware logs the traceback): internals never reach the client.
"""

from __future__ import annotations

import re

from aiohttp import web
from pydantic import ValidationError


class APIError(Exception):
    status = 400
    type = "invalid_request_error"

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, headers: dict | None = None
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


class BadRequest(APIError):
    status = 400


class Unauthorized(APIError):
    status = 401
    type = "authentication_error"


class NotFound(APIError):
    status = 404
    type = "not_found_error"


class Overloaded(APIError):
    status = 503
    type = "server_overloaded"


class RequestCut(APIError):
    """Shutdown ended the request at the drain timeout (or refused to start it once cutting began)."""

    status = 503
    type = "service_unavailable"

    def __init__(self, message: str):
        super().__init__(message, code="shutting_down")


def error_body(message: str, type_: str, param: str | None = None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(
    status: int, message: str, type_: str, param=None, code=None, headers=None
) -> web.Response:
    return web.json_response(error_body(message, type_, param, code), status=status, headers=headers)


def from_api_error(e: APIError) -> web.Response:
    return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)


class InvalidParameter(ValueError):
    """A request value the protocol models refuse; `param` names the field (OpenAI's path spelling)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


# Union members show up in pydantic locations as type tags ("str", "list[int]", ...): not fields.
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


def _is_field(part) -> bool:
    return isinstance(part, int) or not (part in _TYPE_TAGS or any(c in part for c in "[(-,"))


def param_path(loc) -> str | None:
    """('messages', 0, 'content') -> 'messages[0].content', as OpenAI names nested parameters."""
    out = ""
    for part in loc:
        if not _is_field(part):
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def _short(value) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)) or (isinstance(value, str) and len(value) <= 40):
        return repr(value) if isinstance(value, str) else str(value)
    return None


def _leading_field(message: str, fields) -> str | None:
    word = re.match(r"[A-Za-z_]+", message)
    return word.group(0) if word and word.group(0) in fields else None


def to_bad_request(exc: Exception, *, param: str | None = None, fields=()) -> BadRequest:
    """The one place that turns a validation failure into a 400: `param` names the field, the message is
    one sentence for a human (no "Value error," prefix, no pydantic dump, no documentation URL).

    Works for pydantic ValidationErrors (the deepest problem wins: in a union it is the member that got
    furthest), for any exception carrying a `param` attribute (InvalidParameter, engine-side typed errors)
    and for plain ValueErrors, whose param is `param` or the field their message starts with.
    """
    if not isinstance(exc, ValidationError):
        message = str(exc) or "invalid request"
        return BadRequest(
            message, param=getattr(exc, "param", None) or param or _leading_field(message, fields)
        )
    found = []  # (depth, param, message, input)
    for err in exc.errors(include_url=False):
        cause = (err.get("ctx") or {}).get("error")
        if err.get("type") in ("value_error", "assertion_error") and cause is not None:
            msg = str(cause)  # our own sentence, without pydantic's "Value error, " prefix
            inner, outer = getattr(cause, "param", None), param_path(err["loc"])
            where = (f"{outer}.{inner}" if outer and inner else inner or outer) or _leading_field(msg, fields)
        else:
            msg = err.get("msg", "invalid value")
            msg = msg[:1].lower() + msg[1:]
            where = param_path(err["loc"])
        found.append((len(err["loc"]), where, msg, err.get("input")))
    if not found:
        return BadRequest("invalid request", param=param)
    deepest = max(d for d, *_ in found)
    first = next(f for f in found if f[0] == deepest)
    where = first[1] or param
    msgs = list(dict.fromkeys(m for d, w, m, _ in found if d == deepest and w == first[1]))
    message = " or ".join(msgs)
    got = (
        None
        if first[3] is None or msgs[0].startswith(("field required", "unsupported"))
        else _short(first[3])
    )
    if where and not message.startswith(where):
        message = f"Invalid value for '{where}': {message}"
    if got is not None and "(" not in message:
        message += f" (got {got})"
    others = sorted({w for _, w, _, _ in found if w and w != first[1]})
    if others:
        message += f"; also invalid: {', '.join(others[:5])}"
    return BadRequest(message, param=where)


def from_validation_error(e: ValidationError) -> BadRequest:
    return to_bad_request(e)


# aiohttp raises these for routing and body problems; map them onto OpenAI error types.
_HTTP_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
}


def from_http_exception(e: web.HTTPException) -> web.Response:
    status = e.status
    if status == 404:
        message = "Not found: no such route"
    elif status == 413:
        message = f"Request body too large: {e.text or ''}".strip()
    else:
        message = e.reason or "error"
    headers = {k: v for k, v in e.headers.items() if k.lower() in ("allow", "retry-after")}
    return error_response(
        status,
        message,
        _HTTP_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
        code=None,
        headers=headers,
    )


def internal_error() -> web.Response:
    return error_response(500, "Internal server error", "internal_server_error")
