"""What the publish API reads and answers: its error codes, JSON bodies, query strings.

:class:`ApiError` is every refusal of the API, answered as ``{"error":
{"code", "message"}}`` with the status its code stands for
(:data:`STATUS_OF`); the codes are the room protocol's
(``protocol.ERROR_CODES``) and a few of the API's own
(:data:`HTTP_ERROR_CODES`). The readers here parse a body like the room
protocol parses a message (:func:`load_json`), a listing's ``limit`` and
``cursor`` (:func:`page_of`), and the fields of the moderation routes
(:func:`conn_id_of`, :func:`reason_of`), and raise :class:`ApiError`.

Pure: no I/O, no state; ``api.py`` is their only user.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import parse_qs

from . import protocol
from .httpmsg import HttpError, Response

__all__ = [
    "API_ERROR_CODES",
    "CODE_OF",
    "DEFAULT_PAGE",
    "HTTP_ERROR_CODES",
    "MAX_PAGE",
    "STATUS_OF",
    "ApiError",
    "conn_id_of",
    "load_json",
    "page_of",
    "reason_of",
]

MAX_PAGE: Final = 1000
DEFAULT_PAGE: Final = 100

# Codes that only the API has; the room protocol's codes mean the same here.
HTTP_ERROR_CODES: Final = (
    "bad_request",
    "unauthorized",
    "not_found",
    "method_not_allowed",
    "unsupported_media_type",
    "request_timeout",
    "unknown_connection",
)
API_ERROR_CODES: Final = (*protocol.ERROR_CODES, *HTTP_ERROR_CODES)
STATUS_OF: Final = {
    "bad_json": 400,
    "bad_message": 400,
    "invalid_room": 400,
    "bad_request": 400,
    "unauthorized": 401,
    "not_found": 404,
    "unknown_connection": 404,
    "unknown_namespace": 404,
    "not_joined": 404,
    "method_not_allowed": 405,
    "request_timeout": 408,
    "message_too_large": 413,
    "unsupported_media_type": 415,
    "rate_limited": 429,
    "internal": 500,
    "draining": 503,
    "unavailable": 503,
    "outcome_unknown": 504,
}
# The code of each status that the HTTP layer refuses with on its own.
CODE_OF: Final = {
    400: "bad_request",
    408: "request_timeout",
    413: "message_too_large",
    431: "bad_request",
    500: "internal",
    503: "unavailable",
}


class ApiError(HttpError):
    """A request the API refuses: answered with ``{"error": {"code", "message"}}``.

    ``close`` ends the connection after the answer (the request could not be
    read to its end); ``headers`` go with the answer; ``index`` is the
    position of the offending publication in a batch.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int | None = None,
        close: bool = False,
        headers: dict[str, str] | None = None,
        index: int | None = None,
    ) -> None:
        assert code in API_ERROR_CODES, code
        super().__init__(status or STATUS_OF[code], message, close=close, headers=headers)
        self.code = code
        self.index = index

    @classmethod
    def from_http(cls, error: HttpError) -> ApiError:
        """The API's form of a refusal from the HTTP layer."""
        if isinstance(error, ApiError):
            return error
        code = CODE_OF.get(error.status, "internal" if error.status >= 500 else "bad_request")
        return cls(
            code, error.message, status=error.status, close=error.close, headers=error.headers
        )

    def response(self) -> Response:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.index is not None:
            error["index"] = self.index
        return Response.json(self.status, {"error": error}, self.headers, close=self.close)


def load_json(body: bytes) -> Any:
    """Parse a request body like the room protocol parses a message."""
    try:
        return json.loads(
            body.decode("utf-8"),
            parse_constant=_reject_constant,
            parse_float=protocol.finite_float,
        )
    except UnicodeDecodeError:
        raise ApiError("bad_json", "the body is not UTF-8") from None
    except RecursionError:
        raise ApiError("bad_json", "the body is nested too deeply") from None
    except ValueError:
        # JSONDecodeError, NaN/Infinity, numbers out of range (1e999), and
        # integers past Python's 4300-digit limit.
        raise ApiError("bad_json", "the body is not valid JSON") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def conn_id_of(body: Any) -> str:
    if not isinstance(body, dict):
        raise ApiError("bad_message", "the body must be an object")
    conn_id = body.get("conn_id")
    if not protocol.valid_conn_id(conn_id):
        raise ApiError("bad_message", "conn_id is required: the conn_id of a client's hello")
    assert isinstance(conn_id, str)
    return conn_id


def reason_of(body: dict[str, Any]) -> str:
    """A moderation's ``reason``: what fits in a close frame (empty when not given)."""
    reason = body.get("reason", "")
    try:
        size = len(reason.encode()) if isinstance(reason, str) else -1
    except UnicodeEncodeError:  # a lone surrogate
        size = -1
    if not 0 <= size <= protocol.MAX_REASON_BYTES:
        raise ApiError(
            "bad_message",
            f"reason must be a string of at most {protocol.MAX_REASON_BYTES} bytes of UTF-8",
        )
    return str(reason)


def page_of(
    query: str, valid_cursor: Callable[[str], bool], cursor_is: str
) -> tuple[int, str | None]:
    """``limit`` and ``cursor`` of a listing's query string."""
    try:
        params = parse_qs(query, keep_blank_values=True, errors="strict", max_num_fields=64)
    except (ValueError, UnicodeDecodeError):
        raise ApiError("bad_request", "malformed query string") from None
    limit = DEFAULT_PAGE
    cursor = None
    for name, values in params.items():
        if name in ("limit", "cursor") and len(values) > 1:
            raise ApiError("bad_request", f"{name} given more than once")
    if "limit" in params:
        text = params["limit"][0]
        # The length first: int() of more than 4300 digits raises.
        digits = text.lstrip("0") or "0"
        if not (
            text.isascii() and text.isdigit() and len(digits) <= 4 and 1 <= int(digits) <= MAX_PAGE
        ):
            raise ApiError("bad_request", f"limit must be an integer from 1 to {MAX_PAGE}")
        limit = int(digits)
    if "cursor" in params:
        cursor = params["cursor"][0]
        if not valid_cursor(cursor):
            raise ApiError("bad_request", f"cursor must be {cursor_is}")
    return limit, cursor
