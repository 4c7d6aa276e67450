"""What connections, routes and the API see of the server: its context and its live state.

Two objects, built once by :class:`~rtgateway.app.Gateway` when it starts, and
passed to what needs them, the way uvicorn passes one ``ServerState`` and
websockets passes ``ServerConnection(protocol, server)``; nothing below
``app`` holds the gateway itself:

- :class:`Context` is frozen: the configuration, the metrics, the hub, the
  flusher, the logger, and what the server says of itself (its name, the
  ``hello`` fields, the static pages, its node: the token that starts the
  ``conn_id`` of each of its connections), and the moderator;
- :class:`ServerState` changes: draining or not, the sockets accepted, the
  open WebSocket sessions (their outboxes, and the room protocol's sessions
  by ``conn_id`` for moderation), admission's books, and the limits derived
  from the open-files limit at start.

This module holds data and no behaviour beyond reading it; it imports the
package's types only for annotations, so every module may import it.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .admission import Admission
    from .config import Config
    from .metrics import Metrics
    from .moderation import Moderated, Moderator
    from .outbox import Flusher, Outbox
    from .rooms import Hub

__all__ = ["Context", "Limits", "ServerState", "Socket", "StaticFile"]

# A static file: its body, its content type, the headers it is served with.
StaticFile = tuple[bytes, str, dict[str, str]]


class Socket(Protocol):
    """What the server needs of every socket it accepted: a way to drop it."""

    address: str  # the source address its limits count against (admission.py)
    spoke: bool  # whether it has sent a byte

    def abort(self) -> None: ...


@dataclasses.dataclass(frozen=True, slots=True)
class Context:
    """What every connection and route reads, and nobody changes."""

    config: Config
    metrics: Metrics
    hub: Hub
    flusher: Flusher
    log: Any
    clock: Callable[[], float]  # the event loop's time, for rate limits and deadlines
    server_name: str  # "rtgateway/VERSION": the Server header and the hello's
    hello_limits: Mapping[str, Any]  # the limits a client is told in its hello
    hello_extra: Mapping[str, Any]  # more hello fields ({"worker": N} in a worker)
    static: Mapping[str, StaticFile]  # path -> file served before the upgrade
    # This process's token, the first part of each conn_id (empty: ids are not routable).
    node: str = ""
    moderator: Moderator | None = None  # the backend's moderation (the publish API)


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """What this process may hold, derived from the open-files limit at start."""

    max_connections: int  # WebSockets before handshakes get 503
    max_sockets: int  # sockets accepted, pending ones included, before one is dropped


class ServerState:
    """The server's live state. Single-threaded: only the event loop reads or writes it."""

    def __init__(self, limits: Limits, admission: Admission[Any]) -> None:
        self.limits = limits
        self.admission = admission
        self.draining = False
        self.sockets: set[Socket] = set()  # every accepted socket, handshake done or not
        self.outboxes: set[Outbox] = set()  # one per open WebSocket session
        self.sessions_done = asyncio.Event()  # set whenever ``outboxes`` becomes empty
        # The room protocol's open sessions, by conn_id and by outbox (moderation).
        self.sessions: dict[str, Moderated] = {}
        self.session_of: dict[Outbox, Moderated] = {}

    def session_opened(self, outbox: Outbox) -> None:
        self.outboxes.add(outbox)

    def session_closed(self, outbox: Outbox) -> None:
        self.outboxes.discard(outbox)
        if not self.outboxes:
            self.sessions_done.set()

    def session_started(self, session: Moderated) -> None:
        """A room-protocol session said hello: the backend may moderate it from now on."""
        self.sessions[session.conn_id] = session
        self.session_of[session.outbox] = session

    def session_ended(self, session: Moderated) -> None:
        if self.sessions.get(session.conn_id) is session:
            del self.sessions[session.conn_id]
        self.session_of.pop(session.outbox, None)

    # What the metrics read at scrape time (metrics.Live).

    @property
    def max_connections(self) -> int:
        return self.limits.max_connections

    @property
    def pending_handshakes(self) -> int:
        return self.admission.pending

    @property
    def queued_bytes(self) -> int:
        return sum(outbox.nbytes for outbox in self.outboxes)
