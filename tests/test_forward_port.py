"""`ForwardPort`: a forward's listening port accepts as Twisted's `Port` does (the
same protocol, address and transport for each connection, a refused one closed),
with a leaner accept, and hands any accept error but "no more" to Twisted's own."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet import address, protocol, tcp
from twisted.internet.testing import MemoryReactor

from hub.tunnel.accept import ForwardPort, listen_forward


class Factory(protocol.Factory):
    def __init__(self, refuse: bool = False) -> None:
        self.refuse = refuse
        self.addresses: list[Any] = []
        self.made: list[protocol.Protocol] = []

    def buildProtocol(self, addr: Any) -> protocol.Protocol | None:
        self.addresses.append(addr)
        if self.refuse:
            return None
        made = protocol.Protocol()
        self.made.append(made)
        return made


@pytest.fixture
def port() -> Iterator[tuple[ForwardPort, Factory]]:
    factory = Factory()
    listening = ForwardPort(0, factory, 50, "127.0.0.1", MemoryReactor())
    listening.startListening()
    yield listening, factory
    for made in factory.made:
        if made.transport is not None:
            made.transport.socket.close()
    listening.socket.close()


def connect(listening: ForwardPort) -> socket.socket:
    client = socket.create_connection(("127.0.0.1", listening.getHost().port), timeout=5)
    return client


def test_accepts_every_waiting_connection_as_twisted_does(
        port: tuple[ForwardPort, Factory]) -> None:
    listening, factory = port
    clients = [connect(listening) for _ in range(3)]
    listening.doRead()
    assert [a.port for a in factory.addresses] == [c.getsockname()[1] for c in clients]
    assert all(isinstance(a, address.IPv4Address) and a.host == "127.0.0.1"
               for a in factory.addresses)
    for made, client in zip(factory.made, clients, strict=True):
        assert isinstance(made.transport, tcp.Server)
        assert made.transport.getPeer().port == client.getsockname()[1]
        assert made.transport.socket.gettimeout() == 0.0  # non-blocking, as Twisted sets it
    assert [m.transport.sessionno for m in factory.made] == [0, 1, 2]  # type: ignore[union-attr]
    assert listening.numberAccepts == 3  # Twisted's scaling: what one wake-up took
    for client in clients:
        client.close()


def test_a_refused_connection_is_closed(port: tuple[ForwardPort, Factory]) -> None:
    listening, factory = port
    factory.refuse = True
    client = connect(listening)
    listening.doRead()
    assert len(factory.addresses) == 1 and not factory.made
    assert client.recv(10) == b""
    client.close()


class FailingOnce:
    """The listening socket, whose lean accept fails once with `code`."""

    def __init__(self, real: socket.socket, code: int) -> None:
        self.real = real
        self.code = code

    def _accept(self) -> Any:
        raise OSError(self.code, "simulated")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_other_accept_errors_go_to_twisted_s_own_accept(
        port: tuple[ForwardPort, Factory]) -> None:
    listening, factory = port
    client = connect(listening)
    real = listening.socket
    listening.socket = FailingOnce(real, errno.ECONNABORTED)  # type: ignore[assignment]
    try:
        listening.doRead()
    finally:
        listening.socket = real
    # Twisted's doRead took over: it accepted the waiting connection itself.
    assert [a.port for a in factory.addresses] == [client.getsockname()[1]]
    assert isinstance(factory.made[0].transport, tcp.Server)
    client.close()


def test_test_reactors_and_the_port_keeper_get_listen_tcp() -> None:
    reactor = MemoryReactor()
    factory = Factory()
    listen_forward(reactor, 24000, factory, "127.0.0.1")
    assert reactor.tcpServers[0][:2] == (24000, factory)
    assert reactor.tcpServers[0][3] == "127.0.0.1"


def test_log_prefix_is_twisted_s(port: tuple[ForwardPort, Factory]) -> None:
    listening, _factory = port
    assert listening.logPrefix() == tcp.Port.logPrefix(listening) == "test_forward_port.Factory"
    assert listening.logPrefix() == "test_forward_port.Factory"
