"""Requests and answers between gateway processes, over a broker's pub/sub.

The backend's moderation (:mod:`~rtgateway.moderation`) asks other processes
to act on their connections. :class:`Requests` is the envelope and the
waiting, and nothing else: what a request says is the moderator's, how it
travels (``PUBLISH`` to a channel, in order with the publications) is the
broker's.

- **Asking** (:meth:`Requests.ask`): the request gets an ``id`` and the
  asker's node (``reply_to``) and is sent to a channel; the send returns how
  many processes received it, and that many answers are awaited, for at most
  ``timeout_s``. An answer may come back before the count does (they travel
  on different connections), so the wait is registered before the send.
- **Answering** (:meth:`Requests.request`): a request that arrived is given
  to ``answer`` (the moderator's), and what it returns goes back, as
  ``{"op": "answer", "id", "body"}``, to ``reply_to``'s control channel.
- :meth:`Requests.received` sorts what arrives on this process's own control
  channel: answers to its requests, and requests for its connections.

Malformed messages are counted as broker errors and logged, never raised:
they arrive on the subscription connection, which must go on reading. This
module knows nothing of Redis, connections or rooms.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .moderation import Answers

if TYPE_CHECKING:
    from .metrics import Metrics

__all__ = ["REQUEST_MARK", "Requests"]

# A request sent on a room's channel starts with this; a publication starts with its seq.
REQUEST_MARK = b"?"
ANSWER_START = (b'{"op":"answer"', b'{"op": "answer"')

# Sends a payload to a channel: (channel, payload, internal) -> the receivers' count.
Send = Callable[[str, bytes, bool], "asyncio.Future[Any]"]


class Requests:
    """This process's requests in flight, and its answers to others'."""

    def __init__(
        self,
        node: str,
        control_channel: Callable[[str], str],
        send: Send,
        timeout_s: float,
        *,
        metrics: Metrics,
        log: Any,
    ) -> None:
        self.node = node
        self.control_channel = control_channel  # a node -> its control channel
        self.send = send
        self.timeout_s = timeout_s
        self.metrics = metrics
        self.log = log
        # Acts on a request for this process's connections (the moderator's).
        self.answer: Callable[[dict[str, Any]], dict[str, Any]] | None = None
        self.ids = itertools.count(1)
        self.asking: dict[str, _Asking] = {}  # request id -> the answers coming back

    async def ask(self, channel: str, mark: bytes, request: dict[str, Any]) -> Answers:
        """Send ``request`` to ``channel``; the answers of those who received it.

        Raises what the send raises (``BrokerUnavailable``, ``BrokerOutcomeUnknown``).
        """
        id = str(next(self.ids))
        asking = self.asking[id] = _Asking()
        try:
            payload = mark + json.dumps({**request, "id": id, "reply_to": self.node}).encode()
            received = await self.send(channel, payload, False)
            asking.expect(int(received))
            try:
                async with asyncio.timeout(self.timeout_s):
                    await asking.complete.wait()
            except TimeoutError:
                return Answers(asking.replies, complete=False)
            return Answers(asking.replies, complete=True)
        finally:
            del self.asking[id]

    def received(self, payload: bytes) -> None:
        """A message on this process's control channel: an answer, or a request."""
        if not payload.startswith(ANSWER_START):
            self.request(payload)
            return
        try:
            answer = json.loads(payload)
            asking = self.asking.get(answer["id"])
            body = answer["body"]
        except (ValueError, KeyError, TypeError, RecursionError):
            self._bad("broker_bad_answer", payload)
            return
        if asking is not None and isinstance(body, dict):
            asking.add(body)  # else: asked too long ago, or by this node's predecessor

    def request(self, payload: bytes) -> None:
        """A request from another process (or this one): act, and answer on the asker's channel."""
        try:
            request = json.loads(payload)
            id, reply_to = request["id"], request["reply_to"]
            if not isinstance(id, str) or not isinstance(reply_to, str):
                raise TypeError("id and reply_to must be strings")
        except (ValueError, KeyError, TypeError, RecursionError):
            # RecursionError: JSON nested too deeply, from whoever can PUBLISH.
            self._bad("broker_bad_request", payload)
            return
        body: dict[str, Any] = {}
        if self.answer is not None:
            try:
                body = self.answer(request)
            except Exception:
                # A bug costs this request, not the subscription; it is still answered.
                self.log.exception("broker_request_failed", op=str(request.get("op")))
        answer = json.dumps({"op": "answer", "id": id, "body": body}).encode()
        self.send(self.control_channel(reply_to), answer, True).add_done_callback(_consume)

    def _bad(self, event: str, payload: bytes) -> None:
        self.metrics.broker_error(1)
        self.log.warning(event, size=len(payload))


class _Asking:
    """The answers to one request, as they come back."""

    __slots__ = ("complete", "expected", "replies")

    def __init__(self) -> None:
        self.replies: list[dict[str, Any]] = []
        self.expected: int | None = None  # how many processes received it, once known
        self.complete = asyncio.Event()

    def expect(self, count: int) -> None:
        self.expected = count
        self._check()

    def add(self, body: dict[str, Any]) -> None:
        self.replies.append(body)
        self._check()

    def _check(self) -> None:
        if self.expected is not None and len(self.replies) >= self.expected:
            self.complete.set()


def _consume(future: asyncio.Future[Any]) -> None:
    # An answer nobody awaits: its failure is already counted by the publisher.
    if not future.cancelled():
        future.exception()
