"""outbox.py: the bounded send queue, its policies and the flusher, against recording fakes.

No sockets here: a :class:`~recording.RecordingConnection` stands for the
connection (it records each ``transport.write()`` and each close frame asked
for, in order) and a :class:`~recording.ManualLoop` for the flusher's event
loop, so that a test steps through loop iterations one by one. What real
sockets do with these writes is for ``test_connection.py`` and the system
suites (``test_backpressure.py``, ``test_hardening.py``).
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from recording import ManualLoop, RecordingConnection
from structlog.testing import capture_logs

from rtgateway import protocol
from rtgateway.errors import DRAIN, RATE_LIMITED, SLOW_CONSUMER
from rtgateway.metrics import Metrics
from rtgateway.outbox import WRITE_THROUGH_BYTES, Flusher, Outbox


def frame(n: int, size: int = 10) -> bytes:
    """A complete text frame whose payload starts with ``n``, ``size`` bytes of payload."""
    return protocol.text_frame(str(n).encode().ljust(size, b"."))


# Four of these fill WRITE_THROUGH_BYTES exactly (a 4-byte header each).
QUARTER = WRITE_THROUGH_BYTES // 4 - 4


@dataclasses.dataclass
class Bench:
    conn: RecordingConnection
    loop: ManualLoop
    flusher: Flusher
    metrics: Metrics
    outbox: Outbox


def bench(max_messages: int = 4, max_bytes: int = 1 << 20, loop: ManualLoop | None = None) -> Bench:
    """One outbox on a recording connection, its flusher on a loop the test runs."""
    loop = loop or ManualLoop()
    flusher = Flusher(loop)  # type: ignore[arg-type]
    metrics = Metrics(version="test", websockets_version="test")
    conn = RecordingConnection()
    outbox = Outbox(conn, flusher, metrics, max_messages=max_messages, max_bytes=max_bytes)
    return Bench(conn, loop, flusher, metrics, outbox)


def fill(outbox: Outbox, policies: list[str], size: int = 10) -> list[bytes]:
    """Push one frame per policy (numbered from 1); return the frames."""
    frames = [frame(n, size) for n in range(1, len(policies) + 1)]
    for f, policy in zip(frames, policies, strict=True):
        assert outbox.push(f, policy) is None
    return frames


# Coalescing: one write per connection per loop iteration.


def test_frames_pushed_in_one_iteration_leave_in_one_write() -> None:
    """Three pushes, nothing written until the loop runs, then one write of all three."""
    b = bench()
    frames = fill(b.outbox, ["reply", "disconnect", "drop_oldest"])
    assert b.conn.writes() == []
    assert b.loop.run_ready() == 1  # one flush scheduled, however many pushes
    assert b.conn.writes() == [b"".join(frames)]
    assert (b.metrics.messages_sent, b.metrics.sent_bytes) == (3, len(b"".join(frames)))
    assert (b.metrics.flush_frames.count, b.metrics.flush_frames.sum) == (1, 3)
    assert b.outbox.nbytes == 0 and b.outbox.frames == []


def test_each_loop_iteration_writes_what_it_was_given() -> None:
    """Frames pushed in different iterations leave in different writes, in order."""
    b = bench()
    first, second = frame(1), frame(2)
    b.outbox.push(first, "reply")
    b.loop.run_ready()
    b.outbox.push(second, "reply")
    b.loop.run_ready()
    assert b.conn.writes() == [first, second]


def test_one_flusher_run_writes_every_outbox_that_got_frames() -> None:
    """Two connections on one flusher: one scheduled run, one write each."""
    b = bench()
    other_conn = RecordingConnection()
    other = Outbox(other_conn, b.flusher, b.metrics, max_messages=4, max_bytes=1 << 20)
    b.outbox.push(frame(1), "reply")
    other.push(frame(2), "reply")
    other.push(frame(3), "reply")
    assert b.loop.run_ready() == 1
    assert b.conn.writes() == [frame(1)]
    assert other_conn.writes() == [frame(2) + frame(3)]


def test_a_paused_transport_holds_the_frames_until_it_drains() -> None:
    """While paused nothing is written; the flush on resume writes all of it at once."""
    b = bench()
    b.conn.paused = True
    frames = fill(b.outbox, ["reply", "reply"])
    b.loop.run_ready()
    assert b.conn.writes() == []
    b.conn.paused = False
    b.outbox.flush()  # what GatewayConnection.resume_writing() calls
    assert b.conn.writes() == [b"".join(frames)]


def test_frames_for_a_connection_no_longer_open_are_forgotten_not_written() -> None:
    """A connection that is closing takes no more data; the queue is emptied."""
    b = bench()
    b.conn.open = False
    fill(b.outbox, ["reply", "drop_oldest"])
    b.loop.run_ready()
    assert b.conn.writes() == []
    assert b.outbox.nbytes == 0 and b.metrics.messages_sent == 0


# Policies, when the outbox is full.


def test_disconnect_policy_on_a_full_outbox_returns_slow_consumer() -> None:
    """The fifth frame of four returns SLOW_CONSUMER and queues nothing: the caller acts."""
    b = bench(max_messages=4)
    fill(b.outbox, ["disconnect"] * 4)
    assert b.outbox.push(frame(5), "disconnect") is SLOW_CONSUMER
    assert len(b.outbox.frames) == 4
    assert b.conn.closes() == []  # push never closes by itself
    assert b.metrics.dropped == {"drop_oldest": 0, "drop_newest": 0}


def test_drop_newest_drops_the_frame_being_pushed_and_counts_it() -> None:
    """Full: the new frame goes, the waiting ones stay and are written in order."""
    b = bench(max_messages=4)
    frames = fill(b.outbox, ["drop_newest"] * 4)
    assert b.outbox.push(frame(5), "drop_newest") is None
    b.loop.run_ready()
    assert b.conn.writes() == [b"".join(frames)]
    assert b.metrics.dropped["drop_newest"] == 1


def test_drop_newest_evicts_nothing_even_behind_drop_oldest_frames() -> None:
    """A drop_newest frame never makes room by dropping another room's frames."""
    b = bench(max_messages=2)
    frames = fill(b.outbox, ["drop_oldest", "drop_oldest"])
    assert b.outbox.push(frame(3), "drop_newest") is None
    assert b.outbox.frames == frames
    assert b.metrics.dropped == {"drop_oldest": 0, "drop_newest": 1}


def test_drop_oldest_evicts_only_the_oldest_drop_oldest_frames() -> None:
    """Replies and disconnect frames stay; the oldest drop_oldest frames make room."""
    b = bench(max_messages=4)
    r1, _, x3, d4 = fill(b.outbox, ["reply", "drop_oldest", "disconnect", "drop_oldest"])
    d5, d6 = frame(5), frame(6)
    assert b.outbox.push(d5, "drop_oldest") is None
    assert b.outbox.frames == [r1, x3, d4, d5]
    assert b.outbox.push(d6, "drop_oldest") is None
    assert b.outbox.frames == [r1, x3, d5, d6]
    assert b.outbox.policies == ["reply", "disconnect", "drop_oldest", "drop_oldest"]
    assert b.metrics.dropped["drop_oldest"] == 2
    b.loop.run_ready()
    assert b.conn.writes() == [r1 + x3 + d5 + d6]


def test_drop_oldest_with_nothing_to_evict_drops_the_new_frame() -> None:
    """An outbox full of frames that may not be dropped: the drop_oldest frame itself goes."""
    b = bench(max_messages=3)
    frames = fill(b.outbox, ["reply", "disconnect", "drop_newest"])
    assert b.outbox.push(frame(4), "drop_oldest") is None
    assert b.outbox.frames == frames
    assert b.metrics.dropped["drop_oldest"] == 1


def test_a_drop_oldest_frame_larger_than_the_whole_outbox_is_dropped_alone() -> None:
    """It could never fit: dropped, and nothing waiting is evicted for it."""
    b = bench(max_messages=10, max_bytes=100)
    frames = fill(b.outbox, ["drop_oldest", "drop_oldest"])
    assert b.outbox.push(frame(3, size=200), "drop_oldest") is None
    assert b.outbox.frames == frames
    assert b.metrics.dropped["drop_oldest"] == 1


def test_the_outbox_is_bounded_by_bytes_as_well_as_by_frames() -> None:
    """Two 42-byte frames fit in 100 bytes, a third does not, whatever the frame count."""
    b = bench(max_messages=100, max_bytes=100)
    fill(b.outbox, ["disconnect", "disconnect"], size=40)
    assert b.outbox.push(frame(3, size=40), "disconnect") is SLOW_CONSUMER
    assert b.outbox.nbytes == 84
    b = bench(max_messages=100, max_bytes=100)
    _, d2 = fill(b.outbox, ["drop_oldest", "drop_oldest"], size=40)
    d3 = frame(3, size=40)
    assert b.outbox.push(d3, "drop_oldest") is None
    assert b.outbox.frames == [d2, d3] and b.outbox.nbytes == 84


def test_a_reply_is_never_dropped_it_evicts_drop_oldest_frames() -> None:
    """A full outbox of publications: the ack gets in, the oldest publication goes."""
    b = bench(max_messages=3)
    _, d2, d3 = fill(b.outbox, ["drop_oldest"] * 3)
    ack = frame(9)
    assert b.outbox.push(ack, "reply") is None
    assert b.outbox.frames == [d2, d3, ack]
    assert b.metrics.dropped == {"drop_oldest": 1, "drop_newest": 0}


def test_a_reply_that_cannot_fit_makes_the_client_a_slow_consumer() -> None:
    """Nothing droppable waits: the client is not reading, and a reply must not be lost."""
    b = bench(max_messages=3)
    frames = fill(b.outbox, ["reply", "disconnect", "drop_newest"])
    assert b.outbox.push(frame(4), "reply") is SLOW_CONSUMER
    assert b.outbox.frames == frames
    assert b.metrics.dropped == {"drop_oldest": 0, "drop_newest": 0}


# Write-through past WRITE_THROUGH_BYTES, and the heavy flag.


def test_past_the_write_through_threshold_a_push_writes_at_once() -> None:
    """The push that brings the queue to 64 KiB writes all of it before the loop runs."""
    b = bench(max_messages=64)
    frames = fill(b.outbox, ["drop_oldest"] * 3, size=QUARTER)
    assert b.conn.writes() == [] and not b.flusher.heavy
    last = frame(4, size=QUARTER)
    assert b.outbox.push(last, "drop_oldest") is None
    assert b.conn.writes() == [b"".join([*frames, last])]
    assert b.flusher.heavy
    assert b.outbox.nbytes == 0
    b.loop.run_ready()  # the flush scheduled by the first push finds nothing left
    assert len(b.conn.writes()) == 1


def test_a_paused_outbox_past_the_threshold_marks_the_flusher_heavy_once_until_it_drains() -> None:
    """A member that stopped reading makes its room yield once, not on every publication."""
    b = bench(max_messages=64)
    b.conn.paused = True
    fill(b.outbox, ["drop_oldest"] * 4, size=QUARTER)
    assert b.conn.writes() == []  # paused: nothing written through
    assert b.flusher.heavy
    b.flusher.heavy = False  # a publisher relieved it
    b.outbox.push(frame(5, size=QUARTER), "drop_oldest")
    assert not b.flusher.heavy, "a stuck outbox made the room yield again"
    b.conn.paused = False
    b.outbox.flush()  # its transport drained
    assert len(b.conn.writes()) == 1
    b.conn.paused = True
    fill(b.outbox, ["drop_oldest"] * 4, size=QUARTER)
    assert b.flusher.heavy, "once drained, it may make the room yield again"


def test_a_broken_transport_during_a_write_through_is_aborted_and_push_does_not_raise() -> None:
    """Inside a room's fan-out one broken member must not stop the others."""
    b = bench(max_messages=64)
    b.conn.transport.fail = OSError("broken pipe")
    with capture_logs() as logs:
        fill(b.outbox, ["drop_oldest"] * 4, size=QUARTER)
    assert b.conn.transport.aborted
    assert [e["event"] for e in logs] == ["outbox_flush_failed"]


async def test_relieve_yields_to_the_loop_once_only_after_a_heavy_push() -> None:
    """Not heavy: returns without yielding. Heavy: lets the loop run once, and clears it."""
    loop = asyncio.get_running_loop()
    flusher = Flusher(loop)
    ran: list[str] = []
    loop.call_soon(ran.append, "other work")
    await flusher.relieve()
    assert ran == []
    flusher.heavy = True
    await flusher.relieve()
    assert ran == ["other work"]
    assert not flusher.heavy


# Closing.


def test_close_sends_the_close_frame_after_the_frames_already_queued() -> None:
    """Queued frames first, then the close frame with the given reason, in one flush."""
    b = bench()
    frames = fill(b.outbox, ["reply", "drop_oldest"])
    b.outbox.close(DRAIN, "service restart; retry_after_ms=1500")
    assert b.conn.events == []
    b.loop.run_ready()
    assert b.conn.events == [
        ("write", b"".join(frames)),
        ("close", 1012, "service restart; retry_after_ms=1500"),
    ]
    assert b.outbox.disconnect is DRAIN


def test_close_without_a_reason_sends_the_disconnects_own_and_only_once() -> None:
    """The reason text is the disconnect's; a second close changes nothing."""
    b = bench()
    b.outbox.close(RATE_LIMITED)
    b.outbox.close(DRAIN)
    b.loop.run_ready()
    assert b.conn.closes() == [(1008, "rate limit exceeded")]
    assert b.outbox.disconnect is RATE_LIMITED


def test_nothing_pushed_after_close_is_queued() -> None:
    """Once closing, further frames (a late publication) are ignored, not counted as drops."""
    b = bench()
    b.outbox.close(DRAIN)
    assert b.outbox.push(frame(1), "reply") is None
    b.loop.run_ready()
    assert b.conn.writes() == []
    assert b.conn.closes() == [(1012, "service restart")]


def test_close_on_a_paused_transport_waits_for_the_frames_to_be_written() -> None:
    """The close frame never overtakes the data before it."""
    b = bench()
    b.conn.paused = True
    [queued] = fill(b.outbox, ["reply"])
    b.outbox.close(DRAIN)
    b.loop.run_ready()
    assert b.conn.events == []
    b.conn.paused = False
    b.outbox.flush()
    assert b.conn.events == [("write", queued), ("close", 1012, "service restart")]


def test_kill_drops_the_queue_and_sends_the_close_frame_at_once() -> None:
    """A slow consumer is closed now: nothing queued is written, before or after."""
    b = bench()
    fill(b.outbox, ["disconnect"] * 3)
    b.outbox.kill(SLOW_CONSUMER)
    assert b.conn.events == [("close", 4008, "slow consumer")]
    b.loop.run_ready()
    assert b.conn.writes() == []
    assert b.outbox.nbytes == 0 and b.outbox.closed
    assert b.outbox.disconnect is SLOW_CONSUMER


def test_kill_after_close_sends_its_own_close_now_instead() -> None:
    """A close waiting for the queue is replaced: the queue dropped, one close frame sent."""
    b = bench()
    fill(b.outbox, ["reply"])
    b.outbox.close(DRAIN)
    b.outbox.kill(SLOW_CONSUMER)
    b.loop.run_ready()
    assert b.conn.events == [("close", 4008, "slow consumer")]
    assert b.outbox.disconnect is SLOW_CONSUMER


def test_kill_after_the_close_frame_went_out_does_nothing() -> None:
    """One close frame per connection."""
    b = bench()
    b.outbox.close(DRAIN)
    b.loop.run_ready()
    b.outbox.kill(SLOW_CONSUMER)
    assert b.conn.closes() == [(1012, "service restart")]
    assert b.outbox.disconnect is DRAIN


def test_discard_forgets_the_queue_and_sends_nothing() -> None:
    """The connection is gone: no write, no close frame, nothing more accepted."""
    b = bench()
    fill(b.outbox, ["reply"])
    b.outbox.close(DRAIN)
    b.outbox.discard()
    b.loop.run_ready()
    assert b.conn.events == []
    assert b.outbox.push(frame(2), "reply") is None
    assert b.outbox.frames == []


# The flusher.


def test_a_connection_that_fails_to_write_is_aborted_and_the_others_get_their_writes() -> None:
    """One broken socket costs that connection, logged, never the rest of the run."""
    b = bench()
    broken = Outbox(RecordingConnection(), b.flusher, b.metrics, max_messages=4, max_bytes=1 << 20)
    broken.conn.transport.fail = OSError("connection reset")  # type: ignore[attr-defined]
    broken.push(frame(1), "reply")
    b.outbox.push(frame(2), "reply")
    with capture_logs() as logs:
        b.loop.run_ready()
    assert broken.conn.transport.aborted  # type: ignore[attr-defined]
    assert b.conn.writes() == [frame(2)]
    assert [e["event"] for e in logs] == ["outbox_flush_failed"]


@pytest.mark.parametrize("policy", ["reply", "disconnect", "drop_oldest", "drop_newest"])
def test_an_outbox_with_room_takes_a_frame_of_any_policy(policy: str) -> None:
    """Policies only matter when it is full: with room, every frame is queued and written."""
    b = bench()
    [queued] = fill(b.outbox, [policy])
    b.loop.run_ready()
    assert b.conn.writes() == [queued]
