"""Script calls to Redis on one connection, pipelined in the order they came.

:class:`Publisher` is the broker's write path (``broker.py`` is its only
user). Calls wait in one queue; a single sender writes everything waiting as
one pipeline (up to :data:`MAX_BATCH` calls) and reads the replies in order, so
hundreds of publications in flight cost one round trip and one connection.
The connection is checked before each use (a Redis that restarted has closed
it: its FIN is waiting) and replaced when stale, and the scripts are loaded on
every new connection.

What a failure means, which is what the broker answers its clients:

- a call never written to Redis fails with
  :exc:`~rtgateway.errors.BrokerUnavailable` (not published: retrying cannot
  duplicate it), also when it waited past its deadline or Redis refused to run
  it (out of memory, busy);
- a call written and not answered within the timeout fails with
  :exc:`~rtgateway.errors.BrokerOutcomeUnknown` (Redis may still run it);
- ``NOSCRIPT`` (the scripts were flushed) is not a failure: the call did not
  run, and goes again after the scripts are loaded.

Nothing is retried behind the caller's back once it may have run.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from redis.asyncio.connection import Connection
from redis.exceptions import NoScriptError, RedisError, ResponseError

from .errors import BrokerOutcomeUnknown, BrokerUnavailable

__all__ = ["MAX_BATCH", "MAX_QUEUED", "Publisher", "Script"]

MAX_BATCH = 512  # script calls per pipelined write
MAX_QUEUED = 65536  # publications waiting for Redis, beyond which they are refused


class Script:
    """A Lua script, called by its SHA-1 (``EVALSHA``)."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


class Call:
    """One script call waiting for Redis; ``future`` gets the reply."""

    __slots__ = ("args", "deadline", "future", "keys", "script")

    def __init__(
        self,
        script: Script,
        keys: Sequence[str],
        args: Sequence[Any],
        deadline: float,
        future: asyncio.Future[Any],
    ) -> None:
        self.script = script
        self.keys = keys
        self.args = args
        self.deadline = deadline
        self.future = future

    def command(self) -> tuple[Any, ...]:
        return ("EVALSHA", self.script.sha, len(self.keys), *self.keys, *self.args)

    def resolve(self, reply: Any) -> None:
        if not self.future.done():
            self.future.set_result(reply)

    def fail(self, exc: Exception) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


class Publisher:
    """Script calls to Redis on one connection, pipelined in the order they came."""

    def __init__(
        self,
        connect: Callable[[], Connection],
        scripts: Sequence[Script],
        timeout_s: float,
        on_error: Callable[[BaseException, int, bool], None],
    ) -> None:
        self.connect = connect
        self.scripts = scripts
        self.timeout_s = timeout_s
        self.on_error = on_error  # (error, calls failed, whether they were sent)
        self.queue: collections.deque[Call] = collections.deque()
        self.wake = asyncio.Event()
        self.conn: Connection | None = None
        self.stale = False  # replace the connection before its next use
        self.sending: list[Call] = []

    def call(
        self, script: Script, keys: Sequence[str], args: Sequence[Any], *, internal: bool = False
    ) -> asyncio.Future[Any]:
        """Queue one call; the future gets its reply or a broker exception."""
        if not internal and len(self.queue) >= MAX_QUEUED:
            raise BrokerUnavailable("too many publications waiting for redis")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        deadline = loop.time() + self.timeout_s
        self.queue.append(Call(script, keys, args, deadline, future))
        self.wake.set()
        return future

    def reset(self) -> None:
        """Redis restarted or was lost: the next call connects afresh."""
        self.stale = True

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        batch: list[Call] = []
        try:
            while True:
                if not self.queue:
                    self.wake.clear()
                    await self.wake.wait()
                batch = self._take(loop.time())
                if not batch:
                    continue
                try:
                    await self._execute(batch)
                except Exception as exc:
                    # A bug costs this batch, not publishing for good.
                    self.sending = []
                    for call in batch:
                        call.fail(BrokerOutcomeUnknown("the gateway failed to publish"))
                    self.on_error(exc, len(batch), True)
                    await self._drop()
        finally:
            # Stopped with a batch out: what was sent may have been published.
            unknown = BrokerOutcomeUnknown("the gateway stopped before redis confirmed")
            for call in self.sending:
                call.fail(unknown)
            gone = BrokerUnavailable("the gateway is stopping")
            for call in (*batch, *self.queue):
                call.fail(gone)  # no-op for those answered already
            self.queue.clear()
            if self.conn is not None:
                await self.conn.disconnect(nowait=True)

    def _take(self, now: float) -> list[Call]:
        batch: list[Call] = []
        expired = 0
        while self.queue and len(batch) < MAX_BATCH:
            call = self.queue.popleft()
            if call.future.done():
                continue  # its publisher went away
            if now > call.deadline:
                call.fail(BrokerUnavailable("redis was not reachable in time"))
                expired += 1
                continue
            batch.append(call)
        if expired:
            self.on_error(TimeoutError("not sent in time"), expired, False)
        return batch

    async def _execute(self, batch: list[Call]) -> None:
        try:
            conn = await self._connection()
        except (RedisError, OSError, TimeoutError) as exc:
            for call in batch:
                call.fail(BrokerUnavailable("redis is not reachable"))
            self.on_error(exc, len(batch), False)
            return
        loop = asyncio.get_running_loop()
        self.sending = batch
        answered = 0
        again: list[Call] = []
        try:
            commands = conn.pack_commands(call.command() for call in batch)
            await conn.send_packed_command(commands, check_health=False)
            deadline = loop.time() + self.timeout_s
            for call in batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TimeoutError("redis did not answer in time")
                try:
                    reply = await conn.read_response(timeout=remaining)
                except NoScriptError:
                    again.append(call)  # not run: the scripts were flushed
                except ResponseError as exc:
                    # The script failed on the server before it published
                    # (out of memory, busy): not published.
                    call.fail(BrokerUnavailable("redis refused the publication"))
                    self.on_error(exc, 1, False)
                else:
                    if reply is None:
                        raise TimeoutError("redis did not answer in time")
                    call.resolve(reply)
                answered += 1
        except (RedisError, OSError, TimeoutError) as exc:
            unanswered = batch[answered:]
            for call in unanswered:
                call.fail(BrokerOutcomeUnknown("redis did not confirm the publication"))
            self.on_error(exc, len(unanswered), True)
            self.sending = []
            await self._drop()
        # Not in a finally: a cancelled sender leaves the batch in
        # self.sending for run() to answer "outcome unknown".
        self.sending = []
        if again:
            self.stale = True  # load the scripts again
            self.queue.extendleft(reversed(again))

    async def _connection(self) -> Connection:
        conn = self.conn
        if conn is not None and (self.stale or not conn.is_connected or await _dirty(conn)):
            await self._drop()
            conn = None
        if conn is None:
            conn = self.connect()
            try:
                await conn.connect()  # type: ignore[no-untyped-call]
                await _load_scripts(conn, self.scripts)
            except BaseException:
                await conn.disconnect(nowait=True)
                raise
            self.conn = conn
            self.stale = False
        return conn

    async def _drop(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            await conn.disconnect(nowait=True)


async def _dirty(conn: Connection) -> bool:
    """Whether an idle connection has something unexpected: data, or the server's FIN."""
    try:
        return bool(await conn.can_read())
    except (RedisError, OSError):
        return True


async def _load_scripts(conn: Connection, scripts: Iterable[Script]) -> None:
    scripts = list(scripts)
    commands = conn.pack_commands(("SCRIPT", "LOAD", s.source) for s in scripts)
    await conn.send_packed_command(commands, check_health=False)
    for script in scripts:
        sha = await conn.read_response()
        if sha.decode() != script.sha:
            raise RedisError("redis hashed a script differently")
