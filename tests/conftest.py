"""Fixtures: the real gateway in-process on 127.0.0.1 port 0, on uvloop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvloop
from wire import RawConnection

from rtgateway.app import Gateway
from rtgateway.config import Config

# Fixtures that live in their own modules.
pytest_plugins = ("redisserver",)

# Defaults for in-process gateways: an ephemeral port, no stats line, a short
# drain so that fixtures stop quickly.
TEST_CONFIG = Config(
    addr="127.0.0.1:0",
    api_addr="127.0.0.1:0",
    stats_interval_s=0,
    drain_window_s=0.2,
    drain_timeout_s=5,
)


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    # Tests run on the loop production runs on.
    return {"uvloop": uvloop.new_event_loop}


class RunningGateway:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.port = int(gateway.addresses[0].rsplit(":", 1)[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/ws"
        self.echo_url = f"ws://127.0.0.1:{self.port}/ws/echo"

    @property
    def metrics(self) -> Any:
        return self.gateway.metrics


@contextlib.asynccontextmanager
async def running_gateway(
    config: Config | None = None, **changes: Any
) -> AsyncIterator[RunningGateway]:
    """Start the real gateway in this event loop; drain and stop it on exit."""
    config = (config or TEST_CONFIG).replace(**changes)
    gateway = Gateway(config)
    stop = asyncio.Event()
    task = asyncio.create_task(gateway.serve(stop.wait))
    ready = asyncio.create_task(gateway.ready.wait())
    await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        ready.cancel()
        task.result()  # raises the start-up error
    try:
        yield RunningGateway(gateway)
    finally:
        stop.set()
        await task


@contextlib.asynccontextmanager
async def raw_gateway(**changes: Any) -> AsyncIterator[RunningGateway]:
    """The in-process gateway for raw clients: those still open are reset before it stops."""
    async with running_gateway(**{"drain_timeout_s": 1.0, **changes}) as gw:
        try:
            yield gw
        finally:
            RawConnection.reset_all()


@pytest.fixture
async def gateway() -> AsyncIterator[RunningGateway]:
    async with running_gateway() as gw:
        yield gw


@pytest.fixture(autouse=True)
async def reset_raw_connections() -> AsyncIterator[None]:
    """Raw clients (wire.py) a test left open are reset at its end, before its loop closes.

    Warnings are errors in this suite: a transport still open when the loop
    closes is a ResourceWarning.
    """
    yield
    RawConnection.reset_all()
