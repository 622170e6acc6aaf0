"""Reverse forwards, takeover, revocation, public access and the splice, in memory.

The hub and a Conch client are joined by iosim; the hub's clock and reactor is
one `MemoryReactorClock` whose `listenTCP` hands out recording ports. Those
ports behave like the kernel's: a port already listened on (on an overlapping
address) cannot be bound again until its `stopListening` Deferred fires, and
tests may hold those Deferreds to see what waits for them.
"""

from __future__ import annotations

import errno
import struct
from pathlib import Path
from typing import Any

import pytest
from attrs import evolve
from memory_hub import (
    ClientAuth,
    ClientConnection,
    ClientTransport,
    LaterCalls,
    make_hub,
    new_key,
    start_factory,
)
from test_nsca_codec import Encryptor, build_packet
from twisted.conch.error import ConchError
from twisted.conch.ssh import channel, common, keys
from twisted.conch.ssh.connection import OPEN_ADMINISTRATIVELY_PROHIBITED, OPEN_CONNECT_FAILED
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.test.iosim import FakeTransport, IOPump, connect
from zope.interface import implementer

from hub.access import device_client
from hub.access.grants import RegistryGrants
from hub.access.server import HubSSHFactory
from hub.app.context import Hub
from hub.intake.monitoring import STORE_INTERVAL, Monitoring
from hub.intake.nsca import PACKET_SIZE
from hub.rules.ports import ForwardCaps
from hub.ssh.channels import MAX_PACKET, WINDOW
from hub.ssh.connection import ChannelRefused
from hub.ssh.sink import IPacketSink
from hub.store.revisions import NodeUpdate
from hub.tunnel.dial import DeviceRefused, OpenNotice
from hub.tunnel.live import CLOSE_GRACE, KEPT_PORT_RETRY, KEPT_PORT_WAIT, ForwardListener
from hub.tunnel.sessions import ONLINE_WRITE_DELAY
from hub.tunnel.splice import EARLY_LIMIT, SpliceChannel, TCPEnd

PUBLIC = "198.51.100.1"
LOOPBACK = "127.0.0.1"
LOW, HIGH = 50000, 50099


# -- the hub's reactor: listeners that behave like bound sockets -----------

class RecordingPort:
    def __init__(self, reactor: RecordingReactor, port: int, factory: Any, interface: str
                 ) -> None:
        self.reactor = reactor
        self.port = port
        self.factory = factory
        self.interface = interface
        self.listening = True
        self.stop_calls = 0

    def stopListening(self) -> defer.Deferred[None]:
        self.stop_calls += 1
        d: defer.Deferred[None] = defer.Deferred()
        if self.reactor.hold_stops:
            self.reactor.held.append((self, d))
        else:
            self._stopped(d)
        return d

    def _stopped(self, d: defer.Deferred[None]) -> None:
        if self.listening:
            self.listening = False
            self.reactor.events.append(("stopped", self.port, self.interface))
        d.callback(None)

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", self.interface, self.port)


class RecordingReactor(MemoryReactorClock):
    def __init__(self) -> None:
        super().__init__()
        self.ports: list[RecordingPort] = []
        self.events: list[tuple[str, int, str]] = []
        self.hold_stops = False
        self.held: list[tuple[RecordingPort, defer.Deferred[None]]] = []
        self.squatted: set[int] = set()  # held by other programs
        self.listen_errors: list[Exception] = []  # raised by the next listenTCP calls
        self.tried: list[int] = []  # every port listenTCP was asked for

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = ""
                  ) -> RecordingPort:
        def overlaps(a: str, b: str) -> bool:
            return a == b or "0.0.0.0" in (a, b) or "" in (a, b)

        self.tried.append(port)
        if self.listen_errors:
            raise self.listen_errors.pop(0)
        if port in self.squatted or any(
                p.listening and p.port == port and overlaps(p.interface, interface)
                for p in self.ports):
            raise CannotListenError(interface, port, OSError(errno.EADDRINUSE, "in use"))
        super().listenTCP(port, factory, backlog, interface)
        listener = RecordingPort(self, port, factory, interface)
        self.ports.append(listener)
        self.events.append(("listen", port, interface))
        return listener

    def release_stops(self) -> None:
        self.hold_stops = False
        held, self.held = self.held, []
        for port, d in held:
            port._stopped(d)

    def listening(self) -> dict[int, str]:
        return {p.port: p.interface for p in self.ports if p.listening}

    def listener(self, port: int) -> RecordingPort:
        (found,) = [p for p in self.ports if p.listening and p.port == port]
        return found


# -- the device: a Conch client that can forward and accept forwarded-tcpip --

class DeviceChannel(channel.SSHChannel):
    """The device's end of a forwarded connection; records what happens to it."""

    name = b"forwarded-tcpip"

    def __init__(self, open_data: bytes, **kw: Any) -> None:
        channel.SSHChannel.__init__(self, **kw)
        bind, rest = common.getNS(open_data)
        (port,) = struct.unpack(">L", rest[:4])
        origin, rest = common.getNS(rest[4:])
        (origin_port,) = struct.unpack(">L", rest[:4])
        self.bind, self.port, self.origin, self.origin_port = bind, port, origin, origin_port
        self.received = bytearray()
        self.events: list[str] = []
        self.hold_window = False
        self.is_open = False
        self.is_closed = False
        # Sent, then EOF and close, as soon as the channel opens (a device's
        # sshd sends its banner, or refuses with a line, as it accepts).
        self.greeting: bytes | None = None

    def channelOpen(self, specificData: bytes) -> None:
        self.is_open = True
        if self.greeting is not None:
            self.write(self.greeting)
            self.conn.sendEOF(self)
            self.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if not self.events or self.events[-1] != "data":
            self.events.append("data")

    def eofReceived(self) -> None:
        self.events.append("eof")

    def closed(self) -> None:
        self.is_closed = True
        self.events.append("closed")


class DeviceConnection(ClientConnection):
    def serviceStarted(self) -> None:
        ClientConnection.serviceStarted(self)
        self.transport.factory_state["conn"] = self
        self.forwarded: list[DeviceChannel] = []
        self.window_adjusts: list[int] = []
        self.refuse_channels = False
        self.channel_window = 0  # Conch's default
        self.hold_windows = False  # new channels grant no window (hold_window)
        self.greeting: bytes | None = None

    def channel_forwarded_tcpip(self, window: int, max_packet: int, data: bytes) -> Any:
        if self.refuse_channels:
            raise ConchError("connect failed", 2)
        chan = DeviceChannel(data, remoteWindow=window, remoteMaxPacket=max_packet,
                             localWindow=self.channel_window)
        chan.greeting = self.greeting
        chan.hold_window = self.hold_windows
        self.forwarded.append(chan)
        return chan

    def ssh_CHANNEL_DATA(self, packet: bytes) -> None:
        local, length = struct.unpack(">2L", packet[:8])
        chan = self.channels.get(local)
        if isinstance(chan, DeviceChannel) and chan.hold_window:
            # A device that does not read: take the data, grant no window.
            assert length <= chan.localWindowLeft
            chan.localWindowLeft -= length
            chan.dataReceived(packet[8:8 + length])
            return
        ClientConnection.ssh_CHANNEL_DATA(self, packet)

    def ssh_CHANNEL_WINDOW_ADJUST(self, packet: bytes) -> None:
        self.window_adjusts.append(struct.unpack(">2L", packet[:8])[1])
        ClientConnection.ssh_CHANNEL_WINDOW_ADJUST(self, packet)


class DeviceAuth(ClientAuth):
    def __init__(self, user: bytes, key: keys.Key | None, password: bytes | None) -> None:
        ClientAuth.__init__(self, user, key, password)
        self.instance = DeviceConnection()


class DeviceTransport(ClientTransport):
    def connectionSecure(self) -> None:
        auth = DeviceAuth(self.user or b"", self.key, self.password)
        auth._private = self.key  # type: ignore[attr-defined]
        self.requestService(auth)


class Device:
    """One SSH connection of a device, pumped by hand."""

    def __init__(self, factory: HubSSHFactory, reactor: RecordingReactor, *,
                 key: keys.Key | None = None, password: bytes | None = None,
                 peer: str = "192.0.2.10", user: bytes = b"cms") -> None:
        addr = IPv4Address("TCP", peer, 40000)
        self.server: Any = factory.buildProtocol(addr)
        self.client = DeviceTransport(user, key, password)
        self.pump: IOPump = connect(
            self.server, FakeTransport(self.server, isServer=True, peerAddress=addr),
            self.client, FakeTransport(self.client, isServer=False), greet=False,
            clock=reactor)
        self.pump.flush()

    @property
    def conn(self) -> DeviceConnection:
        return self.client.factory_state["conn"]

    @property
    def connected(self) -> bool:
        return "conn" in self.client.factory_state

    def request(self, kind: bytes, bind: bytes, port: int) -> list[Any]:
        """Send a global request; the list gets ("ok", data) or ("fail",) when answered."""
        answers: list[Any] = []
        d = self.conn.sendGlobalRequest(kind, common.NS(bind) + struct.pack(">L", port),
                                        wantReply=1)
        d.addCallbacks(lambda data: answers.append(("ok", data)),
                       lambda f: answers.append(("fail",)))
        return answers

    def forward(self, bind: bytes, port: int) -> Any:
        answers = self.request(b"tcpip-forward", bind, port)
        self.pump.flush()
        assert len(answers) == 1
        return answers[0]

    def cancel(self, bind: bytes, port: int) -> Any:
        answers = self.request(b"cancel-tcpip-forward", bind, port)
        self.pump.flush()
        return answers[0]

    def hang_up(self) -> None:
        self.client.transport.loseConnection()
        self.pump.flush()


def allocated(answer: Any) -> int:
    assert answer[0] == "ok" and len(answer[1]) == 4, answer
    return int(struct.unpack(">L", answer[1])[0])


# -- the TCP side of a forwarded connection ---------------------------------

class TCPTransport(StringTransport):
    """A TCP connection to a node's port, as the hub sees it.

    `producerState` says whether the hub paused *reading* it; `producer` is
    what the hub registered to be paused when *writing* to it backs up."""

    def __init__(self) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "203.0.113.9", 51000), lenient=True)
        self.events: list[str] = []
        self.write_closed = False

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.events.append("registerProducer")
        super().registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.events.append("unregisterProducer")
        super().unregisterProducer()

    def write(self, data: bytes) -> None:
        self.events.append("write")
        super().write(data)

    def loseWriteConnection(self) -> None:
        assert self.producer is None, "half-closed while a paused producer is registered"
        self.events.append("loseWriteConnection")
        self.write_closed = True

    def loseConnection(self) -> None:
        if not self.disconnecting:
            self.events.append("loseConnection")
        super().loseConnection()


def open_tcp(reactor: RecordingReactor, device: Device, port: int
             ) -> tuple[TCPEnd, TCPTransport, DeviceChannel | None]:
    """Connect to the hub's listener on `port`; returns the hub's TCP end, its
    transport and the channel the device got (None if none was opened)."""
    before = len(device.conn.forwarded)
    end = reactor.listener(port).factory.buildProtocol(IPv4Address("TCP", "203.0.113.9", 51000))
    tcp = TCPTransport()
    end.makeConnection(tcp)
    device.pump.flush()
    chans = device.conn.forwarded[before:]
    return end, tcp, chans[0] if chans else None


# -- fixtures ----------------------------------------------------------------

@pytest.fixture
def reactor() -> RecordingReactor:
    return RecordingReactor()


@pytest.fixture
def hub(tmp_path: Path, reactor: RecordingReactor) -> Hub:
    return make_hub(tmp_path, reactor, keepalive="0", **{"public-interface": PUBLIC,
                                                          "port-range": f"{LOW}-{HIGH}"})


@pytest.fixture
def factory(hub: Hub) -> HubSSHFactory:
    return start_factory(hub)


def register(hub: Hub, name: str) -> keys.Key:
    key = new_key()
    hub.registry.register(name, key.public().blob(), "fp", "test")
    return key


@pytest.fixture
def key(hub: Hub) -> keys.Key:
    return register(hub, "site-a")


@pytest.fixture
def device(factory: HubSSHFactory, reactor: RecordingReactor, key: keys.Key) -> Device:
    device = Device(factory, reactor, key=key)
    assert device.connected
    return device


def cli(hub: Hub) -> Any:
    """The admin CLI's view: a second Registry object on the same file."""
    return type(hub.registry)(hub.config.db_path, now=lambda: 0.0)


# -- tcpip-forward -------------------------------------------------------------

def test_port_zero_is_answered_with_the_allocated_port(
        hub: Hub, reactor: RecordingReactor, device: Device) -> None:
    port = allocated(device.forward(b"", 0))
    assert port == LOW
    assert reactor.listening() == {port: LOOPBACK}
    assert isinstance(reactor.listener(port).factory, ForwardListener)
    assert reactor.tcpServers[-1][0] == port and reactor.tcpServers[-1][3] == LOOPBACK
    assert hub.registry.node("site-a").forwards == {"ssh": port}


def test_fixed_port_is_a_service_number(hub: Hub, reactor: RecordingReactor,
                                        device: Device) -> None:
    assert device.forward(b"", 22) == ("ok", b"")
    assert device.forward(b"localhost", 443) == ("ok", b"")
    assert device.forward(b"127.0.0.1", 8080) == ("ok", b"")
    forwards = hub.registry.node("site-a").forwards
    assert set(forwards) == {"ssh", "https", "port-8080"}
    assert reactor.listening() == {p: LOOPBACK for p in forwards.values()}
    # The port the device asked for is not bound anywhere: it is virtual.
    assert not {22, 443, 8080} & set(reactor.listening())


def test_labelled_forward_names_its_service(hub: Hub, reactor: RecordingReactor,
                                            device: Device) -> None:
    ssh = allocated(device.forward(b"", 0))
    http = allocated(device.forward(b"http", 0))
    app = allocated(device.forward(b"app", 0))
    assert hub.registry.node("site-a").forwards == {"ssh": ssh, "http": http, "app": app}
    assert len({ssh, http, app}) == 3


def test_same_forward_twice_is_refused(hub: Hub, reactor: RecordingReactor,
                                      device: Device) -> None:
    # `ssh -R 0:localhost:22 -R 0:localhost:80`: the same (bind, port) twice.
    # Answering the second with the first's port sent both targets' users to
    # the first one, and ExitOnForwardFailure never fired.
    port = allocated(device.forward(b"localhost", 0))
    assert device.forward(b"localhost", 0) == ("fail",)
    assert device.forward(b"http", 80) == ("ok", b"")
    assert device.forward(b"http", 80) == ("fail",)
    assert len(reactor.ports) == 2
    # Cancelled, it may be asked for again, and gets its port back.
    assert device.cancel(b"localhost", port) == ("ok", b"")
    assert allocated(device.forward(b"localhost", 0)) == port


@pytest.mark.parametrize("port", [65536, 2**32 - 1])
def test_a_port_above_65535_is_refused(hub: Hub, reactor: RecordingReactor, device: Device,
                                       port: int) -> None:
    assert device.forward(b"", port) == ("fail",)
    assert device.forward(b"app", port) == ("fail",)
    assert hub.registry.node("site-a").forwards == {}
    assert reactor.listening() == {}
    assert allocated(device.forward(b"", 0)) == LOW


# -- how many forwards a node may hold ------------------------------------------------

def test_a_pending_node_holds_at_most_three_forwards(
        hub: Hub, reactor: RecordingReactor, device: Device) -> None:
    # Anyone with the shared Call Home Password can be a pending node: asking
    # for labels s0, s1, ... took every free port of the hub.
    ports = [allocated(device.forward(f"s{i}".encode(), 0)) for i in range(3)]
    assert device.forward(b"s3", 0) == ("fail",)
    assert device.forward(b"", 8080) == ("fail",)
    # Cancelling one does not make room for a new service: the lease stays.
    assert device.cancel(b"s0", ports[0]) == ("ok", b"")
    assert device.forward(b"s3", 0) == ("fail",)
    assert allocated(device.forward(b"s0", 0)) == ports[0]
    assert set(hub.registry.node("site-a").forwards) == {"s0", "s1", "s2"}
    # Approved, the node may hold 16.
    cli(hub).set_state("site-a", "approved", "cli:test")
    hub.sync()
    more = [allocated(device.forward(f"s{i}".encode(), 0)) for i in range(3, 16)]
    assert device.forward(b"s16", 0) == ("fail",)
    assert len(set(ports + more)) == 16
    assert len(reactor.listening()) == 16


def test_forward_caps_come_from_the_config(tmp_path: Path, reactor: RecordingReactor) -> None:
    (tmp_path / "callhomehub.toml").write_text(
        "[limits]\nmax_forwards_pending = 1\nmax_forwards = 2\n")
    hub = make_hub(tmp_path, reactor, keepalive="0", **{"port-range": f"{LOW}-{HIGH}"})
    a = Device(start_factory(hub), reactor, key=register(hub, "site-a"))
    allocated(a.forward(b"", 0))
    assert a.forward(b"http", 0) == ("fail",)
    hub.registry.set_state("site-a", "approved", "test")
    allocated(a.forward(b"http", 0))
    assert a.forward(b"app", 0) == ("fail",)


def test_last_seen_moves_with_keepalive_answers_written_once_a_minute(
        tmp_path: Path, reactor: RecordingReactor) -> None:
    hub = make_hub(tmp_path, reactor, keepalive="15", **{"port-range": f"{LOW}-{HIGH}"})
    device = Device(start_factory(hub), reactor, key=register(hub, "site-a"))
    allocated(device.forward(b"", 0))
    start = hub.registry.node("site-a").last_seen
    assert start == reactor.seconds()

    def run(seconds: int) -> None:
        for _ in range(seconds):
            reactor.advance(1)
            device.pump.flush()

    run(45)  # three keepalives answered: not yet a minute since the last write
    assert hub.registry.node("site-a").last_seen == start
    run(16)
    assert hub.registry.node("site-a").last_seen == start + 60
    touched = hub.registry.node("site-a").last_seen
    run(50)
    assert hub.registry.node("site-a").last_seen == touched
    run(20)
    assert hub.registry.node("site-a").last_seen == start + 120
    assert hub.registry.node("site-a").online


def test_leases_of_a_pending_node_that_never_came_back_expire(
        hub: Hub, reactor: RecordingReactor, factory: HubSSHFactory, device: Device) -> None:
    squatted = {allocated(device.forward(f"s{i}".encode(), 0)) for i in range(3)}
    approved = Device(factory, reactor, key=register(hub, "site-b"), peer="192.0.2.11")
    hub.registry.set_state("site-b", "approved", "test")
    kept = allocated(approved.forward(b"", 0))
    device.hang_up()
    approved.hang_up()
    reactor.advance(86400 - 120)
    hub.sync()
    assert set(hub.registry.node("site-a").forwards.values()) == squatted
    reactor.advance(240)
    hub.sync()
    assert hub.registry.node("site-a").forwards == {}
    assert hub.registry.node("site-b").forwards == {"ssh": kept}
    assert [e.detail for e in hub.registry.audit_log() if e.action == "lease-expired"] == [
        f"s{i}={p}" for i, p in enumerate(sorted(squatted))]
    # The released ports go back to the pool.
    c = Device(factory, reactor, key=register(hub, "site-c"), peer="192.0.2.12")
    assert allocated(c.forward(b"", 0)) == min(squatted)


def test_leases_of_a_live_pending_node_do_not_expire(
        hub: Hub, reactor: RecordingReactor, device: Device) -> None:
    port = allocated(device.forward(b"", 0))
    assert device.cancel(b"", port) == ("ok", b"")  # an inactive lease of an online node
    reactor.advance(3 * 86400)
    hub.sync()
    assert hub.registry.node("site-a").forwards == {"ssh": port}


def test_forwarded_channel_carries_the_bind_string_and_requested_port(
        reactor: RecordingReactor, device: Device) -> None:
    zero = allocated(device.forward(b"localhost", 0))
    fixed_answer = device.forward(b"http", 80)
    assert fixed_answer == ("ok", b"")
    http = next(p for p in reactor.listening() if p != zero)
    _, _, chan = open_tcp(reactor, device, zero)
    assert chan is not None
    # OpenSSH finds its forward by (bind, port): the allocated one for port 0.
    assert (chan.bind, chan.port) == (b"localhost", zero)
    assert (chan.origin, chan.origin_port) == (b"203.0.113.9", 51000)
    _, _, chan = open_tcp(reactor, device, http)
    assert chan is not None and (chan.bind, chan.port) == (b"http", 80)


def test_port_in_use_by_another_program_is_skipped(
        hub: Hub, reactor: RecordingReactor, device: Device) -> None:
    reactor.squatted = {LOW, LOW + 1}
    assert allocated(device.forward(b"", 0)) == LOW + 2
    assert hub.registry.node("site-a").forwards == {"ssh": LOW + 2}


def test_ports_of_other_programs_are_not_tried_again_for_five_minutes(
        hub: Hub, reactor: RecordingReactor, factory: HubSSHFactory, device: Device,
        logged: list[LogEvent]) -> None:
    reactor.squatted = {LOW, LOW + 1}
    assert allocated(device.forward(b"", 0)) == LOW + 2
    assert reactor.tried == [LOW, LOW + 1, LOW + 2]
    others = [Device(factory, reactor, key=register(hub, f"site-{i}"), peer=f"192.0.2.{20 + i}")
              for i in range(3)]
    reactor.tried.clear()
    assert [allocated(d.forward(b"", 0)) for d in others] == [LOW + 3, LOW + 4, LOW + 5]
    assert reactor.tried == [LOW + 3, LOW + 4, LOW + 5]  # the busy ones passed over
    busy_lines = [formatEvent(e) for e in logged if "in use by another program" in
                  formatEvent(e)]
    assert busy_lines == [f"node site-a: port {LOW} is in use by another program; choosing "
                          "another (new leases pass it over for 5 minutes)"]
    # Five minutes later the program has let them go: the next new lease gets LOW.
    reactor.squatted = set()
    reactor.advance(300)
    late = Device(factory, reactor, key=register(hub, "site-late"), peer="192.0.2.30")
    assert allocated(late.forward(b"", 0)) == LOW


def test_a_devices_own_port_still_held_is_waited_for_not_moved(
        hub: Hub, reactor: RecordingReactor, factory: HubSSHFactory, key: keys.Key,
        logged: list[LogEvent]) -> None:
    """A device back on another worker while the worker that held its last connection
    is still letting its port go (the hub stopping): the lease must not move for good."""
    first = Device(factory, reactor, key=key)
    kept = allocated(first.forward(b"", 0))
    first.hang_up()
    reactor.squatted = {kept}  # "the other worker" still holds it
    again = Device(factory, reactor, key=key)
    answers = again.request(b"tcpip-forward", b"", 0)
    again.pump.flush()
    for _ in range(4):
        reactor.advance(KEPT_PORT_RETRY)
    assert answers == []  # the request waits for the port
    reactor.squatted = set()
    reactor.advance(KEPT_PORT_RETRY)
    again.pump.flush()
    assert answers == [("ok", struct.pack(">L", kept))]
    assert hub.registry.node("site-a").forwards == {"ssh": kept}
    assert any(f"its port {kept} is still in use; waiting up to 5 s" in formatEvent(e)
               for e in logged)
    # Held beyond the wait (another program took it): the lease moves, as before.
    again.hang_up()
    reactor.squatted = {kept}
    third = Device(factory, reactor, key=key)
    answers = third.request(b"tcpip-forward", b"", 0)
    third.pump.flush()
    for _ in range(int(KEPT_PORT_WAIT / KEPT_PORT_RETRY)):
        assert answers == []
        reactor.advance(KEPT_PORT_RETRY)
    third.pump.flush()
    moved = hub.registry.node("site-a").forwards["ssh"]
    assert moved != kept and answers == [("ok", struct.pack(">L", moved))]


def test_exhausted_range_refuses_the_forward(tmp_path: Path, reactor: RecordingReactor) -> None:
    hub = make_hub(tmp_path, reactor, keepalive="0", **{"port-range": f"{LOW}-{LOW}"})
    a = Device(start_factory(hub), reactor, key=register(hub, "site-a"))
    b = Device(start_factory(hub), reactor, key=register(hub, "site-b"), peer="192.0.2.11")
    assert allocated(a.forward(b"", 0)) == LOW
    assert b.forward(b"", 0) == ("fail",)
    assert a.forward(b"http", 0) == ("fail",)
    assert reactor.listening() == {LOW: LOOPBACK}


def test_replies_keep_request_order(hub: Hub, reactor: RecordingReactor, device: Device) -> None:
    answers = [device.request(b"tcpip-forward", b"", 0),
               device.request(b"cancel-tcpip-forward", b"", 12345),  # nothing to cancel
               device.request(b"tcpip-forward", b"http", 0),
               device.request(b"tcpip-forward", b"", 443),
               device.request(b"no-such-request@example.com", b"", 0)]
    device.pump.flush()
    ports = hub.registry.node("site-a").forwards
    assert [a[0] if a else None for a in answers] == [
        ("ok", struct.pack(">L", ports["ssh"])), ("fail",),
        ("ok", struct.pack(">L", ports["http"])), ("ok", b""), ("fail",)]


def test_a_failed_request_without_reply_does_not_refuse_the_next(
        hub: Hub, reactor: RecordingReactor, device: Device) -> None:
    reactor.listen_errors = [RuntimeError("the port keeper broke")]
    device.conn.sendGlobalRequest(b"tcpip-forward", common.NS(b"http") + struct.pack(">L", 0),
                                  wantReply=0)
    device.pump.flush()
    assert reactor.listening() == {}
    port = allocated(device.forward(b"", 0))
    assert reactor.listening() == {port: LOOPBACK}
    # And the failed one may be asked for again.
    http = allocated(device.forward(b"http", 0))
    assert hub.registry.node("site-a").forwards == {"ssh": port, "http": http}


def test_a_failed_request_with_reply_fails_alone(
        hub: Hub, reactor: RecordingReactor, device: Device) -> None:
    reactor.listen_errors = [RuntimeError("the port keeper broke")]
    answers = [device.request(b"tcpip-forward", b"http", 0),
               device.request(b"tcpip-forward", b"", 0)]
    device.pump.flush()
    ports = hub.registry.node("site-a").forwards
    assert [a[0] for a in answers] == [("fail",), ("ok", struct.pack(">L", ports["ssh"]))]


def test_forward_after_cancel_waits_for_the_port_to_be_free(
        hub: Hub, reactor: RecordingReactor, device: Device) -> None:
    port = allocated(device.forward(b"", 0))
    reactor.hold_stops = True
    answers = [device.request(b"cancel-tcpip-forward", b"", port),
               device.request(b"tcpip-forward", b"", 0)]
    device.pump.flush()
    assert answers == [[], []]
    reactor.release_stops()
    device.pump.flush()
    # The same port again, not another one because the old listener held it.
    assert [a[0] for a in answers] == [("ok", b""), ("ok", struct.pack(">L", port))]
    assert reactor.listening() == {port: LOOPBACK}


def test_password_login_cannot_forward(hub: Hub, reactor: RecordingReactor,
                                       factory: HubSSHFactory) -> None:
    device = Device(factory, reactor, password=b"secret")
    assert device.connected
    assert device.forward(b"", 0) == ("fail",)
    assert device.forward(b"http", 80) == ("fail",)
    assert device.cancel(b"", 0) == ("fail",)
    assert reactor.tcpServers == []


def test_malformed_forward_request_fails(reactor: RecordingReactor, device: Device) -> None:
    answers: list[Any] = []
    device.conn.sendGlobalRequest(b"tcpip-forward", b"\x00\x00", wantReply=1).addCallbacks(
        answers.append, lambda f: answers.append("fail"))
    device.pump.flush()
    assert answers == ["fail"]
    assert reactor.tcpServers == []
    assert not device.server.transport.disconnecting


class Opener(channel.SSHChannel):
    """A channel the device opens to the hub; records how its open ended."""

    name = b"direct-tcpip"

    def __init__(self) -> None:
        channel.SSHChannel.__init__(self)
        self.outcome: list[Any] = []

    def channelOpen(self, specificData: bytes) -> None:
        self.outcome.append("open")

    def openFailed(self, reason: Any) -> None:
        self.outcome.append(reason)


@pytest.mark.parametrize(("data", "why"), [
    (b"\0\0", "truncated host length"),
    (common.NS(b"localhost") + struct.pack(">L", 5667), "truncated originator address length"),
    (common.NS(b"localhost") + struct.pack(">L", 5667) + common.NS(b"::1")
     + struct.pack(">L", 1) + b"!", "1 trailing bytes"),
])
def test_malformed_direct_tcpip_is_refused(device: Device, data: bytes, why: str) -> None:
    opener = Opener()
    device.conn.openChannel(opener, data)
    device.pump.flush()
    (reason,) = opener.outcome
    assert isinstance(reason, ConchError)
    assert reason.data == OPEN_ADMINISTRATIVELY_PROHIBITED
    assert reason.value == f"malformed direct-tcpip request: tcpip channel open: {why}".encode()
    assert not device.server.transport.disconnecting


# -- cancel-tcpip-forward --------------------------------------------------------

def test_cancel_port_zero_forward_by_its_allocated_port(
        hub: Hub, reactor: RecordingReactor, device: Device) -> None:
    ssh = allocated(device.forward(b"", 0))
    http = allocated(device.forward(b"http", 0))
    # OpenSSH cancels a port-0 forward by the port the hub allocated.
    assert device.cancel(b"http", http) == ("ok", b"")
    assert reactor.listening() == {ssh: LOOPBACK}
    assert reactor.events[-1] == ("stopped", http, LOOPBACK)
    assert device.cancel(b"http", http) == ("fail",)  # already gone
    # The lease stays with the node: forwarding again gets the same port.
    assert hub.registry.node("site-a").forwards == {"ssh": ssh, "http": http}
    assert allocated(device.forward(b"http", 0)) == http
    assert reactor.listening() == {ssh: LOOPBACK, http: LOOPBACK}


def test_cancel_fixed_port_forward(hub: Hub, reactor: RecordingReactor, device: Device) -> None:
    assert device.forward(b"", 80) == ("ok", b"")
    port = hub.registry.node("site-a").forwards["http"]
    assert device.cancel(b"", 443) == ("fail",)
    assert device.cancel(b"other", 80) == ("fail",)
    assert device.cancel(b"", 80) == ("ok", b"")
    assert reactor.listening() == {}
    assert hub.registry.node("site-a").forwards == {"http": port}


def test_cancel_answer_waits_for_the_listener_to_stop(
        reactor: RecordingReactor, device: Device) -> None:
    port = allocated(device.forward(b"", 0))
    reactor.hold_stops = True
    answers = device.request(b"cancel-tcpip-forward", b"", port)
    device.pump.flush()
    assert answers == []
    reactor.release_stops()
    device.pump.flush()
    assert answers == [("ok", b"")]
    assert reactor.listening() == {}


# -- takeover --------------------------------------------------------------------

def test_takeover_moves_the_ports_to_the_new_connection(
        hub: Hub, reactor: RecordingReactor, factory: HubSSHFactory, key: keys.Key,
        device: Device) -> None:
    ssh = allocated(device.forward(b"", 0))
    http = allocated(device.forward(b"http", 0))
    assert device.forward(b"", 443) == ("ok", b"")
    https = hub.registry.node("site-a").forwards["https"]
    reactor.hold_stops = True  # the old listeners take a while to close

    new = Device(factory, reactor, key=key, peer="192.0.2.99")
    assert new.connected
    # Logging in takes nothing over: the first forward request does.
    assert not device.server.transport.disconnecting
    answers = [new.request(b"tcpip-forward", b"http", 0),
               new.request(b"tcpip-forward", b"", 0),
               new.request(b"keepalive@openssh.com", b"", 0),  # answered at once, in order
               new.request(b"tcpip-forward", b"", 443)]
    new.pump.flush()
    assert device.server.transport.disconnecting
    assert not new.server.transport.disconnecting
    assert hub.registry.node("site-a").peer == "192.0.2.99"
    # Nothing is bound, nor answered, before the old listeners are released.
    assert answers == [[], [], [], []]
    assert all(e[0] == "listen" for e in reactor.events)
    assert len(reactor.held) == 3

    mark = len(reactor.events)
    reactor.release_stops()
    new.pump.flush()
    assert [a[0] for a in answers] == [("ok", struct.pack(">L", http)),
                                       ("ok", struct.pack(">L", ssh)), ("fail",), ("ok", b"")]
    after = reactor.events[mark:]
    assert sorted(e[1] for e in after[:3] if e[0] == "stopped") == sorted([ssh, http, https])
    assert sorted(e[1] for e in after[3:] if e[0] == "listen") == sorted([ssh, http, https])
    assert reactor.listening() == {ssh: LOOPBACK, http: LOOPBACK, https: LOOPBACK}

    # New connections on the ports reach the new session.
    _, _, chan = open_tcp(reactor, new, http)
    assert chan is not None and chan.bind == b"http"

    # The old connection going away later disturbs nothing.
    device.pump.flush()
    reactor.advance(CLOSE_GRACE + 1)
    device.pump.flush()
    assert device.client.transport.disconnected
    assert hub.registry.node("site-a").online
    assert reactor.listening() == {ssh: LOOPBACK, http: LOOPBACK, https: LOOPBACK}
    tunnel = hub.sessions.get("site-a")
    assert tunnel is not None and tunnel.conn is new.server.service


def test_takeover_closes_a_silent_old_connection(
        hub: Hub, reactor: RecordingReactor, factory: HubSSHFactory, key: keys.Key,
        device: Device) -> None:
    allocated(device.forward(b"", 0))
    old_tcp = device.server.transport
    aborted: list[bool] = []
    old_tcp.abortConnection = lambda: aborted.append(True)  # iosim cannot tell it apart
    new = Device(factory, reactor, key=key, peer="192.0.2.99")
    new.forward(b"", 0)
    # The old peer never reads the disconnect: after the grace it is aborted.
    assert old_tcp.disconnecting
    reactor.advance(CLOSE_GRACE - 0.1)
    assert aborted == []
    reactor.advance(0.2)
    assert aborted == [True]


def test_a_login_that_does_not_forward_takes_nothing_over(
        hub: Hub, reactor: RecordingReactor, factory: HubSSHFactory, key: keys.Key,
        device: Device) -> None:
    # A re-register, a check, `ssh cms@hub` by hand: the running tunnel stays.
    ssh = allocated(device.forward(b"", 0))
    check = Device(factory, reactor, key=key, peer="192.0.2.99")
    assert check.connected
    assert check.cancel(b"", ssh) == ("fail",)  # nothing of its own to cancel
    assert check.forward(b"", 2**32 - 1) == ("fail",)  # a refused request takes nothing either
    assert not device.server.transport.disconnecting
    check.hang_up()
    node = hub.registry.node("site-a")
    assert node.online and node.peer == "192.0.2.10"
    assert reactor.listening() == {ssh: LOOPBACK}
    _, _, chan = open_tcp(reactor, device, ssh)
    assert chan is not None and chan.is_open
    tunnel = hub.sessions.get("site-a")
    assert tunnel is not None and tunnel.conn is device.server.service


def test_a_node_without_a_tunnel_is_online_while_a_connection_is(
        hub: Hub, reactor: RecordingReactor, factory: HubSSHFactory, key: keys.Key) -> None:
    # A device that keeps `ssh -N cms@hub` up to send results, with no forward.
    first = Device(factory, reactor, key=key)
    reactor.advance(ONLINE_WRITE_DELAY)  # no forward came meanwhile
    node = hub.registry.node("site-a")
    assert node.online and node.peer == "192.0.2.10"
    second = Device(factory, reactor, key=key, peer="192.0.2.99")
    assert not first.server.transport.disconnecting
    first.hang_up()
    reactor.advance(ONLINE_WRITE_DELAY)
    assert hub.registry.node("site-a").online
    assert hub.registry.node("site-a").peer == "192.0.2.99"
    second.hang_up()
    assert not hub.registry.node("site-a").online
    assert hub.sessions.online() == []


def test_revocation_drops_a_login_that_does_not_forward(
        hub: Hub, reactor: RecordingReactor, factory: HubSSHFactory, key: keys.Key) -> None:
    idle = Device(factory, reactor, key=key)
    assert idle.connected
    cli(hub).set_state("site-a", "revoked", "cli:test")
    hub.sync()
    assert idle.server.transport.disconnecting
    # What it asks on its way out is refused.
    assert idle.forward(b"", 0) == ("fail",)
    assert reactor.listening() == {}
    assert not hub.registry.node("site-a").online


def test_drop_all_closes_every_session_and_marks_them_offline(
        hub: Hub, reactor: RecordingReactor, device: Device) -> None:
    # What the hub does when its port keeper is lost: the ports are gone.
    allocated(device.forward(b"", 0))
    other = Device(start_factory(hub), reactor, key=register(hub, "site-b"), peer="192.0.2.11")
    allocated(other.forward(b"", 0))
    assert hub.sessions.online() == ["site-a", "site-b"]
    hub.sessions.drop_all("port keeper lost")
    assert hub.sessions.online() == []
    assert reactor.listening() == {}
    assert device.server.transport.disconnecting and other.server.transport.disconnecting
    assert not hub.registry.node("site-a").online and not hub.registry.node("site-b").online


# -- revocation and removal ------------------------------------------------------

@pytest.mark.parametrize("action", ["revoke", "remove"])
def test_enforce_drops_a_revoked_or_removed_node(
        hub: Hub, reactor: RecordingReactor, device: Device, action: str) -> None:
    ssh = allocated(device.forward(b"", 0))
    http = allocated(device.forward(b"http", 0))
    admin = cli(hub)
    if action == "revoke":
        admin.set_state("site-a", "revoked", "cli:test")
    else:
        admin.remove("site-a", "cli:test")
    assert reactor.listening() == {ssh: LOOPBACK, http: LOOPBACK}
    hub.sync()
    assert device.server.transport.disconnecting
    assert reactor.listening() == {}
    assert hub.sessions.online() == []
    if action == "revoke":
        node = hub.registry.node("site-a")
        assert not node.online and node.forwards == {"ssh": ssh, "http": http}
    device.pump.flush()
    # What the device asks on its way out is refused.
    assert reactor.listening() == {}


def test_a_revocation_after_the_first_sync_is_applied_from_the_change(
        hub: Hub, reactor: RecordingReactor, factory: HubSSHFactory, device: Device) -> None:
    allocated(device.forward(b"", 0))
    other = Device(factory, reactor, key=register(hub, "site-b"))
    ssh_b = allocated(other.forward(b"", 0))
    hub.sync()  # the mirror has read the whole list: what follows is a change read
    cli(hub).set_state("site-a", "revoked", "cli:test")
    hub.sync()
    assert device.server.transport.disconnecting and not other.server.transport.disconnecting
    assert hub.sessions.online() == ["site-b"] and reactor.listening() == {ssh_b: LOOPBACK}


def test_an_applied_change_looks_only_at_the_nodes_it_changed(
        hub: Hub, reactor: RecordingReactor, factory: HubSSHFactory, device: Device) -> None:
    """With 10,000 nodes a change from another worker costs the nodes it changed,
    not a pass over every tunnel (docs/performance.md, section 8)."""
    ssh_a = allocated(device.forward(b"", 0))
    other = Device(factory, reactor, key=register(hub, "site-b"))
    ssh_b = allocated(other.forward(b"", 0))
    nodes = {n.name.lower(): evolve(n, public=True) for n in hub.registry.nodes()}
    hub.sessions.enforce((NodeUpdate(nodes, [nodes["site-b"]], whole=False), []))
    reactor.release_stops()
    assert reactor.listening() == {ssh_a: LOOPBACK, ssh_b: PUBLIC}
    # A whole list (after a removal) is compared with every tunnel.
    hub.sessions.enforce((NodeUpdate(nodes, list(nodes.values()), whole=True), []))
    assert reactor.listening() == {ssh_a: PUBLIC, ssh_b: PUBLIC}


class CountingCalls:
    """Registry calls passed on, each function's name recorded."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.names = inner, []

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        self.names.append(fn.__name__)
        return self.inner.call(fn, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_login_with_a_forward_reads_its_node_once(
        hub: Hub, reactor: RecordingReactor, factory: HubSSHFactory, key: keys.Key) -> None:
    """The tunnel's attach takes the node as the login's key check read it, and its
    first forward's caps use that read: no listing was applied since."""
    counted = CountingCalls(hub.sessions.calls)
    hub.sessions.calls = counted
    device = Device(factory, reactor, key=key)
    allocated(device.forward(b"", 0))
    assert counted.names.count("node") == 0
    # A later forward reads the node again: an approval since counts at once.
    allocated(device.forward(b"http", 0))
    assert counted.names.count("node") == 1


def test_a_listing_applied_after_the_login_is_read_again_by_the_takeover(
        hub: Hub, reactor: RecordingReactor, factory: HubSSHFactory, key: keys.Key) -> None:
    """Between the login and its first forward the node was revoked, and the hub
    applied it: the takeover reads the node again and refuses, whatever the
    login read."""
    counted = CountingCalls(hub.sessions.calls)
    hub.sessions.calls = counted
    device = Device(factory, reactor, key=key)
    other = Device(factory, reactor, key=register(hub, "site-b"), peer="192.0.2.20")
    cli(hub).set_state("site-b", "revoked", "cli:test")  # another node's change, applied
    hub.sync()
    assert other.server.transport.disconnecting
    allocated(device.forward(b"", 0))  # site-a is still approved: read again, forwards
    assert counted.names.count("node") == 1
    assert hub.sessions.online() == ["site-a"]


class CountingWrites(CountingCalls):
    """Registry calls and writes passed on, each write's function and arguments kept."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.writes: list[tuple[str, tuple[Any, ...]]] = []

    def write(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        self.writes.append((fn.__name__, args))
        self.inner.write(fn, *args, **kwargs)


def test_a_device_calling_back_is_online_with_its_forward_in_one_write(
        hub: Hub, reactor: RecordingReactor, factory: HubSSHFactory, key: keys.Key) -> None:
    """Its first forward, right after its login, takes the node over, marks it
    online and makes the lease active in one transaction: the login's own
    "online" write (not taking it from another hub) waits ONLINE_WRITE_DELAY for
    that and is not made. A first forward that is refused still takes the node
    over."""
    counted = CountingWrites(hub.sessions.calls)
    hub.sessions.calls = counted
    device = Device(factory, reactor, key=key)
    port = allocated(device.forward(b"", 0))
    reactor.advance(ONLINE_WRITE_DELAY)
    assert counted.writes == [("mark_online", ("site-a", "192.0.2.10", True, "ssh"))]
    node = hub.registry.node("site-a")
    assert node.online and node.peer == "192.0.2.10" and node.forwards == {"ssh": port}
    assert hub.registry.query(
        "SELECT l.service, l.port, l.active FROM leases l JOIN nodes n ON n.id = l.node_id"
        " WHERE n.name = 'site-a'") == [("ssh", port, 1)]
    # A later forward is its lease alone.
    allocated(device.forward(b"http", 0))
    assert counted.writes[-1] == ("set_lease_active", ("site-a", "http", True))

    hub.sessions.caps = ForwardCaps(pending=0)
    del counted.writes[:]
    other = Device(factory, reactor, key=register(hub, "site-b"), peer="192.0.2.20")
    assert other.forward(b"", 0) == ("fail",)
    reactor.advance(ONLINE_WRITE_DELAY)
    assert counted.writes == [("mark_online", ("site-b", "192.0.2.20", True))]

    # A login that forwards nothing is written online after the delay, once.
    del counted.writes[:]
    Device(factory, reactor, key=register(hub, "site-c"), peer="192.0.2.30")
    assert counted.writes == []
    reactor.advance(ONLINE_WRITE_DELAY)
    assert counted.writes == [("mark_online", ("site-c", "192.0.2.30", False))]
    reactor.advance(ONLINE_WRITE_DELAY)
    assert len(counted.writes) == 1
    # One gone sooner is written online as it goes (its address and time), then offline.
    del counted.writes[:]
    brief = Device(factory, reactor, key=register(hub, "site-d"), peer="192.0.2.40")
    brief.hang_up()
    assert counted.writes == [("mark_online", ("site-d", "192.0.2.40", False)),
                              ("mark_offline", ("site-d",))]
    reactor.advance(ONLINE_WRITE_DELAY)
    assert len(counted.writes) == 2
    node = hub.registry.node("site-d")
    assert node.peer == "192.0.2.40" and not node.online and node.last_seen is not None


def test_each_registry_listing_applied_is_counted(hub: Hub, device: Device) -> None:
    """What a login read before a listing was applied is not reused after it
    (DeviceKeyChecker compares this count)."""
    allocated(device.forward(b"", 0))
    before = hub.sessions.applied
    cli(hub).set_state("site-a", "revoked", "cli:test")
    hub.sync()
    assert hub.sessions.applied == before + 1


def test_sync_without_changes_touches_nothing(hub: Hub, reactor: RecordingReactor,
                                              device: Device) -> None:
    allocated(device.forward(b"", 0))
    events = list(reactor.events)
    hub.sync()
    hub.sync()
    assert reactor.events == events


# -- public access ---------------------------------------------------------------

def test_access_on_rebinds_on_the_public_interface(
        hub: Hub, reactor: RecordingReactor, device: Device, factory: HubSSHFactory,
        key: keys.Key) -> None:
    ssh = allocated(device.forward(b"", 0))
    http = allocated(device.forward(b"http", 0))
    cli(hub).set_public("site-a", True, "cli:test")
    hub.sync()
    assert reactor.listening() == {ssh: PUBLIC, http: PUBLIC}
    # Forwards asked for while public are bound publicly too.
    https_answer = device.forward(b"", 443)
    assert https_answer == ("ok", b"")
    https = hub.registry.node("site-a").forwards["https"]
    assert reactor.listening() == {ssh: PUBLIC, http: PUBLIC, https: PUBLIC}
    # A reconnect of a public node binds publicly from the start.
    new = Device(factory, reactor, key=key, peer="192.0.2.99")
    assert allocated(new.forward(b"http", 0)) == http
    assert reactor.listening()[http] == PUBLIC

    cli(hub).set_public("site-a", False, "cli:test")
    hub.sync()
    assert reactor.listening() == {http: LOOPBACK}
    assert [e.detail for e in hub.registry.audit_log() if e.action == "access"] == ["on", "off"]


def test_access_toggle_stops_before_it_binds(hub: Hub, reactor: RecordingReactor,
                                             device: Device) -> None:
    ssh = allocated(device.forward(b"", 0))
    reactor.hold_stops = True
    cli(hub).set_public("site-a", True, "cli:test")
    hub.sync()
    assert reactor.listening() == {ssh: LOOPBACK}  # not yet rebound
    reactor.release_stops()
    assert reactor.events[-2:] == [("stopped", ssh, LOOPBACK), ("listen", ssh, PUBLIC)]


def test_access_toggle_racing_a_disconnect_leaks_no_listener(
        hub: Hub, reactor: RecordingReactor, device: Device) -> None:
    ssh = allocated(device.forward(b"", 0))
    reactor.hold_stops = True
    cli(hub).set_public("site-a", True, "cli:test")
    hub.sync()  # the rebind waits for the loopback listener to stop ...
    device.hang_up()  # ... and meanwhile the device goes away
    assert hub.sessions.online() == []
    reactor.release_stops()
    assert reactor.listening() == {}, f"port {ssh} is still bound for an offline node"


def test_access_toggle_racing_a_cancel_leaks_no_listener(
        hub: Hub, reactor: RecordingReactor, device: Device) -> None:
    ssh = allocated(device.forward(b"", 0))
    reactor.hold_stops = True
    cli(hub).set_public("site-a", True, "cli:test")
    hub.sync()
    answers = device.request(b"cancel-tcpip-forward", b"", ssh)
    device.pump.flush()
    reactor.release_stops()
    device.pump.flush()
    assert answers == [("ok", b"")]
    assert reactor.listening() == {}


def test_takeover_racing_an_access_toggle_keeps_the_port(
        hub: Hub, reactor: RecordingReactor, device: Device, factory: HubSSHFactory,
        key: keys.Key) -> None:
    ssh = allocated(device.forward(b"", 0))
    reactor.hold_stops = True
    cli(hub).set_public("site-a", True, "cli:test")
    hub.sync()
    new = Device(factory, reactor, key=key, peer="192.0.2.99")
    answers = new.request(b"tcpip-forward", b"", 0)
    new.pump.flush()
    reactor.release_stops()
    new.pump.flush()
    assert answers == [("ok", struct.pack(">L", ssh))]
    assert reactor.listening() == {ssh: PUBLIC}
    assert hub.registry.node("site-a").forwards == {"ssh": ssh}


def test_second_forward_of_one_service_keeps_the_registry_consistent(
        hub: Hub, reactor: RecordingReactor, device: Device) -> None:
    # `-R 0:a:22 -R 127.0.0.1:0:b:23`: both are service "ssh" (rules.ports.service_name).
    first = allocated(device.forward(b"localhost", 0))
    device.forward(b"127.0.0.1", 0)
    leased = set(hub.registry.node("site-a").forwards.values())
    # Every port the hub listens on for the node is leased to the node ...
    assert set(reactor.listening()) <= leased
    # ... and is not handed to another node.
    other = register(hub, "site-b")
    b = Device(start_factory(hub), reactor, key=other, peer="192.0.2.11")
    assert allocated(b.forward(b"", 0)) != first


# -- the splice: channel <-> TCP --------------------------------------------------

@pytest.fixture
def pipe(hub: Hub, reactor: RecordingReactor, device: Device
         ) -> tuple[TCPEnd, TCPTransport, DeviceChannel, SpliceChannel]:
    port = allocated(device.forward(b"", 0))
    end, tcp, chan = open_tcp(reactor, device, port)
    assert chan is not None and chan.is_open
    splice = end.channel
    assert isinstance(splice, SpliceChannel)
    return end, tcp, chan, splice


def test_data_flows_both_ways(device: Device, pipe: Any) -> None:
    end, tcp, chan, splice = pipe
    assert tcp.producer is splice and tcp.streaming
    chan.write(b"from the device")
    device.pump.flush()
    assert tcp.value() == b"from the device"
    end.dataReceived(b"to the device")
    device.pump.flush()
    assert bytes(chan.received) == b"to the device"
    assert (splice.bytes_in, splice.bytes_out) == (15, 13)


def test_data_of_one_read_goes_to_tcp_in_one_write(device: Device, pipe: Any) -> None:
    _end, tcp, chan, _splice = pipe
    del tcp.events[:]
    for part in (b"one ", b"two ", b"three"):
        chan.write(part)  # three CHANNEL_DATA packets, read by the hub at once
    chan.conn.sendEOF(chan)
    device.pump.flush()
    assert tcp.value() == b"one two three"
    # One write for all three, and before the EOF that came in the same read.
    assert tcp.events == ["write", "unregisterProducer", "loseWriteConnection"]


def test_tcp_reading_before_the_open_is_bounded_and_kept_in_order(
        reactor: RecordingReactor, device: Device) -> None:
    # While the device confirms the channel the hub reads the client's first
    # request (no pause and resume of the socket), but at most EARLY_LIMIT
    # bytes: then reading pauses until the channel is open.
    port = allocated(device.forward(b"", 0))
    end = reactor.listener(port).factory.buildProtocol(IPv4Address("TCP", "203.0.113.9", 1))
    tcp = TCPTransport()
    end.makeConnection(tcp)
    assert tcp.producerState == "producing" and tcp.producer is None
    end.dataReceived(b"GET / HTTP/1.0\r\n")
    assert tcp.producerState == "producing"
    end.dataReceived(b"h" * EARLY_LIMIT)
    assert tcp.producerState == "paused", "the hub kept reading before the channel opened"
    device.pump.flush()  # the device confirms: the kept bytes go first, then reading resumes
    (chan,) = device.conn.forwarded
    assert tcp.producerState == "producing" and tcp.producer is end.channel
    end.dataReceived(b"after")
    device.pump.flush()
    assert bytes(chan.received) == b"GET / HTTP/1.0\r\n" + b"h" * EARLY_LIMIT + b"after"
    assert chan.events == ["data"]


def test_tcp_eof_before_the_open_follows_the_early_data(
        hub: Hub, reactor: RecordingReactor, device: Device) -> None:
    port = allocated(device.forward(b"", 0))
    end = reactor.listener(port).factory.buildProtocol(IPv4Address("TCP", "203.0.113.9", 1))
    tcp = TCPTransport()
    end.makeConnection(tcp)
    end.dataReceived(b"request")
    end.readConnectionLost()  # the client half-closes before the device confirms
    device.pump.flush()
    (chan,) = device.conn.forwarded
    assert bytes(chan.received) == b"request"
    assert chan.events == ["data", "eof"]
    # The answer still reaches the client; then the pipe is done.
    chan.write(b"answer")
    device.conn.sendEOF(chan)
    device.pump.flush()
    assert tcp.value() == b"answer"
    assert chan.events == ["data", "eof", "closed"]
    assert tcp.disconnecting
    assert hub.sessions.get("site-a").pipes == set()


def test_refused_channel_closes_the_tcp_connection(
        hub: Hub, reactor: RecordingReactor, device: Device) -> None:
    port = allocated(device.forward(b"", 0))
    device.conn.refuse_channels = True
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        end, tcp, chan = open_tcp(reactor, device, port)
        end.connectionLost(None)  # the TCP side goes away, as it does after the refusal
        device.pump.flush()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert chan is None
    assert tcp.disconnecting
    assert hub.sessions.get("site-a").pipes == set()
    # One info line, no traceback (a refused open used to end in KeyError in sendClose).
    hub_events = [e for e in events if e.get("log_namespace", "").startswith("hub.")]
    assert [e for e in hub_events if "log_failure" in e or e.get("isError")] == []
    assert [formatEvent(e) for e in hub_events if "channel open failed" in formatEvent(e)] == [
        "forwarded-tcpip channel open failed: connect failed"]


def test_no_window_adjust_while_the_tcp_side_is_paused(device: Device, pipe: Any) -> None:
    _end, tcp, chan, _splice = pipe
    # The TCP reader is slow: its transport asks its producer (the splice) to pause.
    tcp.producer.pauseProducing()
    block = b"x" * MAX_PACKET
    for _ in range(WINDOW // MAX_PACKET + 4):  # more than one window
        chan.write(block)
    device.pump.flush()
    assert device.conn.window_adjusts == []
    assert chan.remoteWindowLeft == 0
    assert len(chan.buf) == 4 * MAX_PACKET  # the rest waits on the device
    assert len(tcp.value()) == WINDOW  # the hub holds one window, no more

    tcp.producer.resumeProducing()
    device.pump.flush()
    assert device.conn.window_adjusts and device.conn.window_adjusts[0] == WINDOW
    assert chan.buf == b""
    assert len(tcp.value()) == WINDOW + 4 * MAX_PACKET


def test_window_is_granted_in_batches(device: Device, pipe: Any) -> None:
    _end, _tcp, chan, _splice = pipe
    chan.write(b"y" * (WINDOW // 4 - 1))
    device.pump.flush()
    assert device.conn.window_adjusts == []
    chan.write(b"y")
    device.pump.flush()
    assert device.conn.window_adjusts == [WINDOW // 4]


def test_a_window_grant_logs_nothing(device: Device, pipe: Any) -> None:
    # A bulk transfer grants window every WINDOW // 4 bytes: Conch's
    # adjustWindow published a debug event for each one.
    _end, _tcp, chan, _splice = pipe
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        chan.write(b"y" * (WINDOW // 4))
        device.pump.flush()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert device.conn.window_adjusts == [WINDOW // 4]
    assert [formatEvent(e) for e in events] == []


def test_tcp_reading_pauses_while_the_device_window_is_full(device: Device, pipe: Any) -> None:
    end, tcp, chan, _splice = pipe
    chan.hold_window = True
    window = chan.localWindowLeft
    end.dataReceived(b"z" * (window + 1000))
    device.pump.flush()
    assert len(chan.received) == window
    assert tcp.producerState == "paused"
    device.conn.adjustWindow(chan, window)
    device.pump.flush()
    assert len(chan.received) == window + 1000
    assert tcp.producerState == "producing"


def test_channel_eof_half_closes_tcp_after_unregistering(device: Device, pipe: Any) -> None:
    end, tcp, chan, _splice = pipe
    tcp.producer.pauseProducing()  # even while the TCP side pushes back
    chan.write(b"last words")
    device.conn.sendEOF(chan)
    device.pump.flush()
    assert tcp.value() == b"last words"
    assert tcp.events[-2:] == ["unregisterProducer", "loseWriteConnection"]
    assert tcp.producer is None and not tcp.disconnecting
    # The other direction still works until the TCP side is done too.
    end.dataReceived(b"reply")
    device.pump.flush()
    assert bytes(chan.received) == b"reply"
    assert not chan.is_closed
    end.readConnectionLost()
    device.pump.flush()
    assert chan.events == ["data", "eof", "closed"]
    assert tcp.disconnecting


def test_tcp_eof_waits_for_the_buffered_data(hub: Hub, device: Device, pipe: Any) -> None:
    end, tcp, chan, _splice = pipe
    chan.hold_window = True
    window = chan.localWindowLeft
    end.dataReceived(b"q" * (window + 5000))
    end.readConnectionLost()
    device.pump.flush()
    assert len(chan.received) == window
    assert chan.events == ["data"], "EOF overtook data still buffered in the hub"
    device.conn.adjustWindow(chan, 4000)
    device.pump.flush()
    assert chan.events == ["data"]
    device.conn.adjustWindow(chan, window)
    device.pump.flush()
    assert len(chan.received) == window + 5000
    assert chan.events == ["data", "eof"]
    # The device closes its side: the pipe is done.
    device.conn.sendEOF(chan)
    device.pump.flush()
    assert chan.events == ["data", "eof", "closed"]
    assert tcp.disconnecting
    assert hub.sessions.get("site-a").pipes == set()


def test_tcp_gone_before_the_channel_opens(hub: Hub, reactor: RecordingReactor,
                                           device: Device) -> None:
    port = allocated(device.forward(b"", 0))
    end = reactor.listener(port).factory.buildProtocol(IPv4Address("TCP", "203.0.113.9", 1))
    tcp = TCPTransport()
    end.makeConnection(tcp)
    errors = []
    try:
        end.connectionLost(None)  # before the device confirmed the channel
    except Exception as e:  # the reactor would log it and carry on
        errors.append(e)
    device.pump.flush()
    (chan,) = device.conn.forwarded
    assert errors == []
    assert chan.is_closed
    assert hub.sessions.get("site-a").pipes == set()


def test_tcp_connection_lost_closes_the_channel(hub: Hub, device: Device, pipe: Any) -> None:
    end, _tcp, chan, _splice = pipe
    end.connectionLost(None)
    device.pump.flush()
    assert chan.is_closed
    assert hub.sessions.get("site-a").pipes == set()


def test_device_closing_the_channel_closes_tcp(hub: Hub, device: Device, pipe: Any) -> None:
    _end, tcp, chan, _splice = pipe
    tcp.producer.pauseProducing()
    chan.loseConnection()
    device.pump.flush()
    assert tcp.disconnecting and tcp.producer is None
    assert hub.sessions.get("site-a").pipes == set()


def test_device_hanging_up_closes_its_pipes(hub: Hub, reactor: RecordingReactor,
                                            device: Device, pipe: Any) -> None:
    _end, tcp, _chan, _splice = pipe
    device.hang_up()
    assert tcp.disconnecting
    assert reactor.listening() == {}
    assert hub.sessions.online() == []
    assert not hub.registry.node("site-a").online


@implementer(IPacketSink)
class RecordingSSH:
    """Just enough of a transport and connection for a channel's writes."""

    def __init__(self) -> None:
        self.packets: list[bytes] = []
        self.transport = self
        self.channelsToRemoteChannel: dict[Any, int] = {}

    def sendPacketParts(self, kind: int, head: bytes, data: Any) -> None:
        self.packets.append(bytes(data))

    def sendChannelData(self, recipient: int, data: Any, maxPacket: int) -> bool:
        return False  # packet by packet, each recorded

    def beginBatch(self) -> bool:
        return False

    def endBatch(self) -> None:
        pass

    def callAfterInput(self, action: Any) -> bool:
        return False


def test_a_relayed_view_waiting_for_window_is_kept_as_a_copy() -> None:
    from hub.tunnel.relay import RelayChannel

    ssh = RecordingSSH()
    chan = RelayChannel(b"session", remoteWindow=10, remoteMaxPacket=4)
    chan.conn = ssh
    ssh.channelsToRemoteChannel[chan] = 7
    packet_buffer = bytearray(b"0123456789abcdef")
    chan.write(memoryview(packet_buffer))  # a view of the transport's packet buffer
    packet_buffer[:] = b"X" * 16  # reused for the next packet
    assert ssh.packets == [b"0123", b"4567", b"89"]
    assert chan.buf == b"abcdef"  # what waits for window was copied


# -- dialling into the device ---------------------------------------------------

class Probe(OpenNotice, channel.SSHChannel):
    """A channel dialled into the device; records how its open ended."""

    name = b"forwarded-tcpip"

    def __init__(self) -> None:
        channel.SSHChannel.__init__(self)
        self.outcome: list[Any] = []

    def channelOpen(self, specificData: bytes) -> None:
        self.outcome.append("open")
        self.notify_open()

    def openFailed(self, reason: Any) -> None:
        self.outcome.append(reason)
        self.notify_failed(reason)


def dial(device: Device, hub: Hub, target: str | int,
         origin: tuple[str | bytes, int] = ("127.0.0.1", 0)) -> tuple[Probe, list[Any]]:
    tunnel = hub.sessions.get("site-a")
    assert tunnel is not None
    probe = Probe()
    results: list[Any] = []
    tunnel.dial(target, probe, origin).addBoth(results.append)
    device.pump.flush()
    return probe, results


def test_dial_a_service_opens_its_forward(hub: Hub, device: Device) -> None:
    port = allocated(device.forward(b"localhost", 0))
    probe, results = dial(device, hub, "ssh", (b"10.1.2.3", 4444))
    assert results == [probe] and probe.outcome == ["open"]
    (chan,) = device.conn.forwarded
    assert (chan.bind, chan.port, chan.origin, chan.origin_port) == (
        b"localhost", port, b"10.1.2.3", 4444)
    assert chan.is_open


@pytest.mark.parametrize(("bind", "requested", "target"), [
    (b"", 22, 22),              # the service a port names: 22 is ssh
    (b"", 8080, 8080),          # port-8080
    (b"web", 80, 80),           # no "http" service, but the device asked for port 80
    (b"", 8080, "port-8080"),   # by service name
    (b"HTTP", 0, "Http"),       # service names are case-insensitive
])
def test_dial_finds_the_forward_an_operator_means(
        device: Device, hub: Hub, bind: bytes, requested: int, target: str | int) -> None:
    device.forward(bind, requested)
    probe, results = dial(device, hub, target)
    assert results == [probe]
    (chan,) = device.conn.forwarded
    assert chan.bind == bind


@pytest.mark.parametrize(("target", "text"), [
    ("http", "node site-a does not forward its http service"),
    (443, "node site-a does not forward port 443"),
])
def test_dial_an_unknown_service_is_refused(device: Device, hub: Hub, target: str | int,
                                            text: str) -> None:
    allocated(device.forward(b"", 0))
    probe, results = dial(device, hub, target)
    (failure,) = results
    assert failure.check(ChannelRefused) and not failure.check(DeviceRefused)
    assert (failure.value.reason, failure.value.text) == (OPEN_CONNECT_FAILED, text)
    assert probe.outcome == [failure.value]  # the channel hears it too
    assert device.conn.forwarded == []


def test_dial_refused_by_the_device(device: Device, hub: Hub) -> None:
    allocated(device.forward(b"", 0))
    device.conn.refuse_channels = True
    probe, results = dial(device, hub, 22)
    (failure,) = results
    assert failure.check(DeviceRefused)
    refusal = failure.value
    assert refusal.reason == OPEN_CONNECT_FAILED
    assert isinstance(refusal.cause, ConchError) and refusal.cause.data == 2
    assert refusal.text == "node site-a port 22: connect failed (code 2, connect failed)"
    assert (refusal.code, refusal.words) == (2, "connect failed (code 2, connect failed)")
    assert probe.outcome == [refusal.cause]


def test_dial_after_the_session_closed_is_refused(device: Device, hub: Hub) -> None:
    allocated(device.forward(b"", 0))
    tunnel = hub.sessions.get("site-a")
    device.hang_up()
    assert tunnel is not None and tunnel.closed
    probe = Probe()
    results: list[Any] = []
    tunnel.dial("ssh", probe).addBoth(results.append)
    (failure,) = results
    assert failure.check(ChannelRefused)


# -- the jump host: an operator's direct-tcpip to a node --------------------------

@pytest.fixture
def operator(hub: Hub, factory: HubSSHFactory, reactor: RecordingReactor, device: Device
             ) -> Device:
    """alice, an operator granted every node, logged in; site-a approved and online."""
    key = new_key()
    hub.registry.add_user("alice", None, [(key.public().blob(), "fp")], ["*"], "test")
    hub.registry.set_state("site-a", "approved", "test")
    alice = Device(factory, reactor, key=key, user=b"alice", peer="198.51.100.7")
    assert alice.connected
    return alice


def jump(operator: Device, device: Device, data: bytes) -> Opener:
    opener = Opener()
    operator.conn.openChannel(opener, data)
    for _ in range(3):  # operator -> hub -> device -> hub -> operator
        operator.pump.flush()
        device.pump.flush()
    return opener


def test_jump_reaches_the_node_through_dial(hub: Hub, device: Device, operator: Device) -> None:
    allocated(device.forward(b"", 0))
    opener = jump(operator, device, common.NS(b"SITE-A") + struct.pack(">L", 22)
                  + common.NS(b"10.9.8.7") + struct.pack(">L", 5555))
    assert opener.outcome == ["open"]
    (chan,) = device.conn.forwarded
    # The operator's originator fields are passed on as they came.
    assert (chan.bind, chan.origin, chan.origin_port) == (b"", b"10.9.8.7", 5555)
    opener.write(b"hello device")
    operator.pump.flush()
    device.pump.flush()
    assert bytes(chan.received) == b"hello device"


class Jumper(Opener):
    """An operator's jump channel: records what comes back, in order."""

    def __init__(self) -> None:
        Opener.__init__(self)
        self.events: list[Any] = []

    def dataReceived(self, data: bytes) -> None:
        self.events.append(data)

    def eofReceived(self) -> None:
        self.events.append("eof")

    def closed(self) -> None:
        self.events.append("closed")
        self.loseConnection()


def test_what_the_device_sends_as_it_opens_reaches_the_operator_in_order(
        hub: Hub, reactor: RecordingReactor, device: Device, operator: Device) -> None:
    # The device's bytes, EOF and close come with its open confirmation, while
    # the jump host still reads the operator's grant again (in the registry
    # thread) before it confirms the operator's channel.
    allocated(device.forward(b"", 0))
    avatar = operator.server.avatar
    avatar.needs = evolve(avatar.needs, grants=RegistryGrants(LaterCalls(hub.calls, reactor)))
    device.conn.greeting = b"SSH-2.0-OpenSSH_9.6\r\n"
    opener = Jumper()
    operator.conn.openChannel(opener, common.NS(b"site-a") + struct.pack(">L", 22)
                              + common.NS(b"10.9.8.7") + struct.pack(">L", 5555))
    for _ in range(6):
        operator.pump.flush()
        device.pump.flush()
        reactor.advance(0)
    assert opener.outcome == ["open"]
    assert opener.events == [b"SSH-2.0-OpenSSH_9.6\r\n", "eof", "closed"]


@pytest.mark.parametrize(("port", "refuse", "code", "text"), [
    (443, False, OPEN_CONNECT_FAILED, b"node site-a does not forward port 443"),
    (22, True, OPEN_CONNECT_FAILED,
     b"node site-a port 22: connect failed (code 2, connect failed)"),
])
def test_jump_refusals(hub: Hub, device: Device, operator: Device, port: int, refuse: bool,
                       code: int, text: bytes) -> None:
    allocated(device.forward(b"", 0))
    device.conn.refuse_channels = refuse
    opener = jump(operator, device, common.NS(b"site-a") + struct.pack(">L", port)
                  + common.NS(b"10.9.8.7") + struct.pack(">L", 5555))
    (reason,) = opener.outcome
    assert (reason.data, reason.value) == (code, text)
    assert not [e for e in hub.registry.audit_log() if e.action == "jump"]


@pytest.mark.parametrize(("data", "why"), [
    (common.NS(b"site-a") + b"\0", "tcpip channel open: truncated port"),
    (common.NS(b"site-\xff") + struct.pack(">L", 22) + common.NS(b"") + struct.pack(">L", 0),
     "host: bad UTF-8"),
])
def test_malformed_jump_is_refused(device: Device, operator: Device, data: bytes,
                                   why: str) -> None:
    allocated(device.forward(b"", 0))
    opener = jump(operator, device, data)
    (reason,) = opener.outcome
    assert reason.data == OPEN_ADMINISTRATIVELY_PROHIBITED
    assert reason.value == f"malformed direct-tcpip request: {why}".encode()
    assert device.conn.forwarded == []
    assert not operator.server.transport.disconnecting


# -- the hub's SSH client to a device goes through dial too ------------------------

@pytest.mark.parametrize(("forward", "refuse", "text"), [
    (b"http", False, "node site-a does not forward its ssh service"),
    (b"", True, "the device's SSH service behind its forward *:0 refused the connection: "
                "connect failed (code 2, connect failed)"),
])
def test_device_client_refusals(hub: Hub, reactor: RecordingReactor, device: Device,
                                forward: bytes, refuse: bool, text: str) -> None:
    allocated(device.forward(forward, 0))
    device.conn.refuse_channels = refuse
    tunnel = hub.sessions.get("site-a")
    assert tunnel is not None
    timers = set(reactor.getDelayedCalls())
    ready, _client = device_client.connect(tunnel, "root", new_key(), None, clock=reactor)
    failures: list[Any] = []
    ready.addErrback(failures.append)
    device.pump.flush()
    (failure,) = failures
    assert failure.check(device_client.DeviceError)
    assert str(failure.value) == text
    assert set(reactor.getDelayedCalls()) == timers  # no login timer left behind


def test_device_client_opens_the_ssh_forward(hub: Hub, reactor: RecordingReactor,
                                             device: Device) -> None:
    port = allocated(device.forward(b"localhost", 0))
    tunnel = hub.sessions.get("site-a")
    assert tunnel is not None
    device_client.connect(tunnel, "root", new_key(), None, clock=reactor)
    device.pump.flush()
    (chan,) = device.conn.forwarded
    assert (chan.bind, chan.port, chan.origin, chan.origin_port) == (
        b"localhost", port, b"127.0.0.1", 0)
    assert chan.is_open


def failures_of_a_login(hub: Hub, reactor: RecordingReactor, device: Device) -> list[Any]:
    """The hub logging in to site-a's ssh forward: the failures it ends with."""
    allocated(device.forward(b"localhost", 0))
    tunnel = hub.sessions.get("site-a")
    assert tunnel is not None
    ready, _client = device_client.connect(tunnel, "root", new_key(), None, clock=reactor)
    failures: list[Any] = []
    ready.addErrback(failures.append)
    return failures


def test_device_client_gives_up_on_a_device_that_never_logs_in(
        hub: Hub, reactor: RecordingReactor, device: Device) -> None:
    failures = failures_of_a_login(hub, reactor, device)
    device.pump.flush()  # the channel opens; the device never answers SSH
    reactor.advance(device_client.VERSION_TIMEOUT - 1)
    assert failures == []
    reactor.advance(1)
    (failure,) = failures
    assert failure.check(device_client.DeviceError)
    assert str(failure.value) == (
        "the device's ssh forward did not answer as an SSH server within 10 s (it sent "
        "nothing); is the forward pointing at another service?")
    assert not any(c.active() for c in reactor.getDelayedCalls()
                   if c.func is not None and "no_version" in repr(c.func))


def test_device_client_names_what_a_forward_that_is_not_ssh_said(
        hub: Hub, reactor: RecordingReactor, device: Device) -> None:
    failures = failures_of_a_login(hub, reactor, device)
    device.pump.flush()
    (chan,) = device.conn.forwarded
    chan.write(b"220 mail.example ESMTP ready\r\n")  # a mail server behind the ssh forward
    device.pump.flush()
    reactor.advance(device_client.VERSION_TIMEOUT)
    (failure,) = failures
    assert "it said '220 mail.example ESMTP ready'" in str(failure.value)
    device.pump.flush()
    assert chan.is_closed  # the hub closed its end


def test_device_client_names_a_forward_that_answers_and_closes(
        hub: Hub, reactor: RecordingReactor, device: Device) -> None:
    failures = failures_of_a_login(hub, reactor, device)
    device.pump.flush()
    (chan,) = device.conn.forwarded
    # A web server behind the ssh forward: an error page for the hub's version line.
    chan.write(b"HTTP/1.0 400 Bad request\r\n\r\n")
    chan.loseConnection()
    device.pump.flush()
    (failure,) = failures
    assert str(failure.value) == (
        "the device's ssh forward did not answer as an SSH server (it said "
        "'HTTP/1.0 400 Bad request'); is the forward pointing at another service?")


def test_device_client_gives_up_on_a_device_that_answers_but_never_logs_in(
        hub: Hub, reactor: RecordingReactor, device: Device) -> None:
    failures = failures_of_a_login(hub, reactor, device)
    device.pump.flush()
    (chan,) = device.conn.forwarded
    # A line before the version line (RFC 4253 allows them), the version, then silence.
    chan.write(b"Authorized use only\r\nSSH-2.0-OpenSSH_9.2\r\n")
    device.pump.flush()
    reactor.advance(device_client.LOGIN_TIMEOUT - 1)
    assert failures == []
    reactor.advance(1)
    (failure,) = failures
    assert str(failure.value) == "the device did not complete the login within 30 s"


def test_forward_port_leaves_the_descriptor_reserve_to_ssh(
        hub: Hub, reactor: RecordingReactor, device: Device) -> None:
    from hub.tunnel.descriptors import DescriptorReserve

    port = allocated(device.forward(b"", 0))
    open_now = [900]
    hub.sessions.descriptors = DescriptorReserve(reactor, reserve=100, limit=lambda: 1000,
                                                 count=lambda: open_now[0])
    listener = reactor.listener(port).factory
    addr = IPv4Address("TCP", "203.0.113.9", 51000)
    assert listener.buildProtocol(addr) is None
    # Logins still have their descriptors; once some are free, the port accepts again.
    open_now[0] = 500
    reactor.advance(1)
    end, _tcp, chan = open_tcp(reactor, device, port)
    assert end is not None and chan is not None


def test_descriptor_estimate_counts_what_it_let_in() -> None:
    from hub.tunnel.descriptors import DescriptorReserve

    clock = MemoryReactorClock()
    counts = []

    def count() -> int:
        counts.append(1)
        return 890

    limits = []

    def limit() -> int:
        limits.append(1)
        return 1000

    reserve = DescriptorReserve(clock, reserve=100, limit=limit, count=count)
    assert [reserve.allows("port 1") for _ in range(12)] == [True] * 10 + [False] * 2
    assert len(counts) == 1  # one directory read for the burst
    assert len(limits) == 1  # and one getrlimit, not one per connection
    clock.advance(1)
    assert reserve.allows("port 1")


# -- a short connection's cost: no log events, EOF and CLOSE together -------------

def test_a_short_connection_logs_nothing_below_debug(hub: Hub, reactor: RecordingReactor,
                                                     device: Device) -> None:
    # Conch's connection and channel built an info or debug event for every
    # forwarded connection's open, close and remote close (filtered out below
    # debug, but built, timestamped and published all the same).
    port = allocated(device.forward(b"", 0))
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        end, tcp, chan = open_tcp(reactor, device, port)
        assert chan is not None
        end.dataReceived(b"ping")
        chan.write(b"pong")
        device.conn.sendEOF(chan)
        device.pump.flush()
        end.readConnectionLost()
        device.pump.flush()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert tcp.value() == b"pong" and bytes(chan.received) == b"ping"
    assert chan.events == ["data", "eof", "closed"]
    hub_conn = hub.sessions.get("site-a").conn
    ours = [formatEvent(e) for e in events
            if e.get("log_source") is hub_conn or isinstance(e.get("log_source"), SpliceChannel)]
    assert ours == []


@implementer(IPacketSink)
class RecordingSink:
    """The hub transport's sink, recording the batches asked of it."""

    def __init__(self, inner: Any, record: list[str]) -> None:
        self.inner, self.record = inner, record

    def sendPacketParts(self, messageType: int, head: bytes, data: Any) -> None:
        self.inner.sendPacketParts(messageType, head, data)

    def sendChannelData(self, recipient: int, data: Any, maxPacket: int) -> bool:
        return bool(self.inner.sendChannelData(recipient, data, maxPacket))

    def beginBatch(self) -> bool:
        self.record.append("begin")
        self.inner.beginBatch()
        return True

    def endBatch(self) -> None:
        self.record.append("end")
        self.inner.endBatch()

    def callAfterInput(self, action: Any) -> bool:
        return bool(self.inner.callAfterInput(action))


def test_tcp_eof_sends_eof_and_close_in_one_batch(hub: Hub, device: Device, pipe: Any) -> None:
    # The device is done first; the client's EOF then ends the pipe: its
    # channel EOF and CLOSE go to the device with one system call.
    end, _tcp, chan, splice = pipe
    device.conn.sendEOF(chan)
    device.pump.flush()
    record: list[str] = []
    splice._sink = RecordingSink(splice.packet_sink(), record)
    transport = hub.sessions.get("site-a").conn.transport
    send = transport.sendPacket

    def recording(message_type: int, payload: bytes) -> None:
        record.append({96: "eof", 97: "close"}.get(message_type, str(message_type)))
        send(message_type, payload)

    transport.sendPacket = recording
    end.readConnectionLost()
    device.pump.flush()
    assert record == ["begin", "eof", "close", "end"]
    assert chan.events == ["eof", "closed"]


def test_early_data_beyond_the_device_window_keeps_reading_paused(
        reactor: RecordingReactor, device: Device) -> None:
    port = allocated(device.forward(b"", 0))
    device.conn.channel_window = EARLY_LIMIT // 2  # a device that offers a small window
    device.conn.hold_windows = True  # ... and does not read yet
    end = reactor.listener(port).factory.buildProtocol(IPv4Address("TCP", "203.0.113.9", 1))
    tcp = TCPTransport()
    end.makeConnection(tcp)
    end.dataReceived(b"e" * EARLY_LIMIT)
    device.pump.flush()
    (chan,) = device.conn.forwarded
    assert len(chan.received) == EARLY_LIMIT // 2
    assert tcp.producerState == "paused", "resumed although the device's window is full"
    device.conn.adjustWindow(chan, EARLY_LIMIT)
    device.pump.flush()
    assert len(chan.received) == EARLY_LIMIT
    assert tcp.producerState == "producing"


def test_port_pipe_bytes_count_in_the_hub_traffic(hub: Hub, device: Device, pipe: Any) -> None:
    end, _tcp, chan, _splice = pipe
    traffic = hub.sessions.traffic
    before = (traffic.to_device, traffic.from_device)
    end.dataReceived(b"12345")
    chan.write(b"abc")
    device.pump.flush()
    assert (traffic.to_device - before[0], traffic.from_device - before[1]) == (5, 3)


def test_a_connection_accepted_as_its_forward_is_cancelled_is_refused(
        hub: Hub, reactor: RecordingReactor, device: Device) -> None:
    http = allocated(device.forward(b"http", 0))
    factory = reactor.listener(http).factory
    end = factory.buildProtocol(IPv4Address("TCP", "203.0.113.9", 1))  # accepted ...
    assert device.cancel(b"http", http) == ("ok", b"")  # ... as the device cancels
    tcp = TCPTransport()
    end.makeConnection(tcp)
    device.pump.flush()
    assert device.conn.forwarded == []  # no channel for a forward that is gone
    assert tcp.disconnecting
    assert hub.sessions.get("site-a").pipes == set()


# -- the in-tunnel NSCA intake -------------------------------------------------------

class NSCASender(Opener):
    """send_nsca through the device's `ssh -L PORT:localhost:5667`: what the intake sends
    back (its init packet) is kept."""

    def __init__(self) -> None:
        Opener.__init__(self)
        self.received = bytearray()

    def dataReceived(self, data: bytes) -> None:
        self.received += data


def test_in_tunnel_nsca_results_beyond_the_window_are_all_stored(
        hub: Hub, reactor: RecordingReactor, key: keys.Key) -> None:
    hub.monitoring = Monitoring(hub.registry, hub.config.nsca, reactor)
    hub.registry.set_state("site-a", "approved", "test")
    device = Device(start_factory(hub), reactor, key=key)
    sender = NSCASender()
    device.conn.openChannel(sender, common.NS(b"localhost") + struct.pack(">L", 5667)
                            + common.NS(b"127.0.0.1") + struct.pack(">L", 40000))
    device.pump.flush()
    assert sender.outcome == ["open"]
    encrypt = Encryptor(1, hub.config.nsca.password.encode(), bytes(sender.received[:128])).encrypt
    count = WINDOW // PACKET_SIZE + 100  # more than one window: the intake must grant more
    sender.write(b"".join(
        encrypt(build_packet(b"site-a", b"svc%d" % i, 0, b"OK", int(reactor.seconds())))
        for i in range(count)))
    for _ in range(20):
        device.pump.flush()
        reactor.advance(STORE_INTERVAL)
    assert hub.monitoring.counts.accepted == count
    assert hub.registry.query("SELECT COUNT(*) FROM results") == [(count,)]
