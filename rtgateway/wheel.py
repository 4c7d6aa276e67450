"""One gateway-wide timer for every connection's deadline: a hashed wheel of ticks.

A connection has at most one deadline at a time (its first byte, its
handshake, its next keepalive ping or pong, its closing handshake), and tens
of thousands of connections have one. An ``asyncio.TimerHandle`` each, or a
task each sleeping in ``keepalive()`` as websockets' asyncio layer runs, costs
hundreds of bytes per connection and a heap entry per reschedule. Here a
deadline is a float on the connection and a place in a set:

- time is cut into ticks of :data:`TICK_S`; a deadline falls in the tick that
  ends at or after it (never early, at most one tick late);
- each tick that holds a deadline has a set of its timers, and a heap of
  those ticks (one entry per tick, not per timer) says which comes next;
- one ``loop.call_at`` is armed for the earliest tick; when it fires, every
  tick that has ended is swept, and each of its timers is told
  (:meth:`Timer.expire`), which may schedule it again.

Rescheduling and cancelling are a set removal and a set insertion: a pong
moves its connection from one tick to another, a closed connection leaves its
tick at once (nothing here keeps a closed connection alive).

This module knows nothing of connections; it calls ``expire(now)``.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from typing import Protocol

import structlog

__all__ = ["TICK_S", "Timer", "Wheel"]

# A deadline fires within one tick after it: 0.1 s, ten sweeps a second at
# most, and none while nothing is due.
TICK_S = 0.1
_log = structlog.get_logger("rtgateway.wheel")


class Timer(Protocol):
    """What the wheel needs of a timer: the deadline it was given, and what to do then."""

    deadline: float | None  # loop time; None while not scheduled (the wheel keeps it)

    def expire(self, now: float) -> None: ...


class Wheel:
    """Deadlines of many timers, swept by one ``call_at`` at tick boundaries. Event loop only."""

    __slots__ = ("armed", "armed_tick", "heap", "loop", "swept", "tick_s", "ticks")

    def __init__(self, loop: asyncio.AbstractEventLoop, tick_s: float = TICK_S) -> None:
        self.loop = loop
        self.tick_s = tick_s
        self.ticks: dict[int, set[Timer]] = {}  # tick -> the timers due in it
        self.heap: list[int] = []  # the keys of ``ticks``, earliest first
        self.swept = math.floor(loop.time() / tick_s)  # every tick up to this one is done
        self.armed: asyncio.TimerHandle | None = None
        self.armed_tick = 0

    def __len__(self) -> int:
        return sum(len(timers) for timers in self.ticks.values())

    def schedule(self, timer: Timer, deadline: float) -> None:
        """Give ``timer`` this deadline, in place of any it had."""
        tick = max(math.ceil(deadline / self.tick_s), self.swept + 1)
        old = timer.deadline
        if old is not None:
            old_tick = max(math.ceil(old / self.tick_s), self.swept + 1)
            if old_tick == tick:
                timer.deadline = deadline
                return
            self._remove(timer, old_tick)
        timer.deadline = deadline
        timers = self.ticks.get(tick)
        if timers is None:
            timers = self.ticks[tick] = set()
            heapq.heappush(self.heap, tick)
            if self.armed is None or tick < self.armed_tick:
                self._arm(tick)
        timers.add(timer)

    def cancel(self, timer: Timer) -> None:
        """Forget ``timer``'s deadline, if it has one."""
        old = timer.deadline
        if old is not None:
            timer.deadline = None
            self._remove(timer, max(math.ceil(old / self.tick_s), self.swept + 1))

    def close(self) -> None:
        """Forget every deadline (the server is stopping)."""
        if self.armed is not None:
            self.armed.cancel()
            self.armed = None
        for timers in self.ticks.values():
            for timer in timers:
                timer.deadline = None
        self.ticks.clear()
        self.heap.clear()

    def _remove(self, timer: Timer, tick: int) -> None:
        timers = self.ticks.get(tick)
        if timers is not None:
            timers.discard(timer)
            # An empty set stays until its tick is swept: the heap still names it.

    def _arm(self, tick: int) -> None:
        if self.armed is not None:
            self.armed.cancel()
        self.armed_tick = tick
        self.armed = self.loop.call_at(tick * self.tick_s, self._sweep)

    def _sweep(self) -> None:
        self.armed = None
        now = self.loop.time()
        # A tick is done once its end has passed (the loop may wake a little early).
        done = math.floor(now / self.tick_s + 1e-9)
        heap, ticks = self.heap, self.ticks
        while heap and heap[0] <= done:
            tick = heapq.heappop(heap)
            self.swept = tick
            for timer in ticks.pop(tick, ()):
                timer.deadline = None
                try:
                    timer.expire(now)
                except Exception:
                    # One broken connection must not stop the others' deadlines.
                    _log.exception("timer_failed")
        self.swept = max(self.swept, done)
        if heap:
            self._arm(heap[0])
