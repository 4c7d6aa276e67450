"""client.py: the asyncio client of the room protocol, against the real gateway in-process."""

from __future__ import annotations

import asyncio

import pytest
from conftest import RunningGateway, running_gateway

from rtgateway.client import Client, ServerError


async def test_connect_reads_the_hello_and_names_the_connection(gateway: RunningGateway) -> None:
    """The hello is read before the client is handed over; conn_id comes from it."""
    async with Client.connect(gateway.ws_url) as client:
        assert client.hello["op"] == "hello"
        assert client.conn_id == client.hello["conn_id"] != ""


async def test_connect_can_be_awaited_as_well_as_entered(gateway: RunningGateway) -> None:
    """``await Client.connect(url)`` gives an open client the caller closes."""
    client = await Client.connect(gateway.ws_url)
    try:
        assert (await client.ping())["op"] == "pong"
    finally:
        await client.close()


async def test_requests_get_their_own_replies_whatever_the_order(
    gateway: RunningGateway,
) -> None:
    """Concurrent requests are matched to their acks by id."""
    async with Client.connect(gateway.ws_url) as client:
        acks = await asyncio.gather(*(client.join(f"room-{n}") for n in range(20)))
        assert [ack["room"] for ack in acks] == [f"room-{n}" for n in range(20)]
        assert len({ack["id"] for ack in acks}) == 20


async def test_an_error_reply_raises_server_error_with_its_code(gateway: RunningGateway) -> None:
    """The gateway's error becomes an exception carrying the whole reply."""
    async with Client.connect(gateway.ws_url) as client:
        with pytest.raises(ServerError) as refused:
            await client.leave("nowhere")
        assert refused.value.code == "not_joined"
        assert refused.value.reply["op"] == "error"
        assert str(refused.value).startswith("not_joined: ")


async def test_publish_returns_the_seq_and_members_receive_the_message(
    gateway: RunningGateway,
) -> None:
    """publish() waits for the ack; next_message() and messages() yield what members get."""
    async with (
        Client.connect(gateway.ws_url) as publisher,
        Client.connect(gateway.ws_url) as member,
    ):
        await member.join("r")
        await publisher.join("r")
        assert await publisher.publish("r", {"n": 1}) == 1
        assert (await member.next_message(5))["data"] == {"n": 1}
        await publisher.publish("r", {"n": 2})
        async for message in member.messages():
            assert (message["seq"], message["data"]) == (2, {"n": 2})
            break


async def test_an_error_that_answers_no_request_is_kept_in_errors(
    gateway: RunningGateway,
) -> None:
    """publish_nowait carries no id: its refusal lands in ``errors``."""
    async with Client.connect(gateway.ws_url) as client:
        await client.publish_nowait("not-joined", 1)
        await client.ping()  # replies come in order: the error came before the pong
        assert [e["code"] for e in client.errors] == ["not_joined"]


async def test_messages_end_when_the_connection_closes() -> None:
    """The iterator yields what was received, then stops once the gateway closed."""
    async with running_gateway() as gw:
        client = await Client.open(gw.ws_url)
        await client.join("r")
        await client.publish("r", "last")
        stop = asyncio.ensure_future(gw.gateway.stop())
        got = [message["data"] async for message in client.messages()]
        await stop
        assert got == ["last"]
        await client.close()


async def test_a_request_waiting_when_the_connection_closes_fails_with_connection_error() -> None:
    """A waiter is never left hanging: the gateway closes without answering, it gets an error."""
    # Past the rate limit the gateway closes 1008 and answers nothing more.
    async with running_gateway(rate_limit_burst=1, rate_limit_max_rejected=0) as gw:
        client = await Client.open(gw.ws_url)
        assert (await client.ping())["op"] == "pong"
        with pytest.raises(ConnectionError):
            await client.ping()
        assert client.ws.close_code == 1008
        await client.close()
