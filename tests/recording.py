"""Recording fakes for the unit tests of the outbox and the handlers: no sockets.

Like the recording protocol of websockets' own tests (``tests/protocol.py``),
these stand where the I/O would be and keep what the code under test did to
it, in order, for the test to read back:

- :class:`RecordingConnection` is an :class:`~rtgateway.outbox.Writable`: its
  :class:`RecordingTransport` keeps every ``write()``, and the connection
  keeps every close frame asked for, in one list of events;
- :class:`ManualLoop` is the flusher's event loop: ``call_soon`` callbacks
  wait until the test runs them (:meth:`ManualLoop.run_ready`), so "one write
  per loop iteration" is something a test can step through;
- :class:`FakeClock` is a clock that moves only when told.

The tests that claim to test sockets never use these: they run the real
gateway on loopback (``conftest.running_gateway``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from wire import OP_BINARY, OP_TEXT, FrameReader

__all__ = ["FakeClock", "ManualLoop", "RecordingConnection", "RecordingTransport"]


class RecordingTransport:
    """What an outbox calls on its transport: ``write`` recorded, ``abort`` remembered."""

    def __init__(self, events: list[tuple[Any, ...]]) -> None:
        self.events = events
        self.aborted = False
        self.fail: Exception | None = None  # raised by the next write, as a broken socket

    def write(self, data: bytes) -> None:
        if self.fail is not None:
            raise self.fail
        self.events.append(("write", bytes(data)))

    def abort(self) -> None:
        self.aborted = True
        self.events.append(("abort",))

    def is_closing(self) -> bool:
        return self.aborted


class RecordingConnection:
    """A :class:`~rtgateway.outbox.Writable` that records what is sent to it, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.transport = RecordingTransport(self.events)
        self.paused = False
        self.open = True
        self.read = 0  # frames already returned by messages()

    def is_open(self) -> bool:
        return self.open and not self.transport.aborted

    def send_close(self, code: int, reason: str) -> None:
        # As websockets' protocol: once a close frame is sent, no data follows.
        self.events.append(("close", code, reason))
        self.open = False

    # Reading back.

    def writes(self) -> list[bytes]:
        """The ``write()`` calls so far, each as the bytes it wrote."""
        return [event[1] for event in self.events if event[0] == "write"]

    def closes(self) -> list[tuple[int, str]]:
        """The close frames asked for so far: (code, reason)."""
        return [(event[1], event[2]) for event in self.events if event[0] == "close"]

    def frames(self) -> list[bytes]:
        """Every frame's payload written so far, split at frame boundaries."""
        reader = FrameReader()
        frames = reader.feed(b"".join(self.writes()))
        assert not reader.buffer, "a partial frame was written"
        return [frame.payload for frame in frames if frame.opcode in (OP_TEXT, OP_BINARY)]

    def messages(self) -> list[Any]:
        """The JSON messages written since the last call (each is returned once)."""
        payloads = self.frames()
        seen, self.read = self.read, len(payloads)
        return [json.loads(payload) for payload in payloads[seen:]]


class ManualLoop:
    """The one method the flusher uses of its loop, run when the test says."""

    def __init__(self) -> None:
        self.ready: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        self.ready.append((callback, args))

    def run_ready(self) -> int:
        """Run the callbacks scheduled so far (one loop iteration); how many ran."""
        ready, self.ready = self.ready, []
        for callback, args in ready:
            callback(*args)
        return len(ready)


class FakeClock:
    """A monotonic clock that moves only when the test moves it."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
