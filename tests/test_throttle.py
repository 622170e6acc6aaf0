"""The throttle rules (hub.rules.throttle): plain values, the time passed in."""

from __future__ import annotations

from hub.rules.throttle import OncePer, TokenBucket


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(burst=3, rate=0.5)
    assert [bucket.take(0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(1.9)  # 0.95 of a token
    assert bucket.take(2.0)
    assert [bucket.take(100) for _ in range(4)] == [True, True, True, False]  # capped at burst


def test_once_per_interval_counts_what_it_held_back() -> None:
    once = OncePer(interval=60, max_keys=2)
    assert once.due(0, "a") == 0
    assert [once.due(t, "a") for t in (1, 30, 59)] == [None, None, None]
    assert once.due(60, "a") == 3
    assert once.due(61, "b") == 0 and once.due(62, "b") is None
    # Beyond max_keys, fresh keys share one line per interval.
    assert once.due(63, "c") == 0 and once.due(64, "d") is None
    assert once.due(200, "e") == 0  # old keys are forgotten
