"""M3: bounded outboxes, slow-consumer policies, the ping-flood guard, rate limits.

The gateway runs as a subprocess (its own core, its own RSS to measure); the
members are raw clients in this process. The slow consumer is real: a socket
with a 4 KiB receive buffer that stops reading.
"""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from conftest import TEST_CONFIG, running_gateway
from support import GatewayProcess, http_get, wait_until
from wire import OP_CLOSE, OP_PING, OP_TEXT, RawConnection, encode_frame

from rtgateway.client import Client

N_MESSAGES = 10_000
N_FAST = 200
SEQ_RE = re.compile(rb'"seq":(\d+)')


def metric(gw: GatewayProcess, name: str, labels: str = "") -> float:
    _, body, _ = http_get(gw.url + "/metrics")
    for line in body.splitlines():
        if line.startswith(name + labels + " ") or (not labels and line.startswith(name + " ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def rss_bytes(gw: GatewayProcess) -> int:
    assert gw.proc is not None
    with open(f"/proc/{gw.proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def joined_raw(
    port: int, room: str, policy: str | None = None, rcvbuf: int | None = None
) -> RawConnection:
    client = await RawConnection.open(port, rcvbuf=rcvbuf)
    assert (await client.recv_json())["op"] == "hello"
    join = {"op": "join", "room": room, "id": 1}
    if policy:
        join["policy"] = policy
    await client.send_json(join)
    ack = await client.recv_json()
    assert ack["op"] == "ack", ack
    return client


async def read_seqs(
    client: RawConnection, count: int, progress: list[int] | None = None
) -> list[int]:
    seqs: list[int] = []
    while len(seqs) < count:
        frame = await client.recv_frame(timeout=60)
        if frame is None or frame.opcode == OP_CLOSE:
            break
        if frame.opcode == OP_TEXT:
            match = SEQ_RE.search(frame.payload)
            if match:
                seqs.append(int(match.group(1)))
                if progress is not None:
                    progress[0] = seqs[-1]
    return seqs


# Fast members are those that keep up: the publisher never runs more than this
# many messages ahead of the slowest of them. (All 200 members are read by this
# one Python process, which decodes slower than the gateway sends.)
FAST_WINDOW = 500


async def publish_many(
    port: int, room: str, n: int, progress: list[list[int]] | None = None
) -> None:
    # The publisher is not a member (RTG_PUBLISH_REQUIRES_JOIN=false): it
    # measures the members, not itself.
    async with Client.connect(f"ws://127.0.0.1:{port}/ws") as pub:
        for i in range(n):
            if progress and i % 50 == 0:
                while i - min(p[0] for p in progress) > FAST_WINDOW:  # noqa: ASYNC110
                    await asyncio.sleep(0.002)
            await pub.publish_nowait(room, {"i": i, "pad": "x" * 64})
        # The last publish is acknowledged only after every earlier one was fanned out.
        await pub.publish(room, {"i": "last"})


@pytest.fixture
def fast_gateway() -> GatewayProcess:
    env = {
        "RTG_RATE_LIMIT_MSGS_PER_S": "1000000",
        "RTG_RATE_LIMIT_BURST": "1000000",
        "RTG_RATE_LIMIT_BYTES_PER_S": "0",
        "RTG_PUBLISH_REQUIRES_JOIN": "false",
        # Without it Linux lets one socket hold up to 4 MiB (tcp_wmem), more
        # than this test publishes.
        "RTG_SOCKET_SNDBUF_BYTES": "65536",
        # Long enough for the slow consumer to come back and read its close frame.
        "RTG_CLOSE_TIMEOUT_S": "300",
        # The members are raw clients, which answer no ping: with keepalive on,
        # a run slowed past 40 s (a loaded machine) cut them off with 1011.
        "RTG_PING_INTERVAL_S": "0",
    }
    with GatewayProcess(env) as gw:
        yield gw


@pytest.mark.timeout(240)
@pytest.mark.parametrize("policy", ["disconnect", "drop_oldest"])
async def test_slow_consumer_in_busy_room_does_not_slow_fast_members(
    fast_gateway: GatewayProcess, policy: str
) -> None:
    """200 fast members get all 10,000 publications in order; the slow one gets its policy."""
    gw = fast_gateway
    assert gw.port is not None
    fast = [await joined_raw(gw.port, "busy") for _ in range(N_FAST)]
    slow = await joined_raw(gw.port, "busy", policy=policy, rcvbuf=4096)
    await asyncio.to_thread(
        wait_until,
        lambda: metric(gw, "rtgateway_room_members_current") == N_FAST + 1,
        10,
        what="every member joined",
    )
    rss_before = rss_bytes(gw)

    progress = [[0] for _ in fast]
    readers = [
        asyncio.create_task(read_seqs(c, N_MESSAGES + 1, p))
        for c, p in zip(fast, progress, strict=True)
    ]
    await publish_many(gw.port, "busy", N_MESSAGES, progress)
    results = await asyncio.gather(*readers)
    rss_after = rss_bytes(gw)

    # Every fast member got every message, in order, none missing.
    expected = list(range(1, N_MESSAGES + 2))
    for seqs in results:
        assert seqs == expected

    outbox_max_bytes, write_limit = 1 << 20, 64 << 10
    # One slow client may hold at most its outbox and the transport's buffer;
    # the rest is allocator slack, stated here as the bound.
    bound = outbox_max_bytes + write_limit + outbox_max_bytes + (16 << 20)
    assert rss_after - rss_before < bound, (rss_before, rss_after)

    if policy == "disconnect":
        # The slow consumer reads again: behind the frames already written it
        # finds the close frame (the gateway waits RTG_CLOSE_TIMEOUT_S for the
        # reply, then aborts; the counter moves when the connection is gone).
        code, reason, frames = await slow.recv_close(timeout=60)
        await slow.send_frame(OP_CLOSE, (4008).to_bytes(2, "big"))
        await slow.close()
        wait_until(
            lambda: metric(gw, "rtgateway_disconnects_total", '{reason="slow_consumer"}') == 1,
            30,
            what="slow_consumer counted",
        )
        assert (code, reason) == (4008, "slow consumer")
        # Bounded: the outbox, the transport buffer and the kernel's buffers
        # (SO_SNDBUF 64 KiB, which Linux doubles, and the 4 KiB receive buffer).
        received = sum(len(f.payload) + 4 for f in frames)
        assert received < outbox_max_bytes + write_limit + 2 * 65536 + (64 << 10)
        assert len(frames) < N_MESSAGES
    else:
        assert metric(gw, "rtgateway_disconnects_total", '{reason="slow_consumer"}') == 0
        seqs: list[int] = []
        # Read what is left until the newest message arrives.
        while not seqs or seqs[-1] != N_MESSAGES + 1:
            seqs += await read_seqs(slow, 1)
        assert seqs == sorted(seqs)
        gaps = N_MESSAGES + 1 - len(seqs)
        assert gaps > 0, "the slow consumer should have lost messages"
        dropped = metric(gw, "rtgateway_messages_dropped_total", '{policy="drop_oldest"}')
        assert dropped == gaps
        await slow.close()
    for c in fast:
        await c.close()


async def test_ping_flood_from_a_client_that_never_reads_is_cut_off() -> None:
    """Pings from a client that never reads its pongs: reset at the buffer limit, RSS bounded."""
    with GatewayProcess() as gw:
        assert gw.port is not None
        flooder = await RawConnection.open(gw.port, "/ws/echo", rcvbuf=4096)
        rss_before = rss_bytes(gw)
        sent = 0
        with pytest.raises(ConnectionError):
            # 125-byte pings: each one makes the server queue a 127-byte pong.
            for _ in range(200_000):
                await flooder.send_frame(OP_PING, b"p" * 125)
                sent += 1
        assert sent < 200_000
        wait_until(
            lambda: metric(gw, "rtgateway_disconnects_total", '{reason="write_buffer"}') == 1,
            10,
            what="write_buffer disconnect",
        )
        assert rss_bytes(gw) - rss_before < 16 << 20
        # The gateway still serves others.
        async with Client.connect(gw.ws_url + "/ws") as other:
            assert (await other.ping())["op"] == "pong"


async def test_publish_flood_gets_rate_limited_errors_then_close_1008() -> None:
    """A publish flood: the burst passes, 20 rate_limited errors, then close 1008."""
    env = {
        "RTG_RATE_LIMIT_MSGS_PER_S": "5",
        "RTG_RATE_LIMIT_BURST": "10",
        "RTG_RATE_LIMIT_MAX_REJECTED": "20",
    }
    with GatewayProcess(env) as gw:
        assert gw.port is not None
        client = await joined_raw(gw.port, "flood")
        for i in range(200):
            await client.send_json({"op": "publish", "room": "flood", "data": i, "id": i})
        code, _, frames = await client.recv_close()
        replies = [f.json() for f in frames if f.opcode == OP_TEXT]
        errors = [r for r in replies if r["op"] == "error"]
        assert errors and all(e["code"] == "rate_limited" for e in errors)
        assert all(e["retry_after_ms"] > 0 for e in errors)
        assert errors[0]["id"] is not None
        assert code == 1008
        # The burst passed; 20 rejections were answered, the 21st closed it.
        assert len(errors) == 20
        assert metric(gw, "rtgateway_rate_limited_total") == 21
        wait_until(
            lambda: metric(gw, "rtgateway_disconnects_total", '{reason="rate_limited"}') == 1,
            10,
        )


async def test_drop_newest_policy_keeps_the_oldest_and_counts_the_rest() -> None:
    """drop_newest keeps the oldest publications, in order, and counts every one it drops."""
    env = {
        "RTG_OUTBOX_MAX_MESSAGES": "16",
        "RTG_PUBLISH_REQUIRES_JOIN": "false",
        "RTG_RATE_LIMIT_MSGS_PER_S": "1000000",
        "RTG_RATE_LIMIT_BURST": "1000000",
        "RTG_RATE_LIMIT_BYTES_PER_S": "0",
    }
    with GatewayProcess(env) as gw:
        assert gw.port is not None
        slow = await joined_raw(gw.port, "r", policy="drop_newest", rcvbuf=4096)
        await publish_many(gw.port, "r", 3000)
        seqs: list[int] = []
        while True:
            got = await asyncio.wait_for(read_seqs(slow, 1), 10)
            seqs += got
            if (
                metric(gw, "rtgateway_outbox_queued_bytes") == 0
                and len(seqs)
                + metric(gw, "rtgateway_messages_dropped_total", '{policy="drop_newest"}')
                >= 3001
            ):
                break
        dropped = metric(gw, "rtgateway_messages_dropped_total", '{policy="drop_newest"}')
        assert dropped > 0
        assert len(seqs) + dropped == 3001
        assert seqs == sorted(seqs) and seqs[0] == 1
        await slow.close()


async def test_client_may_choose_only_allowed_policies() -> None:
    """A client may join with an allowed policy only; another gets policy_not_allowed."""
    with GatewayProcess({"RTG_SLOW_CONSUMER_POLICIES": "disconnect,drop_oldest"}) as gw:
        async with Client.connect(gw.ws_url + "/ws") as c:
            ack = await c.join("a", policy="drop_oldest")
            assert ack["policy"] == "drop_oldest"
            with pytest.raises(Exception) as info:
                await c.join("b", policy="drop_newest")
            assert getattr(info.value, "code", None) == "policy_not_allowed"


# A legal burst to members that read as fast as they can: nobody is a slow
# consumer. One event-loop iteration's fan-out used to exceed the whole outbox
# (1 MiB) of a member that was reading at full speed, which closed it 4008.

BURST_MEMBERS = 10


async def read_messages(client: RawConnection, count: int) -> tuple[list[int], int | None]:
    """The seqs of the next ``count`` publications, and the close code if one came first."""
    seqs: list[int] = []
    while len(seqs) < count:
        frame = await client.recv_frame(timeout=60)
        if frame is None:
            return seqs, None
        if frame.opcode == OP_CLOSE:
            return seqs, int.from_bytes(frame.payload[:2], "big")
        if frame.opcode == OP_TEXT and frame.payload.startswith(b'{"op":"message"'):
            match = SEQ_RE.search(frame.payload)
            assert match is not None
            seqs.append(int(match.group(1)))
    return seqs, None


def api_port(gw: GatewayProcess) -> int:
    listening = next(e for e in gw.events if e.get("event") == "gateway_listening")
    return int(listening["api_addresses"][0].rsplit(":", 1)[1])


async def post(port: int, path: str, body: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n" % (path.encode(), len(body)) + body
    )
    response = await asyncio.wait_for(reader.read(), 60)
    writer.close()
    head, _, payload = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), payload


async def test_api_batch_of_100_x_10k_reaches_every_member_that_reads() -> None:
    """One API batch of 100 x 10.4 KB reaches every member that reads; none is closed 4008."""
    with GatewayProcess({"RTG_API_ADDR": "127.0.0.1:0", "RTG_STATS_INTERVAL_S": "0"}) as gw:
        assert gw.port is not None
        members = [await joined_raw(gw.port, "burst") for _ in range(BURST_MEMBERS)]
        readers = [asyncio.create_task(read_messages(m, 100)) for m in members]
        # 100 publications of 10.4 KB: 1,046,801 bytes, under the 1 MiB body limit.
        item = b'{"room":"burst","data":"%s"}' % (b"x" * 10_441)
        body = b"[" + b",".join([item] * 100) + b"]"
        assert len(body) == 1_046_801 < 1 << 20
        status, payload = await post(api_port(gw), "/api/publish/batch", body)
        assert status == 200, payload[:200]
        assert [r["seq"] for r in json.loads(payload)] == list(range(1, 101))
        for seqs, close_code in await asyncio.gather(*readers):
            assert close_code is None, f"closed {close_code} after {len(seqs)} messages"
            assert seqs == list(range(1, 101))
        assert metric(gw, "rtgateway_disconnects_total", '{reason="slow_consumer"}') == 0
        for m in members:
            await m.close()


async def test_two_clients_bursting_65k_messages_reach_every_member_that_reads() -> None:
    """Two clients pipelining 16 x 65 KB each: every reading member gets all 32 in order."""
    # In-process: the members read on the gateway's own event loop, so they
    # read exactly when the gateway lets them, as fast as it lets them.
    async with running_gateway(TEST_CONFIG) as gw:
        members = [await joined_raw(gw.port, "burst") for _ in range(BURST_MEMBERS)]
        publishers = [await joined_raw(gw.port, "burst") for _ in range(2)]
        # Everyone reads, the publishers too (they are members).
        readers = [asyncio.create_task(read_messages(m, 32)) for m in [*members, *publishers]]
        data = "y" * 65_000  # with its envelope, just under RTG_MAX_MESSAGE_BYTES
        frame = encode_frame(
            OP_TEXT, json.dumps({"op": "publish", "room": "burst", "data": data}).encode()
        )
        # 16 x 65 KB = 1,040,000 bytes each, sent at once: inside the 1 MiB/s
        # byte limit's burst, and within websockets' 16-message read queue.
        for publisher in publishers:
            await publisher.send(frame * 16)
        for seqs, close_code in await asyncio.gather(*readers):
            assert close_code is None, f"closed {close_code} after {len(seqs)} messages"
            assert seqs == list(range(1, 33))
        assert gw.metrics.disconnects["slow_consumer"] == 0
        assert gw.metrics.rate_limited == 0
        for m in [*members, *publishers]:
            await m.close()


async def test_a_member_that_stopped_reading_does_not_cost_its_room_the_coalescing() -> None:
    """A stuck member does not turn its room's bursts into one write per publication."""
    # A publisher yields to the loop after a publication that filled an
    # outbox past the write-through threshold; a stuck member's outbox stays
    # there, and must not make every publication yield (one write per member
    # per publication instead of one per burst).
    config = TEST_CONFIG.replace(
        publish_requires_join=False,
        socket_sndbuf_bytes=4096,
        rate_limit_msgs_per_s=1e6,
        rate_limit_burst=10**6,
        rate_limit_bytes_per_s=0,
    )
    async with running_gateway(config) as gw:
        healthy = [await joined_raw(gw.port, "room") for _ in range(20)]
        stuck = await joined_raw(gw.port, "room", policy="drop_oldest", rcvbuf=4096)
        publisher = await RawConnection.open(gw.port)

        async def burst(count: int, size: int) -> None:
            frames = b"".join(
                encode_frame(
                    OP_TEXT,
                    json.dumps({"op": "publish", "room": "room", "data": "z" * size}).encode(),
                )
                for _ in range(count)
            )
            readers = [asyncio.create_task(read_messages(m, count)) for m in healthy]
            await publisher.send(frames)
            for seqs, close_code in await asyncio.gather(*readers):
                assert close_code is None and len(seqs) == count

        # Fill the stuck member: its kernel buffers, its transport, then its outbox.
        await burst(200, 1000)
        assert gw.gateway.state.queued_bytes > 64 * 1024
        writes_before = gw.metrics.flush_frames.count
        await burst(10, 10)
        writes = gw.metrics.flush_frames.count - writes_before
        # One write per healthy member for the whole burst (a few more if the
        # burst arrived in pieces); one per publication would be 200.
        assert writes < 3 * len(healthy), writes
        assert gw.metrics.disconnects["slow_consumer"] == 0
        stuck.abort()
        publisher.abort()
        for m in healthy:
            await m.close()
