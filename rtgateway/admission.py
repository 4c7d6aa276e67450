"""Admission: sockets that have not finished a handshake, and connections per source address.

A socket the listener accepted is *pending* until its request head has been
read (and answered: upgraded, refused, or a health check). Pending sockets
have a budget of their own, apart from the WebSocket connections, so that
sockets that never send a byte cannot crowd out a ``/healthz`` probe or a new
client:

- at most ``max_pending`` in the process, and ``max_pending_per_address``
  from one source address (an IPv6 source by its /64);
- a new socket past either budget *evicts* the oldest pending socket (of its
  own address first), preferring one that has not sent a byte, rather than
  being refused: a fresh probe always gets in, and an attacker who opens
  sockets faster than clients complete handshakes mostly evicts their own;
- a socket that sends nothing within the first-byte deadline is aborted
  (``GatewayConnection`` owns that timer).

Established WebSocket connections are counted per address as well:
``max_connections_per_address`` of them, past which a handshake is answered
503 (``http.process_request``).

This module keeps the books and decides who goes; it never touches a socket.
The caller aborts what :meth:`Admission.admit` returns. 0 turns a
per-address limit off.
"""

from __future__ import annotations

import ipaddress
from typing import Generic, Protocol, TypeVar

__all__ = ["Admission", "Pending", "address_key"]


class Pending(Protocol):
    """What admission needs of a socket: its address key, and whether it has spoken."""

    address: str
    spoke: bool


P = TypeVar("P", bound=Pending)


def address_key(host: str) -> str:
    """The source address limits are kept for: IPv4 as is, IPv6 by its /64.

    An IPv4-mapped IPv6 address (a dual-stack listener) is its IPv4 address.
    One host on IPv6 usually holds a whole /64, and can pick any address in it.
    """
    if ":" not in host:
        return host
    try:
        address = ipaddress.IPv6Address(host.partition("%")[0])
    except ValueError:
        return host
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Address(int(address) >> 64 << 64)) + "/64"


class Admission(Generic[P]):
    """The books of pending sockets and of connections per address. Event loop only."""

    def __init__(
        self,
        *,
        max_pending: int,
        max_pending_per_address: int,
        max_connections_per_address: int,
    ) -> None:
        self.max_pending = max_pending
        self.max_pending_per_address = max_pending_per_address
        self.max_connections_per_address = max_connections_per_address
        # Insertion-ordered: the oldest first.
        self.silent: dict[P, None] = {}
        self.talking: dict[P, None] = {}
        self.by_address: dict[str, dict[P, None]] = {}
        self.connections: dict[str, int] = {}

    @property
    def pending(self) -> int:
        return len(self.silent) + len(self.talking)

    def admit(self, sock: P) -> tuple[P, str] | None:
        """Count a new socket as pending; return a pending one to evict, and why, if any."""
        victim: tuple[P, str] | None = None
        mine = self.by_address.get(sock.address)
        if mine is not None and 0 < self.max_pending_per_address <= len(mine):
            victim = (_oldest(mine), "address_pending_limit")
        elif self.pending >= self.max_pending > 0:
            victim = (self.oldest(), "pending_evicted")
        if victim is not None:
            self.done(victim[0])
        self.silent[sock] = None
        self.by_address.setdefault(sock.address, {})[sock] = None
        return victim

    def oldest(self) -> P:
        """The pending socket to evict first: the oldest silent one, else the oldest."""
        return next(iter(self.silent or self.talking))

    def spoke(self, sock: P) -> None:
        """``sock`` sent its first bytes."""
        if sock in self.silent:
            del self.silent[sock]
            self.talking[sock] = None

    def done(self, sock: P) -> None:
        """``sock`` is no longer pending: answered, upgraded, evicted or gone."""
        self.silent.pop(sock, None)
        self.talking.pop(sock, None)
        mine = self.by_address.get(sock.address)
        if mine is not None:
            mine.pop(sock, None)
            if not mine:
                del self.by_address[sock.address]

    # Established WebSocket connections.

    def at_connection_limit(self, address: str) -> bool:
        limit = self.max_connections_per_address
        return 0 < limit <= self.connections.get(address, 0)

    def opened(self, address: str) -> None:
        self.connections[address] = self.connections.get(address, 0) + 1

    def closed(self, address: str) -> None:
        left = self.connections.get(address, 0) - 1
        if left > 0:
            self.connections[address] = left
        else:
            self.connections.pop(address, None)


def _oldest(sockets: dict[P, None]) -> P:
    for sock in sockets:
        if not sock.spoke:
            return sock
    return next(iter(sockets))
