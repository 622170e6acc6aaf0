"""Pending nodes' leases expire after a day away, counted from the hub's start at the earliest."""

from __future__ import annotations

from pathlib import Path

from memory_hub import new_key, outcome, registry_thread
from twisted.internet.testing import MemoryReactorClock

from hub.store.registry import Registry
from hub.tunnel.expiry import EXPIRY_INTERVAL, PendingLeaseExpiry

DAY = 86400.0


def pending_node(tmp_path: Path, clock: MemoryReactorClock) -> Registry:
    registry = Registry(str(tmp_path / "hub.sqlite3"), now=clock.seconds)
    registry.register("site-a", new_key().public().blob(), "SHA256:a", "test")
    registry.lease("site-a", "ssh", 49152, 49200)
    return registry


def seen_now(registry: Registry) -> None:
    registry.mark_online("site-a", "192.0.2.7")
    registry.mark_offline("site-a")


def test_a_restart_gives_a_pending_node_a_full_day_to_call_back(tmp_path: Path) -> None:
    clock = MemoryReactorClock()
    registry = pending_node(tmp_path, clock)
    clock.advance(1000)
    seen_now(registry)  # online until the old hub stopped
    clock.advance(2 * DAY)  # the hub was stopped for two days
    # The hub starts again (the pass runs in its registry thread).
    expiry = PendingLeaseExpiry(registry, clock, DAY, calls=registry_thread(tmp_path, clock))
    assert outcome(expiry.calls, expiry.poll()) == []
    clock.advance(DAY - EXPIRY_INTERVAL)
    assert outcome(expiry.calls, expiry.poll()) == []
    assert registry.node("site-a").forwards == {"ssh": 49152}
    clock.advance(2 * EXPIRY_INTERVAL)
    assert outcome(expiry.calls, expiry.poll()) == [("site-a", "ssh", 49152)]


def test_away_since_after_the_start_expires_a_day_after_it_was_seen(tmp_path: Path) -> None:
    clock = MemoryReactorClock()
    registry = pending_node(tmp_path, clock)
    # The hub starts at 0 (the pass runs in its registry thread).
    expiry = PendingLeaseExpiry(registry, clock, DAY, calls=registry_thread(tmp_path, clock))
    clock.advance(1000)
    seen_now(registry)
    clock.advance(DAY - EXPIRY_INTERVAL)
    assert outcome(expiry.calls, expiry.poll()) == []  # away a day less a minute
    clock.advance(2 * EXPIRY_INTERVAL)
    assert outcome(expiry.calls, expiry.poll()) == [("site-a", "ssh", 49152)]
