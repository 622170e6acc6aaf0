"""The console gateway and jump host: what an operator may do through the hub.

`ssh alice@hub` with a pty gets a chooser of the nodes alice may reach;
`ssh alice:NODE@hub [command]` goes straight to NODE (`alice:NODE:PORT` to a
serial port); `direct-tcpip` to a node name (`ssh -J`, `-W`, `-L`) reaches the
node's forwarded service end to end. Every device is reached through its tunnel
with the hub's management key; nothing is contacted before the grant check.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from typing import Any

from twisted.conch.avatar import ConchUser
from twisted.conch.ssh import common, connection
from twisted.logger import Logger

from hub.access.device_client import DeviceConnection, DeviceError, connect
from hub.app.context import Hub
from hub.errors import NotFound
from hub.rules.chooser import Chooser, Entry, Quit, Select
from hub.rules.logins import OperatorLogin, may_reach
from hub.ssh.connection import ChannelRefused
from hub.ssh.wire import WireError, text, unpack_tcpip_open
from hub.store.registry import NETCONF, Node
from hub.tunnel.dial import OpenNotice
from hub.tunnel.live import NodeTunnel
from hub.tunnel.relay import RelayChannel

log = Logger()


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t))


class OperatorAvatar(ConchUser):
    """An operator logged in to the hub."""

    def __init__(self, hub: Hub, login: OperatorLogin, peer: Callable[[], str]) -> None:
        ConchUser.__init__(self)
        self.hub = hub
        self.login = login
        self._peer = peer
        self.conn: Any = None

    @property
    def actor(self) -> str:
        return f"{self.login.user}@{self._peer()}"

    def logout(self) -> None:
        pass

    def resolve(self, name: str) -> tuple[Node, NodeTunnel]:
        """The node and live tunnel `name` stands for, if this operator may reach it."""
        node = self.resolve_node(name)
        return node, self.tunnel_of(node)

    def tunnel_of(self, node: Node) -> NodeTunnel:
        """The live call-home tunnel of a (non-NETCONF) node."""
        if node.kind == NETCONF:
            raise ChannelRefused(connection.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                 f"node {node.name} is a NETCONF device: use "
                                 f"ssh -s {self.login.user}:{node.name}@hub netconf")
        tunnel = self.hub.sessions.get(node.name)
        if tunnel is None:
            raise ChannelRefused(connection.OPEN_CONNECT_FAILED, f"node {node.name} is offline")
        return tunnel

    def resolve_netconf(self, node: Node) -> Any:
        """The live call-home session of a NETCONF node (see `netconf.NetconfSessions`)."""
        session = self.hub.netconf.get(node.name) if self.hub.netconf is not None else None
        if session is None:
            raise ChannelRefused(connection.OPEN_CONNECT_FAILED, f"node {node.name} is offline")
        return session

    def resolve_node(self, name: str) -> Node:
        """The approved node `name` stands for, if this operator may reach it."""
        unknown = ChannelRefused(connection.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                 f"node {name!r} does not exist or you may not reach it")
        try:
            user = self.hub.registry.user(self.login.user)
            node = self.hub.registry.node(name)
        except NotFound:
            raise unknown from None
        if not may_reach(user.allow, node.name):
            log.info("{actor}: not granted node {node}", actor=self.actor, node=node.name)
            raise unknown
        if node.state != "approved":
            raise ChannelRefused(connection.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                 f"node {node.name} is {node.state}, not approved")
        return node

    def reachable(self) -> list[Entry]:
        user = self.hub.registry.user(self.login.user)
        return [Entry(n.name, n.online) for n in self.hub.registry.nodes()
                if n.state == "approved" and may_reach(user.allow, n.name)]

    def lookupChannel(self, channel_type: bytes, window: int, max_packet: int,
                      data: bytes) -> Any:
        if channel_type == b"session":
            return GatewaySession(self, remoteWindow=window, remoteMaxPacket=max_packet)
        if channel_type == b"direct-tcpip":
            return self.jump(data, window, max_packet)
        raise ChannelRefused(connection.OPEN_ADMINISTRATIVELY_PROHIBITED,
                             f"channel type {channel_type.decode('ascii', 'replace')} "
                             "is not offered by the gateway")

    def jump(self, data: bytes, window: int, max_packet: int) -> Any:
        try:
            request = unpack_tcpip_open(data)
            name = text(request.host, "host")
        except WireError as e:
            raise ChannelRefused(connection.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                 f"malformed direct-tcpip request: {e}") from None
        port = request.port
        node, tunnel = self.resolve(name)
        operator = RelayChannel(b"direct-tcpip", remoteWindow=window,
                                remoteMaxPacket=max_packet)
        device = JumpDeviceChannel()
        operator.relay_peer, device.relay_peer = device, operator
        started = self.hub.clock.seconds()

        def audit() -> None:
            self.hub.registry.audit(
                self.actor, "jump", node.name,
                f"port {port} start {_stamp(started)} end {_stamp(self.hub.clock.seconds())}"
                f" bytes to-device {operator.relay_bytes_in} from-device {device.relay_bytes_in}")
        opened = tunnel.dial(port, device, (request.origin, request.origin_port))
        if not opened.called:  # a port the node does not forward is refused at once
            operator.on_close = audit
            log.info("{actor}: jump to {node}:{port}", actor=self.actor, node=node.name,
                     port=port)
        return opened.addCallback(lambda _: operator)

    def gotGlobalRequest(self, request_type: bytes, data: bytes) -> Any:
        return 0


class JumpDeviceChannel(OpenNotice, RelayChannel):
    """The device end of a jump-host relay; the operator's open waits for it."""

    def __init__(self) -> None:
        RelayChannel.__init__(self, b"forwarded-tcpip")

    def channelOpen(self, specificData: bytes) -> None:
        self.notify_open()

    def openFailed(self, reason: Any) -> None:
        self.notify_failed(reason)


class DeviceSession(RelayChannel):
    """The device end of a gateway session: pty, shell/exec, exit status."""

    def __init__(self, operator: GatewaySession, request: tuple[bytes, bytes]) -> None:
        RelayChannel.__init__(self, b"session")
        self.operator = operator
        self.request = request

    def channelOpen(self, specificData: bytes) -> None:
        if self.operator.pty is not None:
            self.conn.sendRequest(self, b"pty-req", self.operator.pty, wantReply=1
                                  ).addErrback(lambda f: None)
        kind, data = self.request
        self.conn.sendRequest(self, kind, data, wantReply=1).addErrback(
            lambda f: self.operator.fail(f"the device refused the {kind.decode()} request"))
        self.operator.flush_early(self)

    def openFailed(self, reason: Any) -> None:
        self.operator.fail(f"the device refused a session: {reason}")

    def requestReceived(self, requestType: bytes, data: bytes) -> int:
        if requestType in (b"exit-status", b"exit-signal"):
            op = self.operator
            op.exit_sent = True
            if not op.chooser_mode:
                op.after_flush(lambda: op.conn.sendRequest(op, requestType, data)
                               if op.relay_open() else None)
            return 1
        return 0

    def eofReceived(self) -> None:
        if not self.operator.chooser_mode:
            RelayChannel.eofReceived(self)

    def closed(self) -> None:
        self.operator.device_closed(self)


class GatewaySession(RelayChannel):
    """An operator's session channel: the chooser, or a device session relayed."""

    data_views = False  # the chooser keeps what it is given

    def __init__(self, avatar: OperatorAvatar, **kw: Any) -> None:
        RelayChannel.__init__(self, b"session", **kw)
        self.owner = avatar
        self.pty: bytes | None = None
        self.chooser: Chooser | None = None
        self.chooser_mode = False
        self.device_conn: DeviceConnection | None = None
        self.exit_sent = False
        self._audit: tuple[str, str, float] | None = None
        self._last_node: str | None = None
        # Operator input that came while the device session was being set up
        # (bounded by the channel window, which is granted only once it is sent).
        self._early: list[bytes] | None = None
        self._early_eof = False

    # -- requests from the operator ----------------------------------------

    def requestReceived(self, requestType: bytes, data: bytes) -> int:
        peer = self.relay_peer
        if requestType == b"pty-req":
            self.pty = data
            return 1
        if requestType in (b"window-change", b"signal"):
            if peer is not None and peer.relay_open():
                peer.conn.sendRequest(peer, requestType, data)
            return 1
        if requestType in (b"shell", b"exec", b"subsystem"):
            self._early = []  # input may follow at once; hold it for the device
            self.owner.hub.clock.callLater(0, self.start, requestType, data)
            return 1
        return 0

    def start(self, kind: bytes, data: bytes) -> None:
        login = self.owner.login
        if login.node is not None:
            self.connect(login.node, kind, data)
        elif kind == b"shell" and self.pty is not None:
            self._early = None
            self.chooser_mode = True
            self.show_chooser(b"")
        else:
            self.fail(f"no node selected: use ssh {login.user}:NODE@hub, "
                      "or a terminal for the chooser")

    # -- the chooser -------------------------------------------------------

    def show_chooser(self, before: bytes) -> None:
        self.chooser = Chooser(self.owner.reachable())
        self.write(before + self.chooser.menu())

    def dataReceived(self, data: bytes) -> None:
        if self._early is not None:
            self._early.append(data)
            return
        if self.chooser is None:
            RelayChannel.dataReceived(self, data)
            return
        echo, decision = self.chooser.feed(data)
        self.relay_received(len(data))
        if echo:
            self.write(echo)
        if isinstance(decision, Quit):
            self.chooser = None
            self.conn.sendRequest(self, b"exit-status", struct.pack(">L", 0))
            self.loseConnection()
        elif isinstance(decision, Select):
            self.chooser = None
            self.connect(decision.node, b"shell", b"")

    # -- the device session ------------------------------------------------

    def eofReceived(self) -> None:
        if self._early is not None:
            self._early_eof = True
            return
        RelayChannel.eofReceived(self)

    def flush_early(self, device: DeviceSession) -> None:
        early, self._early = self._early, None
        data = b"".join(early or [])
        if data:
            device.write(data)
            self.relay_received(len(data))
        if self._early_eof:
            self._early_eof = False
            RelayChannel.eofReceived(self)

    def connect(self, name: str, kind: bytes, data: bytes) -> None:
        hub = self.owner.hub
        if self._early is None:
            self._early = []
        try:
            node = self.owner.resolve_node(name)
            if node.kind == NETCONF:
                self.connect_netconf(node, kind, data)
                return
            tunnel = self.owner.tunnel_of(node)
        except ChannelRefused as e:
            self.fail(e.text)
            return
        if node.host_key is None:
            self.fail(f"node {node.name} is not enrolled: run callhomehub approve or enroll")
            return
        user, request = node.device_user, (kind, data)
        port = self.owner.login.port if self.chooser_mode is False else None
        label = {b"shell": "shell", b"exec": "exec", b"subsystem": "subsystem"}[kind]
        if port is not None:
            label = f"console {port}"
            if node.console:
                request = (b"exec", common.NS(node.console.replace("{port}", port).encode()))
            else:
                user = f"{user}:{port}"
        log.info("{actor}: {kind} on {node}", actor=self.owner.actor, kind=label, node=node.name)
        self._audit = (node.name, label, hub.clock.seconds())
        ready, _client = connect(tunnel, user, hub.keys.mgmt, node.host_key, clock=hub.clock)

        def opened(conn: DeviceConnection) -> None:
            if not self.relay_open():
                conn.close()
                return
            self.device_conn = conn
            device = DeviceSession(self, request)
            device.relay_peer, self.relay_peer = self, device
            conn.openChannel(device)

        def failed(f: Any) -> None:
            reason = f.value if isinstance(f.value, DeviceError) else f.getErrorMessage()
            log.warn("{actor}: cannot reach {node}: {why}", actor=self.owner.actor,
                     node=node.name, why=str(reason))
            self.fail(f"cannot log in to {node.name}: {reason}")

        ready.addCallbacks(opened, failed)

    def connect_netconf(self, node: Node, kind: bytes, data: bytes) -> None:
        """A NETCONF node: a new `netconf` subsystem channel on its call-home session."""
        subsystem = common.getNS(data)[0] if kind == b"subsystem" and data else b""
        if subsystem != b"netconf" or self.owner.login.port is not None:
            self.fail(f"node {node.name} is a NETCONF device: only its netconf subsystem is "
                      f"offered (ssh -s {self.owner.login.user}:{node.name}@hub netconf)")
            return
        session = self.owner.resolve_netconf(node)
        log.info("{actor}: netconf on {node}", actor=self.owner.actor, node=node.name)
        self._audit = (node.name, "netconf", self.owner.hub.clock.seconds())
        device = DeviceSession(self, (kind, data))
        device.relay_peer, self.relay_peer = self, device
        session.conn.openChannel(device)

    def fail(self, message: str) -> None:
        self._early = None
        if not self.relay_open():
            return
        self.writeExtended(connection.EXTENDED_DATA_STDERR, f"callhomehub: {message}\r\n".encode())
        if self.chooser_mode:
            self._close_device()
            self.show_chooser(b"")
            return
        self.after_flush(lambda: self.conn.sendRequest(self, b"exit-status",
                                                       struct.pack(">L", 1)))
        self.after_flush(self.loseConnection)

    def device_closed(self, device: DeviceSession) -> None:
        self._early = None
        self._record()
        self.relay_peer = None
        self._close_device()
        if not self.relay_open():
            return
        if self.chooser_mode:
            name = self._last_node or "the node"
            self.after_flush(lambda: self.show_chooser(
                f"\r\nConnection to {name} closed.\r\n".encode()))
            return
        if not self.exit_sent:
            self.after_flush(lambda: self.conn.sendRequest(
                self, b"exit-status", struct.pack(">L", 255)))
        self.after_flush(self.loseConnection)

    def _record(self) -> None:
        if self._audit is None:
            return
        node, kind, started = self._audit
        self._audit = None
        self._last_node = node
        peer = self.relay_peer
        hub = self.owner.hub
        hub.registry.audit(
            self.owner.actor, "gateway", node,
            f"{kind} start {_stamp(started)} end {_stamp(hub.clock.seconds())}"
            f" bytes to-device {self.relay_bytes_in}"
            f" from-device {peer.relay_bytes_in if peer is not None else 0}")

    def _close_device(self) -> None:
        if self.device_conn is not None:
            self.device_conn.close()
            self.device_conn = None

    def closed(self) -> None:
        peer = self.relay_peer
        if peer is not None and peer.relay_open():
            peer.loseConnection()
        self._record()
        self._close_device()
