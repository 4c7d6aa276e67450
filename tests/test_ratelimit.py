"""ratelimit.py: token buckets and a connection's limits (pure: the clock is passed in)."""

from __future__ import annotations

import pytest

from rtgateway.ratelimit import RateLimit, TokenBucket


def test_a_full_bucket_pays_its_capacity_then_says_how_long_to_wait() -> None:
    """Capacity tokens at once; then the wait for one more, and nothing is taken."""
    bucket = TokenBucket(rate=10, capacity=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.1)
    assert bucket.take(0.0) == pytest.approx(0.1)  # refusing took nothing
    assert bucket.tokens == pytest.approx(0.0)


def test_tokens_come_back_at_the_rate_up_to_the_capacity() -> None:
    """Time refills the bucket, never past its capacity."""
    bucket = TokenBucket(rate=10, capacity=3, now=0.0)
    for _ in range(3):
        bucket.take(0.0)
    assert bucket.take(0.25) == 0.0  # 2.5 tokens came back, one taken
    assert bucket.tokens == pytest.approx(1.5)
    bucket.take(100.0)
    assert bucket.tokens == pytest.approx(2.0)  # capped at 3, then one taken


def test_a_clock_that_goes_back_refills_nothing() -> None:
    """Only elapsed time adds tokens."""
    bucket = TokenBucket(rate=10, capacity=1, now=5.0)
    bucket.take(5.0)
    assert bucket.take(4.0) == pytest.approx(0.1)


def test_a_cost_above_one_waits_for_all_of_it() -> None:
    """A message of N bytes waits for N byte tokens."""
    bucket = TokenBucket(rate=100, capacity=100, now=0.0)
    assert bucket.take(0.0, 60) == 0.0
    assert bucket.take(0.0, 60) == pytest.approx(0.2)


def limit(**changes: object) -> RateLimit:
    settings: dict[str, object] = {
        "msgs_per_s": 10,
        "burst": 2,
        "bytes_per_s": 100,
        "max_message_bytes": 50,
        "max_rejected": 2,
        "window_s": 10.0,
        "now": 0.0,
    }
    settings.update(changes)
    return RateLimit(**settings)  # type: ignore[arg-type]


def test_messages_past_the_burst_are_refused_with_the_wait() -> None:
    """check() is 0.0 when allowed, the seconds to wait when not."""
    rl = limit()
    assert rl.check(0.0, 1) == 0.0
    assert rl.check(0.0, 1) == 0.0
    assert rl.check(0.0, 1) == pytest.approx(0.1)
    assert rl.rejected == 1


def test_bytes_past_the_byte_burst_are_refused_even_within_the_message_limit() -> None:
    """The byte bucket holds one second of bytes_per_s."""
    rl = limit(burst=10)
    assert rl.check(0.0, 100) == 0.0
    assert rl.check(0.0, 10) == pytest.approx(0.1)


def test_the_byte_burst_is_at_least_one_message_of_the_maximum_size() -> None:
    """A limit below the message size would refuse every large message for ever."""
    rl = limit(bytes_per_s=10, max_message_bytes=50)
    assert rl.check(0.0, 50) == 0.0


def test_bytes_per_s_zero_turns_the_byte_limit_off() -> None:
    """Only the message count applies."""
    rl = limit(bytes_per_s=0, burst=3)
    assert rl.byte_bucket is None
    assert [rl.check(0.0, 10**9) for _ in range(3)] == [0.0, 0.0, 0.0]


def test_past_max_rejected_in_the_window_the_limit_is_exceeded() -> None:
    """Two refusals are tolerated, the third says: close the connection."""
    rl = limit(burst=1, max_rejected=2)
    rl.check(0.0, 1)
    rl.check(0.0, 1)
    rl.check(0.0, 1)
    assert not rl.exceeded
    rl.check(0.0, 1)
    assert rl.exceeded


def test_refusals_older_than_the_window_are_forgotten() -> None:
    """A client refused now and then, more than a window apart, is never closed."""
    rl = limit(burst=1, msgs_per_s=0.01, max_rejected=1)
    rl.check(0.0, 1)
    rl.check(1.0, 1)
    rl.check(2.0, 1)
    assert rl.exceeded
    rl = limit(burst=1, msgs_per_s=0.01, max_rejected=1)
    rl.check(0.0, 1)
    rl.check(1.0, 1)
    rl.check(12.0, 1)  # past the 10 s window: counting starts again
    assert rl.rejected == 1 and not rl.exceeded
