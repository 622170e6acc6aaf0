from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from test_nsca_codec import IV, PASSWORD, T0, Encryptor, build_packet
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogEvent, formatEvent
from zope.interface import implementer

from hub.intake.backlog import Backlog
from hub.intake.commandfile import CommandFileWriter
from hub.intake.monitoring import STORE_INTERVAL, Monitoring, NSCAChannel, status
from hub.intake.nsca import PACKET_SIZE, CheckResult
from hub.intake.settings import NSCASettings
from hub.ssh.iogroup import InputRound
from hub.ssh.sink import IPacketSink
from hub.store.registry import Registry


def test_results_of_one_turn_are_stored_together_with_bounded_history(registry_at: str) -> None:
    clock = MemoryReactorClock()
    registry = Registry(registry_at, now=clock.seconds)
    monitoring = Monitoring(registry, NSCASettings(history=2, strict_host=True), clock)
    registry.register("site-a", b"key-a", "fp-a", "test")
    registry.set_state("site-a", "approved", "test")
    for i in range(5):
        monitoring.deliver("site-a", CheckResult("site-a", "load", i % 3, f"run {i}", 100 + i))
    monitoring.deliver("site-a", CheckResult("spoof", "load", 2, "fake", 100))
    assert status(registry) == []  # not yet: stored at the end of the reactor turn
    clock.advance(STORE_INTERVAL)
    [latest] = status(registry)
    assert (latest.node, latest.host, latest.output, latest.code) == ("site-a", "site-a",
                                                                     "run 4", 1)
    kept = registry.query("SELECT output FROM results ORDER BY id")
    assert kept == [("run 3",), ("run 4",)]
    monitoring.deliver("", CheckResult("lab", "", 0, "up", 200))
    monitoring.flush()  # as at shutdown
    assert [(s.node, s.host, s.service) for s in status(registry)] == [
        ("", "lab", ""), ("site-a", "site-a", "load")]
    assert status(registry, "SITE-A")[0].host == "site-a"
    clock.advance(STORE_INTERVAL)  # the cancelled flush does nothing more
    assert len(registry.query("SELECT id FROM results")) == 3


def _monitoring(tmp_path: Path, **settings: object
                ) -> tuple[Monitoring, Registry, MemoryReactorClock]:
    clock = MemoryReactorClock()
    registry = Registry(str(tmp_path / "hub.sqlite3"), now=clock.seconds)
    return Monitoring(registry, NSCASettings(**settings), clock), registry, clock  # type: ignore[arg-type]


def test_results_from_a_pending_node_are_dropped_and_logged_once_a_minute(
        tmp_path: Path, logged: list[LogEvent]) -> None:
    monitoring, registry, clock = _monitoring(tmp_path, strict_host=False)
    registry.register("site-p", b"pending-key", "fp-p", "test")  # not approved
    for i in range(50):
        monitoring.deliver("site-p", CheckResult("prod-1", "load", 2, f"CRITICAL {i}", 100))
        clock.advance(1)
    assert status(registry) == []
    drops = [formatEvent(e) for e in logged if "not approved" in formatEvent(e)]
    assert len(drops) == 1 and "site-p" in drops[0]
    clock.advance(60)
    monitoring.deliver("site-p", CheckResult("prod-1", "load", 2, "again", 100))
    clock.advance(STORE_INTERVAL)
    drops = [formatEvent(e) for e in logged if "not approved" in formatEvent(e)]
    assert len(drops) == 2 and "49 more" in drops[1]
    registry.register("gone", b"gone-key", "fp-g", "test")
    registry.set_state("gone", "approved", "test")
    registry.set_state("site-p", "approved", "test")
    monitoring.deliver("site-p", CheckResult("site-p", "load", 0, "OK", 100))
    monitoring.deliver("nobody", CheckResult("nobody", "load", 0, "OK", 100))  # not a node
    clock.advance(STORE_INTERVAL)
    assert [(s.node, s.output) for s in status(registry)] == [("site-p", "OK")]


def test_strict_host_is_the_default_and_allows_the_mapped_hosts(
        tmp_path: Path, logged: list[LogEvent]) -> None:
    assert NSCASettings().strict_host
    monitoring, registry, clock = _monitoring(
        tmp_path, hosts={"Site-A": ["prod-1", "db-*"]})
    for name in ("site-a", "site-b"):
        registry.register(name, name.encode(), "fp", "test")
        registry.set_state(name, "approved", "test")
    for host in ("site-a", "PROD-1", "db-7", "prod-2"):
        monitoring.deliver("site-a", CheckResult(host, "load", 0, "OK", 100))
    for _ in range(20):
        monitoring.deliver("site-b", CheckResult("prod-1", "load", 2, "forged", 100))
    # The --nsca TCP listener has no node: strict mode does not apply to it.
    monitoring.deliver("", CheckResult("anything", "load", 0, "tcp", 100))
    clock.advance(STORE_INTERVAL)
    assert sorted((s.node, s.host) for s in status(registry)) == [
        ("", "anything"), ("site-a", "PROD-1"), ("site-a", "db-7"), ("site-a", "site-a")]
    drops = [formatEvent(e) for e in logged if "strict_host" in formatEvent(e)]
    assert len(drops) == 2  # one per node and minute, not one per result
    assert any("site-b" in d and "prod-1" in d for d in drops)


@pytest.mark.parametrize(("hosts", "message"), [
    ({"bad name!": ["x"]}, "hosts: 'bad name!' is not a valid node name"),
    ({"site-a": "prod-1"}, "hosts: site-a: expected a list of host names"),
    ({"site-a": ["ok", ""]}, "hosts: site-a: expected a list of host names"),
    ({"site-a": [3]}, "hosts: site-a: expected a list of host names"),
])
def test_host_mapping_is_validated(hosts: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        NSCASettings(hosts=hosts)  # type: ignore[arg-type]


def test_a_turns_results_go_to_the_command_file_in_a_few_writes_in_order(
        tmp_path: Path) -> None:
    clock = MemoryReactorClock()
    registry = Registry(str(tmp_path / "hub.sqlite3"), now=clock.seconds)
    (tmp_path / "cmd").touch()
    command_file = CommandFileWriter(str(tmp_path / "cmd"), clock)
    monitoring = Monitoring(registry, NSCASettings(), clock, command_file)
    clock.advance(1000)
    for i in range(100):
        monitoring.deliver("", CheckResult("lab", f"svc{i}", i % 4, f"run {i}", 990))
    clock.advance(STORE_INTERVAL)
    lines = (tmp_path / "cmd").read_text().splitlines()
    assert lines == [f"[1000] PROCESS_SERVICE_CHECK_RESULT;lab;svc{i};{i % 4};run {i}"
                     for i in range(100)]
    assert command_file.writes <= 2  # 100 lines of ~50 bytes: not a write a line


class HeldCalls:
    """A registry thread that is slow: each call runs when the test says so."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.held: list[tuple[defer.Deferred[object], Callable[[], object]]] = []

    def call(self, fn: Callable[..., object], *args: object, **kwargs: object
             ) -> defer.Deferred[object]:
        d: defer.Deferred[object] = defer.Deferred()
        self.held.append((d, lambda: fn(self.registry, *args, **kwargs)))
        return d

    def run_next(self) -> None:
        d, job = self.held.pop(0)
        d.callback(job())


def test_results_wait_while_a_batch_is_stored_then_go_in_one_transaction_in_order(
        tmp_path: Path) -> None:
    clock = MemoryReactorClock()
    registry = Registry(str(tmp_path / "hub.sqlite3"), now=clock.seconds)
    calls = HeldCalls(registry)
    monitoring = Monitoring(registry, NSCASettings(history=10), clock,
                            calls=calls)  # type: ignore[arg-type]
    for i in range(3):
        monitoring.deliver("", CheckResult("lab", "load", 0, f"run {i}", 100))
    clock.advance(STORE_INTERVAL)
    assert len(calls.held) == 1
    for turn in range(3):  # three more turns while the registry is busy
        for i in range(2):
            monitoring.deliver("", CheckResult("lab", "load", 0, f"turn {turn}.{i}", 100))
        clock.advance(STORE_INTERVAL)
    assert len(calls.held) == 1  # still one store in flight, nothing queued behind it
    calls.run_next()
    clock.advance(STORE_INTERVAL)
    assert len(calls.held) == 1  # the six results of three turns: one transaction
    calls.run_next()
    clock.advance(STORE_INTERVAL)
    assert calls.held == []
    assert registry.query("SELECT output FROM results ORDER BY id") == [
        (f"run {i}",) for i in range(3)] + [
        (f"turn {t}.{i}",) for t in range(3) for i in range(2)]
    assert monitoring.counts.accepted == 9
    monitoring.deliver("", CheckResult("lab", "load", 0, "at shutdown", 100))
    monitoring.flush()  # at shutdown: stored at once whatever is in flight
    calls.run_next()
    assert registry.query("SELECT COUNT(*) FROM results") == [(10,)]


def _held_intake(tmp_path: Path, limit: int) -> tuple[Monitoring, HeldCalls, MemoryReactorClock]:
    """An intake whose registry stores only when told (`HeldCalls.run_next`), with
    a backlog of `limit` results; its node `site-a` is approved."""
    clock = MemoryReactorClock()
    clock.advance(T0)
    registry = Registry(str(tmp_path / "hub.sqlite3"), now=clock.seconds)
    registry.register("site-a", b"key-a", "fp-a", "test")
    registry.set_state("site-a", "approved", "test")
    calls = HeldCalls(registry)
    monitoring = Monitoring(registry, NSCASettings(password=PASSWORD), clock,
                            calls=calls, backlog=Backlog(limit))  # type: ignore[arg-type]
    return monitoring, calls, clock


def _results(n: int, iv: bytes = IV) -> bytes:
    packets = [build_packet(b"site-a", b"svc%d" % i, 0, b"OK") for i in range(n)]
    encrypt = Encryptor(1, PASSWORD.encode(), iv).encrypt
    return b"".join(encrypt(p) for p in packets)


def test_a_tcp_sender_is_not_read_while_the_backlog_is_full(tmp_path: Path) -> None:
    monitoring, calls, clock = _held_intake(tmp_path, limit=3)
    factory = monitoring.tcp_factory()
    factory.iv_source = lambda n: IV[:n]
    proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4242))
    assert proto is not None
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(_results(5))
    assert transport.producerState == "paused"
    clock.advance(60)  # longer than read_timeout: paused, the client is not timed out
    assert not transport.disconnecting
    calls.run_next()  # the 5 results stored: the backlog is empty again
    assert transport.producerState == "producing"
    assert monitoring.backlog.size == 0
    clock.advance(31)  # reading again: the deadline runs again
    assert transport.disconnecting
    assert len(monitoring.registry.query("SELECT id FROM results")) == 5


class WindowLog:
    """A connection that records the window its channel grants and what it sends."""

    def __init__(self) -> None:
        self.granted: list[int] = []
        self.sent = b""
        self.close_sent = False
        self.transport = StringTransport()

    def adjustWindow(self, channel: object, n: int) -> None:
        self.granted.append(n)

    def sendData(self, channel: object, data: bytes) -> None:
        self.sent += data

    def sendClose(self, channel: object) -> None:
        self.close_sent = True


def test_an_in_tunnel_sender_gets_no_window_while_the_backlog_is_full(tmp_path: Path) -> None:
    monitoring, calls, clock = _held_intake(tmp_path, limit=3)
    size = 2 * PACKET_SIZE  # a quarter window (the grant step) is half a packet
    channel = NSCAChannel(monitoring, "site-a", "site-a", localWindow=4 * size,
                          remoteWindow=1 << 20, remoteMaxPacket=32768)
    channel.conn = conn = WindowLog()
    channel.channelOpen(b"")
    data = _results(5, iv=conn.sent[:128])  # the IV of the init packet
    channel.dataReceived(data[: 2 * PACKET_SIZE])
    assert conn.granted == [2 * PACKET_SIZE]  # taken, backlog not full: window back
    channel.dataReceived(data[2 * PACKET_SIZE :])
    assert conn.granted == [2 * PACKET_SIZE]  # backlog full: held
    clock.advance(STORE_INTERVAL)
    assert conn.granted == [2 * PACKET_SIZE]
    calls.run_next()
    assert conn.granted == [2 * PACKET_SIZE, 3 * PACKET_SIZE]
    assert len(monitoring.registry.query("SELECT id FROM results")) == 5


@implementer(IPacketSink)
class ReadingTransport(StringTransport):
    """An SSH transport in the middle of a read: what is to run once the read is
    dispatched (`callAfterInput`) runs at `end_read`, as the hub's transport does."""

    def __init__(self) -> None:
        super().__init__()
        self.round = InputRound()
        self.round.depth = 1

    def callAfterInput(self, action: Callable[[], object]) -> bool:
        return self.round.defer(action)

    def end_read(self) -> None:
        self.round.depth = 0
        self.round.run()


def test_the_results_of_one_read_go_to_the_intake_together_at_its_end(
        tmp_path: Path) -> None:
    monitoring, calls, clock = _held_intake(tmp_path, limit=100)
    channel = NSCAChannel(monitoring, "site-a", "site-a", localWindow=8 * PACKET_SIZE,
                          remoteWindow=1 << 20, remoteMaxPacket=32768)
    channel.conn = conn = WindowLog()
    conn.transport = reading = ReadingTransport()
    channel.channelOpen(b"")
    data = _results(5, iv=conn.sent[:128])
    packet = bytearray(PACKET_SIZE)  # the transport's packet buffer, reused
    for i in range(3):  # one read of three packets
        packet[:] = data[i * PACKET_SIZE:(i + 1) * PACKET_SIZE]
        with memoryview(packet) as view:
            channel.dataReceived(view)
        packet[:] = bytes(PACKET_SIZE)  # a view is valid during the call only
    assert monitoring.backlog.size == 0 and conn.granted == []
    reading.end_read()
    assert monitoring.backlog.size == 3
    assert conn.granted == [3 * PACKET_SIZE]  # a quarter window or more: granted
    # Two more in the next read, then EOF in the same read: EOF waits for them.
    reading.round.depth = 1
    channel.dataReceived(data[3 * PACKET_SIZE:4 * PACKET_SIZE])
    channel.dataReceived(data[4 * PACKET_SIZE:])
    channel.eofReceived()
    assert monitoring.backlog.size == 5 and conn.close_sent
    reading.end_read()
    clock.advance(STORE_INTERVAL)
    calls.run_next()
    assert sorted(s.service for s in status(monitoring.registry)) == [
        f"svc{i}" for i in range(5)]


def test_a_large_batch_keeps_every_checks_history_bounded(registry_at: str) -> None:
    clock = MemoryReactorClock()
    registry = Registry(registry_at, now=clock.seconds)
    monitoring = Monitoring(registry, NSCASettings(history=2), clock)
    checks = 300  # more than the largest statement takes: several statements
    for turn in range(3):
        for i in range(checks):
            monitoring.deliver("", CheckResult("lab", f"svc{i}", 0, f"turn {turn}", 100))
        clock.advance(STORE_INTERVAL)
    kept = registry.query("SELECT service, output FROM results ORDER BY id")
    assert len(kept) == 2 * checks
    assert {output for _, output in kept} == {"turn 1", "turn 2"}
    assert len(status(registry)) == checks
