"""Denial of service before login, in memory: pipelined passwords, bcrypt
budgets, the key-exchange grace and admission of unauthenticated connections."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from memory_hub import connect_client, make_hub, new_key, start_factory
from twisted.conch.ssh.common import NS
from twisted.conch.ssh.transport import MSG_SERVICE_REQUEST
from twisted.conch.ssh.userauth import MSG_USERAUTH_REQUEST
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from hub.access.auth import check_password
from hub.app.context import Hub

BCRYPT_TIME = 0.3  # what one check takes on the thread pool, in the fake


@pytest.fixture
def clock() -> MemoryReactorClock:
    return MemoryReactorClock()


class SlowThreads:
    """run_in_thread that answers after BCRYPT_TIME on the clock, like a
    thread pool; counts the bcrypt checks started."""

    def __init__(self, clock: MemoryReactorClock) -> None:
        self.clock = clock
        self.checks = 0

    def __call__(self, f: Any, *a: Any) -> defer.Deferred[Any]:
        if f is check_password:
            self.checks += 1
        d: defer.Deferred[Any] = defer.Deferred()
        self.clock.callLater(BCRYPT_TIME, lambda: d.callback(f(*a)))
        return d


def slow_hub(tmp_path: Path, clock: MemoryReactorClock,
             config: str = "") -> tuple[Hub, SlowThreads]:
    if config:
        (tmp_path / "callhomehub.toml").write_text(config)
    hub = make_hub(tmp_path, clock)
    threads = SlowThreads(clock)
    hub.run_in_thread = threads
    return hub, threads


def pipeline_passwords(client: Any, count: int, user: bytes = b"cms") -> None:
    """Ask for user auth and send `count` password requests without waiting
    for an answer (the client's own transport ignores the answers)."""
    client.dispatchMessage = lambda num, payload: None
    client.sendPacket(MSG_SERVICE_REQUEST, NS(b"ssh-userauth"))
    for i in range(count):
        client.sendPacket(MSG_USERAUTH_REQUEST, NS(user) + NS(b"ssh-connection")
                          + NS(b"password") + b"\x00" + NS(b"wrong%d" % i))


def run(clock: MemoryReactorClock, pump: Any, seconds: float, step: float = 0.1) -> None:
    for _ in range(int(seconds / step)):
        clock.advance(step)
        pump.flush()


def test_pipelined_passwords_are_checked_one_at_a_time(tmp_path: Path,
                                                       clock: MemoryReactorClock) -> None:
    hub, threads = slow_hub(tmp_path, clock)
    factory = start_factory(hub)
    server, client, pump = connect_client(factory, clock, None, peer="198.51.100.7")
    pipeline_passwords(client, 200)
    pump.flush()
    # One check in flight, not one per request.
    assert threads.checks == 1
    run(clock, pump, 120)
    # Never more checks than failed attempts allowed on one connection.
    assert threads.checks <= hub.config.limits.max_auth_tries
    assert server.transport.disconnecting


def test_no_bcrypt_for_a_connection_that_is_gone(tmp_path: Path,
                                                 clock: MemoryReactorClock) -> None:
    hub, threads = slow_hub(tmp_path, clock)
    factory = start_factory(hub)
    server, client, pump = connect_client(factory, clock, None, peer="198.51.100.7")
    pipeline_passwords(client, 5)
    pump.flush()
    server.connectionLost(None)
    run(clock, pump, 60)
    assert threads.checks == 1


def one_password_each_from(factory: Any, clock: MemoryReactorClock, peer: str,
                           connections: int) -> list[Any]:
    """`connections` connections from `peer`, each sending one password at once;
    their pumps."""
    pumps = []
    for _ in range(connections):
        _, client, pump = connect_client(factory, clock, None, peer=peer)
        pipeline_passwords(client, 1)
        pumps.append(pump)
    for pump in pumps:
        pump.flush()
    return pumps


def test_password_budget_per_source_across_connections(tmp_path: Path,
                                                       clock: MemoryReactorClock) -> None:
    hub, threads = slow_hub(tmp_path, clock, "[limits]\npassword_checks_burst = 3\n"
                                             "password_checks_per_minute = 6\n")
    factory = start_factory(hub)
    pumps = one_password_each_from(factory, clock, "198.51.100.7", connections=8)
    clock.advance(BCRYPT_TIME)
    # Three at once (the burst); the rest wait their turn or are refused.
    assert threads.checks == 3
    for _ in range(100):
        clock.advance(0.1)
        for pump in pumps:
            pump.flush()
    # Ten seconds later: at most one more per 10 s (6 a minute).
    assert threads.checks <= 5
    # Another source is not held up by this one.
    before = threads.checks
    _, client, pump = connect_client(factory, clock, None, peer="203.0.113.9")
    pipeline_passwords(client, 1)
    pump.flush()
    assert threads.checks == before + 1


def test_key_login_is_not_delayed_by_password_flood(tmp_path: Path,
                                                    clock: MemoryReactorClock) -> None:
    hub, threads = slow_hub(tmp_path, clock)
    factory = start_factory(hub)
    for _ in range(5):
        _, client, pump = connect_client(factory, clock, None, peer="198.51.100.7")
        pipeline_passwords(client, 50)
        pump.flush()
    key = new_key()
    hub.registry.register("site-a", key.public().blob(), "fp", "test")
    _, device, _ = connect_client(factory, clock, b"cms", key=key, peer="198.51.100.7")
    # In at once, while five bcrypt checks (one per connection) are still running.
    assert device.factory_state.get("connected")
    assert threads.checks == 5


def silent(factory: Any, peer: str) -> Any:
    """A TCP connection that never sends a byte (not even a version line)."""
    from twisted.internet.testing import StringTransport

    t = factory.buildProtocol(IPv4Address("TCP", peer, 40001))
    if t is not None:
        t.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", peer, 40001)))
    return t


def test_silent_socket_is_gone_within_the_kex_grace(tmp_path: Path,
                                                    clock: MemoryReactorClock) -> None:
    factory = start_factory(make_hub(tmp_path, clock))
    t = silent(factory, "198.51.100.7")
    clock.advance(9.9)
    assert not t.transport.disconnecting
    clock.advance(0.2)
    assert t.transport.disconnecting or t.transport.disconnected


def test_finished_kex_has_the_whole_login_window(tmp_path: Path,
                                                 clock: MemoryReactorClock) -> None:
    factory = start_factory(make_hub(tmp_path, clock))
    server, _client, pump = connect_client(factory, clock, None)
    clock.advance(60)
    pump.flush()
    assert not server.transport.disconnecting


def test_flooded_source_is_capped_and_others_get_in(tmp_path: Path,
                                                    clock: MemoryReactorClock) -> None:
    hub = make_hub(tmp_path, clock)
    factory = start_factory(hub)
    floods = [silent(factory, "198.51.100.7") for _ in range(1000)]
    accepted = [t for t in floods if t is not None]
    open_now = [t for t in accepted if not t.transport.disconnecting]
    assert len(open_now) <= hub.config.limits.per_source_unauthenticated
    assert len(factory.unauthenticated) <= hub.config.limits.per_source_unauthenticated
    # The flood earned its source a penalty: most were refused outright.
    assert len(accepted) < 100
    key = new_key()
    hub.registry.register("site-a", key.public().blob(), "fp", "test")
    _, device, _ = connect_client(factory, clock, b"cms", key=key, peer="203.0.113.9")
    assert device.factory_state.get("connected")


def test_device_source_keeps_logging_in_during_a_flood(tmp_path: Path,
                                                       clock: MemoryReactorClock) -> None:
    hub = make_hub(tmp_path, clock)
    factory = start_factory(hub)
    key = new_key()
    hub.registry.register("site-a", key.public().blob(), "fp", "test")
    # A device behind the address (CGNAT) logged in before the flood began.
    _, device, _ = connect_client(factory, clock, b"cms", key=key, peer="198.51.100.7")
    assert device.factory_state.get("connected")
    for _ in range(1000):
        silent(factory, "198.51.100.7")
    assert len(factory.unauthenticated) <= hub.config.limits.per_device_source_unauthenticated
    _, again, _ = connect_client(factory, clock, b"cms", key=key, peer="198.51.100.7")
    assert again.factory_state.get("connected")


def test_new_device_on_a_flooded_source_replaces_a_silent_socket(
        tmp_path: Path, clock: MemoryReactorClock) -> None:
    hub = make_hub(tmp_path, clock)
    factory = start_factory(hub)
    cap = hub.config.limits.per_source_unauthenticated
    socks = [silent(factory, "198.51.100.7") for _ in range(cap)]
    assert all(t is not None for t in socks)
    key = new_key()
    hub.registry.register("site-a", key.public().blob(), "fp", "test")
    _, device, _ = connect_client(factory, clock, b"cms", key=key, peer="198.51.100.7")
    assert device.factory_state.get("connected")
    assert socks[0].transport.disconnecting or socks[0].transport.disconnected


def test_new_device_registers_from_a_penalized_shared_address(
        tmp_path: Path, clock: MemoryReactorClock) -> None:
    hub = make_hub(tmp_path, clock)
    factory = start_factory(hub)
    peer = "198.51.100.7"  # a CGNAT address: a hostile neighbour and a new device
    floods = [t for t in (silent(factory, peer) for _ in range(1000)) if t is not None]
    assert factory.gate.admission.penalized(peer, clock.seconds())
    assert silent(factory, peer) is None  # the flood gets no more while it holds one
    for t in floods:
        if not t.transport.disconnected:
            t.connectionLost(None)
    assert peer not in factory.gate.by_source
    clock.advance(5)
    assert factory.gate.admission.penalized(peer, clock.seconds())
    # Within the penalty the address gets one unauthenticated connection at a time:
    held = silent(factory, peer)
    assert held is not None and silent(factory, peer) is None
    held.connectionLost(None)
    # ... through which a new device (no key yet: the Call Home Password) registers.
    _server, device, pump = connect_client(factory, clock, b"cms", password=b"secret",
                                           peer=peer)
    for _ in range(10):
        pump.pump()
    assert device.factory_state.get("connected")
    assert factory.gate.admission.penalized(peer, clock.seconds())


def test_penalty_expires_and_exempt_sources_are_never_penalized(
        tmp_path: Path, clock: MemoryReactorClock) -> None:
    (tmp_path / "callhomehub.toml").write_text(
        '[limits]\npenalty_exempt = ["198.51.100.0/24"]\npenalty_time = 30\n')
    hub = make_hub(tmp_path, clock)
    factory = start_factory(hub)
    for _ in range(50):
        assert silent(factory, "198.51.100.7") is not None
    assert len(factory.unauthenticated) == 50  # no per-source cap either
    for _ in range(50):
        silent(factory, "203.0.113.9")
    assert silent(factory, "203.0.113.9") is None
    clock.advance(31)
    assert silent(factory, "203.0.113.9") is not None


def test_exempt_source_takes_from_the_global_password_budget_only(
        tmp_path: Path, clock: MemoryReactorClock) -> None:
    hub, threads = slow_hub(tmp_path, clock, '[limits]\npassword_checks_burst = 2\n'
                                             'password_checks_global_burst = 5\n'
                                             'penalty_exempt = ["198.51.100.7"]\n')
    one_password_each_from(start_factory(hub), clock, "198.51.100.7", connections=8)
    # Past the per-source burst of 2, up to the hub's burst of 5.
    assert threads.checks == 5


def test_devices_refused_for_want_of_a_call_home_password_warn_once_a_minute(
        tmp_path: Path, clock: MemoryReactorClock) -> None:
    hub, _threads = slow_hub(tmp_path, clock)
    with sqlite3.connect(hub.config.db_path) as db:  # as if none had ever been set
        db.execute("DELETE FROM settings WHERE key = 'callhome_password'")
    factory = start_factory(hub)
    events: list[Any] = []
    globalLogPublisher.addObserver(events.append)
    try:
        for peer in ("198.51.100.7", "198.51.100.8", "198.51.100.9"):
            _, client, pump = connect_client(factory, clock, None, peer=peer)
            pipeline_passwords(client, 1)
            run(clock, pump, 5)
        clock.advance(60)
        _, client, pump = connect_client(factory, clock, None, peer="198.51.100.10")
        pipeline_passwords(client, 1)
        run(clock, pump, 5)
    finally:
        globalLogPublisher.removeObserver(events.append)
    warnings = [formatEvent(e) for e in events if e.get("log_level") == LogLevel.warn
                and "no Call Home Password" in (formatEvent(e) or "")]
    assert [w.split(":")[0] if w else w for w in warnings] == [
        "device login refused from 198.51.100.7", "device login refused from 198.51.100.10"]
    assert warnings[1].endswith("; 3 refused since the last warning")
