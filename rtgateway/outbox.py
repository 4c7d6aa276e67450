"""The bounded per-connection send queue: the only code that writes to a socket.

Frames from rooms, replies to the client and close frames all enter a
connection's :class:`Outbox`. Frames pushed during one event-loop iteration
leave together in one ``transport.write`` (the :class:`Flusher` runs once per
iteration over the outboxes that got frames), so a burst of publications costs
one system call per connection instead of one per frame. While the transport
is above its high-water mark (the connection is *paused*) frames wait, and
they are flushed when it drains.

Only a member that stops reading may fill its outbox, never one iteration's
fan-out: one API batch, or 16 queued client messages, can push more than a
whole outbox in one iteration, before any socket was written. Two things keep
that from happening:

- *write-through*: once an outbox holds :data:`WRITE_THROUGH_BYTES` and its
  transport is not paused, :meth:`Outbox.push` writes at once; the kernel
  takes what the peer has room for;
- *one heavy publication per iteration*: such a push marks the flusher
  ``heavy``, and a publisher awaits :meth:`Flusher.relieve` before its next
  publication, which lets the event loop run once (sockets are read and
  written) when, and only when, the last one was heavy. A paused outbox past
  the threshold marks it once, then again only after its transport drained:
  a member that stopped reading must not make every publication to its room
  yield.

Small bursts never reach the threshold and still leave in one write per
connection per iteration.

The queue is bounded by frames and by bytes. When it is full, the policy of
the frame being pushed decides (Centrifugo and Phoenix hard-code one of these;
here each room membership carries its own):

- ``disconnect``: :meth:`Outbox.push` returns
  :data:`~rtgateway.errors.SLOW_CONSUMER` (close 4008), as centrifuge's
  ``writer.enqueue`` returns a disconnect, and the caller acts on it
  (:meth:`Outbox.kill`);
- ``drop_newest``: drop the frame being pushed;
- ``drop_oldest``: drop the oldest waiting ``drop_oldest`` frames to make room.

Replies (acks, errors, pongs) use ``reply``: they are never dropped; they may
evict waiting ``drop_oldest`` frames, and a client whose outbox holds nothing
else to drop is a slow consumer.

An outbox never awaits: pushing costs the same whether the peer reads or not,
so a room's fan-out never waits on a slow member.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import structlog

from .errors import SLOW_CONSUMER, Disconnect
from .metrics import Metrics

__all__ = ["WRITE_THROUGH_BYTES", "Flusher", "Outbox", "Writable"]

# Queued bytes past which an outbox writes at once: the transport's high-water
# mark (the gateway's write limit), so that a connection that is not paused
# never holds more than a write's worth in its outbox.
WRITE_THROUGH_BYTES = 64 * 1024
_log = structlog.get_logger("rtgateway.outbox")


class Writable(Protocol):
    """What an outbox needs from a connection (see ``connection.GatewayConnection``)."""

    transport: asyncio.Transport
    paused: bool

    def is_open(self) -> bool: ...

    def send_close(self, code: int, reason: str) -> None: ...


class Flusher:
    """Runs :meth:`Outbox.flush` once per loop iteration for outboxes with new frames.

    ``heavy`` is set when a push filled an outbox past
    :data:`WRITE_THROUGH_BYTES`; :meth:`relieve` clears it.
    """

    __slots__ = ("dirty", "heavy", "loop", "scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.dirty: list[Outbox] = []
        self.scheduled = False
        self.heavy = False

    async def relieve(self) -> None:
        """Yield to the event loop once if the last publication filled an outbox.

        Publishers call this between publications: a burst of heavy ones is
        spread over loop iterations, in which members read and their
        transports drain, instead of queued in one.
        """
        if self.heavy:
            self.heavy = False
            await asyncio.sleep(0)

    def add(self, outbox: Outbox) -> None:
        self.dirty.append(outbox)
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.run)

    def run(self) -> None:
        self.scheduled = False
        dirty, self.dirty = self.dirty, []
        for outbox in dirty:
            outbox.scheduled = False
            try:
                outbox.flush()
            except Exception:
                # One broken connection must not stop delivery to the others.
                _log.exception("outbox_flush_failed")
                outbox.conn.transport.abort()


class Outbox:
    """One connection's queue of complete frames, and the only writer of its socket."""

    __slots__ = (
        "closed",
        "conn",
        "disconnect",
        "drained",
        "flusher",
        "frames",
        "max_bytes",
        "max_messages",
        "metrics",
        "namespaces",
        "nbytes",
        "pending_close",
        "policies",
        "scheduled",
    )

    def __init__(
        self,
        conn: Writable,
        flusher: Flusher,
        metrics: Metrics,
        *,
        max_messages: int,
        max_bytes: int,
    ) -> None:
        self.conn = conn
        self.flusher = flusher
        self.metrics = metrics
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.frames: list[bytes] = []
        self.policies: list[str] = []
        # The namespace (its metrics index) of each frame, for the drop counter.
        self.namespaces: list[int] = []
        self.nbytes = 0
        self.scheduled = False
        self.closed = False
        self.drained = True  # written to the transport since it last made a publisher yield
        # (code, reason) of a close frame to send once the queue is written.
        self.pending_close: tuple[int, str] | None = None
        # Why the gateway ended this connection, for the disconnect counter.
        self.disconnect: Disconnect | None = None

    def push(self, frame: bytes, policy: str, namespace: int = 0) -> Disconnect | None:
        """Queue one complete frame; apply ``policy`` if the outbox is full.

        ``namespace`` is the metrics index of the frame's room's namespace (a
        drop is counted under it). Returns the disconnect the caller must
        carry out (:meth:`kill`): the client is not reading and its policy, or
        a reply, leaves no room.
        """
        if self.closed:
            return None
        size = len(frame)
        if len(self.frames) >= self.max_messages or self.nbytes + size > self.max_bytes:
            room = self._make_room(size, policy, namespace)
            if room is False:
                return None  # dropped by its policy
            if room is not True:
                return room
        self.frames.append(frame)
        self.policies.append(policy)
        self.namespaces.append(namespace)
        nbytes = self.nbytes = self.nbytes + size
        if nbytes >= WRITE_THROUGH_BYTES and self._write_through():
            return None
        if not self.scheduled:
            self.scheduled = True
            self.flusher.add(self)
        return None

    def _write_through(self) -> bool:
        """Past the threshold: write now if the transport takes it; whether it was written."""
        if not self.conn.paused:
            # The peer's socket may take it now: a member that reads is not
            # made to hold a whole burst.
            self.flusher.heavy = True
            self.flush_guarded()
            return True
        if self.drained:
            # Paused: the publisher yields once, and again only after this
            # transport drained, so that a member that stopped reading does
            # not cost its room a loop iteration per publication (and the
            # coalescing of everyone else's writes).
            self.drained = False
            self.flusher.heavy = True
        return False

    def _make_room(self, size: int, policy: str, namespace: int) -> Disconnect | bool:
        """True when the frame fits now; False when it was dropped; else the disconnect."""
        if policy == "drop_newest" or (policy == "drop_oldest" and size > self.max_bytes):
            # (A frame larger than the whole outbox can never fit: drop it.)
            self.metrics.message_dropped(policy, namespace)
            return False
        if size <= self.max_bytes:  # drop_oldest or reply: evict drop_oldest frames
            frames, policies = self.frames, self.policies
            i = 0
            while i < len(frames) and (
                len(frames) >= self.max_messages or self.nbytes + size > self.max_bytes
            ):
                if policies[i] == "drop_oldest":
                    self.metrics.message_dropped("drop_oldest", self.namespaces[i])
                    self._discard(i)
                else:
                    i += 1
            if len(frames) < self.max_messages and self.nbytes + size <= self.max_bytes:
                return True
            if policy == "drop_oldest":
                self.metrics.message_dropped("drop_oldest", namespace)
                return False
        # disconnect, or a reply that cannot fit: the client is not reading.
        return SLOW_CONSUMER

    def _discard(self, index: int) -> None:
        frame = self.frames.pop(index)
        del self.policies[index]
        del self.namespaces[index]
        self.nbytes -= len(frame)

    def _clear(self) -> None:
        self.frames.clear()
        self.policies.clear()
        self.namespaces.clear()
        self.nbytes = 0

    def flush_guarded(self) -> None:
        """:meth:`flush`, inside a fan-out: one broken connection must not stop the others."""
        try:
            self.flush()
        except Exception:
            _log.exception("outbox_flush_failed")
            self.conn.transport.abort()

    def flush(self) -> None:
        """Write every waiting frame in one write, unless the transport is paused."""
        conn = self.conn
        if conn.paused:
            return  # resume_writing() calls flush() again.
        frames = self.frames
        if frames:
            if conn.is_open():
                count = len(frames)
                data = frames[0] if count == 1 else b"".join(frames)
                conn.transport.write(data)
                self.drained = True
                self.metrics.sent(count, len(data))
                self.metrics.flush_frames.observe(count)
            self._clear()
        if self.pending_close is not None:
            code, reason = self.pending_close
            self.pending_close = None
            conn.send_close(code, reason)

    def close(self, disconnect: Disconnect, reason: str | None = None) -> None:
        """Close after the frames already queued, e.g. 1012 while draining.

        ``reason`` replaces the disconnect's reason text (the drain's carries
        the client's reconnect delay).
        """
        if self.closed:
            return
        assert disconnect.code is not None, disconnect
        self.closed = True
        self.disconnect = disconnect
        self.pending_close = (disconnect.code, disconnect.reason if reason is None else reason)
        if not self.scheduled:
            self.scheduled = True
            self.flusher.add(self)

    def kill(self, disconnect: Disconnect) -> None:
        """Drop what is queued and send a close frame now (slow consumer, abuse)."""
        if self.closed and self.pending_close is None:
            return
        assert disconnect.code is not None, disconnect
        self.closed = True
        self.disconnect = disconnect
        self.pending_close = None
        self._clear()
        self.conn.send_close(disconnect.code, disconnect.reason)

    def discard(self) -> None:
        """Forget the queue when the connection is gone."""
        self.closed = True
        self.pending_close = None
        self._clear()
