"""Token buckets for inbound traffic. Pure: the caller passes the clock."""

from __future__ import annotations

__all__ = ["RateLimit", "TokenBucket"]


class TokenBucket:
    """``rate`` tokens per second, at most ``capacity`` saved up.

    :meth:`take` returns 0.0 when the cost was paid, else the seconds to wait
    until it could be (nothing is taken then).
    """

    __slots__ = ("capacity", "rate", "tokens", "updated")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.updated = now

    def take(self, now: float, cost: float = 1.0) -> float:
        elapsed = now - self.updated
        if elapsed > 0:
            self.tokens = min(self.capacity, self.tokens + elapsed * self.rate)
            self.updated = now
        if self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        return (cost - self.tokens) / self.rate


class RateLimit:
    """A connection's inbound limits: messages and bytes per second, and abuse.

    :meth:`check` takes one message's tokens. A refused message counts towards
    ``max_rejected`` within ``window_s``, past which :attr:`exceeded` says to
    close the connection. ``bytes_per_s`` 0 turns the byte limit off; its
    burst is one second of it, and at least one message of ``max_message_bytes``.
    """

    __slots__ = ("byte_bucket", "max_rejected", "msg_bucket", "rejected", "since", "window_s")

    def __init__(
        self,
        msgs_per_s: float,
        burst: int,
        bytes_per_s: int,
        *,
        max_message_bytes: int,
        max_rejected: int,
        window_s: float,
        now: float,
    ) -> None:
        self.msg_bucket = TokenBucket(msgs_per_s, burst, now)
        self.byte_bucket = (
            TokenBucket(bytes_per_s, max(bytes_per_s, max_message_bytes), now)
            if bytes_per_s
            else None
        )
        self.max_rejected = max_rejected
        self.window_s = window_s
        self.rejected = 0
        self.since = now

    def check(self, now: float, size: int) -> float:
        """Seconds until this message would be allowed; 0.0 when it is."""
        wait = self.msg_bucket.take(now)
        if not wait and self.byte_bucket is not None:
            wait = self.byte_bucket.take(now, size)
        if not wait:
            return 0.0
        self.note_refused(now)
        return wait

    def note_refused(self, now: float) -> None:
        """Count a message another limit of the connection refused (a namespace's rate)."""
        if now - self.since > self.window_s:
            self.rejected = 0
            self.since = now
        self.rejected += 1

    @property
    def exceeded(self) -> bool:
        return self.rejected > self.max_rejected
