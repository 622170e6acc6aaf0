"""The SSH server's limits and keepalives, in memory with a MemoryReactorClock."""

from __future__ import annotations

import socket
import struct
from pathlib import Path
from typing import Any

import pytest
from memory_hub import connect_client, make_hub, new_key, start_factory
from twisted.conch.ssh import common
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from hub.app.context import Hub
from hub.tunnel.sessions import ONLINE_WRITE_DELAY


@pytest.fixture
def clock() -> MemoryReactorClock:
    return MemoryReactorClock()


@pytest.fixture
def hub(tmp_path: Path, clock: MemoryReactorClock) -> Hub:
    return make_hub(tmp_path, clock, keepalive="15", **{"keepalive-count": "3"})


def register(hub: Hub, name: str):
    key = new_key()
    hub.registry.register(name, key.public().blob(), "fp", "test")
    return key


def test_key_login_marks_node_online(hub: Hub, clock: MemoryReactorClock) -> None:
    key = register(hub, "site-a")
    factory = start_factory(hub)
    _server, client, _pump = connect_client(factory, clock, b"cms", key=key)
    assert client.factory_state.get("connected")
    assert not factory.unauthenticated
    # Written once no forward took the node over meanwhile (that write would say it).
    assert not hub.registry.node("site-a").online
    clock.advance(ONLINE_WRITE_DELAY)
    assert hub.registry.node("site-a").online
    assert hub.registry.node("site-a").peer == "192.0.2.10"


def test_login_timeout_is_120_seconds(hub: Hub, clock: MemoryReactorClock) -> None:
    factory = start_factory(hub)
    server, _client, pump = connect_client(factory, clock, None)
    assert server.isEncrypted("both") and server in factory.unauthenticated
    clock.advance(119)
    pump.flush()
    assert not server.transport.disconnecting
    clock.advance(1.5)
    pump.flush()
    assert server.transport.disconnecting


def test_unauthenticated_connections_are_bounded(tmp_path: Path,
                                                 clock: MemoryReactorClock) -> None:
    (tmp_path / "callhomehub.toml").write_text("[limits]\nmax_unauthenticated = 2\n")
    hub = make_hub(tmp_path, clock)
    factory = start_factory(hub)
    connect_client(factory, clock, None)
    second, _, _ = connect_client(factory, clock, None)
    assert factory.buildProtocol(IPv4Address("TCP", "192.0.2.99", 1)) is None
    second.transport.loseConnection()
    second.connectionLost(None)
    assert factory.buildProtocol(IPv4Address("TCP", "192.0.2.99", 1)) is not None


def test_answered_keepalives_keep_the_tunnel(hub: Hub, clock: MemoryReactorClock) -> None:
    key = register(hub, "site-a")
    server, _client, pump = connect_client(start_factory(hub), clock, b"cms", key=key)
    for _ in range(10):
        clock.advance(15)
        pump.flush()
    assert not server.transport.disconnecting
    assert hub.registry.node("site-a").online


def test_silent_peer_is_dropped_after_keepalive_count(hub: Hub,
                                                      clock: MemoryReactorClock) -> None:
    key = register(hub, "site-a")
    server, _client, _pump = connect_client(start_factory(hub), clock, b"cms", key=key)
    # The peer vanishes: nothing it would answer is delivered any more.
    for _ in range(3):
        clock.advance(15)
    assert not server.transport.disconnecting
    clock.advance(15)
    assert server.transport.disconnecting


def test_password_backoff_per_source_spares_keys(hub: Hub, clock: MemoryReactorClock) -> None:
    factory = start_factory(hub)
    connect_client(factory, clock, b"cms", password=b"wrong", peer="198.51.100.1")
    assert factory.backoff.delay("198.51.100.1") == 1.0
    _, _, pump = connect_client(factory, clock, b"cms", password=b"wrong", peer="198.51.100.1")
    # The second guess waits out the first back-off before it is even checked.
    assert factory.backoff.delay("198.51.100.1") == 1.0
    clock.advance(1.1)
    for _ in range(5):
        pump.pump()
    assert factory.backoff.delay("198.51.100.1") == 2.0
    assert factory.backoff.delay("203.0.113.5") == 0.0
    # A device with a key behind the same address logs in at once.
    key = register(hub, "site-b")
    _, client, _ = connect_client(factory, clock, b"cms", key=key, peer="198.51.100.1")
    assert client.factory_state.get("connected")
    # The right password from that address waits for the back-off first.
    _, client, pump = connect_client(factory, clock, b"cms", password=b"secret",
                                     peer="198.51.100.1")
    assert not client.factory_state.get("connected")
    clock.advance(factory.backoff.delay("198.51.100.1") + 0.1)
    for _ in range(10):
        pump.pump()
    assert client.factory_state.get("connected")


def test_revoked_node_cannot_log_in_and_is_dropped(hub: Hub, clock: MemoryReactorClock) -> None:
    key = register(hub, "site-a")
    factory = start_factory(hub)
    server, client, _pump = connect_client(factory, clock, b"cms", key=key)
    assert client.factory_state.get("connected")
    cli = type(hub.registry)(hub.config.db_path, now=clock.seconds)
    cli.set_state("site-a", "revoked", "cli:test")
    hub.sync()
    assert server.transport.disconnecting
    assert not hub.registry.node("site-a").online
    _, again, _ = connect_client(factory, clock, b"cms", key=key)
    assert not again.factory_state.get("connected")


def forward(client: Any, pump: Any) -> None:
    """Ask for `-R 0:...` on the client's connection."""
    client.service.sendGlobalRequest(b"tcpip-forward", common.NS(b"") + struct.pack(">L", 0),
                                     wantReply=1)
    for _ in range(10):
        pump.pump()


def test_reconnect_takes_over_once_it_forwards(hub: Hub, clock: MemoryReactorClock) -> None:
    key = register(hub, "site-a")
    factory = start_factory(hub)
    old, old_client, old_pump = connect_client(factory, clock, b"cms", key=key,
                                               peer="192.0.2.1")
    forward(old_client, old_pump)
    new, client, pump = connect_client(factory, clock, b"cms", key=key, peer="192.0.2.2")
    # Logging in takes nothing over (a re-register, a check) ...
    assert not old.transport.disconnecting
    assert hub.registry.node("site-a").peer == "192.0.2.1"
    # ... the first forward request does.
    forward(client, pump)
    assert old.transport.disconnecting and not new.transport.disconnecting
    assert hub.registry.node("site-a").peer == "192.0.2.2"
    old.connectionLost(None)  # the old one's logout must not mark the node offline
    assert hub.registry.node("site-a").online


@pytest.mark.parametrize(("code", "level", "line"), [
    (11, LogLevel.info, "192.0.2.10 disconnected: disconnected by user (by application)"),
    (2, LogLevel.warn, "192.0.2.10 disconnected: disconnected by user (protocol error)")])
def test_a_client_that_leaves_is_one_line_at_the_level_it_deserves(
        hub: Hub, clock: MemoryReactorClock, code: int, level: LogLevel, line: str) -> None:
    key = register(hub, "site-a")
    _server, client, pump = connect_client(start_factory(hub), clock, b"cms", key=key)
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        client.sendDisconnect(code, b"disconnected by user")
        pump.flush()
    finally:
        globalLogPublisher.removeObserver(events.append)
    hubs = [e for e in events if e.get("log_namespace", "").startswith("hub.")
            or "HubServerTransport" in e.get("log_namespace", "")]
    assert [(e["log_level"], formatEvent(e)) for e in hubs
            if "disconnected" in formatEvent(e)] == [(level, line)]
    assert not [e for e in hubs if e["log_level"] >= LogLevel.error]


def test_clients_hear_why_when_the_hub_stops(hub: Hub, clock: MemoryReactorClock) -> None:
    factory = start_factory(hub)
    key = register(hub, "site-a")
    _server, client, pump = connect_client(factory, clock, b"cms", key=key)
    heard: list[tuple[int, bytes]] = []
    client.receiveError = lambda code, why: heard.append((code, why))  # type: ignore[method-assign]
    stopped = factory.disconnect_all("the hub is shutting down", grace=2.0)
    pump.flush()
    assert heard == [(11, b"the hub is shutting down")]
    assert stopped.called and not factory.connections
    # A client that never reads its disconnect does not hold the stop up for long.
    _server2, _client2, _pump2 = connect_client(factory, clock, b"cms", key=key)
    stalled = factory.disconnect_all("the hub is shutting down", grace=2.0)
    assert not stalled.called
    clock.advance(2)
    assert stalled.called


class CountingSocket:
    """The server's end of a socket pair, counting its sends."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.sends = sock, 0

    def send(self, data: Any) -> int:
        self.sends += 1
        return self.sock.send(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


def test_what_one_read_brings_before_login_is_answered_with_one_send(
        hub: Hub, clock: MemoryReactorClock) -> None:
    """Before login nothing relays through a connection: the packets the hub
    answers one read with (the key exchange's reply and NEWKEYS; EXT_INFO and
    SERVICE_ACCEPT) go out together, one send per read answered."""
    from memory_hub import ClientTransport
    from twisted.internet import tcp
    from twisted.internet.testing import StringTransport

    key = register(hub, "site-a")
    factory = start_factory(hub)
    with socket.create_server(("127.0.0.1", 0)) as listening:
        theirs = socket.create_connection(listening.getsockname())
        ours, _ = listening.accept()
    ours.setblocking(False)
    theirs.setblocking(False)
    server = factory.buildProtocol(IPv4Address("TCP", "192.0.2.10", 40000))
    conn = tcp.Connection(ours, server, clock)
    conn.connected = True
    counting = CountingSocket(ours)
    conn.socket = counting  # type: ignore[assignment]
    conn.getPeer = lambda: IPv4Address("TCP", "192.0.2.10", 40000)  # type: ignore[method-assign]
    conn.getHost = lambda: IPv4Address("TCP", "127.0.0.1", 22)  # type: ignore[method-assign]
    client = ClientTransport(b"cms", key, None)
    to_server = StringTransport()
    client.makeConnection(to_server)
    server.makeConnection(conn)
    conn.doWrite()  # the version line and KEXINIT, queued by Conch's connectionMade
    reads = sends = 0
    for _ in range(50):
        if server.authenticated:
            break
        data = to_server.value()
        to_server.clear()
        if data:
            before = counting.sends
            server.dataReceived(data)
            reads += 1
            sends += counting.sends - before > 0
            assert counting.sends - before <= 1
        try:
            client.dataReceived(theirs.recv(65536))
        except BlockingIOError:
            pass
    assert server.authenticated and client.factory_state.get("connected")
    assert reads >= 4 and sends >= 3
    # A connection dropped at once while packets are gathered: they go out first.
    before = counting.sends
    assert server.beginBatch()
    server.disconnectNow(3, b"gone")
    server.endBatch()
    assert counting.sends == before + 1


def test_a_key_probed_then_signed_is_named_once(hub: Hub, clock: MemoryReactorClock,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The client offers its key, then signs with it: the key's text for the log
    line (its SHA-256 fingerprint) is worked out once per connection."""
    from hub.access import authlog

    texts: list[bytes] = []
    real = authlog.key_text

    def counted(algorithm: bytes, blob: bytes) -> str:
        texts.append(blob)
        return real(algorithm, blob)

    monkeypatch.setattr(authlog, "key_text", counted)
    key = register(hub, "site-a")
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        _server, client, _pump = connect_client(start_factory(hub), clock, b"cms", key=key)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert client.factory_state.get("connected")
    assert texts == [key.public().blob()]
    [accepted] = [formatEvent(e) for e in events if formatEvent(e).startswith("Accepted")]
    assert accepted.endswith(real(b"ssh-ed25519", key.public().blob()))
