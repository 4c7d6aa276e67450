"""session.py: the room protocol and the echo, against a real Hub and Outbox, without sockets.

Each client is a :class:`~rtgateway.session.Session` (or
:class:`~rtgateway.session.Echo`) on a real :class:`~rtgateway.outbox.Outbox`
whose connection is a :class:`~recording.RecordingConnection`; the flusher
runs on a :class:`~recording.ManualLoop`, so a test reads exactly what one
loop iteration wrote. Rate limits read a :class:`~recording.FakeClock`. A
broker between processes is a recording one that the test drives: rooms
become live, and publications are confirmed, when the test says. The same
protocol over real sockets is ``test_rooms.py``'s.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import structlog
from recording import FakeClock, ManualLoop, RecordingConnection
from structlog.testing import capture_logs

from rtgateway import namespaces
from rtgateway.admission import Admission
from rtgateway.config import Config
from rtgateway.errors import BrokerOutcomeUnknown, BrokerUnavailable
from rtgateway.metrics import Metrics
from rtgateway.outbox import Flusher, Outbox
from rtgateway.rooms import Hub
from rtgateway.session import Echo, Session
from rtgateway.state import Context, Limits, ServerState


class RecordingBroker:
    """A broker between processes that the test drives; it records what it is asked."""

    def __init__(self) -> None:
        self.hub: Any = None
        self.available = True
        self.refuse = False  # submit raises BrokerUnavailable, as with Redis known down
        self.opened: list[str] = []
        self.closed: list[str] = []
        self.submitted: list[tuple[str, bytes, asyncio.Future[int]]] = []

    def attach(self, events: Any) -> None:
        self.hub = events

    def submit(self, room: str, floor: int, ts_ms: int, data: bytes, started: float) -> Any:
        if self.refuse:
            raise BrokerUnavailable("redis is not connected")
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.submitted.append((room, data, future))
        return future

    def room_opened(self, room: str) -> bool:
        self.opened.append(room)
        return False  # live once the test says so (hub.room_live)

    def room_closed(self, room: str) -> None:
        self.closed.append(room)


# What an ack says of a room's rules without RTG_ROOMS_FILE: the settings' defaults.
RULES = {
    "rules": {
        "namespace": "default",
        "publish": "members",
        "join": True,
        "default_policy": "disconnect",
        "policies": ["disconnect", "drop_oldest", "drop_newest"],
        "max_members": None,
        "publish_rate_per_s": None,
    }
}


class Server:
    """The context and state every session of one test shares."""

    def __init__(self, broker: RecordingBroker | None = None, **changes: Any) -> None:
        self.config = Config().replace(**changes)
        self.metrics = Metrics(version="test", websockets_version="test")
        # The rules the gateway builds from the settings when there is no RTG_ROOMS_FILE.
        self.hub = Hub(
            self.metrics,
            broker,
            join_timeout_s=self.config.broker_timeout_s,
            namespaces=namespaces.from_config(self.config),
        )
        self.loop = ManualLoop()
        self.clock = FakeClock()
        self.ctx = Context(
            config=self.config,
            metrics=self.metrics,
            hub=self.hub,
            flusher=Flusher(self.loop),  # type: ignore[arg-type]
            log=structlog.get_logger("rtgateway"),
            clock=self.clock,
            server_name="rtgateway/test",
            hello_limits={"max_message_bytes": self.config.max_message_bytes},
            hello_extra={"worker": 3},
            static={},
        )
        self.state = ServerState(
            Limits(max_connections=100, max_sockets=200),
            Admission(max_pending=100, max_pending_per_address=0, max_connections_per_address=0),
        )
        self.count = 0

    def client(self, echo: bool = False) -> Client:
        self.count += 1
        return Client(self, f"conn-{self.count}", echo)


class Client:
    """One handler on its own outbox and recording connection; hello already read."""

    def __init__(self, server: Server, conn_id: str, echo: bool) -> None:
        self.server = server
        self.conn = RecordingConnection()
        config = server.config
        self.outbox = Outbox(
            self.conn,
            server.ctx.flusher,
            server.metrics,
            max_messages=config.outbox_max_messages,
            max_bytes=config.outbox_max_bytes,
        )
        self.handler: Session | Echo = (
            Echo(server.ctx, self.outbox)
            if echo
            else Session(server.ctx, server.state, self.outbox, conn_id)
        )
        self.handler.open()
        self.hello = self.replies()

    def send(self, message: str | bytes | dict[str, Any]) -> Any:
        """Hand one message to the handler, as the connection would; what it returned."""
        text = json.dumps(message) if isinstance(message, dict) else message
        return self.handler.received(text)

    def replies(self) -> list[Any]:
        """Run one loop iteration; the JSON messages it wrote to this client."""
        self.server.loop.run_ready()
        return self.conn.messages()

    def ask(self, message: str | bytes | dict[str, Any]) -> list[Any]:
        """:meth:`send`, then :meth:`replies` (the handler must answer at once)."""
        assert self.send(message) is None
        return self.replies()


def codes(replies: list[Any]) -> list[str]:
    return [r.get("code", r["op"]) for r in replies]


# The hello, joins and leaves.


async def test_open_sends_the_hello_with_the_conn_id_server_limits_and_extra_fields() -> None:
    """The first frame: who answered, under which limits (and which worker)."""
    server = Server()
    client = server.client()
    assert client.hello == [
        {
            "op": "hello",
            "conn_id": "conn-1",
            "server": "rtgateway/test",
            "worker": 3,
            "limits": {"max_message_bytes": 65536},
        }
    ]


async def test_a_join_is_acknowledged_with_the_member_count_and_the_policy() -> None:
    """Each joiner is told how many members the room has, itself included."""
    server = Server()
    a, b = server.client(), server.client()
    assert a.ask({"op": "join", "room": "lobby", "id": 1}) == [
        {"op": "ack", "id": 1, "room": "lobby", "members": 1, "policy": "disconnect", **RULES}
    ]
    [ack] = b.ask({"op": "join", "room": "lobby", "id": "b", "policy": "drop_oldest"})
    assert (ack["members"], ack["policy"]) == (2, "drop_oldest")
    assert server.hub.rooms["lobby"].members == {a.outbox: "disconnect", b.outbox: "drop_oldest"}
    assert (server.metrics.rooms_current, server.metrics.room_members_current) == (1, 2)


async def test_joining_twice_is_acknowledged_and_keeps_the_first_policy() -> None:
    """A second join of the same room changes nothing, and says so."""
    server = Server()
    client = server.client()
    client.ask({"op": "join", "room": "r", "policy": "drop_newest", "id": 1})
    [again] = client.ask({"op": "join", "room": "r", "policy": "drop_oldest", "id": 2})
    assert (again["members"], again["policy"]) == (1, "drop_newest")
    assert client.ask({"op": "join", "room": "r"}) == []  # no id: nothing to acknowledge
    assert server.metrics.room_members_current == 1


async def test_a_leave_is_acknowledged_with_the_members_left_and_stops_deliveries() -> None:
    """After its leave is acknowledged a client receives nothing more from the room."""
    server = Server()
    a, b = server.client(), server.client()
    a.ask({"op": "join", "room": "r", "id": 1})
    b.ask({"op": "join", "room": "r", "id": 1})
    assert a.ask({"op": "leave", "room": "r", "id": 2}) == [
        {"op": "ack", "id": 2, "room": "r", "members": 1}
    ]
    b.ask({"op": "publish", "room": "r", "data": "after", "id": 3})
    assert a.replies() == []
    assert server.metrics.room_members_current == 1


async def test_leaving_a_room_one_is_not_in_is_not_joined() -> None:
    """The error names the room; nothing changes."""
    server = Server()
    [error] = server.client().ask({"op": "leave", "room": "elsewhere", "id": 7})
    assert (error["code"], error["id"], error["message"]) == (
        "not_joined",
        7,
        "not a member of elsewhere",
    )
    assert server.metrics.protocol_errors["not_joined"] == 1


async def test_closed_leaves_every_room_and_the_empty_rooms_go() -> None:
    """A connection that ends holds no membership: rooms it was alone in are closed."""
    server = Server()
    a, b = server.client(), server.client()
    for room in ("one", "two"):
        a.ask({"op": "join", "room": room})
    b.ask({"op": "join", "room": "two"})
    a.handler.closed()
    assert sorted(server.hub.rooms) == ["two"]
    assert server.hub.members("two") == 1
    assert (server.metrics.rooms_current, server.metrics.room_members_current) == (1, 1)


@pytest.mark.parametrize(
    ("changes", "join", "code"),
    [
        (
            {"slow_consumer_policies": ("disconnect",)},
            {"room": "second", "policy": "drop_oldest"},
            "policy_not_allowed",
        ),
        ({"max_rooms_per_connection": 1}, {"room": "second"}, "too_many_rooms"),
        ({"max_rooms": 1}, {"room": "second"}, "room_limit"),
    ],
)
async def test_a_join_past_a_limit_is_refused_and_the_connection_stays(
    changes: dict[str, Any], join: dict[str, Any], code: str
) -> None:
    """Policies allowed, rooms per connection, rooms per process: an error, not a close."""
    server = Server(**changes)
    client = server.client()
    client.ask({"op": "join", "room": "first"})
    [error] = client.ask({"op": "join", "room": "first", "id": 9, **join})
    assert (error["op"], error["code"], error["id"]) == ("error", code, 9)
    assert server.hub.members("second") == 0
    assert client.ask({"op": "ping", "id": 10}) == [{"op": "pong", "id": 10}]


async def test_while_draining_joins_and_publishes_get_draining() -> None:
    """A gateway that is shutting down takes no new work from its clients."""
    server = Server()
    client = server.client()
    client.ask({"op": "join", "room": "r"})
    server.state.draining = True
    replies = client.ask({"op": "join", "room": "s", "id": 1})
    replies += client.ask({"op": "publish", "room": "r", "data": 1, "id": 2})
    assert codes(replies) == ["draining", "draining"]
    assert server.metrics.publishes == 0


# Publishing, alone (no broker): numbered and fanned out before the reply.


async def test_a_publish_reaches_every_member_once_and_is_acknowledged_with_its_seq() -> None:
    """Members get the same frame; the publisher, a member too, gets it and its ack."""
    server = Server()
    a, b = server.client(), server.client()
    a.ask({"op": "join", "room": "r"})
    b.ask({"op": "join", "room": "r"})
    replies = a.ask({"op": "publish", "room": "r", "data": {"k": [1, "é"]}, "id": "p"})
    [message] = [r for r in replies if r["op"] == "message"]
    assert [r for r in replies if r["op"] == "ack"] == [
        {"op": "ack", "id": "p", "room": "r", "seq": 1}
    ]
    assert (message["room"], message["seq"], message["data"]) == ("r", 1, {"k": [1, "é"]})
    assert b.replies() == [message]
    assert (server.metrics.publishes, server.metrics.deliveries) == (1, 2)


async def test_publishing_without_joining_is_refused_unless_allowed() -> None:
    """not_joined by default; with publish_requires_join off, an empty room numbers nothing."""
    server = Server()
    [error] = server.client().ask({"op": "publish", "room": "r", "data": 1, "id": 1})
    assert error["code"] == "not_joined"
    open_server = Server(publish_requires_join=False)
    assert open_server.client().ask({"op": "publish", "room": "r", "data": 1, "id": 1}) == [
        {"op": "ack", "id": 1, "room": "r", "seq": 0}
    ]


async def test_a_publication_members_could_not_take_is_refused_as_too_large() -> None:
    """Data that, with its envelope, would pass max_message_bytes is never sent on."""
    server = Server(max_message_bytes=1024, publish_requires_join=False)
    client = server.client()
    [error] = client.ask({"op": "publish", "room": "r", "data": "x" * 1000, "id": 1})
    assert error["code"] == "message_too_large"
    assert "1024 bytes" in error["message"]
    assert client.ask({"op": "publish", "room": "r", "data": "x" * 800, "id": 2})[0]["seq"] == 0


# What the client sends that is refused, and bugs.


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("{not json", "bad_json"),
        (b'{"op":"ping"}', "bad_message"),
        ('{"op":"dance","id":4}', "unknown_op"),
        ('{"op":"join","room":"a b"}', "invalid_room"),
    ],
)
async def test_a_refused_message_gets_its_error_code_and_is_counted(
    message: str | bytes, code: str
) -> None:
    """Each refusal answers that message only; the next one is served."""
    server = Server()
    client = server.client()
    assert codes(client.ask(message)) == [code]
    assert server.metrics.protocol_errors[code] == 1
    assert client.ask({"op": "ping", "id": 1}) == [{"op": "pong", "id": 1}]


async def test_a_bug_while_handling_a_message_costs_that_message_not_the_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An exception inside the hub answers ``internal``, is logged, and the session goes on."""
    server = Server()
    client = server.client()
    client.ask({"op": "join", "room": "r"})

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("injected fault")

    monkeypatch.setattr(server.hub, "submit", broken)
    with capture_logs() as logs:
        [error] = client.ask({"op": "publish", "room": "r", "data": 1, "id": 5})
    assert (error["code"], error["id"]) == ("internal", 5)
    assert "injected" not in error["message"]  # never exception text to a client
    assert [(e["event"], e["conn_id"]) for e in logs] == [("message_failed", "conn-1")]
    monkeypatch.undo()
    assert client.ask({"op": "publish", "room": "r", "data": 2, "id": 6})[-1]["seq"] == 1


# Rate limits.


async def test_past_the_burst_a_message_gets_rate_limited_with_its_id_and_a_wait() -> None:
    """The refused message is not acted on; its reply says when to come back."""
    server = Server(rate_limit_msgs_per_s=10, rate_limit_burst=3)
    client = server.client()
    for n in range(3):
        assert client.ask({"op": "ping", "id": n}) == [{"op": "pong", "id": n}]
    [error] = client.ask({"op": "ping", "id": "late"})
    assert (error["code"], error["id"], error["retry_after_ms"]) == ("rate_limited", "late", 100)
    assert (server.metrics.rate_limited, server.metrics.messages_received) == (1, 4)
    server.clock.advance(0.1)  # one token back
    assert client.ask({"op": "ping", "id": 9}) == [{"op": "pong", "id": 9}]


async def test_too_many_refusals_close_the_connection_1008_and_later_messages_are_ignored() -> None:
    """Past rate_limit_max_rejected the session closes; what follows is counted, not served."""
    server = Server(rate_limit_msgs_per_s=1, rate_limit_burst=1, rate_limit_max_rejected=2)
    client = server.client()
    replies = []
    for n in range(4):
        replies += client.ask({"op": "ping", "id": n})
    assert codes(replies) == ["pong", "rate_limited", "rate_limited"]
    assert client.conn.closes() == [(1008, "rate limit exceeded")]
    assert client.ask({"op": "ping", "id": 99}) == []
    assert server.metrics.messages_received == 5


async def test_echo_sends_text_back_as_text_and_bytes_as_binary() -> None:
    """The echo keeps each message's kind and bytes."""
    server = Server()
    echo = server.client(echo=True)
    assert echo.hello == []  # the echo says nothing first
    assert echo.send("héllo") is None
    assert echo.send(b"\x00\xff") is None
    server.loop.run_ready()
    [written] = echo.conn.writes()
    assert written == b"\x81\x06" + "héllo".encode() + b"\x82\x02\x00\xff"


async def test_echo_under_its_rate_limit_answers_rate_limited_then_closes_1008() -> None:
    """The connection's limits apply on /ws/echo too: an error frame instead of the echo."""
    server = Server(rate_limit_msgs_per_s=1, rate_limit_burst=1, rate_limit_max_rejected=1)
    echo = server.client(echo=True)
    for _ in range(3):
        echo.send(b"x")
    server.loop.run_ready()
    frames = echo.conn.frames()
    assert frames[0] == b"x"
    assert json.loads(frames[1])["code"] == "rate_limited"
    assert echo.conn.closes() == [(1008, "rate limit exceeded")]


# With a broker between processes: joins wait for the room to be live,
# publications for the broker's confirmation.


async def test_a_join_is_answered_only_once_the_broker_says_the_room_is_live() -> None:
    """Until room_live the joiner waits (no ack, not a member); then every waiting id is acked."""
    broker = RecordingBroker()
    server = Server(broker)
    client = server.client()
    assert client.ask({"op": "join", "room": "r", "id": 1}) == []
    assert client.ask({"op": "join", "room": "r", "id": 2}) == []  # answered with the first
    assert broker.opened == ["r"]
    assert server.hub.members("r") == 0
    server.hub.room_live("r")
    assert client.replies() == [
        {"op": "ack", "id": 1, "room": "r", "members": 1, "policy": "disconnect", **RULES},
        {"op": "ack", "id": 2, "room": "r", "members": 1, "policy": "disconnect", **RULES},
    ]
    assert server.hub.members("r") == 1


async def test_a_pending_join_the_broker_cannot_make_live_gets_unavailable() -> None:
    """The broker lost Redis: every waiting join is refused and the client is not a member."""
    broker = RecordingBroker()
    server = Server(broker)
    client = server.client()
    client.ask({"op": "join", "room": "r", "id": 1})
    broker.available = False
    server.hub.broker_down()
    assert codes(client.replies()) == ["unavailable"]
    assert client.ask({"op": "leave", "room": "r", "id": 2})[0]["code"] == "not_joined"
    assert broker.closed == ["r"]


async def test_leaving_while_the_join_waits_answers_the_join_then_the_leave() -> None:
    """Joined, then left, in that order: no join is left unanswered."""
    server = Server(RecordingBroker())
    client = server.client()
    client.ask({"op": "join", "room": "r", "id": 1})
    replies = client.ask({"op": "leave", "room": "r", "id": 2})
    assert [(r["op"], r["id"]) for r in replies] == [("ack", 1), ("ack", 2)]
    assert server.hub.rooms == {}


async def test_a_publish_through_an_asynchronous_broker_returns_an_awaitable() -> None:
    """The handler answers once the broker confirms; the connection awaits it meanwhile."""
    broker = RecordingBroker()
    server = Server(broker, publish_requires_join=False)
    client = server.client()
    pending = client.send({"op": "publish", "room": "r", "data": [1], "id": 1})
    assert pending is not None
    [(room, data, future)] = broker.submitted
    assert (room, data) == ("r", b"[1]")
    assert client.replies() == []
    future.set_result(41)
    await pending
    assert client.replies() == [{"op": "ack", "id": 1, "room": "r", "seq": 41}]


@pytest.mark.parametrize(
    ("failure", "code"),
    [(BrokerUnavailable("down"), "unavailable"), (BrokerOutcomeUnknown("late"), "outcome_unknown")],
)
async def test_a_publish_the_broker_fails_answers_what_the_failure_means(
    failure: Exception, code: str
) -> None:
    """Not published, or not known: the client is told which, with its id."""
    broker = RecordingBroker()
    server = Server(broker, publish_requires_join=False)
    client = server.client()
    pending = client.send({"op": "publish", "room": "r", "data": 1, "id": 8})
    broker.submitted[0][2].set_exception(failure)
    await pending
    [error] = client.replies()
    assert (error["code"], error["id"]) == (code, 8)


async def test_a_publish_the_broker_refuses_at_once_is_unavailable_without_an_awaitable() -> None:
    """Redis known down: submit raises, and the answer comes in the same iteration."""
    broker = RecordingBroker()
    broker.refuse = True
    server = Server(broker, publish_requires_join=False)
    assert codes(server.client().ask({"op": "publish", "room": "r", "data": 1, "id": 1})) == [
        "unavailable"
    ]
