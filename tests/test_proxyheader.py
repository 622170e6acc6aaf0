"""The PROXY protocol header from a trusted load balancer, in memory: the device's
address is the peer for everything the hub decides before and after login; anyone
else's connection is SSH from its first byte."""

from __future__ import annotations

import ipaddress
import struct
from pathlib import Path
from typing import Any

import pytest
from memory_hub import make_hub, start_factory
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogEvent, formatEvent

from hub.access.proxyheader import HEADER_TIMEOUT, ProxyHeaderReader
from hub.access.server import HubServerTransport, HubSSHFactory
from hub.app.service import Options

BALANCER = "10.0.0.5"
CLIENT_VERSION = b"SSH-2.0-OpenSSH_9.2\r\n"
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v1(source: str = "203.0.113.7", port: int = 51000) -> bytes:
    return f"PROXY TCP4 {source} 192.0.2.1 {port} 22\r\n".encode()


def v2(source: str | None = "203.0.113.8", port: int = 52000) -> bytes:
    if source is None:  # LOCAL: the balancer's own connection (a health check)
        return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    addresses = (ipaddress.IPv4Address(source).packed + ipaddress.IPv4Address("192.0.2.1").packed
                 + struct.pack("!HH", port, 22))
    return V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(addresses)) + addresses


@pytest.fixture
def clock() -> MemoryReactorClock:
    return MemoryReactorClock()


@pytest.fixture
def factory(tmp_path: Path, clock: MemoryReactorClock) -> HubSSHFactory:
    (tmp_path / "callhomehub.toml").write_text(
        '[ssh]\nproxy_protocol_from = ["10.0.0.0/24"]\n'
        "[limits]\nper_source_unauthenticated = 1\n")
    return start_factory(make_hub(tmp_path, clock))


def accept(factory: HubSSHFactory, source: str = BALANCER) -> tuple[Any, StringTransport]:
    address = IPv4Address("TCP", source, 40000)
    protocol = factory.buildProtocol(address)
    tcp = StringTransport(peerAddress=address)
    if protocol is not None:
        protocol.makeConnection(tcp)
    return protocol, tcp


def test_the_device_address_in_the_header_is_the_peer_from_the_start(
        factory: HubSSHFactory) -> None:
    reader, tcp = accept(factory)
    assert isinstance(reader, ProxyHeaderReader) and tcp.value() == b""  # SSH waits
    header = v1()
    reader.dataReceived(header[:9])  # a header may come in pieces
    reader.dataReceived(header[9:] + CLIENT_VERSION)
    ssh = tcp.protocol
    assert isinstance(ssh, HubServerTransport)
    assert ssh.peer == "203.0.113.7" and tcp.getPeer() == IPv4Address("TCP", "203.0.113.7", 51000)
    assert tcp.value().startswith(b"SSH-2.0-")  # the hub's version line, after the header
    assert ssh.otherVersionString == CLIENT_VERSION.strip()  # the bytes after the header
    assert factory.awaiting_header == set() and ssh in factory.unauthenticated


def test_per_source_caps_count_the_devices_not_the_balancer(factory: HubSSHFactory) -> None:
    def through_balancer(header: bytes) -> Any:
        reader, tcp = accept(factory)
        reader.dataReceived(header + CLIENT_VERSION)  # not silent: the gate keeps it
        return tcp

    first = through_balancer(v2("203.0.113.8"))
    assert isinstance(first.protocol, HubServerTransport)
    assert first.protocol.peer == "203.0.113.8"
    # per_source_unauthenticated = 1: the same device again is refused...
    again = through_balancer(v2("203.0.113.8", 52001))
    assert again.disconnecting and getattr(again, "protocol", None) is None
    # ...and another device behind the same balancer is not.
    other = through_balancer(v1("198.51.100.20"))
    assert isinstance(other.protocol, HubServerTransport)


def test_a_local_header_stands_for_the_balancer_itself(factory: HubSSHFactory) -> None:
    reader, tcp = accept(factory)
    reader.dataReceived(v2(None) + CLIENT_VERSION)
    assert tcp.protocol.peer == BALANCER


def test_other_addresses_are_never_read_for_a_header(factory: HubSSHFactory) -> None:
    ssh, tcp = accept(factory, "198.51.100.99")
    assert isinstance(ssh, HubServerTransport) and ssh.peer == "198.51.100.99"
    assert tcp.value().startswith(b"SSH-2.0-")  # SSH from the first byte
    ssh.dataReceived(v1("192.0.2.66"))  # a header from anyone else is not believed
    assert ssh.peer == "198.51.100.99"


@pytest.mark.parametrize(("sent", "why"), [
    (CLIENT_VERSION, "it sent no PROXY protocol header (it began b'SSH-2.0-OpenSSH_9.2\\r\\n')"),
    (b"PROXY TCP4 nonsense here\r\n", "its PROXY protocol header is malformed"),
    (b"PROXY " + b"9" * 120, "its PROXY protocol header is malformed"),
])
def test_a_trusted_address_that_sends_no_valid_header_is_closed_with_one_line(
        factory: HubSSHFactory, logged: list[LogEvent], sent: bytes, why: str) -> None:
    reader, tcp = accept(factory)
    reader.dataReceived(sent)
    assert tcp.disconnecting and getattr(tcp, "protocol", None) is None
    assert [formatEvent(e) for e in logged if "PROXY" in formatEvent(e)] == [
        f"connection from {BALANCER} (trusted for the PROXY protocol) closed: {why}"]
    assert factory.awaiting_header == set()


def test_a_balancer_that_sends_nothing_is_closed_after_the_header_timeout(
        factory: HubSSHFactory, clock: MemoryReactorClock, logged: list[LogEvent]) -> None:
    reader, tcp = accept(factory)
    reader.dataReceived(v1()[:3])
    clock.advance(HEADER_TIMEOUT - 0.1)
    assert not tcp.disconnecting
    clock.advance(0.1)
    assert tcp.disconnecting and factory.awaiting_header == set()
    assert "no PROXY protocol header within 10 s" in formatEvent(logged[-1])


def test_connections_waiting_for_their_header_count_as_unauthenticated(
        tmp_path: Path, clock: MemoryReactorClock) -> None:
    (tmp_path / "callhomehub.toml").write_text(
        '[ssh]\nproxy_protocol_from = ["10.0.0.5"]\n[limits]\nmax_unauthenticated = 2\n')
    factory = start_factory(make_hub(tmp_path, clock))
    waiting = [accept(factory)[0] for _ in range(2)]
    assert all(isinstance(r, ProxyHeaderReader) for r in waiting)
    assert accept(factory)[0] is None
    assert accept(factory, "198.51.100.1")[0] is None  # the direct ones too
    assert factory.auth_failures["refused_preauth"] == 2


def test_the_trusted_balancers_are_checked_at_start(tmp_path: Path) -> None:
    (tmp_path / "callhomehub.toml").write_text('[ssh]\nproxy_protocol_from = ["10.0.0.300"]\n')
    with pytest.raises(SystemExit, match=r"\[ssh\] proxy_protocol_from: '10.0.0.300' is not "
                                         "an address or network"):
        Options().parseOptions(["--data", str(tmp_path)])


def test_the_balancers_own_health_checks_are_never_penalized(
        factory: HubSSHFactory, clock: MemoryReactorClock, logged: list[LogEvent]) -> None:
    """HAProxy's checks (`check-send-proxy`: a LOCAL header, the banner, close) come from
    the balancer itself every few seconds and never log in: like the hub's own host, the
    trusted balancer is neither capped per address nor penalized."""
    for _ in range(3 * factory.limits.penalty_points):
        reader, tcp = accept(factory)
        reader.dataReceived(v2(None))
        ssh = tcp.protocol
        assert isinstance(ssh, HubServerTransport) and ssh.peer == BALANCER
        ssh.connectionLost(None)  # gone after the banner, without a login
        clock.advance(2)
    assert not any(word in formatEvent(e) for e in logged for word in ("refusing", "penalized"))
