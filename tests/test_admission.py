"""The admission rules and token buckets, on plain values."""

from __future__ import annotations

import attrs
import pytest

from hub.rules.admission import (
    Admission,
    AdmissionPolicy,
    Buckets,
    Verdict,
    early_drop,
    parse_networks,
    parse_startups,
)


def test_bucket_burst_then_rate() -> None:
    b = Buckets(rate=0.5, burst=3)
    assert [b.take("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert not b.take("a", 1.0)
    assert b.take("a", 2.0)
    assert b.take("b", 2.0)  # another key has its own bucket


def test_bucket_reserve_queues_in_turn_and_refuses_long_waits() -> None:
    b = Buckets(rate=1.0, burst=1)
    assert b.reserve("a", 0.0, max_wait=2.5) == 0.0
    assert b.reserve("a", 0.0, max_wait=2.5) == 1.0
    assert b.reserve("a", 0.0, max_wait=2.5) == 2.0
    assert b.reserve("a", 0.0, max_wait=2.5) is None
    b.refund("a", 0.0)
    assert b.reserve("a", 0.0, max_wait=2.5) == 2.0


def test_bucket_forgets_old_keys() -> None:
    b = Buckets(rate=0.0, burst=1, max_keys=2)
    for key in "abc":
        assert b.take(key, 0.0)
    assert b.take("a", 0.0)  # forgotten, so full again
    assert not b.take("c", 0.0)


def test_early_drop_like_sshd() -> None:
    assert not early_drop(9, 10, 30, 100, 0.0)
    assert early_drop(10, 10, 30, 100, 0.29)
    assert not early_drop(10, 10, 30, 100, 0.31)
    assert early_drop(55, 10, 30, 100, 0.64)
    assert not early_drop(55, 10, 30, 100, 0.66)
    assert early_drop(100, 10, 30, 100, 0.99)


def test_parse_startups_and_networks() -> None:
    assert parse_startups("10:30:100") == (10, 30, 100)
    for bad in ("10:30", "a:b:c", "50:30:10", "10:130:100", "0:30:100"):
        with pytest.raises(ValueError):
            parse_startups(bad)
    assert parse_networks(["192.0.2.1", "2001:db8::/32"]) == ("192.0.2.1", "2001:db8::/32")
    with pytest.raises(ValueError, match="'nope'"):
        parse_networks(["nope"])


POLICY = AdmissionPolicy(start=5, rate=50, full=10, per_source=2, per_device_source=4,
                         penalty_points=3, penalty_window=60, penalty_time=30,
                         exempt=("192.0.2.0/24",), penalty_trickle=0)  # sshd's refusal


def test_decide_caps_per_source_and_more_for_device_sources() -> None:
    a = Admission(POLICY)
    assert a.decide("198.51.100.1", 0, total=0, from_source=1, draw=0.0) is Verdict.ACCEPT
    assert a.decide("198.51.100.1", 0, 0, 2, 0.0) is Verdict.REPLACE_SILENT
    a.key_login("198.51.100.1", 0)
    assert a.decide("198.51.100.1", 1, 0, 3, 0.0) is Verdict.ACCEPT
    assert a.decide("198.51.100.1", 1, 0, 4, 0.0) is Verdict.REPLACE_SILENT
    assert a.decide("192.0.2.7", 0, 0, 50, 0.0) is Verdict.ACCEPT  # exempt


def test_decide_global_early_drop_and_full() -> None:
    a = Admission(POLICY)
    assert a.decide("198.51.100.1", 0, 5, 0, 0.49) is Verdict.EARLY_DROP
    assert a.decide("198.51.100.1", 0, 5, 0, 0.51) is Verdict.ACCEPT
    assert a.decide("198.51.100.1", 0, 10, 0, 0.99) is Verdict.FULL


def test_penalty_after_bad_endings_then_expires() -> None:
    a = Admission(POLICY)
    assert not a.bad_ending("198.51.100.1", 0)
    assert not a.bad_ending("198.51.100.1", 1)
    assert a.bad_ending("198.51.100.1", 2)
    assert a.decide("198.51.100.1", 3, 0, 0, 0.99) is Verdict.PENALIZED
    assert a.decide("198.51.100.2", 3, 0, 0, 0.99) is Verdict.ACCEPT
    assert a.decide("198.51.100.1", 32, 0, 0, 0.99) is Verdict.ACCEPT


def test_bad_endings_spread_out_earn_no_penalty() -> None:
    a = Admission(POLICY)
    assert not any(a.bad_ending("198.51.100.1", t * 40.0) for t in range(10))


def test_device_sources_and_exempt_sources_are_not_penalized() -> None:
    a = Admission(POLICY)
    a.key_login("198.51.100.1", 0)
    for t in range(5):
        a.bad_ending("198.51.100.1", t)
        assert not a.bad_ending("192.0.2.1", t)
    assert a.decide("198.51.100.1", 6, 0, 0, 0.99) is Verdict.ACCEPT
    assert a.decide("192.0.2.1", 6, 0, 0, 0.99) is Verdict.ACCEPT
    # A day later the source is no longer a device source.
    a.bad_ending("198.51.100.1", 90000)
    a.bad_ending("198.51.100.1", 90001)
    a.bad_ending("198.51.100.1", 90002)
    assert a.decide("198.51.100.1", 90003, 0, 0, 0.99) is Verdict.PENALIZED


def test_a_penalty_is_earned_once_and_never_by_a_device_source() -> None:
    a = Admission(POLICY)
    a.key_login("198.51.100.1", 0)
    assert not any(a.bad_ending("198.51.100.1", t) for t in range(20))
    earned = [a.bad_ending("198.51.100.2", t / 10) for t in range(20)]
    assert earned.count(True) == 1  # not again while it lasts


def test_a_penalized_source_keeps_a_trickle_of_one_connection_at_a_time() -> None:
    a = Admission(attrs.evolve(POLICY, penalty_trickle=1))
    for t in range(3):
        a.bad_ending("198.51.100.1", t)
    assert a.penalized("198.51.100.1", 3)
    # A new device's registration from a shared address gets in while a neighbour's
    # penalty lasts, one unauthenticated connection at a time ...
    assert a.decide("198.51.100.1", 3, total=0, from_source=0, draw=0.99) is Verdict.ACCEPT
    # ... and a flood from there gets no second one.
    assert a.decide("198.51.100.1", 3, 1, 1, 0.99) is Verdict.PENALIZED
    assert a.decide("198.51.100.1", 3, 0, 5, 0.99) is Verdict.PENALIZED
    # The trickle still meets the global bounds.
    assert a.decide("198.51.100.1", 3, 10, 0, 0.99) is Verdict.FULL
    # Its own bad endings do not lengthen the penalty.
    assert not a.bad_ending("198.51.100.1", 4)
    assert a.decide("198.51.100.1", 33, 0, 1, 0.99) is Verdict.ACCEPT  # over: the full cap
