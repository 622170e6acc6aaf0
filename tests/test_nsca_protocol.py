"""The NSCA protocol adapter: over StringTransport with a MemoryReactorClock, and once on a real
reactor with the real send_nsca."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from test_nsca_codec import IV, PASSWORD, RECORDS, SEND_NSCA, T0, build_packet, stream
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import LogEvent, formatEvent

from hub.intake.nsca import CheckResult, make_init_packet
from hub.intake.protocol import NSCAServerFactory, NSCAServerProtocol
from hub.intake.settings import NSCASettings
from hub.tunnel.descriptors import DescriptorReserve

GOOD = build_packet(b"web1", b"HTTP", 0, b"OK")
RESULT = CheckResult("web1", "HTTP", 0, "OK", T0)




def connect(
    method: int = 1, deliver: object = None, read_timeout: float = 30.0
) -> tuple[NSCAServerProtocol, StringTransport, MemoryReactorClock, list[CheckResult]]:
    clock = MemoryReactorClock()
    clock.advance(T0)
    results: list[CheckResult] = []
    settings = NSCASettings(encryption=method, password=PASSWORD, read_timeout=read_timeout)
    factory = NSCAServerFactory(settings, deliver or results.append, clock,
                                iv_source=lambda n: IV[:n])
    proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4242))
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport, clock, results


def messages(events: list[LogEvent]) -> str:
    return "\n".join(formatEvent(e) for e in events)


def test_sends_init_packet_with_injected_iv_and_clock() -> None:
    _proto, transport, _clock, _results = connect()
    assert transport.value() == make_init_packet(IV, T0)


@pytest.mark.parametrize("method", [0, 1, 3, 14])
def test_delivers_results_from_split_data(method: int) -> None:
    proto, transport, _clock, results = connect(method)
    data = stream(method, [GOOD, GOOD])
    for i in range(0, len(data), 1000):
        proto.dataReceived(data[i : i + 1000])
    assert results == [RESULT, RESULT]
    assert not transport.disconnecting


def test_bad_packet_is_logged_and_closes_only_this_connection(logged: list[LogEvent]) -> None:
    proto, transport, _clock, results = connect(1)
    other, other_transport, _c, other_results = connect(1)
    bad = build_packet(b"web1", b"HTTP", 0, b"OK", crc=7)
    proto.dataReceived(stream(1, [GOOD, bad, GOOD]))
    assert results == [RESULT]  # the good packet before the bad one is kept
    assert transport.disconnecting
    (event,) = [e for e in logged if "rejected" in e.get("log_format", "")]
    assert event["peer"] == "127.0.0.1:4242" and "CRC" in event["reason"]
    other.dataReceived(stream(1, [GOOD]))
    assert other_results == [RESULT] and not other_transport.disconnecting
    proto.dataReceived(stream(1, [GOOD]))  # late bytes after the close are ignored
    assert results == [RESULT]


def test_stale_packet_is_rejected_by_the_injected_clock(logged: list[LogEvent]) -> None:
    proto, transport, clock, results = connect(0, read_timeout=60)
    clock.advance(31)
    proto.dataReceived(GOOD)
    assert results == [] and transport.disconnecting
    assert "stale" in messages(logged)


def test_stalled_client_times_out(logged: list[LogEvent]) -> None:
    proto, transport, clock, results = connect(0, read_timeout=30)
    proto.dataReceived(GOOD[:100])
    clock.advance(20)
    proto.dataReceived(GOOD[100:200])  # data in the middle of a packet: same deadline
    clock.advance(9)
    assert not transport.disconnecting
    clock.advance(1)
    assert transport.disconnecting
    assert "not complete within 30 s" in messages(logged) and "200 bytes" in messages(logged)
    assert clock.getDelayedCalls() == []
    assert results == []


def test_connection_lost_cancels_the_timer(logged: list[LogEvent]) -> None:
    proto, _transport, clock, _results = connect(0)
    proto.dataReceived(GOOD[:10])
    proto.connectionLost(None)
    assert clock.getDelayedCalls() == []
    assert "mid-packet (10 bytes" in messages(logged)


def test_failing_deliver_does_not_lose_the_other_results(logged: list[LogEvent]) -> None:
    seen: list[CheckResult] = []

    def deliver(result: CheckResult) -> None:
        seen.append(result)
        if len(seen) == 1:
            raise RuntimeError("store is full")

    proto, transport, _clock, _results = connect(0, deliver=deliver)
    proto.dataReceived(GOOD + GOOD)
    assert seen == [RESULT, RESULT] and not transport.disconnecting
    assert any(e.get("log_failure") for e in logged)


def test_settings_refuse_unsupported_method() -> None:
    with pytest.raises(ValueError, match="method 8"):
        NSCASettings(encryption=8)
    with pytest.raises(ValueError):
        NSCASettings(max_age=-1)


@pytest.mark.e2e
@pytest.mark.skipif(SEND_NSCA is None, reason="send_nsca (nsca-client) is not installed")
@pytest_twisted.inlineCallbacks
def test_real_send_nsca_to_real_listener(tmp_path: Path) -> Iterator[defer.Deferred[object]]:
    from twisted.internet import reactor

    results: list[CheckResult] = []
    all_in: defer.Deferred[None] = defer.Deferred()

    def deliver(result: CheckResult) -> None:
        results.append(result)
        if len(results) == 3:
            all_in.callback(None)

    factory = NSCAServerFactory(NSCASettings(encryption=14, password=PASSWORD), deliver, reactor)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        cfg = tmp_path / "send_nsca.cfg"
        cfg.write_text(f"password={PASSWORD}\nencryption_method=14\n")
        records = tmp_path / "records"
        records.write_bytes(RECORDS)
        # getProcessOutputAndValue has no stdin; a shell redirect provides it.
        out, err, code = yield getProcessOutputAndValue(
            "/bin/sh",
            ["-c", 'exec "$0" -H 127.0.0.1 -p "$1" -c "$2" < "$3"', SEND_NSCA or "",
             str(port.getHost().port), str(cfg), str(records)],
            env=dict(os.environ),
        )
        assert code == 0, (out, err)
        assert b"3 data packet(s) sent to host successfully" in out
        yield all_in.addTimeout(10, reactor)
    finally:
        yield port.stopListening()
    assert [(r.host, r.service, r.code, r.output) for r in results] == [
        ("web1", "HTTP", 0, "OK - 200 in 0.1 s"),
        ("web1", "", 1, "host warn"),
        ("db", "disk /", 2, "line1\nline2 C:\\path;semi"),
    ]


def test_trickling_client_is_closed_within_the_timeout_of_its_first_byte(
        logged: list[LogEvent]) -> None:
    # 2 bytes, then 1 byte every 20 s: every byte used to restart the 30 s timer.
    proto, transport, clock, results = connect(0, read_timeout=30)
    proto.dataReceived(GOOD[:2])
    for i in range(2, 4):
        clock.advance(20)
        if transport.disconnecting:
            break
        proto.dataReceived(GOOD[i:i + 1])
    assert transport.disconnecting and results == []
    assert clock.seconds() - T0 <= 40  # 30 s after the first byte, at the 20 s tick after
    assert "not complete within 30 s of its first byte" in messages(logged)
    assert clock.getDelayedCalls() == []


def test_each_packet_gets_the_timeout_from_its_own_first_byte() -> None:
    proto, transport, clock, results = connect(0, read_timeout=30)
    clock.advance(5)  # idle after the init packet: allowed up to the timeout
    proto.dataReceived(GOOD[:10])
    clock.advance(20)
    proto.dataReceived(GOOD[10:] + GOOD[:10])  # completes one packet, starts the next
    assert results == [RESULT]
    clock.advance(20)
    proto.dataReceived(GOOD[10:20])  # more of it does not move its deadline
    clock.advance(9)
    assert not transport.disconnecting
    clock.advance(1)  # the second packet started 30 s ago
    assert transport.disconnecting


def test_silent_client_is_closed_after_the_timeout_from_the_connection_start(
        logged: list[LogEvent]) -> None:
    _proto, transport, clock, _results = connect(0, read_timeout=30)
    clock.advance(29.9)
    assert not transport.disconnecting
    clock.advance(0.1)
    assert transport.disconnecting and "nothing received for 30 s" in messages(logged)


def test_listener_caps_connections_globally_and_per_source(logged: list[LogEvent]) -> None:
    clock = MemoryReactorClock()
    settings = NSCASettings(max_connections=4, max_connections_per_source=2)
    factory = NSCAServerFactory(settings, lambda r: None, clock, iv_source=lambda n: IV[:n])

    def open_from(host: str, port: int) -> NSCAServerProtocol | None:
        proto = factory.buildProtocol(IPv4Address("TCP", host, port))
        if proto is not None:
            proto.makeConnection(StringTransport())
        return proto

    a1, a2 = open_from("127.0.0.2", 1), open_from("127.0.0.2", 2)
    assert a1 is not None and a2 is not None
    assert open_from("127.0.0.2", 3) is None  # per source
    b1, b2 = open_from("127.0.0.3", 1), open_from("127.0.0.3", 2)
    assert b1 is not None and b2 is not None
    assert open_from("127.0.0.4", 1) is None  # global
    for port in range(4, 50):
        assert open_from("127.0.0.2", port) is None
    refusals = [e for e in logged if "refusing NSCA" in e.get("log_format", "")]
    assert len(refusals) == 1  # one line, not one per refused connection
    a1.connectionLost(None)
    assert open_from("127.0.0.4", 2) is not None  # a closed connection frees its slot
    clock.advance(60)
    assert open_from("127.0.0.2", 99) is None
    refusals = [formatEvent(e) for e in logged if "refusing NSCA" in e.get("log_format", "")]
    assert len(refusals) == 2 and "47 more refused" in refusals[1]


def test_listener_gives_way_to_the_descriptors_kept_for_ssh_logins() -> None:
    clock = MemoryReactorClock()
    in_use = [100]
    reserve = DescriptorReserve(clock, reserve=50, limit=lambda: 200, count=lambda: in_use[0])
    factory = NSCAServerFactory(NSCASettings(), lambda r: None, clock,
                                iv_source=lambda n: IV[:n], descriptors=reserve)
    assert factory.buildProtocol(IPv4Address("TCP", "127.0.0.2", 1)) is not None
    in_use[0] = 160  # fewer than 50 left free
    clock.advance(1)
    assert factory.buildProtocol(IPv4Address("TCP", "127.0.0.2", 2)) is None
    in_use[0] = 100
    clock.advance(1)
    assert factory.buildProtocol(IPv4Address("TCP", "127.0.0.2", 3)) is not None
