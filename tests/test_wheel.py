"""The timer wheel (``rtgateway/wheel.py``): a real event loop, timers that record when they fired.

How the connections use it (every deadline on one wheel, no task per
connection) is shown over real sockets in ``test_connection.py``.
"""

from __future__ import annotations

import asyncio
import random

from support import eventually

from rtgateway.wheel import Wheel

# The wheel.


class Recorder:
    """A wheel.Timer that notes when it fired; ``again`` schedules it once more."""

    def __init__(self, name: int, fired: list[tuple[int, float, float]]) -> None:
        self.name = name
        self.deadline: float | None = None
        self.wanted = 0.0
        self.fired = fired
        self.again: Wheel | None = None

    def expire(self, now: float) -> None:
        self.fired.append((self.name, self.wanted, now))
        if self.again is not None:
            wheel, self.again = self.again, None
            self.wanted = now + 0.05
            wheel.schedule(self, self.wanted)


async def test_wheel_fires_every_deadline_once_never_early_rescheduled_or_cancelled() -> None:
    """2000 deadlines, 300 moved and 300 cancelled: each live one fires once, none early."""
    loop = asyncio.get_running_loop()
    wheel = Wheel(loop)
    fired: list[tuple[int, float, float]] = []
    rng = random.Random(19)
    timers = [Recorder(i, fired) for i in range(2000)]
    now = loop.time()
    for timer in timers:
        timer.wanted = now + rng.uniform(0, 0.5)
        wheel.schedule(timer, timer.wanted)
    assert len(wheel) == 2000
    moved, cancelled = timers[:300], timers[300:600]
    for timer in moved:  # later or sooner, as a pong moves a connection's next ping
        timer.wanted = loop.time() + rng.uniform(0, 0.6)
        wheel.schedule(timer, timer.wanted)
    for timer in cancelled:  # as a connection that closes
        wheel.cancel(timer)
    assert len(wheel) == 1700
    await eventually(lambda: len(fired) >= 1700, timeout=15)
    await asyncio.sleep(0.3)  # time must pass to show that nothing more fires
    names = [name for name, _, _ in fired]
    assert sorted(names) == sorted(t.name for t in timers if t not in cancelled)
    early = [(name, wanted, at) for name, wanted, at in fired if at < wanted - 1e-6]
    assert early == []
    assert all(t.deadline is None for t in timers) and len(wheel) == 0
    assert wheel.armed is None  # nothing due: no wake-ups


async def test_wheel_goes_on_after_a_timer_fails_and_lets_a_timer_schedule_itself() -> None:
    """A timer that raises does not stop the sweep; one may schedule itself from expire()."""
    loop = asyncio.get_running_loop()
    wheel = Wheel(loop)
    fired: list[tuple[int, float, float]] = []

    class Broken(Recorder):
        def expire(self, now: float) -> None:
            super().expire(now)
            raise RuntimeError("a bug in one connection")

    broken = Broken(0, fired)
    keepalive = Recorder(1, fired)
    keepalive.again = wheel  # fires, then schedules itself once more
    for timer in (broken, keepalive):
        timer.wanted = loop.time() + 0.05
        wheel.schedule(timer, timer.wanted)
    await eventually(lambda: len(fired) >= 3)
    # The broken one fired once; the other fired, and fired again.
    assert sorted(name for name, _, _ in fired) == [0, 1, 1]
    wheel.close()
