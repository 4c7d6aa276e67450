"""HTTP/1.1 messages as the publish API sees them, and the head checks stricter than h11.

:class:`Request`, :class:`Response` and :exc:`HttpError` are what
:mod:`rtgateway.http11` hands its handler and takes back. :func:`check_head`
refuses, on the raw head before h11 reads it, what h11 would accept and a
proxy in front could read as another request (RFC 9112 §11.2).

Pure: no I/O, nothing of the package.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Final

__all__ = [
    "MAX_HEADERS",
    "OTHER",
    "HttpError",
    "Request",
    "Response",
    "check_head",
]

OTHER: Final = "other"  # the endpoint label of a request that matched no route
MAX_HEADERS: Final = 64
# Control characters other than HTAB, CR and LF; h11 takes them in field values.
CONTROL_RE: Final = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# The fields that frame a body, as h11 reads them from a head that has passed
# the checks before it: lines end in CRLF, none is folded.
FRAMING_FIELD_RE: Final = re.compile(
    rb"\r\n(content-length|transfer-encoding):[ \t]*([^\r]*?)[ \t]*(?=\r\n)", re.IGNORECASE
)
# h11 refuses a Content-Length of more than this many characters.
H11_LENGTH_DIGITS: Final = 20


class HttpError(Exception):
    """A request refused with an HTTP status; the handler renders it.

    ``close`` ends the connection after the answer (the request could not be
    read to its end); ``headers`` go with the answer. An application may
    subclass it to carry fields of its own, an error code say.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        close: bool = False,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close
        self.headers = headers or {}


@dataclasses.dataclass(slots=True)
class Request:
    """A parsed request head; ``endpoint`` is the label the handler gives it."""

    method: str
    path: str
    query: str
    version: str
    headers: dict[str, str]
    endpoint: str = OTHER


@dataclasses.dataclass(slots=True)
class Response:
    status: int
    body: bytes
    content_type: str
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    close: bool = False

    @classmethod
    def json(
        cls, status: int, obj: Any, headers: dict[str, str] | None = None, close: bool = False
    ) -> Response:
        body = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
        return cls(status, body, "application/json", headers or {}, close)


def check_head(head: bytearray) -> int | None:
    """Refuse a head where h11 would be more lenient; return its body's length (None: chunked).

    Each of these lets a proxy in front that reads the head otherwise see
    another request in the same bytes (RFC 9112 §11.2), and each is a 400
    here: obsolete line folding (h11 unfolds it; RFC 9112 §5.2), control
    characters in a field (h11 takes all but NUL), ``Content-Length`` given
    twice or as a list (h11 takes equal ones), ``Content-Length`` beside
    ``Transfer-Encoding`` (h11 lets the coding win; RFC 9112 §6.1 allows it),
    and a coding other than a single ``chunked`` (h11 answers 501).
    ``Content-Length`` may carry leading zeros (RFC 9110 §8.6); h11 reads at
    most 20 characters, so a longer one is given to it without them.
    """
    if head.count(b"\r\n") - 2 > MAX_HEADERS:
        raise HttpError(431, "too many header fields", close=True)
    if b"\r\n " in head or b"\r\n\t" in head:
        raise HttpError(400, "obsolete line folding", close=True)
    if CONTROL_RE.search(head) is not None:
        raise HttpError(400, "malformed header field", close=True)
    lengths: list[re.Match[bytes]] = []
    codings: list[re.Match[bytes]] = []
    for field in FRAMING_FIELD_RE.finditer(head):
        (lengths if field[1].lower() == b"content-length" else codings).append(field)
    if len(lengths) > 1:
        raise HttpError(400, "content-length given more than once", close=True)
    if codings:
        if len(codings) > 1:
            raise HttpError(400, "transfer-encoding given more than once", close=True)
        if lengths:
            raise HttpError(400, "Content-Length and Transfer-Encoding together", close=True)
        if codings[0][2].lower() != b"chunked":
            raise HttpError(400, "only the chunked transfer coding", close=True)
        return None
    if not lengths:
        return 0
    length = lengths[0]
    if not length[2].isdigit():  # ASCII digits only, no sign, no list
        raise HttpError(400, "malformed Content-Length", close=True)
    digits = length[2].lstrip(b"0") or b"0"
    # int() refuses more than 4300 digits; any limit is far below 19.
    if len(digits) > 18:
        raise HttpError(413, "the body is too large", close=True)
    if len(length[2]) > H11_LENGTH_DIGITS:
        head[length.start(2) : length.end(2)] = digits
    return int(digits)
