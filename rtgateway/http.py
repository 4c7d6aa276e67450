"""Plain HTTP on the WebSocket port, answered before the upgrade.

``/healthz`` and ``/readyz`` (200 ``ok``, 503 ``draining``), ``/metrics``
(Prometheus text), the demo page (with a Content-Security-Policy that allows
only its own inline script and style) and its client module, and the checks that
refuse a handshake: unknown path (404), method (405), HTTP/1.0 (400), foreign
Origin (403), draining or over the connection limit (503 with Retry-After).
Each refusal is counted by reason.
"""

from __future__ import annotations

import base64
import hashlib
import http
import random
import re
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING, Protocol

from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol

if TYPE_CHECKING:
    from .state import Context, ServerState

__all__ = ["WS_PATHS", "Handshaking", "load_static", "process_request", "process_response"]

WS_PATHS = ("/ws", "/ws/echo")
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/rtgateway.js": ("rtgateway.js", "text/javascript; charset=utf-8"),
}


class Handshaking(Protocol):
    """What the routes need of the socket whose request they answer (``handshake.Accepted``)."""

    address: str  # the source address its limits count against (admission.py)
    counted: bool  # whether it counts as a WebSocket of its address
    protocol: ServerProtocol


# A page of ours is framed by nobody, and its MIME type is not guessed.
PAGE_HEADERS = {"X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"}


def load_static() -> dict[str, tuple[bytes, str, dict[str, str]]]:
    """The demo page and the browser client, read once at start, with their headers."""
    files: dict[str, tuple[bytes, str, dict[str, str]]] = {}
    root = resources.files("rtgateway") / "static"
    for path, (name, content_type) in STATIC.items():
        entry = root / name
        if entry.is_file():
            body = entry.read_bytes()
            headers = {}
            if content_type.startswith("text/html"):
                headers = {**PAGE_HEADERS, "Content-Security-Policy": content_security_policy(body)}
            files[path] = (body, content_type, headers)
    return files


def content_security_policy(page: bytes) -> str:
    """A policy that allows the page's own inline script and style, by hash, and nothing else.

    The page loads its client module from this origin and opens a WebSocket to
    it; it loads nothing from anywhere else, posts no form, and may not be
    framed (``frame-ancestors 'none'``, clickjacking). The hashes are taken
    from the page as served, so an edit to it cannot leave the policy stale.
    """

    def hashes(tag: bytes) -> str:
        blocks = re.findall(rb"<%s\b[^>]*>(.*?)</%s>" % (tag, tag), page, re.DOTALL)
        return " ".join(
            "'sha256-" + base64.b64encode(hashlib.sha256(block).digest()).decode() + "'"
            for block in blocks
        )

    scripts = " ".join(("'self'", hashes(b"script"))).rstrip()
    styles = hashes(b"style") or "'none'"
    return "; ".join(
        (
            "default-src 'none'",
            f"script-src {scripts}",
            f"style-src {styles}",
            "connect-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        )
    )


def _response(status: int, body: bytes, content_type: str, **headers: str) -> Response:
    status_enum = http.HTTPStatus(status)
    h = Headers()
    h["Content-Type"] = content_type
    h["Content-Length"] = str(len(body))
    h["Connection"] = "close"
    h["Cache-Control"] = "no-store"
    h["X-Content-Type-Options"] = "nosniff"
    for key, value in headers.items():
        h[key.replace("_", "-")] = value
    return Response(status, status_enum.phrase, h, body)


def _text(status: int, text: str, **headers: str) -> Response:
    return _response(status, text.encode(), "text/plain; charset=utf-8", **headers)


def process_request(
    ctx: Context, state: ServerState, connection: Handshaking, request: Request
) -> Response | Awaitable[Response] | None:
    """The answer to a request before the upgrade, or None to upgrade it to a WebSocket."""
    path = request.path.partition("?")[0]
    metrics = ctx.metrics
    if request.method not in ("GET", "HEAD"):
        metrics.handshake_rejected("method")
        return _text(405, "method not allowed\n", Allow="GET")
    # RFC 9112 §3.2: exactly one Host in an HTTP/1.1 request (RFC 6455 §4.1
    # requires it on a handshake); a second Origin would let a check and a
    # browser disagree about which one counts.
    hosts = request.headers.get_all("Host")
    if len(hosts) > 1 or (not hosts and request.protocol == "HTTP/1.1"):
        metrics.handshake_rejected("bad_request")
        return _text(400, "exactly one Host header is required\n")
    origins = request.headers.get_all("Origin")
    if len(origins) > 1:
        metrics.handshake_rejected("bad_request")
        return _text(400, "Origin given more than once\n")
    if path in ("/healthz", "/readyz"):
        if state.draining:
            return _text(503, "draining")
        return _text(200, "ok")
    if path == "/metrics":
        if metrics.render_hook is not None:
            return _host_metrics(metrics.render_hook)
        return _response(200, metrics.render(), PROMETHEUS_CONTENT_TYPE)
    if path in ctx.static:
        body, content_type, headers = ctx.static[path]
        return _response(200, body, content_type, **headers)
    if path not in WS_PATHS:
        metrics.handshake_rejected("not_found")
        return _text(404, "not found\n")
    if request.method != "GET":
        metrics.handshake_rejected("method")
        return _text(405, "method not allowed\n", Allow="GET")
    if request.protocol != "HTTP/1.1":
        metrics.handshake_rejected("bad_request")
        return _text(400, "WebSocket needs HTTP/1.1\n")
    allowed = ctx.config.allowed_origins
    if allowed and origins and origins[0] not in allowed:
        metrics.handshake_rejected("origin")
        return _text(403, "origin not allowed\n")
    if state.draining:
        metrics.handshake_rejected("draining")
        return _text(503, "draining; reconnect\n", Retry_After=_retry_after())
    if metrics.connections_current >= state.limits.max_connections:
        metrics.handshake_rejected("connection_limit")
        return _text(503, "too many connections\n", Retry_After=_retry_after())
    admission = state.admission
    if admission.at_connection_limit(connection.address):
        metrics.handshake_rejected("address_limit")
        return _text(503, "too many connections from this address\n", Retry_After=_retry_after())
    # Counted from here until the socket closes (connection_lost), so that
    # handshakes in flight count too.
    connection.counted = True
    admission.opened(connection.address)
    return None


async def _host_metrics(render: Callable[[], Awaitable[bytes]]) -> Response:
    # Under workers: the siblings' metrics are fetched without blocking this loop.
    return _response(200, await render(), PROMETHEUS_CONTENT_TYPE)


def process_response(
    ctx: Context, connection: Handshaking, request: Request, response: Response
) -> None:
    # websockets itself refuses handshakes with missing or bad Upgrade headers.
    if (
        response.status_code >= 400
        and request.path.partition("?")[0] in WS_PATHS
        and connection.protocol.handshake_exc is not None
    ):
        ctx.metrics.handshake_rejected("bad_request")


def _retry_after() -> str:
    # Spread reconnects so that a refused fleet does not come back at once.
    return str(random.randint(1, 10))
