"""Why a connection ends, and the package's exceptions.

Disconnects are data. Every way the gateway ends a WebSocket is one
:class:`Disconnect` value below: the close code it sends (``None`` when the
socket is dropped without a close frame), the reason text, the label it is
counted under in ``rtgateway_disconnects_total{reason}``, and what a client
should do next. The codes follow RFC 6455 §7.4:

- **1000-1015** are the protocol's: 1002 protocol error, 1007 invalid UTF-8,
  1008 policy violation (here: the rate limit), 1009 message too large, 1011
  internal error (also websockets' keepalive timeout), 1012 service restart;
- **4000-4999** are private to an application: 4008 is this gateway's slow
  consumer (a member whose outbox filled). The backend that disconnects a
  connection through the publish API chooses its code in
  :data:`KICK_CODES` (4000-4499 but 4008), counted as ``kicked``; 4500-4999
  are kept for the gateway.

``reconnect`` says whether a well-behaved client reconnects: after 1012 it
waits the ``retry_after_ms`` the reason carries; after 4008 or 1011 at once
with a backoff; after 1002, 1007, 1008 or 1009 it must first change what it
sends, or it will be closed again; after a kick it does not reconnect on its
own (the backend closed it on purpose).

The exceptions, one base for the package (as ``websockets.exceptions`` draws
its own)::

    GatewayError
    ├── ConfigError            an invalid setting: exit status 2 (config.py)
    ├── ProtocolError          a client message refused, the connection stays (protocol.py)
    └── BrokerError            publishing through the broker failed (broker.py)
        ├── BrokerUnavailable      not published: retrying cannot duplicate it
        ├── BrokerOutcomeUnknown   sent, not confirmed in time: it may be published
        └── BrokerStalled          Redis answered nothing for too long

This module imports nothing from the package: everything may import it.
"""

from __future__ import annotations

import dataclasses
from typing import Final

__all__ = [
    "ABORTED",
    "CLIENT_CLOSE",
    "DISCONNECTS",
    "DISCONNECT_REASONS",
    "DRAIN",
    "INTERNAL_ERROR",
    "KICKED",
    "KICK_CODES",
    "MESSAGE_TOO_LARGE",
    "PING_TIMEOUT",
    "PROTOCOL_ERROR",
    "RATE_LIMITED",
    "SLOW_CONSUMER",
    "WRITE_BUFFER",
    "BrokerError",
    "BrokerOutcomeUnknown",
    "BrokerStalled",
    "BrokerUnavailable",
    "ConfigError",
    "Disconnect",
    "GatewayError",
    "ProtocolError",
    "by_close_code",
]


@dataclasses.dataclass(frozen=True, slots=True)
class Disconnect:
    """One way a connection ends: what is sent, how it is counted, what the client does."""

    label: str  # rtgateway_disconnects_total{reason=label}
    code: int | None  # the close code sent; None: dropped without a close frame
    reason: str = ""  # the close frame's reason text
    reconnect: bool = True  # whether a well-behaved client reconnects as it is


# Closed by the gateway.
DRAIN: Final = Disconnect("drain", 1012, "service restart")
SLOW_CONSUMER: Final = Disconnect("slow_consumer", 4008, "slow consumer")
RATE_LIMITED: Final = Disconnect("rate_limited", 1008, "rate limit exceeded", reconnect=False)
INTERNAL_ERROR: Final = Disconnect("error", 1011, "internal error")
# Closed by the backend through the publish API, with a code of KICK_CODES and
# a reason of its choice (``dataclasses.replace(KICKED, code=..., reason=...)``).
KICKED: Final = Disconnect("kicked", 4000, "", reconnect=False)
KICK_CODES: Final = tuple(code for code in range(4000, 4500) if code != SLOW_CONSUMER.code)
# Closed by the WebSocket protocol (websockets) on the client's input.
PROTOCOL_ERROR: Final = Disconnect("protocol_error", 1002, reconnect=False)
MESSAGE_TOO_LARGE: Final = Disconnect("message_too_large", 1009, reconnect=False)
PING_TIMEOUT: Final = Disconnect("ping_timeout", 1011, "keepalive ping timeout")
# Ended without a close frame from the gateway.
WRITE_BUFFER: Final = Disconnect("write_buffer", None)  # pings sent, replies never read
CLIENT_CLOSE: Final = Disconnect("client_close", None)  # the client's close frame
ABORTED: Final = Disconnect("aborted", None)  # the TCP connection ended, no close frame

DISCONNECTS: Final = (
    CLIENT_CLOSE,
    DRAIN,
    SLOW_CONSUMER,
    RATE_LIMITED,
    PROTOCOL_ERROR,
    MESSAGE_TOO_LARGE,
    PING_TIMEOUT,
    WRITE_BUFFER,
    INTERNAL_ERROR,
    ABORTED,
    KICKED,
)
# The metric's label set: small and fixed, derived from the values above.
DISCONNECT_REASONS: Final = tuple(d.label for d in DISCONNECTS)


def by_close_code(code: int, reason: str) -> Disconnect | None:
    """The disconnect that a close frame the WebSocket protocol sent stands for."""
    if code == 1009:
        return MESSAGE_TOO_LARGE
    if code in (1002, 1003, 1007):
        return PROTOCOL_ERROR
    if code == PING_TIMEOUT.code and reason == PING_TIMEOUT.reason:
        return PING_TIMEOUT
    return None


class GatewayError(Exception):
    """The base of every exception the package raises on purpose."""


class ConfigError(GatewayError, ValueError):
    """An invalid setting. ``str()`` is the one line shown to the operator.

    ``name`` is how the operator gave it (``RTG_X`` or ``--x``).
    """

    def __init__(self, name: str, accepted: str, value: str, *, message: str = "") -> None:
        self.name = name
        self.accepted = accepted
        self.value = value
        super().__init__(message or f"{name}: expected {accepted}, got {value!r}")


class ProtocolError(GatewayError):
    """A client message the gateway refuses; the connection stays open.

    ``code`` is one of ``protocol.ERROR_CODES``, ``message`` is safe to show
    to the client, ``id`` is the request id when one could be read.
    """

    def __init__(self, code: str, message: str, id: int | str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.id = id


class BrokerError(GatewayError):
    """Publishing through the broker between processes failed."""


class BrokerUnavailable(BrokerError):
    """Not published: the broker could not take it (Redis is down, or never got it).

    Retrying cannot duplicate the publication.
    """


class BrokerOutcomeUnknown(BrokerError):
    """Sent to the broker but not confirmed in time: it may or may not have been published."""


class BrokerStalled(BrokerError):
    """Redis answered nothing on the subscription connection for too long."""
