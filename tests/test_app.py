"""app.py: the gateway's lifecycle, in-process on real sockets.

A start that fails half-way stops what had started; stop is idempotent; a
background loop that fails is logged and keeps running; the parts stop in
reverse order of their start, after the drain.
"""

from __future__ import annotations

import asyncio
import socket

import pytest
from conftest import TEST_CONFIG, running_gateway
from structlog.testing import capture_logs

from rtgateway.app import Gateway


def _port_of(gateway: Gateway) -> int:
    return int(gateway.addresses[0].rsplit(":", 1)[1])


def _refuses(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


async def test_a_start_that_fails_half_way_closes_the_websocket_listener() -> None:
    """The API's port is taken: serve raises, and the WebSocket port is not left open."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        api_port = taken.getsockname()[1]
        gateway = Gateway(TEST_CONFIG.replace(api_addr=f"127.0.0.1:{api_port}"))
        with pytest.raises(OSError):
            await gateway.serve(asyncio.Event().wait)
        assert gateway.addresses, "the WebSocket listener had started"
        assert _refuses(_port_of(gateway))
        assert not gateway.ready.is_set()


async def test_stop_twice_drains_once() -> None:
    """A second stop waits for the first instead of stopping the parts again."""
    gateway = Gateway(TEST_CONFIG)
    with capture_logs() as logs:
        await gateway.start()
        port = _port_of(gateway)
        await asyncio.gather(gateway.stop(), gateway.stop())
        await gateway.stop()
    assert [e["event"] for e in logs].count("drain_finished") == 1
    assert _refuses(port)


async def test_a_failing_background_tick_is_logged_and_the_loop_goes_on() -> None:
    """A bug in a periodic task costs one tick, not the task (the heartbeat must survive)."""
    async with running_gateway() as gw:
        gateway = gw.gateway
        ticks: list[float] = []
        done = asyncio.Event()

        def tick(late_s: float) -> None:
            ticks.append(late_s)
            if len(ticks) == 3:
                done.set()
            if len(ticks) < 3:
                raise RuntimeError("injected fault")

        with capture_logs() as logs:
            gateway._every("test", 0.01, tick)
            await asyncio.wait_for(done.wait(), 10)
        failures = [e for e in logs if e["event"] == "background_task_failed"]
        assert [e["task"] for e in failures] == ["test", "test"]
        assert all(late >= 0 for late in ticks)


async def test_stop_cancels_every_background_loop_and_closes_the_listener() -> None:
    """After the drain the loops are cancelled (and counted) and nothing listens."""
    gateway = Gateway(TEST_CONFIG.replace(stats_interval_s=60))
    await gateway.start()
    port = _port_of(gateway)
    loops = set(gateway.tasks)
    assert len(loops) >= 3  # loop lag, status, stats
    with capture_logs() as logs:
        await gateway.stop()
    assert all(task.done() for task in loops)
    finished = [e for e in logs if e["event"] == "drain_finished"]
    assert finished[0]["background_tasks_cancelled"] == len(loops)
    assert _refuses(port)
