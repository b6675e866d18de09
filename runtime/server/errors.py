"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Handlers raise `APIError` (or one of its subclasses); the error middleware in
app.py turns it, aiohttp's HTTP exceptions and anything unexpected into a JSON
response with the right status. Unexpected exceptions become a bare 500 (the
middleware logs the traceback): internals never reach the client.
"""
from __future__ import annotations

from typing import Optional

from aiohttp import web
from pydantic import ValidationError


class APIError(Exception):
    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict] = None):
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


def error_body(message: str, type_: str, param: Optional[str] = None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, type_: str, param=None, code=None, headers=None) -> web.Response:
    return web.json_response(error_body(message, type_, param, code), status=status, headers=headers)


def from_api_error(e: APIError) -> web.Response:
    return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)


def from_validation_error(e: ValidationError) -> BadRequest:
    """The first problem names the parameter; the message lists all of them."""
    parts, param = [], None
    for err in e.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()))
        if param is None and loc:
            param = loc
        msg = err.get("msg", "invalid value")
        if err.get("type") == "extra_forbidden":
            msg = "unsupported parameter"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return BadRequest("; ".join(parts) or "invalid request", param=param)


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
    return error_response(status, message, _HTTP_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
                          code=None, headers=headers)


def internal_error() -> web.Response:
    return error_response(500, "Internal server error", "internal_server_error")
