"""The seams between channels and transport (hub.ssh.sink) and the per-factory
IOGroup (hub.ssh.iogroup), in memory: Conch transports joined with iosim."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from twisted.conch.ssh import factory, transport
from twisted.conch.ssh.channel import SSHChannel
from twisted.conch.ssh.connection import SSHConnection
from twisted.internet import defer, protocol, tcp
from twisted.internet.testing import MemoryReactor, MemoryReactorClock
from twisted.test import iosim
from zope.interface.verify import verifyObject

from hub.access.server import HubSSHFactory
from hub.app.config import Limits
from hub.ssh.channels import PacketWriteMixin
from hub.ssh.connection import WindowedChannelsMixin
from hub.ssh.iogroup import IOGroup
from hub.ssh.keys import HubKeys
from hub.ssh.sink import IChannelDataViews, IPacketSink, PlainSink, sink_for
from hub.ssh.testing import ModernClientTransport, ModernServerTransport, newEd25519Key

HOST_KEY = newEd25519Key()
# Over Conch's default window (128 KiB) and several packets per write.
PAYLOAD = bytes(range(256)) * 1200


class Collector(PacketWriteMixin, SSHChannel):
    """Writes `send` once open, sends EOF, and keeps what it receives."""

    name = b"session"
    data_views = True

    def __init__(self, send: bytes = b"", **kw: Any) -> None:
        SSHChannel.__init__(self, **kw)
        self.send = send
        self.received = bytearray()
        self.kinds: set[type] = set()
        self.eof = False
        self.eof_wanted = False

    def channelOpen(self, specificData: bytes) -> None:
        if self.send:
            self.write(self.send)
        self.eof_wanted = True
        self._maybe_eof()

    def addWindowBytes(self, data: int) -> None:
        SSHChannel.addWindowBytes(self, data)
        self._maybe_eof()

    def _maybe_eof(self) -> None:
        # EOF only once what waits for window has gone out.
        if self.eof_wanted and not self.buf and not self.closing:
            self.eof_wanted = False
            self.conn.sendEOF(self)

    def dataReceived(self, data: bytes) -> None:
        self.kinds.add(type(data))
        self.received += data
        # Data taken as views skips Conch's window adjust: grant it here.
        self.conn.adjustWindow(self, len(data))

    def eofReceived(self) -> None:
        self.eof = True


class ServerConnection(SSHConnection):
    """No user auth in these tests: the channel is found here, not on an avatar."""

    channel: Collector | None = None

    def getChannel(self, channelType: bytes, windowSize: int, maxPacket: int,
                   data: bytes) -> Collector:
        self.channel = Collector(self.factory_payload, remoteWindow=windowSize,
                                 remoteMaxPacket=maxPacket, conn=self)
        return self.channel

    factory_payload = PAYLOAD


class WindowedServerConnection(WindowedChannelsMixin, ServerConnection):
    pass


class ClientConnection(SSHConnection):
    def __init__(self) -> None:
        super().__init__()
        self.channel = Collector(PAYLOAD)

    def serviceStarted(self) -> None:
        super().serviceStarted()
        self.openChannel(self.channel)


class NoAuth:
    """Stands for the avatar user auth would give: Conch serves ssh-connection
    only to a transport that has one."""

    conn: SSHConnection | None = None


def _server_factory(server: type[transport.SSHServerTransport],
                    connection: type[SSHConnection]) -> factory.SSHFactory:
    f = factory.SSHFactory()
    f.publicKeys = {HOST_KEY.sshType(): HOST_KEY.public()}
    f.privateKeys = {HOST_KEY.sshType(): HOST_KEY}
    f.primes = None
    f.services = {b"ssh-connection": connection}
    f.protocol = server
    return f


def _client(base: type[transport.SSHClientTransport]) -> Any:
    class Client(base):  # type: ignore[valid-type,misc]
        def verifyHostKey(self, hostKey: bytes, fingerprint: bytes) -> Any:
            return defer.succeed(hostKey == HOST_KEY.public().blob())

        def connectionSecure(self) -> None:
            self.conn = ClientConnection()
            self.requestService(self.conn)

    return Client()


def _run(server: type[transport.SSHServerTransport], client: type[transport.SSHClientTransport],
         connection: type[SSHConnection] = ServerConnection) -> tuple[Any, Any]:
    clock = MemoryReactorClock()
    f = _server_factory(server, connection)
    f.startFactory()
    server_proto: Any = f.buildProtocol(None)
    server_proto.avatar = NoAuth()
    if isinstance(server_proto, ModernServerTransport):
        server_proto.clock = clock
    client_proto = _client(client)
    if isinstance(client_proto, ModernClientTransport):
        client_proto.clock = clock
    pump = iosim.connect(server_proto, iosim.makeFakeServer(server_proto),
                         client_proto, iosim.makeFakeClient(client_proto),
                         greet=False, clock=clock)
    for _ in range(2000):
        if not pump.pump():
            break
    else:
        raise AssertionError("the connection never went quiet")
    return server_proto, client_proto


def test_a_stock_conch_pair_carries_channel_data_through_the_plain_sink() -> None:
    server, client = _run(transport.SSHServerTransport, transport.SSHClientTransport)
    ours, theirs = client.conn.channel, server.service.channel
    assert isinstance(ours.packet_sink(), PlainSink)
    assert isinstance(theirs.packet_sink(), PlainSink)
    assert bytes(theirs.received) == PAYLOAD and theirs.eof
    assert bytes(ours.received) == PAYLOAD and ours.eof


def test_the_hub_transport_is_its_own_sink_and_takes_channel_data_as_views() -> None:
    server, client = _run(ModernServerTransport, ModernClientTransport,
                          WindowedServerConnection)
    theirs = server.service.channel
    assert theirs.packet_sink() is server
    assert bytes(theirs.received) == PAYLOAD and theirs.eof
    assert theirs.kinds == {memoryview}  # handed up without a copy
    assert bytes(client.conn.channel.received) == PAYLOAD


def test_a_service_without_the_data_view_hook_gets_channel_data_as_usual() -> None:
    server, _client_proto = _run(ModernServerTransport, ModernClientTransport)
    theirs = server.service.channel
    assert not IChannelDataViews.providedBy(server.service)
    assert bytes(theirs.received) == PAYLOAD
    assert theirs.kinds == {bytes}


def test_sink_for() -> None:
    hub_transport = ModernServerTransport()
    assert sink_for(hub_transport) is hub_transport
    assert verifyObject(IPacketSink, hub_transport)
    stock = transport.SSHServerTransport()
    plain = sink_for(stock)
    assert isinstance(plain, PlainSink) and verifyObject(IPacketSink, plain)
    assert not plain.beginBatch()
    assert not plain.callAfterInput(lambda: None)
    assert verifyObject(IChannelDataViews, WindowedServerConnection())


# Per-factory isolation


def _hub_factory() -> HubSSHFactory:
    keys = HubKeys({HOST_KEY.sshType(): HOST_KEY}, {HOST_KEY.sshType(): HOST_KEY.public()},
                   newEd25519Key())
    return HubSSHFactory(None, keys, MemoryReactorClock(), Limits(), 0, 3)


def test_each_hub_factory_has_its_own_group_shared_by_its_transports() -> None:
    one, two = _hub_factory(), _hub_factory()
    a, b, c = one.buildProtocol(None), one.buildProtocol(None), two.buildProtocol(None)
    assert a.ioGroup is b.ioGroup is one.io_group
    assert c.ioGroup is two.io_group is not one.io_group


@pytest.fixture
def tcp_connections() -> Iterator[Callable[[], tcp.Connection]]:
    sockets: list[socket.socket] = []

    def make() -> tcp.Connection:
        ours, theirs = socket.socketpair()
        sockets.extend((ours, theirs))
        conn = tcp.Connection(ours, protocol.Protocol(), MemoryReactor())
        conn.connected = True
        return conn

    yield make
    for s in sockets:
        s.close()


def _on_tcp(group: IOGroup | None, conn: tcp.Connection) -> ModernServerTransport:
    t = ModernServerTransport()
    t.ioGroup = group
    t.supportedPublicKeys = [HOST_KEY.sshType()]
    t.factory = _server_factory(ModernServerTransport, ServerConnection)
    t.makeConnection(conn)
    conn.doWrite()  # the version line and KEXINIT go out: the queue is empty again
    return t


def test_write_batches_of_two_groups_do_not_exclude_each_other(tcp_connections: Any) -> None:
    hub_group, other_group = IOGroup(), IOGroup()
    a = _on_tcp(hub_group, tcp_connections())
    b = _on_tcp(hub_group, tcp_connections())
    c = _on_tcp(other_group, tcp_connections())
    assert a.beginBatch()
    assert not b.beginBatch()  # one batch at a time within a group
    assert c.beginBatch()  # another hub's batch is its own
    c.endBatch()
    a.endBatch()
    assert b.beginBatch()
    b.endBatch()


def test_a_transport_left_without_a_group_gets_its_own(tcp_connections: Any) -> None:
    a = _on_tcp(None, tcp_connections())
    b = _on_tcp(None, tcp_connections())
    assert a.ioGroup is not None and b.ioGroup is not None
    assert a.ioGroup is not b.ioGroup


class Probe(SSHChannel):
    """On data, asks other transports to run something once input ends."""

    name = b"session"
    probes: list[Any] = []
    answers: list[bool] = []
    ran: list[str] = []

    def dataReceived(self, data: bytes) -> None:
        for i, sink in enumerate(self.probes):
            self.answers.append(sink.callAfterInput(lambda i=i: self.ran.append(f"after {i}")))
        self.ran.append("data")


def test_input_rounds_of_two_groups_are_apart() -> None:
    # While one hub's transport reads, a transport of the same group defers
    # its after-input actions to the end of that read; another group's
    # transport is not reading, so it has nothing to wait for.
    hub_group, other_group = IOGroup(), IOGroup()
    clock = MemoryReactorClock()
    same, other = ModernServerTransport(), ModernServerTransport()
    same.ioGroup, other.ioGroup = hub_group, other_group
    same.makeConnection(iosim.FakeTransport(same, isServer=True))
    other.makeConnection(iosim.FakeTransport(other, isServer=True))

    class Connection(ServerConnection):
        def getChannel(self, *args: Any) -> Any:
            return Probe(conn=self)

    f = _server_factory(ModernServerTransport, Connection)
    f.startFactory()
    server: Any = f.buildProtocol(None)
    server.avatar = NoAuth()
    server.ioGroup = hub_group
    server.clock = clock
    client = _client(ModernClientTransport)
    client.clock = clock
    Probe.probes, Probe.answers, Probe.ran = [same, other], [], []
    pump = iosim.connect(server, iosim.makeFakeServer(server),
                         client, iosim.makeFakeClient(client), greet=False, clock=clock)
    for _ in range(200):
        pump.pump()
    assert Probe.answers  # the channel got data
    assert set(Probe.answers[0::2]) == {True}  # same group: deferred
    assert set(Probe.answers[1::2]) == {False}  # other group: not reading
    assert Probe.ran.count("after 0") == len(Probe.answers) // 2
    assert Probe.ran[0] == "data" and "after 1" not in Probe.ran
