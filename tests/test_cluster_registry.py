"""Several hubs on one registry file: claims, takeover, heartbeat and dead-hub reclaim."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import pytest
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, LogLevel, formatEvent

from hub.cluster.heartbeat import HubHeartbeat
from hub.errors import RegistryError
from hub.rules.cluster import (
    DEAD_AFTER,
    HEARTBEAT,
    default_hub_id,
    is_live,
    is_valid_hub_id,
    peer_address,
    split_address,
)
from hub.store.offthread import InlineCalls
from hub.store.registry import Registry

LOW, HIGH = 50000, 50099
T = TypeVar("T")


def fired(d: defer.Deferred[T]) -> T:
    """The result of a Deferred that has fired (registry calls run inline)."""
    got: list[T] = []
    d.addCallback(got.append)
    [result] = got
    return result


def two_hubs(tmp_path: Path, clock: MemoryReactorClock) -> tuple[Registry, Registry]:
    path = str(tmp_path / "hub.sqlite3")
    a, b = Registry(path, now=clock.seconds), Registry(path, now=clock.seconds)
    a.hub_id, b.hub_id = "hub-a", "hub-b"
    a.register("site-a", b"key-a", "fp", "test")
    a.set_state("site-a", "approved", "test")
    return a, b


def test_a_node_is_claimed_by_the_hub_that_marks_it_online(tmp_path: Path) -> None:
    clock = MemoryReactorClock()
    a, b = two_hubs(tmp_path, clock)
    a.mark_online("site-a", "192.0.2.7")
    port, _ = a.lease("site-a", "ssh", LOW, HIGH)
    a.set_lease_active("site-a", "ssh", True)
    assert (b.hub_of("site-a"), b.node("site-a").hub) == ("hub-a", "hub-a")
    # A connection without a tunnel on hub B (a device sending results) takes nothing over.
    b.mark_online("site-a", "192.0.2.8", take=False)
    assert b.hub_of("site-a") == "hub-a"
    # The device's tunnel comes up on hub B: B holds it now; A's late "offline"
    # (its stale session going away) leaves B's claim and the live lease alone.
    b.mark_online("site-a", "192.0.2.8")
    a.mark_offline("site-a")
    node = b.node("site-a")
    assert (node.online, node.hub, node.live) == (True, "hub-b", frozenset({"ssh"}))
    # B's own offline clears it; the lease stays the node's.
    b.mark_offline("site-a")
    node = a.node("site-a")
    assert (node.online, node.hub, node.live, node.forwards) == (False, None, frozenset(),
                                                                 {"ssh": port})


def test_a_restarting_hub_clears_only_its_own_claims(tmp_path: Path) -> None:
    clock = MemoryReactorClock()
    a, b = two_hubs(tmp_path, clock)
    a.register("site-b", b"key-b", "fp", "test")
    a.mark_online("site-a", "192.0.2.7")
    a.set_lease_active("site-a", "ssh", True) if a.lease("site-a", "ssh", LOW, HIGH) else None
    b.mark_online("site-b", "192.0.2.8")
    b.lease("site-b", "ssh", LOW, HIGH)
    b.set_lease_active("site-b", "ssh", True)
    a.reset_online()
    assert (a.node("site-a").online, a.node("site-a").live) == (False, frozenset())
    assert (a.node("site-b").online, a.node("site-b").hub,
            a.node("site-b").live) == (True, "hub-b", frozenset({"ssh"}))
    # A single hub (no hub id) still clears everything, as before.
    single = Registry(str(tmp_path / "hub.sqlite3"), now=clock.seconds)
    single.reset_online()
    assert not single.node("site-b").online and single.node("site-b").live == frozenset()


def test_a_dead_hubs_claims_are_reclaimed_by_a_live_one(tmp_path: Path) -> None:
    clock = MemoryReactorClock()
    a, b = two_hubs(tmp_path, clock)
    beat_a = HubHeartbeat(InlineCalls(a), clock, "hub-a", "ssh-ed25519 AAAA a")
    beat_b = HubHeartbeat(InlineCalls(b), clock, "hub-b", "ssh-ed25519 AAAA b")
    beat_a.start("127.0.0.1:1001")
    beat_b.start("127.0.0.1:1002")
    a.mark_online("site-a", "192.0.2.7")
    port, _ = a.lease("site-a", "ssh", LOW, HIGH)
    a.set_lease_active("site-a", "ssh", True)
    # Both beat: nobody is reclaimed.
    clock.pump([HEARTBEAT] * 10)
    assert b.node("site-a").hub == "hub-a"
    [row_a] = [h for h in b.hubs() if h.id == "hub-a"]
    assert (row_a.peer_address, row_a.heartbeat) == ("127.0.0.1:1001", clock.seconds())
    # Hub A is killed (its loop stops, it writes nothing more).
    assert beat_a._loop is not None
    beat_a._loop.stop()
    killed = clock.seconds()
    # Hub B's own heartbeat loop notices, after DEAD_AFTER missed heartbeats and
    # before one more.
    while b.node("site-a").hub is not None:
        assert clock.seconds() - killed <= HEARTBEAT * DEAD_AFTER
        clock.advance(HEARTBEAT)
    assert clock.seconds() - killed <= HEARTBEAT * (DEAD_AFTER + 1)
    node = b.node("site-a")
    assert (node.online, node.hub, node.live, node.forwards) == (False, None, frozenset(),
                                                                 {"ssh": port})
    assert b.audit_log()[-1].action == "hub-reclaim"
    # Nothing is left for the next look, and the device gets its old port on hub B.
    assert fired(beat_b.reclaim()) == [] and fired(beat_b.beat()) == []
    b.mark_online("site-a", "192.0.2.9")
    assert b.lease("site-a", "ssh", LOW, HIGH) == (port, False)


class Outage(InlineCalls):
    """Registry calls that fail while `down` (the database away for every hub)."""

    down = False

    def call(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        if Outage.down:
            return defer.fail(RegistryError("connection refused"))
        return super().call(fn, *args, **kwargs)


def test_after_an_outage_of_the_registry_no_hub_reclaims_the_others(tmp_path: Path) -> None:
    clock = MemoryReactorClock()
    a, b = two_hubs(tmp_path, clock)
    beat_a = HubHeartbeat(Outage(a), clock, "hub-a", "ssh-ed25519 AAAA a")
    beat_b = HubHeartbeat(Outage(b), clock, "hub-b", "ssh-ed25519 AAAA b")
    beat_a.start("127.0.0.1:1001")
    clock.advance(1)  # hub B beats 1 s after hub A
    beat_b.start("127.0.0.1:1002")
    b.mark_online("site-a", "192.0.2.7")
    clock.pump([1.0] * 30)
    # The database is away for 40 s, more than a death (15 s), for both hubs.
    Outage.down = True
    try:
        clock.pump([1.0] * 40)
    finally:
        Outage.down = False
    # Hub A's first heartbeat back sees hub B's last one 40 s old: B is not dead,
    # only not yet back; B beats within its interval and both go on.
    clock.pump([1.0] * int(HEARTBEAT * (DEAD_AFTER + 2)))
    assert b.node("site-a").hub == "hub-b" and b.node("site-a").online
    assert [e for e in a.audit_log() if e.action == "hub-reclaim"] == []
    # A hub that really died is still found, once the survivor has beaten for a death.
    assert beat_b._loop is not None
    beat_b._loop.stop()
    clock.pump([1.0] * int(HEARTBEAT * (DEAD_AFTER + 1)))
    assert b.node("site-a").hub is None


def test_a_stopped_hubs_nodes_are_cleared_as_a_stop_not_a_death(
        tmp_path: Path, logged: list[LogEvent]) -> None:
    """A hub that said it stops (as every worker of a hub does on SIGTERM) leaves
    its nodes online in the registry (its registry thread closed first): a live
    hub clears them and says the hub stopped, at info; a warning with the age of
    a heartbeat of 0 (56 years) read as an alarm on every restart."""
    clock = MemoryReactorClock()
    a, b = two_hubs(tmp_path, clock)
    beat_a = HubHeartbeat(InlineCalls(a), clock, "hub-a", "ssh-ed25519 AAAA a")
    beat_b = HubHeartbeat(InlineCalls(b), clock, "hub-b", "ssh-ed25519 AAAA b")
    clock.advance(1_700_000_000)
    beat_a.start("127.0.0.1:1001")
    beat_b.start("127.0.0.1:1002")
    a.mark_online("site-a", "192.0.2.7")
    clock.pump([HEARTBEAT] * (DEAD_AFTER + 1))  # hub B judges others now
    beat_a.stop()
    assert fired(beat_b.beat()) == ["site-a"]
    assert not b.node("site-a").online
    lines = [(e["log_level"], formatEvent(e)) for e in logged
             if e.get("log_namespace") == "hub.cluster.heartbeat" and "site-a" in formatEvent(e)]
    assert lines == [(LogLevel.info, "hub hub-a stopped: 1 node(s) it held are offline now, "
                                     "their ports kept: site-a")]


def test_a_hub_that_stops_is_dead_at_once_and_a_lost_row_is_written_again(
        tmp_path: Path) -> None:
    clock = MemoryReactorClock()
    a, b = two_hubs(tmp_path, clock)
    beat_a = HubHeartbeat(InlineCalls(a), clock, "hub-a", "ssh-ed25519 AAAA a")
    clock.advance(1000)
    beat_a.start("127.0.0.1:1001")
    beat_a.stop()
    [row] = b.hubs()
    assert not is_live(row.heartbeat, clock.seconds())
    beat_a.start("127.0.0.1:1001")
    with a.transaction() as db:
        db.execute("DELETE FROM hubs")
    clock.advance(HEARTBEAT)
    assert [h.id for h in b.hubs()] == ["hub-a"]


def test_cluster_rules() -> None:
    assert is_live(100.0, 100.0 + HEARTBEAT * DEAD_AFTER)
    assert not is_live(100.0, 100.0 + HEARTBEAT * DEAD_AFTER + 0.1)
    assert is_valid_hub_id("hub-1.example.org") and not is_valid_hub_id("-x")
    assert not is_valid_hub_id("a b") and not is_valid_hub_id("x" * 64)
    assert default_hub_id("my host") == "my-host" and default_hub_id("") == "hub"
    assert peer_address(None, "127.0.0.1", 4100) == "127.0.0.1:4100"
    assert peer_address(None, "::1", 4100) == "[::1]:4100"
    assert peer_address(None, "0.0.0.0", 4100) is None
    assert peer_address("hub-a.lan:4100", "0.0.0.0", 4100) == "hub-a.lan:4100"
    assert split_address("[::1]:22") == ("::1", 22)
    for bad in ("nohost", "h:0", "h:x", "a:b:1"):
        with pytest.raises(ValueError):
            split_address(bad)


def test_cluster_config(tmp_path: Path) -> None:
    from hub.app.config import build_config
    from hub.errors import ConfigError

    single = build_config({"data": str(tmp_path)})
    assert single.peer is None and is_valid_hub_id(single.cluster_id)
    workers = build_config({"data": str(tmp_path), "peer": "tcp:0:interface=127.0.0.1"})
    assert workers.peer == "tcp:0:interface=127.0.0.1" and workers.peer_address is None
    with pytest.raises(ConfigError, match=r"listens on every interface; set \[cluster\] "
                                          "peer_address"):
        build_config({"data": str(tmp_path), "peer": "tcp:4100"})
    (tmp_path / "callhomehub.toml").write_text(
        '[cluster]\nid = "hub-a"\npeer_address = "hub-a.lan:4100"\n')
    config = build_config({"data": str(tmp_path), "peer": "tcp:4100"})
    assert (config.cluster_id, config.peer_address) == ("hub-a", "hub-a.lan:4100")
    (tmp_path / "callhomehub.toml").write_text('[cluster]\nid = "no spaces"\n')
    with pytest.raises(ConfigError, match=r"\[cluster\] id: 'no spaces' is not a valid hub id"):
        build_config({"data": str(tmp_path)})
    (tmp_path / "callhomehub.toml").write_text('[cluster]\npeer_address = "hub-a.lan"\n')
    with pytest.raises(ConfigError, match=r"\[cluster\] peer_address: expected HOST:PORT"):
        build_config({"data": str(tmp_path)})


def test_another_hubs_heartbeat_is_no_change_to_act_on_its_writes_to_nodes_are(
        tmp_path: Path) -> None:
    clock = MemoryReactorClock()
    a, b = two_hubs(tmp_path, clock)
    b.hub_started("hub-b", "127.0.0.1:4100", "ssh-ed25519 AAAA")
    assert a.changed()
    assert not a.changed()
    for _ in range(3):
        clock.advance(HEARTBEAT)
        assert b.hub_heartbeat("hub-b")
        b.touch("site-a")
        b.audit("alice", "gateway", "site-a")
        assert not a.changed()
    b.mark_online("site-a", "192.0.2.8")
    assert a.changed() and not a.changed()
    # Its own writes are no news to a hub; one from another that came first still is.
    a.set_state("site-a", "revoked", "test")
    assert not a.changed()
    b.set_state("site-a", "approved", "test")
    a.mark_offline("site-a")
    assert a.changed() and not a.changed()


def test_a_hub_reads_nothing_on_other_hubs_heartbeats_and_acts_on_their_revoke(
        tmp_path: Path) -> None:
    from twisted.internet.testing import MemoryReactorClock as Reactor

    from hub.app.service import Options, makeService

    options = Options()
    options.parseOptions(["--data", str(tmp_path), "--ssh", "tcp:2222:interface=127.0.0.1",
                          "--metrics", "none", "--web", "none", "--workers", "1"])
    reactor = Reactor()
    top = makeService(options, reactor=reactor)
    top.privilegedStartService()
    top.startService()
    try:
        hub = top.hub  # type: ignore[attr-defined]
        reads: list[str] = []
        hub.registry._db._db.set_trace_callback(reads.append)  # the sqlite3 connection
        other = Registry(str(tmp_path / "hub.sqlite3"), now=reactor.seconds)
        other.hub_id = "hub-b"
        other.hub_started("hub-b", "127.0.0.1:4100", "ssh-ed25519 AAAA")
        other.register("site-a", b"key-a", "fp", "cli")
        reactor.advance(0.25)
        reads.clear()
        for _ in range(20):  # 100 s of hub B's heartbeats
            other.hub_heartbeat("hub-b")
            reactor.advance(HEARTBEAT)
        acted = [q for q in reads if "data_version" not in q and "generation" not in q]
        assert acted == []
        other.set_state("site-a", "revoked", "cli")
        reactor.advance(0.25)
        assert any("pair" in q or "nodes" in q for q in reads)
    finally:
        top.stopService()
