"""state.py: the frozen Context and the live ServerState (data, read by everyone else)."""

from __future__ import annotations

import dataclasses

import pytest
import structlog
from recording import ManualLoop, RecordingConnection

from rtgateway.admission import Admission
from rtgateway.config import Config
from rtgateway.metrics import Metrics
from rtgateway.outbox import Flusher, Outbox
from rtgateway.rooms import Hub
from rtgateway.state import Context, Limits, ServerState

LIMITS = Limits(max_connections=10, max_sockets=20)


class Sock:
    def __init__(self, address: str) -> None:
        self.address = address
        self.spoke = False


def server_state() -> ServerState:
    admission: Admission[Sock] = Admission(
        max_pending=10, max_pending_per_address=0, max_connections_per_address=0
    )
    return ServerState(LIMITS, admission)


def outbox_of(nbytes: int) -> Outbox:
    """An outbox holding ``nbytes`` bytes of frames (its flusher never runs)."""
    metrics = Metrics(version="test", websockets_version="test")
    outbox = Outbox(
        RecordingConnection(),
        Flusher(ManualLoop()),  # type: ignore[arg-type]
        metrics,
        max_messages=10,
        max_bytes=1 << 20,
    )
    outbox.push(b"x" * nbytes, "reply")
    return outbox


def test_sessions_done_is_set_when_the_last_session_closes() -> None:
    """The drain waits on it: set once no WebSocket session is left, not before."""
    state = server_state()
    a, b = outbox_of(1), outbox_of(1)
    state.session_opened(a)
    state.session_opened(b)
    state.session_closed(a)
    assert not state.sessions_done.is_set()
    state.session_closed(b)
    assert state.sessions_done.is_set()
    assert state.outboxes == set()


def test_closing_a_session_twice_is_harmless() -> None:
    """connection.py closes in ``finally``; a second close must not raise or count twice."""
    state = server_state()
    a = outbox_of(1)
    state.session_opened(a)
    state.session_closed(a)
    state.session_closed(a)
    assert state.outboxes == set()


def test_what_the_metrics_read_at_scrape_time_is_the_live_state() -> None:
    """queued_bytes sums the outboxes now; pending_handshakes is admission's; the limit is fixed."""
    state = server_state()
    first, second = outbox_of(100), outbox_of(23)
    state.session_opened(first)
    state.session_opened(second)
    assert state.queued_bytes == 123
    state.session_closed(second)
    assert state.queued_bytes == 100
    state.admission.admit(Sock("192.0.2.1"))
    assert state.pending_handshakes == 1
    assert state.max_connections == 10
    assert state.draining is False


def test_the_context_is_frozen() -> None:
    """Nobody changes what every connection reads."""
    metrics = Metrics(version="test", websockets_version="test")
    ctx = Context(
        config=Config(),
        metrics=metrics,
        hub=Hub(metrics),
        flusher=Flusher(ManualLoop()),  # type: ignore[arg-type]
        log=structlog.get_logger(),
        clock=lambda: 0.0,
        server_name="rtgateway/test",
        hello_limits={},
        hello_extra={},
        static={},
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.config = Config()  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        LIMITS.max_connections = 1  # type: ignore[misc]
