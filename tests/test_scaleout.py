"""Past one process: workers sharing a port, and gateways sharing rooms through Redis.

Real processes and a real ``redis-server`` on a free port: the supervisor
(``RTG_WORKERS=2``) runs as a subprocess; clients open connections until they
have one on each worker (the merged ``/metrics`` says which worker took a
connection), then share a room, lose a worker, lose Redis, and drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import pytest
from conftest import running_gateway
from redisserver import RedisServer
from support import ROOT, SupervisorProcess, free_port, supervisor, wait_until
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

pytestmark = [pytest.mark.system, pytest.mark.timeout(120)]

ROOM = "scale"


# Clients.


@pytest.fixture(autouse=True)
async def drop_clients() -> AsyncIterator[None]:
    """Clients still open at the end of a test are aborted, on its own loop, before it closes."""
    yield
    while Client.opened:
        Client.opened.pop().ws.transport.abort()


class Client:
    """A room-protocol client that keeps the messages it reads while awaiting replies.

    Every one made is kept in :attr:`opened`; the clients a test leaves open
    are dropped at its end (:func:`drop_clients`).
    """

    ids = itertools.count(1)
    opened: ClassVar[list[Client]] = []

    def __init__(self, ws: ClientConnection, hello: dict[str, Any]) -> None:
        self.ws = ws
        self.hello = hello
        self.messages: list[dict[str, Any]] = []
        self.worker = -1
        Client.opened.append(self)

    @classmethod
    async def connect(cls, url: str) -> Client:
        ws = await connect(url + "/ws", open_timeout=10)
        hello = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert hello["op"] == "hello"
        return cls(ws, hello)

    async def request(self, msg: dict[str, Any], timeout: float = 10) -> dict[str, Any]:
        msg = {**msg, "id": next(self.ids)}
        await self.ws.send(json.dumps(msg))
        async with asyncio.timeout(timeout):
            while True:
                reply = json.loads(await self.ws.recv())
                if reply.get("op") == "message":
                    self.messages.append(reply)
                elif reply.get("id") == msg["id"]:
                    return reply

    async def join(self, room: str = ROOM) -> None:
        reply = await self.request({"op": "join", "room": room})
        assert reply["op"] == "ack", reply

    async def publish(self, data: Any, room: str = ROOM, timeout: float = 10) -> dict[str, Any]:
        return await self.request({"op": "publish", "room": room, "data": data}, timeout)

    async def message(self, timeout: float = 10) -> dict[str, Any]:
        if self.messages:
            return self.messages.pop(0)
        async with asyncio.timeout(timeout):
            while True:
                reply = json.loads(await self.ws.recv())
                if reply.get("op") == "message":
                    return reply

    async def until(self, data: Any, timeout: float = 10) -> list[dict[str, Any]]:
        """Messages up to and including the one carrying ``data``."""
        seen = []
        async with asyncio.timeout(timeout):
            while True:
                message = await self.message()
                seen.append(message)
                if message["data"] == data:
                    return seen


async def clients_on_each_worker(gw: SupervisorProcess, workers: int = 2) -> list[Client]:
    """Open connections until one is on each worker; close the spares."""
    found: dict[int, Client] = {}
    spare: list[Client] = []
    for _ in range(40):
        client = await Client.connect(gw.ws_url)
        worker = int(client.hello["worker"])  # the hello names its worker
        client.worker = worker
        if worker in found:
            spare.append(client)
        else:
            found[worker] = client
        if len(found) == workers:
            break
    for client in spare:
        await client.ws.close()
    assert sorted(found) == list(range(workers)), "the kernel never picked some worker"
    return [found[w] for w in range(workers)]


async def in_step(clients: list[Client], room: str = ROOM) -> None:
    """Join ``room`` everywhere, and start everyone at the same point of the stream.

    A join is acknowledged once its worker's Redis subscription is confirmed,
    so the first probe reaches everyone; a marker then ends the warm-up at
    the same point of the stream for everyone.
    """
    for client in clients:
        await client.join(room)
    publisher = clients[0]
    async with asyncio.timeout(15):
        while True:
            await publisher.publish("probe", room)
            # Each client not served yet waits a moment for the probe (_has_message).
            ready = [bool(c.messages) or await _has_message(c) for c in clients]
            if all(ready):
                break
    await publisher.publish("in-step", room)
    for client in clients:
        await client.until("in-step")
        client.messages.clear()


async def _has_message(client: Client) -> bool:
    try:
        reply = json.loads(await asyncio.wait_for(client.ws.recv(), 0.05))
    except TimeoutError:
        return False
    if reply.get("op") == "message":
        client.messages.append(reply)
    return bool(client.messages)


def assert_one_order(streams: list[list[dict[str, Any]]]) -> None:
    first = streams[0]
    seqs = [m["seq"] for m in first]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
    for other in streams[1:]:
        assert [(m["seq"], m["data"]) for m in other] == [(m["seq"], m["data"]) for m in first]


async def interleaved_publishes(
    clients: list[Client], count: int, room: str = ROOM
) -> list[list[dict[str, Any]]]:
    """Every client publishes ``count`` messages at once; every client's stream of them."""

    async def publish_all(client: Client) -> None:
        for n in range(count):
            reply = await client.publish({"from": client.worker, "n": n}, room)
            assert reply["op"] == "ack", reply

    await asyncio.gather(*(publish_all(c) for c in clients))
    total = count * len(clients)
    streams = []
    for client in clients:
        streams.append([await client.message() for _ in range(total)])
    return streams


# Tests.


def test_workers_without_a_broker_refuse_to_start() -> None:
    """RTG_WORKERS=2 without RTG_BROKER_URL exits 2 with one line naming it."""
    proc = subprocess.run(
        [sys.executable, "-m", "rtgateway"],
        env={**os.environ, "RTG_WORKERS": "2", "RTG_BROKER_URL": "", "RTG_ADDR": "127.0.0.1:0"},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "RTG_BROKER_URL" in lines[0], proc.stderr


async def test_workers_share_a_room_in_one_order(redis_server: RedisServer) -> None:
    """Two workers share a room: both publish and both see one order; one scrape covers both."""
    with supervisor(redis_server.url) as gw:
        a, b = await clients_on_each_worker(gw)
        await in_step([a, b])
        streams = await interleaved_publishes([a, b], 25)
        assert_one_order(streams)
        assert {m["data"]["from"] for m in streams[0]} == {0, 1}
        # One scrape covers both workers.
        # (the spare connections' closes may still be under way)
        await asyncio.to_thread(
            wait_until,
            lambda: gw.worker_metric("rtgateway_connections_current") == {0: 1.0, 1: 1.0},
            10,
            what="one connection on each worker in the merged /metrics",
        )
        up = await asyncio.to_thread(gw.worker_metric, "rtgateway_worker_scrape_up")
        assert up == {0: 1.0, 1: 1.0}


async def test_killed_worker_is_replaced_while_the_other_serves(
    redis_server: RedisServer,
) -> None:
    """A SIGKILLed worker is replaced while the other serves; the replacement shares rooms again."""
    with supervisor(redis_server.url) as gw:
        a, b = await clients_on_each_worker(gw)
        await in_step([a, b])
        old_pid = gw.worker_pid(a.worker)
        os.kill(old_pid, signal.SIGKILL)
        with pytest.raises(ConnectionClosed):
            await a.ws.recv()
        # The survivor keeps serving its members meanwhile.
        for n in range(5):
            assert (await b.publish(n))["op"] == "ack"
        assert [m["data"] for m in [await b.message() for _ in range(5)]] == list(range(5))
        # A new worker takes the dead one's place, and shares the room again.
        await asyncio.to_thread(
            wait_until,
            lambda: (
                gw.worker_pid(a.worker) != old_pid
                and any(
                    e.get("event") == "worker_ready" and e.get("pid") == gw.worker_pid(a.worker)
                    for e in gw.events
                )
            ),
            30,
            what="the replacement worker",
        )
        assert any(e.get("event") == "worker_died" for e in gw.events)
        c, d = await clients_on_each_worker(gw)
        await in_step([c, d, b], room="after")
        assert_one_order(await interleaved_publishes([c, d, b], 5, room="after"))
        assert gw.proc is not None and gw.proc.poll() is None


async def test_redis_restart_gives_unavailable_then_recovers(redis_server: RedisServer) -> None:
    """Redis stopped: unavailable, pings answered; back: workers reconnect, share rooms."""
    with supervisor(redis_server.url) as gw:
        a, b = await clients_on_each_worker(gw)
        await in_step([a, b])
        redis_server.stop()
        # The first publishes may beat the workers to noticing that Redis went.
        for _ in range(100):
            reply = await a.publish("lost")
            if reply["op"] != "ack":
                break
        assert reply["op"] == "error" and reply["code"] == "unavailable", reply
        assert (await b.publish("lost"))["code"] == "unavailable"
        # Connections are still served meanwhile.
        assert (await a.request({"op": "ping"}))["op"] == "pong"
        connected = await asyncio.to_thread(gw.worker_metric, "rtgateway_broker_connected")
        assert connected == {0: 0.0, 1: 0.0}

        redis_server.start()
        await asyncio.to_thread(
            wait_until,
            lambda: gw.worker_metric("rtgateway_broker_connected") == {0: 1.0, 1: 1.0},
            30,
            what="both workers reconnected to redis",
        )
        # Every worker subscribed to its rooms again: the room works across workers.
        a.messages.clear()
        b.messages.clear()
        await in_step([a, b])
        assert_one_order(await interleaved_publishes([a, b], 10))
        reconnects = await asyncio.to_thread(gw.worker_metric, "rtgateway_broker_reconnects_total")
        assert all(v >= 1 for v in reconnects.values()) and len(reconnects) == 2
        errors = await asyncio.to_thread(gw.worker_metric, "rtgateway_broker_errors_total")
        assert all(v >= 1 for v in errors.values())
        assert gw.proc is not None and gw.proc.poll() is None
        assert not any(e.get("event") == "worker_died" for e in gw.events)


async def test_sigterm_drains_every_worker(redis_server: RedisServer) -> None:
    """SIGTERM to the supervisor: every worker's clients get 1012 and it exits 0."""
    with supervisor(redis_server.url) as gw:
        clients = await clients_on_each_worker(gw)
        gw.signal(signal.SIGTERM)
        for client in clients:
            async with asyncio.timeout(15):
                with contextlib.suppress(ConnectionClosed):
                    while True:
                        await client.ws.recv()
            assert client.ws.close_code == 1012
        assert await asyncio.to_thread(gw.wait, 20) == 0
        exited = {e["worker"] for e in gw.events if e.get("event") == "worker_exited"}
        assert exited == {0, 1}
        assert not any(e.get("event") == "worker_died" for e in gw.events)


@contextlib.asynccontextmanager
async def two_hosts(redis: RedisServer) -> AsyncIterator[tuple[str, str]]:
    async with running_gateway(broker_url=redis.url) as one:
        async with running_gateway(broker_url=redis.url) as two:
            assert one.metrics.broker_connected and two.metrics.broker_connected
            yield f"http://127.0.0.1:{one.port}", f"http://127.0.0.1:{two.port}"


async def test_single_gateways_on_one_redis_share_rooms(redis_server: RedisServer) -> None:
    """Two single gateways on one Redis share a room in one order."""
    async with two_hosts(redis_server) as (one, two):
        a = await Client.connect(one.replace("http", "ws"))
        b = await Client.connect(two.replace("http", "ws"))
        a.worker, b.worker = 0, 1
        assert "worker" not in a.hello  # a single-process gateway has no workers
        await in_step([a, b])
        assert_one_order(await interleaved_publishes([a, b], 20))
        await a.ws.close()
        await b.ws.close()


async def test_single_gateway_with_redis_numbers_from_redis(redis_server: RedisServer) -> None:
    """A member that joins and publishes at once sees its own publication."""
    async with two_hosts(redis_server) as (one, _):
        a = await Client.connect(one.replace("http", "ws"))
        await a.join("fresh")
        reply = await a.publish("first", room="fresh")
        assert reply == {"op": "ack", "id": reply["id"], "room": "fresh", "seq": 1}
        message = await a.message()
        assert (message["seq"], message["data"]) == (1, "first")
        assert time.time() * 1000 - message["ts"] < 60_000
        await a.ws.close()


async def test_hung_redis_gives_an_answer_not_a_hang(redis_server: RedisServer) -> None:
    """Redis alive but not answering (SIGSTOP): a publish in flight is ``outcome_unknown``."""
    async with running_gateway(broker_url=redis_server.url) as gw:
        a = await Client.connect(gw.ws_url.removesuffix("/ws"))
        await a.join()
        assert (await a.publish("before"))["op"] == "ack"
        assert redis_server.proc is not None
        redis_server.proc.send_signal(signal.SIGSTOP)
        try:
            reply = await a.publish("during", timeout=30)
            assert reply["op"] == "error" and reply["code"] == "outcome_unknown", reply
            assert (await a.request({"op": "ping"}))["op"] == "pong"
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)
        for _ in range(150):  # until Redis has caught up: at most ~30 s
            if (await a.publish("after"))["op"] == "ack":
                break
            await asyncio.sleep(0.2)
        # Delivered too: the subscription survived or was made again.
        assert (await a.until("after"))[-1]["data"] == "after"
        assert gw.metrics.broker_connected
        assert gw.metrics.broker_errors >= 1
        await a.ws.close()


def _post_json(url: str, body: Any) -> tuple[int, Any]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        return resp.status, json.loads(resp.read())


async def test_publish_api_on_worker_zero_reaches_every_worker(
    redis_server: RedisServer,
) -> None:
    """The publish API, served by worker 0, reaches members on every worker with one seq."""
    api_port = free_port()
    with supervisor(redis_server.url, RTG_API_ADDR=f"127.0.0.1:{api_port}") as gw:
        a, b = await clients_on_each_worker(gw)
        await in_step([a, b])
        url = f"http://127.0.0.1:{api_port}/api/publish"
        status, body = await asyncio.to_thread(_post_json, url, {"room": ROOM, "data": "api"})
        assert status == 200 and body["seq"] > 0
        for client in (a, b):
            message = await client.message()
            assert (message["seq"], message["data"]) == (body["seq"], "api")


async def test_sigterm_to_every_process_at_once_still_drains(redis_server: RedisServer) -> None:
    """systemd's default KillMode=control-group signals the workers too, not only the main PID."""
    with supervisor(redis_server.url, RTG_DRAIN_WINDOW_S="2") as gw:
        assert gw.proc is not None
        clients = await clients_on_each_worker(gw)
        for index in (0, 1):
            os.kill(gw.worker_pid(index), signal.SIGTERM)
        # The workers' signal first, so that the supervisor's is a second one
        # (two signals sent at once may merge into one).
        await asyncio.to_thread(
            wait_until,
            lambda: (
                {e.get("worker") for e in gw.events if e.get("event") == "drain_started"} == {0, 1}
            ),
            10,
            what="both workers draining",
        )
        gw.signal(signal.SIGTERM)
        for client in clients:
            async with asyncio.timeout(15):
                with contextlib.suppress(ConnectionClosed):
                    while True:
                        await client.ws.recv()
            assert client.ws.close_code == 1012
        assert await asyncio.to_thread(gw.wait, 20) == 0
        exits = [e for e in gw.events if e.get("event") == "worker_exited"]
        assert sorted(e["worker"] for e in exits) == [0, 1]
        assert all(e["returncode"] == 0 for e in exits), exits
