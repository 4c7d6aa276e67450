"""Requests between processes (rtgateway/control.py): the envelope, the waiting, the counts.

Two :class:`Requests` on one event loop joined by an in-memory bus that
behaves as Redis' ``PUBLISH`` does (it returns how many subscribers got the
message, and delivers later, on another path): what travels, and when an
asker stops waiting. The same code over a real Redis, between workers and
between hosts, is tested in test_moderation.py.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from structlog.testing import capture_logs

from rtgateway import log as rtglog
from rtgateway.control import REQUEST_MARK, Requests
from rtgateway.metrics import Metrics

CONTROL = "rtg:ctl:"


class Bus:
    """Channels to subscribers; a send answers its receivers' count and delivers on a later turn."""

    def __init__(self) -> None:
        self.channels: dict[str, list[Requests]] = {}
        self.sent: list[tuple[str, bytes]] = []
        self.deaf: set[str] = set()  # nodes that receive but never answer

    def subscribe(self, channel: str, requests: Requests) -> None:
        self.channels.setdefault(channel, []).append(requests)

    def send_of(self, node: str) -> Any:
        def send(channel: str, payload: bytes, internal: bool) -> asyncio.Future[Any]:
            self.sent.append((channel, payload))
            receivers = self.channels.get(channel, [])
            loop = asyncio.get_running_loop()
            for requests in receivers:
                if requests.node in self.deaf:
                    continue
                if channel == CONTROL + requests.node:
                    loop.call_soon(requests.received, payload)
                else:  # a room's channel: a request is marked
                    assert payload[:1] == REQUEST_MARK
                    loop.call_soon(requests.request, payload[1:])
            future = loop.create_future()
            future.set_result(len(receivers))
            return future

        return send


def process(bus: Bus, node: str, answer: Any = None, timeout_s: float = 5.0) -> Requests:
    metrics = Metrics(version="test", websockets_version="test")
    requests = Requests(
        node,
        lambda node: CONTROL + node,
        bus.send_of(node),
        timeout_s,
        metrics=metrics,
        log=rtglog.get_logger(),
    )
    requests.answer = answer
    bus.subscribe(CONTROL + node, requests)
    return requests


async def test_a_request_reaches_its_node_and_the_answer_comes_back() -> None:
    """ask() sends to one node's channel, which answers on the asker's; complete once it did."""
    bus = Bus()
    asker = process(bus, "a")
    process(bus, "b", lambda request: {"result": "done", "echo": request["op"]})
    answers = await asker.ask(CONTROL + "b", b"", {"op": "disconnect", "conn_id": "b.1"})
    assert answers.complete and answers.replies == [{"result": "done", "echo": "disconnect"}]
    request = json.loads(bus.sent[0][1])
    assert request["reply_to"] == "a" and request["id"] == "1"
    assert bus.sent[1][0] == CONTROL + "a"  # the answer, on the asker's channel
    assert asker.asking == {}  # nothing left waiting


async def test_nobody_listening_is_an_empty_complete_answer_at_once() -> None:
    """A node with no subscriber: PUBLISH counts 0, so there is nothing to wait for."""
    bus = Bus()
    asker = process(bus, "a", timeout_s=60)
    answers = await asyncio.wait_for(asker.ask(CONTROL + "gone", b"", {"op": "x"}), 5)
    assert answers.complete and answers.replies == []


async def test_a_room_request_waits_for_every_process_with_members() -> None:
    """On a room's channel, as many answers as subscribers are awaited and kept."""
    bus = Bus()
    asker = process(bus, "a", lambda r: {"connections": [["a.1", 1]]})
    other = process(bus, "b", lambda r: {"connections": [["b.1", 2]]})
    for requests in (asker, other):
        bus.subscribe("rtg:room:lobby", requests)
    answers = await asker.ask("rtg:room:lobby", REQUEST_MARK, {"op": "connections"})
    assert answers.complete
    assert sorted(r["connections"][0][0] for r in answers.replies) == ["a.1", "b.1"]


async def test_a_silent_receiver_makes_the_answers_incomplete_after_the_timeout() -> None:
    """A process that received the request and never answers: incomplete, never a hang."""
    bus = Bus()
    asker = process(bus, "a", timeout_s=0.05)
    process(bus, "b", lambda r: {"result": "done"})
    bus.deaf.add("b")
    answers = await asker.ask(CONTROL + "b", b"", {"op": "disconnect"})
    assert not answers.complete and answers.replies == []
    assert asker.asking == {}


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"\xff\xfe",
        b'{"op":"disconnect"}',  # no id, no reply_to
        b'{"id":1,"reply_to":"a"}',  # id not a string
        b'{"id":"1","reply_to":["a"]}',
        b"[" * 100_000,
        b'{"op":"answer"',  # an answer, cut short
        b'{"op":"answer","id":"1"}',
        b'{"op":"answer","id":[],"body":{}}',
    ],
)
async def test_a_malformed_message_is_counted_and_logged_by_size_only(payload: bytes) -> None:
    """Garbage on a control channel: a broker error counted, one warning with its size, no raise."""
    bus = Bus()
    requests = process(bus, "a", lambda r: {"result": "done"})
    with capture_logs() as logs:
        requests.received(payload)
    assert requests.metrics.broker_errors == 1
    assert [e["log_level"] for e in logs] == ["warning"]
    assert logs[0]["size"] == len(payload) and "payload" not in logs[0]
    assert bus.sent == []  # nothing answered


async def test_a_failing_answer_still_answers_and_the_subscription_goes_on() -> None:
    """An exception in the moderator costs that request an empty body, not the reader."""
    bus = Bus()

    def broken(request: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("a bug")

    asker = process(bus, "a")
    process(bus, "b", broken)
    with capture_logs() as logs:
        answers = await asker.ask(CONTROL + "b", b"", {"op": "disconnect"})
    assert answers.complete and answers.replies == [{}]
    assert [e["event"] for e in logs] == ["broker_request_failed"]


async def test_a_late_or_foreign_answer_is_ignored() -> None:
    """An answer to a request nobody awaits (timed out, or a predecessor's) changes nothing."""
    bus = Bus()
    asker = process(bus, "a")
    with capture_logs() as logs:
        asker.received(b'{"op":"answer","id":"999","body":{"result":"done"}}')
    assert logs == [] and asker.metrics.broker_errors == 0 and asker.asking == {}
