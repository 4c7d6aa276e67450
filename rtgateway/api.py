"""The publish API: backends publish to rooms over HTTP, on a listener of its own.

The routes in :data:`ROUTES` answer with JSON; ``docs/api.yaml`` describes
them. The wire (parsing, keep-alive, bodies, the listener, its limits and
deadlines) is :mod:`rtgateway.http11`'s; this module is what it serves. It sits
beside the WebSocket listener, never on it: the WebSocket port faces browsers,
this one faces the backends and should stay private.

Publications go through :meth:`Hub.publish <rtgateway.rooms.Hub.publish>`,
the very call a WebSocket client's publish makes, so members see one ``seq``
sequence in one order whichever side published. The room protocol's rules
apply (room names, size, encodability, its error codes, and of the room
namespaces, that a room of an undeclared namespace may be refused; the API
may publish wherever clients may not); HTTP adds a few codes of its own
(:data:`HTTP_ERROR_CODES`). Moderation (disconnect a connection, remove it
from a room, list a room's connections) goes through the
:class:`~rtgateway.moderation.Moderator`, which finds the connection on
whichever process holds it. Body limits are set here per route:
``RTG_MAX_MESSAGE_BYTES``, :data:`BATCH_BODY_FACTOR` times it for a batch. The
bearer token is compared in constant time and never logged.

This module must not touch WebSocket connections or outboxes: it only calls
the hub and the moderator.
"""

from __future__ import annotations

import heapq
import hmac
from collections.abc import Awaitable
from importlib import resources
from typing import TYPE_CHECKING, Any, Final, TypeVar
from urllib.parse import unquote

from . import __version__, protocol
from .apimsg import (
    API_ERROR_CODES,
    HTTP_ERROR_CODES,
    ApiError,
    conn_id_of,
    load_json,
    page_of,
    reason_of,
)
from .config import parse_addr
from .errors import KICK_CODES, KICKED, BrokerOutcomeUnknown, BrokerUnavailable
from .http11 import (
    BODY_TIMEOUT_S,
    HEADER_TIMEOUT_S,
    IDLE_TIMEOUT_S,
    MAX_CONNECTIONS,
    OTHER,
    WRITE_TIMEOUT_S,
    BodyReader,
    HttpError,
    HttpServer,
    Request,
    Response,
    retry_after,
)

if TYPE_CHECKING:
    from .moderation import Moderator
    from .state import Context, ServerState

T = TypeVar("T")

__all__ = [
    "API_ERROR_CODES",
    "ENDPOINTS",
    "HTTP_ERROR_CODES",
    "MAX_BATCH_ITEMS",
    "ApiError",
    "ApiServer",
]

# Route templates and their methods. The template is the ``endpoint`` label.
ROUTES: Final = {
    "/api/publish": ("POST",),
    "/api/publish/batch": ("POST",),
    "/api/rooms": ("GET", "HEAD"),
    "/api/rooms/{room}": ("GET", "HEAD"),
    "/api/rooms/{room}/connections": ("GET", "HEAD"),
    "/api/disconnect": ("POST",),
    "/api/remove": ("POST",),
    "/api/info": ("GET", "HEAD"),
    "/api/openapi.yaml": ("GET", "HEAD"),
}
ENDPOINTS: Final = (*ROUTES, OTHER)
ROOM_PREFIX: Final = "/api/rooms/"

MAX_BATCH_ITEMS: Final = 100
BATCH_BODY_FACTOR: Final = 16  # a batch body may be this many times RTG_MAX_MESSAGE_BYTES


def route(path: str) -> tuple[str, str | None]:
    """The route template that ``path`` matches (or :data:`OTHER`) and its room."""
    if path in ROUTES:
        return path, None
    if path.startswith(ROOM_PREFIX):
        room, slash, rest = path[len(ROOM_PREFIX) :].partition("/")
        if room and (not slash or rest == "connections"):
            endpoint = "/api/rooms/{room}/connections" if slash else "/api/rooms/{room}"
            try:
                return endpoint, unquote(room, errors="strict")
            except UnicodeDecodeError:
                return endpoint, room  # "%" makes it an invalid room
    return OTHER, None


class ApiServer:
    """The publish API's listener: an :class:`~rtgateway.http11.HttpServer` answered here."""

    def __init__(
        self,
        ctx: Context,
        state: ServerState,
        *,
        addr: str | None = None,
        max_connections: int = MAX_CONNECTIONS,
        header_timeout_s: float = HEADER_TIMEOUT_S,
        body_timeout_s: float = BODY_TIMEOUT_S,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        write_timeout_s: float = WRITE_TIMEOUT_S,
    ) -> None:
        self.ctx = ctx
        self.state = state
        self.config = ctx.config
        self.log = ctx.log.bind(listener="api")
        self.addr = self.config.api_addr if addr is None else addr
        self.token = self.config.api_token.encode()
        self.max_body_bytes = self.config.max_message_bytes
        self.max_batch_bytes = BATCH_BODY_FACTOR * self.config.max_message_bytes
        self.spec = (resources.files("rtgateway") / "static" / "api.yaml").read_bytes()
        self.addresses: list[str] = []
        self.http = HttpServer(
            self,
            name="API",
            log=self.log,
            server_name=ctx.server_name,
            max_connections=max_connections,
            header_timeout_s=header_timeout_s,
            body_timeout_s=body_timeout_s,
            idle_timeout_s=idle_timeout_s,
            write_timeout_s=write_timeout_s,
        )

    @property
    def connections(self) -> int:
        """Connections open now, refused ones included until they close."""
        return self.http.connections

    async def start(self) -> None:
        host, port = parse_addr(self.addr)
        await self.http.start(host or None, port, backlog=min(self.config.backlog, 1024))
        self.addresses = self.http.addresses
        self.ctx.metrics.api_started(ENDPOINTS)
        if not self.token and not all(_is_loopback(a) for a in self.addresses):
            self.log.warning(
                "api_unprotected",
                addresses=self.addresses,
                hint="set RTG_API_TOKEN or bind RTG_API_ADDR to loopback",
            )

    async def stop(self) -> None:
        """Stop listening, close idle connections, give busy ones a bounded wait."""
        if self.http.server is None:
            return
        connections, aborted = await self.http.stop()
        self.ctx.metrics.api_stopped()
        self.log.info("api_stopped", connections=connections, aborted=aborted)

    # What the HTTP layer asks of its handler.

    def error_response(self, error: HttpError) -> Response:
        return ApiError.from_http(error).response()

    def observe(self, request: Request | None, status: int, seconds: float) -> None:
        self.ctx.metrics.api_request(request.endpoint if request else OTHER, status, seconds)

    def keep_alive(self) -> bool:
        return not self.state.draining

    async def handle(self, request: Request, read_body: BodyReader, started: float) -> Response:
        endpoint, room = route(request.path)
        request.endpoint = endpoint
        self._authorize(request)
        if endpoint == OTHER:
            raise ApiError("not_found", "no such path; see /api/openapi.yaml")
        methods = ROUTES[endpoint]
        if request.method not in methods:
            raise ApiError(
                "method_not_allowed",
                f"{endpoint} takes {' and '.join(methods)}",
                headers={"Allow": ", ".join(methods)},
            )
        if request.method == "POST":
            self._refuse_while_draining()
            content_type = request.headers.get("content-type", "")
            if content_type.partition(";")[0].strip().lower() != "application/json":
                # Also keeps browsers out: a page can POST text/plain to a
                # loopback address without a CORS preflight, not JSON.
                raise ApiError("unsupported_media_type", "send the body as application/json")
            batch = endpoint == "/api/publish/batch"
            body = await read_body(self.max_batch_bytes if batch else self.max_body_bytes)
            self._refuse_while_draining()
            if batch:
                return await self._publish_batch(load_json(body), started)
            if endpoint == "/api/disconnect":
                return await self._disconnect(load_json(body))
            if endpoint == "/api/remove":
                return await self._remove(load_json(body))
            return await self._publish(load_json(body), started)
        await read_body(self.max_body_bytes)
        if endpoint == "/api/rooms/{room}":
            assert room is not None
            return self._room(room)
        if endpoint == "/api/rooms/{room}/connections":
            assert room is not None
            return await self._connections(room, request.query)
        if endpoint == "/api/rooms":
            return self._rooms(request.query)
        if endpoint == "/api/info":
            return self._info()
        return Response(200, self.spec, "application/yaml")

    def _authorize(self, request: Request) -> None:
        if not self.token:
            return
        scheme, _, credentials = request.headers.get("authorization", "").strip().partition(" ")
        given = credentials.strip().encode("latin-1")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, self.token):
            raise ApiError(
                "unauthorized",
                "this API needs Authorization: Bearer <RTG_API_TOKEN>",
                headers={"WWW-Authenticate": 'Bearer realm="rtgateway"'},
            )

    def _refuse_while_draining(self) -> None:
        if self.state.draining:
            raise ApiError(
                "draining",
                "the gateway is shutting down; publish to another instance",
                headers=retry_after(),
            )

    # The routes.

    def _publication(self, item: Any, index: int | None = None) -> tuple[str, bytes]:
        if not isinstance(item, dict):
            raise ApiError("bad_message", "a publication is an object: room, data", index=index)
        if not isinstance(item.get("room"), str):
            raise ApiError("bad_message", "room is required, a string", index=index)
        room: str = item["room"]
        self._check_room(room, index)
        if "data" not in item:
            raise ApiError("bad_message", "data is required", index=index)
        try:
            data = protocol.encode_data(item["data"])
        except protocol.ProtocolError as exc:
            raise ApiError(exc.code, exc.message, index=index) from None
        limit = self.config.max_message_bytes
        if len(data) + len(room) + protocol.MESSAGE_ENVELOPE_BYTES > limit:
            # Members may hold the same size limit as the gateway.
            raise ApiError(
                "message_too_large",
                f"the message to members would exceed {limit} bytes",
                index=index,
            )
        return room, data

    async def _publish(self, body: Any, started: float) -> Response:
        room, data = self._publication(body)
        try:
            seq = await self.ctx.hub.publish(room, data, started=started)
        except BrokerUnavailable:
            raise ApiError(
                "unavailable",
                "not published: publishing is unavailable; retry",
                headers=retry_after(),
            ) from None
        except BrokerOutcomeUnknown:
            raise ApiError(
                "outcome_unknown",
                "the broker did not confirm the publication in time; it may have been published",
            ) from None
        return Response.json(200, {"seq": seq})

    async def _publish_batch(self, body: Any, started: float) -> Response:
        if not isinstance(body, list):
            raise ApiError("bad_message", "the body must be an array of publications")
        if len(body) > MAX_BATCH_ITEMS:
            raise ApiError("bad_message", f"at most {MAX_BATCH_ITEMS} publications per batch")
        # Validate all first: a bad batch publishes nothing.
        publications = [self._publication(item, index) for index, item in enumerate(body)]
        hub, flusher = self.ctx.hub, self.ctx.flusher
        outcomes: list[Awaitable[int] | Exception] = []
        for room, data in publications:
            # A burst is spread over loop iterations once it weighs (outbox.py).
            if flusher.heavy:
                await flusher.relieve()
            try:
                # In order, without waiting: Redis gets them in one round trip.
                outcomes.append(hub.submit(room, data, started=started))
            except BrokerUnavailable as exc:
                outcomes.append(exc)
        results: list[dict[str, Any]] = []
        for outcome in outcomes:
            try:
                if isinstance(outcome, Exception):
                    raise outcome
                results.append({"seq": await outcome})
            except BrokerUnavailable:
                message = "not published: publishing is unavailable; retry this one"
                results.append({"error": {"code": "unavailable", "message": message}})
            except BrokerOutcomeUnknown:
                message = "the broker did not confirm this one in time; it may have been published"
                results.append({"error": {"code": "outcome_unknown", "message": message}})
        return Response.json(200, results)

    def _check_room(self, room: str, index: int | None = None) -> None:
        """A valid room name, in a namespace that is not refused."""
        if not protocol.valid_room(room):
            raise ApiError(
                "invalid_room", "room must be 1-128 characters of A-Z a-z 0-9 _ . : -", index=index
            )
        if self.ctx.hub.namespaces.rules_for(room) is None:
            raise ApiError(
                "unknown_namespace",
                f"{room.partition(':')[0]} is not a namespace of this gateway",
                index=index,
            )

    def _room(self, room: str) -> Response:
        self._check_room(room)
        return Response.json(200, {"room": room, "members": self.ctx.hub.members(room)})

    def _rooms(self, query: str) -> Response:
        limit, cursor = page_of(query, protocol.valid_room, "the next_cursor of a page")
        hub = self.ctx.hub
        after = (name for name in hub.rooms if cursor is None or name > cursor)
        names = heapq.nsmallest(limit + 1, after)
        page = names[:limit]
        next_cursor = page[-1] if len(names) > limit else None
        rooms = [{"room": name, "members": hub.members(name)} for name in page]
        return Response.json(200, {"rooms": rooms, "next_cursor": next_cursor})

    def _info(self) -> Response:
        ctx = self.ctx
        return Response.json(
            200,
            {
                "server": ctx.server_name,
                "version": __version__,
                "connections": ctx.metrics.connections_current,
                "rooms": len(ctx.hub.rooms),
                "draining": self.state.draining,
                **ctx.hub.namespaces.describe(),
            },
        )

    # Moderation.

    @property
    def moderator(self) -> Moderator:
        assert self.ctx.moderator is not None, "the gateway gives every API a moderator"
        return self.ctx.moderator

    async def _disconnect(self, body: Any) -> Response:
        conn_id = conn_id_of(body)
        code = body.get("code", KICKED.code)
        if isinstance(code, float) and code.is_integer():
            code = int(code)  # 4000.0 is an integer to JSON
        if not isinstance(code, int) or isinstance(code, bool) or code not in KICK_CODES:
            raise ApiError("bad_message", "code must be an integer from 4000 to 4499, except 4008")
        reason = reason_of(body)
        result = await _moderated(self.moderator.disconnect(conn_id, code, reason))
        if result != "done":
            raise ApiError("unknown_connection", f"no connection {conn_id} is open")
        return Response.json(200, {"conn_id": conn_id, "code": code, "reason": reason})

    async def _remove(self, body: Any) -> Response:
        conn_id = conn_id_of(body)
        room = body.get("room")
        if not isinstance(room, str):
            raise ApiError("bad_message", "room is required, a string")
        self._check_room(room)
        reason = reason_of(body)
        result = await _moderated(self.moderator.remove(conn_id, room, reason))
        if result == "not_joined":
            raise ApiError("not_joined", f"{conn_id} is not a member of {room}")
        if result != "done":
            raise ApiError("unknown_connection", f"no connection {conn_id} is open")
        return Response.json(200, {"conn_id": conn_id, "room": room})

    async def _connections(self, room: str, query: str) -> Response:
        self._check_room(room)
        limit, cursor = page_of(query, protocol.valid_conn_id, "the next_cursor of a page")
        page, next_cursor = await _moderated(self.moderator.connections(room, cursor, limit))
        connections = [{"conn_id": conn_id, "joined_at": joined} for conn_id, joined in page]
        return Response.json(
            200, {"room": room, "connections": connections, "next_cursor": next_cursor}
        )


async def _moderated(pending: Awaitable[T]) -> T:
    """A moderation request through the broker, its failures as the API's errors."""
    try:
        return await pending
    except BrokerUnavailable:
        raise ApiError(
            "unavailable", "the broker could not carry the request; retry", headers=retry_after()
        ) from None
    except BrokerOutcomeUnknown:
        raise ApiError(
            "outcome_unknown",
            "the gateway holding the connection did not confirm in time; it may have been done",
        ) from None


def _is_loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    return host == "::1" or host.startswith("127.")
