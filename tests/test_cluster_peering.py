"""Two hubs on one registry, in memory: peer logins, the dial channel, routing and takeover.

Hub A holds node site-a's tunnel (the in-memory device of `memory_gateway.Site`);
hub B shares A's registry file and reaches site-a through its peer connection
to A's peer listener. Every connection is an iosim pump on one MemoryReactorClock.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest
from memory_gateway import OperatorChannel, Site, exec_
from memory_hub import ClientTransport, LaterCalls, make_hub, new_key, start_factory
from twisted.conch.ssh import channel, common, keys
from twisted.cred.credentials import SSHPrivateKey
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, protocol
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, connect

from hub.access.gateway import JumpDeviceChannel
from hub.cluster.dialwire import DIAL, DialRequest, pack_dial, unpack_dial
from hub.cluster.peerclient import PeerConnection, PeerLinks, PeerUnreachable
from hub.cluster.peerserver import PeerKeyChecker, build_peer_factory
from hub.cluster.remote import RemoteTunnel, Routes
from hub.cluster.view import FleetView
from hub.rules.cluster import DEAD_AFTER, HEARTBEAT, STOPPED
from hub.ssh.wire import WireError
from hub.store.hubs import HubRow


def key_line(key: keys.Key, comment: bytes) -> str:
    return key.public().toString("openssh", comment=comment).decode()


class TwoHubs:
    def __init__(self, tmp_path: Path) -> None:
        self.site = Site(tmp_path)
        self.clock = self.site.clock
        self.a = self.site.hub
        self.a.registry.hub_id = self.a.sessions.hub_id = "hub-a"
        self.a.registry.mark_online("site-a", "192.0.2.20")  # held by hub A
        self.key_a, self.key_b = new_key(), new_key()
        self.peer_factory = build_peer_factory(self.a.calls, self.a.sessions, self.key_a,
                                               self.clock, self.a.config.limits, 0, 3)
        self.peer_factory.startFactory()
        self.a.registry.hub_started("hub-a", "127.0.0.1:4101", key_line(self.key_a, b"a"))
        self.b = make_hub(tmp_path, self.clock, keepalive="0")
        self.b.registry.hub_id = self.b.sessions.hub_id = "hub-b"
        self.b.registry.hub_started("hub-b", "127.0.0.1:4102", key_line(self.key_b, b"b"))
        self.links = PeerLinks(self.b.calls, self.clock, "hub-b", self.key_b, self.connect,
                               keepalive=0)
        # Hub B routes from the fleet as last read: read again on each change applied.
        self.view = FleetView(self.b.calls)
        self.b.sessions.remote = Routes(self.view, self.b.sessions, self.links,
                                        "hub-b").remote
        self.b.sessions.on_change = self.view.refresh
        self.view.refresh()
        self.factory_b = start_factory(self.b)
        self.dialled: list[tuple[str, int]] = []

    def connect(self, host: str, port: int, factory: protocol.ClientFactory
                ) -> defer.Deferred[Any]:
        self.dialled.append((host, port))
        addr = IPv4Address("TCP", "127.0.0.1", 40100)
        server = self.peer_factory.buildProtocol(addr)
        client = factory.buildProtocol(addr)
        self.site.pumps.append(connect(
            server, FakeTransport(server, isServer=True, peerAddress=addr),
            client, FakeTransport(client, isServer=False), greet=False, clock=self.clock))
        return defer.succeed(client)

    def peer(self) -> PeerConnection | Failure:
        found: list[Any] = []
        self.links.connection("hub-a").addBoth(found.append)
        self.site.settle()
        [result] = found
        return result  # type: ignore[no-any-return]

    def operator_on_b(self, login: bytes, requests: list[tuple[bytes, bytes]]) -> OperatorChannel:
        client = self.operator_client(login)
        chan = OperatorChannel(requests, b"", False)
        client.service.openChannel(chan)
        self.site.settle()
        return chan

    def operator_client(self, login: bytes) -> ClientTransport:
        client = ClientTransport(login, self.site.alice, None)
        addr = IPv4Address("TCP", "192.0.2.10", 40000)
        server = self.factory_b.buildProtocol(addr)
        self.site.pumps.append(connect(
            server, FakeTransport(server, isServer=True, peerAddress=addr),
            client, FakeTransport(client, isServer=False), greet=False, clock=self.clock))
        self.site.settle()
        assert client.factory_state.get("connected"), "the operator did not log in to hub B"
        return client


@pytest.fixture
def hubs(tmp_path: Path) -> TwoHubs:
    return TwoHubs(tmp_path)


class Probe(JumpDeviceChannel):
    """A dial channel opened straight on the peer connection; records what comes back."""

    def __init__(self) -> None:
        JumpDeviceChannel.__init__(self)
        self.name = DIAL
        self.received = b""
        self.outcome: list[Any] = []
        self.opened.addBoth(self.outcome.append)

    def dataReceived(self, data: bytes) -> None:
        self.received += data


def dial(hubs: TwoHubs, data: bytes) -> Probe:
    conn = hubs.peer()
    assert isinstance(conn, PeerConnection)
    probe = Probe()
    conn.openChannel(probe, data)
    hubs.site.settle()
    return probe


def refusal(probe: Probe) -> str:
    [outcome] = probe.outcome
    assert isinstance(outcome, Failure), outcome
    text = outcome.value.args[0]
    return text.decode() if isinstance(text, bytes) else str(text)


# -- peer logins ---------------------------------------------------------------

def test_a_live_hub_with_its_published_key_logs_in(hubs: TwoHubs) -> None:
    assert isinstance(hubs.peer(), PeerConnection)
    assert hubs.dialled == [("127.0.0.1", 4101)]
    # One connection per peer: the next dial reuses it.
    assert isinstance(hubs.peer(), PeerConnection) and len(hubs.dialled) == 1


def test_an_unknown_peer_key_is_refused(hubs: TwoHubs) -> None:
    hubs.links.key = new_key()  # not what hub-b publishes
    result = hubs.peer()
    assert isinstance(result, Failure) and result.check(PeerUnreachable)
    assert "hub hub-a refused this hub's login" in str(result.value)
    assert hubs.links.current("hub-a") is None


def test_a_dead_hubs_key_is_refused(hubs: TwoHubs) -> None:
    hubs.clock.advance(HEARTBEAT * DEAD_AFTER + 1)
    hubs.a.registry.hub_heartbeat("hub-a")  # A lives on, B's row went silent
    result = hubs.peer()
    assert isinstance(result, Failure) and result.check(PeerUnreachable)
    assert "refused this hub's login" in str(result.value)


def test_a_peer_with_another_host_key_than_published_is_refused(hubs: TwoHubs) -> None:
    hubs.a.registry.hub_started("hub-a", "127.0.0.1:4101", key_line(new_key(), b"other"))
    result = hubs.peer()
    assert isinstance(result, Failure) and result.check(PeerUnreachable)
    assert "presented host key SHA256:" in str(result.value)
    assert "not the peer key it publishes" in str(result.value)


@pytest.mark.parametrize(("heartbeat", "why"), [
    (STOPPED, "hub hub-a has stopped"),
    (1000.0 - HEARTBEAT * DEAD_AFTER - 5, f"hub hub-a is dead (last heartbeat "
                                          f"{HEARTBEAT * DEAD_AFTER + 5:.0f} s ago)"),
])
def test_a_stopped_or_dead_peer_is_refused_saying_which(heartbeat: float, why: str) -> None:
    key = new_key()
    row = HubRow("hub-a", "127.0.0.1:4101", key_line(key, b"peer"), 1.0, heartbeat)
    clock = Clock()
    clock.advance(1000.0)
    checker = PeerKeyChecker(None, clock)  # type: ignore[arg-type]  # _check reads no registry
    credentials = SSHPrivateKey(b"hub-a", b"ssh-ed25519", key.public().blob(), b"", None)
    with pytest.raises(UnauthorizedLogin) as refused:
        checker._check([row], credentials)
    assert str(refused.value) == why


def test_a_dead_peer_is_not_dialled(hubs: TwoHubs) -> None:
    hubs.clock.advance(HEARTBEAT * DEAD_AFTER + 1)
    result = hubs.peer()
    assert isinstance(result, Failure) and "hub hub-a is not alive" in str(result.value)
    assert hubs.dialled == []


# -- the dial channel ----------------------------------------------------------

def test_dial_request_round_trip_and_malformed() -> None:
    for request in (DialRequest("site-a", "ssh", "192.0.2.1", 5000),
                    DialRequest("site-a", 8080, "", 0)):
        assert unpack_dial(pack_dial(request)) == request
    good = pack_dial(DialRequest("site-a", "ssh", "o", 1))
    for bad, why in ((good[:-1], "truncated"), (good + b"x", "trailing"),
                     (pack_dial(DialRequest("", "ssh", "o", 1)), "names no node"),
                     (pack_dial(DialRequest("n", "", "o", 1)), "either a service or a port")):
        with pytest.raises(WireError, match=why):
            unpack_dial(bad)


def test_dial_to_an_unknown_node_is_refused(hubs: TwoHubs) -> None:
    probe = dial(hubs, pack_dial(DialRequest("nowhere", "ssh", "192.0.2.10", 1)))
    assert refusal(probe) == "no node named 'nowhere'"


def test_dial_to_a_node_not_held_here_is_refused(hubs: TwoHubs) -> None:
    hubs.site.enroll("site-b", hubs.site.sshd)
    probe = dial(hubs, pack_dial(DialRequest("site-b", "ssh", "192.0.2.10", 1)))
    assert refusal(probe) == "node site-b is not connected to this hub"


def test_dial_to_a_service_the_node_does_not_forward_is_refused(hubs: TwoHubs) -> None:
    probe = dial(hubs, pack_dial(DialRequest("site-a", "http", "192.0.2.10", 1)))
    assert refusal(probe) == "node site-a does not forward its http service"


def test_a_malformed_dial_is_refused(hubs: TwoHubs) -> None:
    probe = dial(hubs, b"\x00\x00\x00\x09site")
    assert refusal(probe).startswith("malformed dial request: dial request truncated")


def test_dial_relays_to_the_device(hubs: TwoHubs) -> None:
    probe = dial(hubs, pack_dial(DialRequest("site-a", 22, "192.0.2.10", 1)))
    assert probe.outcome == [probe]
    assert probe.received.startswith(b"SSH-2.0-")  # the device's sshd, through hub A


# -- routing -------------------------------------------------------------------

def test_hub_b_returns_a_remote_tunnel_for_a_node_hub_a_holds(hubs: TwoHubs) -> None:
    tunnel = hubs.b.sessions.get("SITE-A")
    assert isinstance(tunnel, RemoteTunnel)
    assert (tunnel.node, tunnel.hub, [f.service for f in tunnel.table]) == (
        "site-a", "hub-a", ["ssh"])
    assert hubs.b.sessions.local("site-a") is None
    # Hub A holds it itself; nobody holds site-b.
    assert hubs.a.sessions.get("site-a") is hubs.a.sessions.local("site-a") is not None
    hubs.site.enroll("site-b", hubs.site.sshd)
    assert hubs.b.sessions.get("site-b") is None
    # A dead hub's nodes are not routed to.
    hubs.clock.advance(HEARTBEAT * DEAD_AFTER + 1)
    assert hubs.b.sessions.get("site-a") is None


def test_an_operator_on_hub_b_runs_a_command_on_a_device_of_hub_a(hubs: TwoHubs) -> None:
    chan = hubs.operator_on_b(b"alice:site-a", exec_(b"hello"))
    assert (chan.out, chan.err, chan.status) == (b"hello from root\n", b"err\n", 3)
    assert hubs.site.sshd.logins == [b"root"]
    # Hub B checked the grant and wrote the audit (one registry, so one log).
    gateway = [e for e in hubs.b.registry.audit_log() if e.action == "gateway"]
    assert [e.actor.split("@")[0] for e in gateway] == ["alice"]


class Jump(channel.SSHChannel):
    """An operator's `direct-tcpip` channel (`ssh -J alice@hub-b site-a`)."""

    name = b"direct-tcpip"

    def __init__(self) -> None:
        channel.SSHChannel.__init__(self)
        self.out = b""
        self.outcome: list[Any] = []

    def channelOpen(self, specificData: bytes) -> None:
        self.outcome.append("open")

    def openFailed(self, reason: Any) -> None:
        self.outcome.append(reason)

    def dataReceived(self, data: bytes) -> None:
        self.out += data


def test_the_devices_first_bytes_reach_an_operator_jumping_through_hub_b(
        hubs: TwoHubs) -> None:
    # The device's sshd sends its banner as soon as the connection opens: it
    # reaches hub B with hub A's open confirmation, while hub B still reads the
    # operator's grant before it confirms the operator's channel.
    hubs.b.calls = LaterCalls(hubs.b.calls, hubs.clock)  # type: ignore[assignment]
    client = hubs.operator_client(b"alice")
    jump = Jump()
    client.service.openChannel(jump, common.NS(b"site-a") + struct.pack(">L", 22)
                               + common.NS(b"127.0.0.1") + struct.pack(">L", 50000))
    hubs.site.settle()
    assert jump.outcome == ["open"]
    assert jump.out.startswith(b"SSH-2.0-")  # not the key exchange that follows it


def test_a_node_on_a_hub_b_cannot_reach_is_refused_with_a_reason(hubs: TwoHubs) -> None:
    hubs.links.key = new_key()
    chan = hubs.operator_on_b(b"alice:site-a", exec_(b"hello"))
    assert b"hub-a" in chan.out + chan.err and chan.status != 0


def test_a_pair_name_on_hub_b_reaches_its_active_member_on_hub_a(hubs: TwoHubs) -> None:
    hubs.site.enroll("site-b", hubs.site.sshd)  # the clone: offline
    hubs.b.registry.add_pair("site-pbx", "site-b", "site-a", "test")
    chan = hubs.operator_on_b(b"alice:site-pbx", exec_(b"hello"))
    assert (chan.out, chan.status) == (b"hello from root\n", 3)


def test_every_hub_agrees_on_a_pairs_active_member_and_only_its_hub_listens(
        hubs: TwoHubs) -> None:
    from hub.tunnel.pairs import PairListener

    def listening(hub: Any) -> list[int]:
        return [port for port, factory, _, _ in hubs.clock.tcpServers
                if isinstance(factory, PairListener) and factory.pairs is hub.sessions.pairs]

    hubs.site.enroll("site-b", hubs.site.sshd)  # the master: offline
    hubs.a.registry.set_lease_active("site-a", "ssh", True)
    hubs.b.registry.add_pair("site-pbx", "site-b", "site-a", "test")
    hubs.a.sync()
    hubs.b.sync()
    assert hubs.a.sessions.pairs.active("site-pbx") == "site-a"
    assert hubs.b.sessions.pairs.active("site-pbx") == "site-a"  # held by hub A
    [port] = listening(hubs.a)
    assert listening(hubs.b) == [] and hubs.b.sessions.pairs.ports("site-pbx") == {}
    assert hubs.a.sessions.pairs.ports("site-pbx") == {"ssh": port}
    switches = [e.detail for e in hubs.a.registry.audit_log() if e.action == "pair-switch"]
    assert switches == ["from none to site-a"]  # written once, by the hub holding it


# -- takeover ------------------------------------------------------------------

def test_hub_a_drops_its_session_when_the_node_comes_up_on_hub_b(hubs: TwoHubs) -> None:
    hubs.a.sync()  # the registry changes above, applied
    assert hubs.a.sessions.local("site-a") is not None
    hubs.b.registry.mark_online("site-a", "192.0.2.30")  # its tunnel is up on hub B now
    hubs.a.sync()
    hubs.clock.advance(6)  # the disconnect's grace
    hubs.site.settle()
    assert hubs.a.sessions.local("site-a") is None
    assert hubs.site.tunnel.transport is None or hubs.site.tunnel.transport.disconnecting
    node = hubs.a.registry.node("site-a")
    assert (node.online, node.hub) == (True, "hub-b")  # A's goodbye left B's claim alone




# -- per-device ports on every hub ----------------------------------------------

def test_hub_b_answers_on_the_port_of_a_node_hub_a_holds(hubs: TwoHubs) -> None:
    from twisted.internet.error import CannotListenError
    from twisted.internet.testing import StringTransport

    from hub.cluster.ports import RelayedPortFactory, RemotePorts

    def relayed() -> list[Any]:
        return [s for s in hubs.clock.tcpServers if isinstance(s[1], RelayedPortFactory)]

    port = hubs.a.registry.node("site-a").forwards["ssh"]
    hubs.a.registry.set_lease_active("site-a", "ssh", True)
    taken: set[int] = set()

    def listen(number: int, factory: Any, interface: str = "") -> Any:
        if number in taken:  # bound on this machine already (hub A itself)
            raise CannotListenError(interface, number, OSError(98, "Address already in use"))
        return hubs.clock.listenTCP(number, factory, interface=interface)

    ports = RemotePorts(hubs.view, hubs.b.sessions, "hub-b", listen)
    hubs.view.refresh()
    taken.add(port)
    ports.refresh()
    assert relayed() == []  # skipped, no error
    taken.clear()
    ports.refresh()
    [(number, factory, _, interface)] = relayed()
    assert (number, interface) == (port, "127.0.0.1")
    end = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50500))
    tcp = StringTransport()
    end.makeConnection(tcp)
    hubs.site.settle()
    assert tcp.value().startswith(b"SSH-2.0-")  # the device's sshd, through hub A
    # The node's tunnel comes up on hub B: its relayed port closes first.
    released: list[object] = []
    ports.release("SITE-A").addCallback(released.append)
    assert released == [None] and ports._open == {}
    # A dead holder's ports are not relayed.
    hubs.clock.advance(HEARTBEAT * DEAD_AFTER + 1)
    hubs.b.registry.hub_heartbeat("hub-b")
    assert ports.wanted() == set()


def test_a_peer_connection_carries_more_channels_than_an_operators(hubs: TwoHubs) -> None:
    conn = hubs.peer()
    assert isinstance(conn, PeerConnection)
    many = hubs.a.config.limits.max_channels + 8  # an operator's connection gets 64
    probes = [Probe() for _ in range(many)]
    for probe in probes:
        conn.openChannel(probe, pack_dial(DialRequest("site-a", 22, "192.0.2.10", 1)))
    hubs.site.settle()
    assert [p.outcome for p in probes] == [[p] for p in probes]
