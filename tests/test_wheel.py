"""The timer wheel (``rtgateway/wheel.py``), and the lean connection that runs on it.

The wheel's own tests use a real event loop and timers that record when they
fired. The connection-level tests, few and named for what they prove, run the
real gateway in-process over real sockets: every connection's deadline on one
wheel and no task per connection; fragment assembly at its limit; reading paused
while a publication waits for a frozen Redis, and the messages still in order.
"""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

from conftest import RunningGateway, running_gateway
from redisserver import RedisServer
from wire import OP_CONT, OP_PING, OP_PONG, OP_TEXT, RawConnection, encode_frame, parse_close

from rtgateway.connection import MAX_FRAGMENTS, GatewayConnection
from rtgateway.wheel import Wheel

# The wheel.


class Recorder:
    """A wheel.Timer that notes when it fired; ``again`` schedules it once more."""

    def __init__(self, name: int, fired: list[tuple[int, float, float]]) -> None:
        self.name = name
        self.deadline: float | None = None
        self.wanted = 0.0
        self.fired = fired
        self.again: Wheel | None = None

    def expire(self, now: float) -> None:
        self.fired.append((self.name, self.wanted, now))
        if self.again is not None:
            wheel, self.again = self.again, None
            self.wanted = now + 0.05
            wheel.schedule(self, self.wanted)


async def test_wheel_fires_every_deadline_once_never_early_rescheduled_or_cancelled() -> None:
    loop = asyncio.get_running_loop()
    wheel = Wheel(loop)
    fired: list[tuple[int, float, float]] = []
    rng = random.Random(19)
    timers = [Recorder(i, fired) for i in range(2000)]
    now = loop.time()
    for timer in timers:
        timer.wanted = now + rng.uniform(0, 0.5)
        wheel.schedule(timer, timer.wanted)
    assert len(wheel) == 2000
    moved, cancelled = timers[:300], timers[300:600]
    for timer in moved:  # later or sooner, as a pong moves a connection's next ping
        timer.wanted = loop.time() + rng.uniform(0, 0.6)
        wheel.schedule(timer, timer.wanted)
    for timer in cancelled:  # as a connection that closes
        wheel.cancel(timer)
    assert len(wheel) == 1700
    await until(lambda: len(fired) >= 1700)
    await asyncio.sleep(0.3)  # nothing more comes
    names = [name for name, _, _ in fired]
    assert sorted(names) == sorted(t.name for t in timers if t not in cancelled)
    early = [(name, wanted, at) for name, wanted, at in fired if at < wanted - 1e-6]
    assert early == []
    assert all(t.deadline is None for t in timers) and len(wheel) == 0
    assert wheel.armed is None  # nothing due: no wake-ups


async def test_wheel_goes_on_after_a_timer_fails_and_lets_a_timer_schedule_itself() -> None:
    loop = asyncio.get_running_loop()
    wheel = Wheel(loop)
    fired: list[tuple[int, float, float]] = []

    class Broken(Recorder):
        def expire(self, now: float) -> None:
            super().expire(now)
            raise RuntimeError("a bug in one connection")

    broken = Broken(0, fired)
    keepalive = Recorder(1, fired)
    keepalive.again = wheel  # fires, then schedules itself once more
    for timer in (broken, keepalive):
        timer.wanted = loop.time() + 0.05
        wheel.schedule(timer, timer.wanted)
    await until(lambda: len(fired) >= 3)
    # The broken one fired once; the other fired, and fired again.
    assert sorted(name for name, _, _ in fired) == [0, 1, 1]
    wheel.close()


# The connection on the wheel.


def connections(gw: RunningGateway) -> list[GatewayConnection]:
    state = gw.gateway.state
    assert state is not None
    return [s for s in state.sockets if isinstance(s, GatewayConnection)]


async def until(predicate: Any, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def member(port: int) -> RawConnection:
    conn = await RawConnection.open(port, "/ws")
    assert (await conn.recv_json())["op"] == "hello"
    await conn.send_json({"op": "join", "room": "wheel", "id": 1})
    assert (await conn.recv_json())["op"] == "ack"
    return conn


async def answer_pings(conn: RawConnection) -> None:
    """What a live client does: every ping gets its pong (RFC 6455 §5.5.2)."""
    while True:
        frame = await conn.recv_frame(timeout=30)
        if frame is None:
            return
        if frame.opcode == OP_PING:
            await conn.send_frame(OP_PONG, frame.payload)


async def test_deadlines_of_many_connections_run_on_one_wheel_and_no_task_each() -> None:
    async with running_gateway(
        ping_interval_s=0.2,
        ping_timeout_s=0.3,
        close_timeout_s=0.3,
        open_timeout_s=1.0,
        first_byte_timeout_s=0.5,
        max_pending_handshakes_per_address=0,
        drain_timeout_s=1.0,
    ) as gw:
        tasks_before = len(asyncio.all_tasks())
        live = [await member(gw.port) for _ in range(60)]
        dead = [await member(gw.port) for _ in range(60)]  # joined, then never read
        silent = [await RawConnection.connect(gw.port) for _ in range(30)]
        trickling = [await RawConnection.connect(gw.port) for _ in range(30)]
        for conn in trickling:
            await conn.send(b"GET /ws HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        opened = [c for c in connections(gw) if c.outbox is not None]
        assert len(opened) == 120
        # Every socket has one deadline on the listener's wheel, and the
        # gateway started no task for any of them.
        listener = gw.gateway.listener
        assert listener is not None
        assert len(listener.wheel) == len(connections(gw)) == 180
        assert len(asyncio.all_tasks()) == tasks_before
        answering = [asyncio.ensure_future(answer_pings(c)) for c in live]
        try:
            m = gw.metrics
            await until(lambda: m.disconnects["ping_timeout"] == 60)
            await until(lambda: m.handshake_rejections["first_byte_timeout"] == 30)
            await until(lambda: m.handshake_rejections["timeout"] == 30)  # the open timeout
            for conn in dead:
                code, reason, _ = await conn.recv_close()
                assert (code, reason) == (1011, "keepalive ping timeout")
            # The live ones answered several pings and are still members.
            await asyncio.sleep(1.0)
            assert m.connections_current == 60 and m.room_members_current == 60
            assert len(listener.wheel) == 60
        finally:
            for task in answering:
                task.cancel()
            for conn in (*live, *dead, *silent, *trickling):
                conn.abort()


async def test_a_message_of_4096_fragments_is_assembled_and_one_more_fragment_is_1009() -> None:
    async with running_gateway(drain_timeout_s=1.0) as gw:
        for count in (MAX_FRAGMENTS, MAX_FRAGMENTS + 1):
            conn = await RawConnection.open(gw.port, "/ws/echo")
            try:
                frames = [encode_frame(OP_TEXT, b"a", fin=False)]
                frames += [encode_frame(OP_CONT, b"b", fin=False) for _ in range(count - 2)]
                frames.append(encode_frame(OP_CONT, b"c"))
                await conn.send(b"".join(frames))
                frame = await conn.recv_frame()
                assert frame is not None
                if count == MAX_FRAGMENTS:
                    assert frame.opcode == OP_TEXT
                    assert frame.payload == b"a" + b"b" * (count - 2) + b"c"
                else:
                    assert parse_close(frame.payload) == (1009, "too many fragments")
            finally:
                conn.abort()
        await until(lambda: gw.metrics.disconnects["message_too_large"] == 1)


async def test_reading_pauses_while_a_publication_waits_and_replies_keep_their_order(
    redis_server: RedisServer,
) -> None:
    async with running_gateway(
        broker_url=redis_server.url, broker_timeout_s=10.0, drain_timeout_s=1.0
    ) as gw:
        conn = await member(gw.port)
        try:
            (gateway_side,) = [c for c in connections(gw) if c.outbox is not None]
            redis_server.freeze()
            pings = [{"op": "ping", "id": i} for i in range(2, 6)]
            batch = [{"op": "publish", "room": "wheel", "data": "x", "id": 1}, *pings]
            await conn.send(b"".join(encode_frame(OP_TEXT, _json(m)) for m in batch))
            # The publication waits for Redis: the pings are parsed but held,
            # and the socket is not read meanwhile.
            await until(lambda: gateway_side.inbox is not None and len(gateway_side.inbox) == 4)
            assert not gateway_side.transport.is_reading()  # type: ignore[attr-defined]
            await conn.send_json({"op": "ping", "id": 6})  # waits in the kernel
            await asyncio.sleep(0.3)
            assert len(gateway_side.inbox or ()) == 4
            redis_server.thaw()
            replies = [await conn.recv_json(timeout=15) for _ in range(7)]
            order = [(r["op"], r.get("id")) for r in replies if r["op"] != "message"]
            assert order == [("ack", 1), *(("pong", i) for i in range(2, 7))]
            await until(lambda: gateway_side.inbox is None)
            assert gateway_side.transport.is_reading()  # type: ignore[attr-defined]
        finally:
            redis_server.thaw()
            conn.abort()


def _json(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode()
